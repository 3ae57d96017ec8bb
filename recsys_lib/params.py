"""Parameter overrides checked before any notebook kernel starts.

`--set mf.epochz=3` or `--set mf.epochs=abc` used to be accepted and fail (or silently do
nothing) only when a notebook read them, minutes later. `check_overrides` refuses them at once,
with one line naming the key and what is valid:
- the key must exist in the run's parameters or be a field of the section's config dataclass
  (``mf.dim`` is a field of `MFConfig` even where params/ does not list it);
- the value must have the type of what it replaces (a number for a number, an integer for an
  integer, true/false for a flag);
- sizes are at least 1, learning rates and regularisation are above 0, shares lie in (0, 1).
"""
from __future__ import annotations

from dataclasses import fields
from numbers import Number
from typing import Any

from .config import parse_override
from .errors import ConfigError
from .models.registry import REGISTRY
from .protocol.evaluate import EvalConfig
from .stage2.leakage import AuditConfig
from .stage2.rerankers import CONFIGS as RERANKER_CONFIGS
from .stage2.section import RerankerSection

#: params section (dotted for a sub-section) -> the config dataclass whose fields it may set
SECTION_CONFIGS = {**{spec.section or name: spec.config for name, spec in REGISTRY.items() if spec.config_name},
                   "eval": EvalConfig, "audit": AuditConfig, "reranker": RerankerSection,
                   **{f"reranker.{kind}": cls for kind, cls in RERANKER_CONFIGS.items()}}
AT_LEAST_ONE = {"epochs", "batch_size", "dim", "dim_gmf", "dim_mlp", "factors", "iterations", "n_estimators",
                "folds", "candidate_k", "users_per_batch", "history_len", "num_leaves", "emb_dim",
                "early_stopping_rounds", "n_bootstrap", "batch_users", "core", "train_core", "eval_core",
                "n_tags", "year_bucket", "num_threads", "lstm_hidden", "side_dim", "nproc", "nnodes",
                "steps", "max_len", "blocks", "heads", "history", "window", "max_users"}
AT_LEAST_ZERO = {"patience", "n_neg", "negatives", "n_uniform_neg", "max_edge_steps", "window_days", "seed",
                 "dropout", "weight_decay", "l2", "min_child_samples"}
ABOVE_ZERO = {"decay", "gap_decay", "lr", "max_lr", "learning_rate", "reg", "regularization", "alpha", "temperature",
              "timeout_minutes"}
WORDS = {"nproc": ("auto",)}                 # keys that take a word besides a number
RUN_FIELDS = {"seed", "device", "progress", "verbose"}   # config fields the run sets, never params/
SHARES = {"held_out_share", "label_window", "stale_lists", "train_frac", "valid_frac"}


def _config_fields(section: str) -> set[str]:
    return {f.name for f in fields(SECTION_CONFIGS[section])} if section in SECTION_CONFIGS else set()


def _check_value(key: str, leaf: str, old: Any, new: Any) -> None:
    def fail(why: str) -> None:
        raise ConfigError(f"--set {key}={new!r}: {why}")

    is_num = isinstance(new, Number) and not isinstance(new, bool)
    if new in WORDS.get(leaf, ()) or old in WORDS.get(leaf, ()) and is_num:
        old = None                                   # dist.nproc: auto <-> a number
    if isinstance(old, bool) and not isinstance(new, bool):
        fail("expected true or false")
    if isinstance(old, Number) and not isinstance(old, bool) and not is_num and new is not None:
        fail(f"expected a number (it replaces {old!r})")
    if isinstance(old, int) and not isinstance(old, bool) and is_num and float(new) != int(new):
        fail(f"expected an integer (it replaces {old!r})")
    if not is_num:
        return
    if leaf in AT_LEAST_ONE and new < 1:
        fail("must be at least 1")
    if leaf in AT_LEAST_ZERO and new < 0:
        fail("must be 0 or more")
    if leaf in ABOVE_ZERO and new <= 0:
        fail("must be above 0")
    if leaf in SHARES and not 0 < new < 1:
        fail("must lie strictly between 0 and 1")


def check_overrides(params: dict, overrides: list[str] | None) -> None:
    """Raise ConfigError (one line) for the first override that names no known parameter or gives
    a value of the wrong type or range. ``params`` are the run's parameters *before* overrides."""
    for text in overrides or []:
        path, value = parse_override(text)
        key = ".".join(path)
        node: Any = params
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            known = set(node) if isinstance(node, dict) else set()
            allowed = known | _config_fields(".".join(path[:depth])) if depth >= 1 else known
            if part not in allowed:
                where = ".".join(path[:depth]) or "the parameters"
                raise ConfigError(f"--set {key}: unknown parameter {part!r} in {where}; valid: "
                                  f"{', '.join(sorted(map(str, allowed))) or '(none)'}")
            node = node.get(part) if isinstance(node, dict) else None
            if not last and node is not None and not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {'.'.join(path[:depth + 1])} is a value, not a section")
        _check_value(key, path[-1], node, value)


def describe(profile: str, dataset: str | None = None, overrides: list[str] | None = None) -> list[tuple[str, Any, str]]:
    """Every resolved parameter of a run as (dotted key, value, where it came from), in the params'
    order: the yaml layer or ``--set`` that set it, or ``default (MFConfig)`` for a field of a
    section's config dataclass that no layer sets (the value the code uses). Fields the run itself
    fills in (``RUN_FIELDS``: its seed and device, progress output) are left out."""
    from dataclasses import MISSING

    from .config import _leaves, load_params, param_origins
    if dataset is not None:
        check_overrides(load_params(profile, dataset), overrides)
    params = load_params(profile, dataset, overrides)
    origin = param_origins(profile, dataset, overrides)
    rows = [(".".join(path), value, origin[path]) for path, value in _leaves(params)]
    for section, cls in SECTION_CONFIGS.items():
        node: Any = params
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        for f in fields(cls):
            if isinstance(node, dict) and f.name not in node and f.init and f.name not in RUN_FIELDS | {"variant"}:
                default = f.default if f.default is not MISSING else (
                    f.default_factory() if f.default_factory is not MISSING else MISSING)
                if default is not MISSING:
                    rows.append((f"{section}.{f.name}", default, f"default ({cls.__name__})"))
    order = {k: i for i, k in enumerate(dict.fromkeys(key.split(".")[0] for key, _, _ in rows))}
    return sorted(rows, key=lambda r: order[r[0].split(".")[0]])     # stable: defaults after their section
