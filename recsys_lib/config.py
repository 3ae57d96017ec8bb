"""Paths, parameters, seeding and device: every path derives from here, never from a notebook's cwd.

``RECSYS_DATA_DIR`` moves the data folder (tests point it at a temporary directory);
``MOVIELENS_MIRROR`` names a local folder holding ``NAME.zip`` or ``NAME/`` for offline use;
``RECSYS_TORCH_THREADS`` fixes torch's intra-op threads in every process of a run (`torch_threads`).
"""
from __future__ import annotations

import copy
import json
import os
import platform
import random
import secrets
import subprocess
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from .errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = PROJECT_ROOT / "params"
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"


def notebooks_dir() -> Path:
    """The pipeline's notebooks; ``RECSYS_NOTEBOOKS_DIR`` points elsewhere (tests run a subset)."""
    return Path(os.environ.get("RECSYS_NOTEBOOKS_DIR", NOTEBOOKS_DIR)).resolve()


def data_dir() -> Path:
    """Root of raw/processed/runs; read at call time so tests can redirect it."""
    return Path(os.environ.get("RECSYS_DATA_DIR", PROJECT_ROOT / "data")).resolve()


def raw_dir(dataset: str | None = None) -> Path:
    root = data_dir() / "raw"
    return root / dataset if dataset else root


def processed_dir(dataset: str | None = None) -> Path:
    root = data_dir() / "processed"
    return root / dataset if dataset else root


def runs_dir(dataset: str | None = None) -> Path:
    root = data_dir() / "runs"
    return root / dataset if dataset else root


def reports_dir(dataset: str | None = None) -> Path:
    root = Path(os.environ.get("RECSYS_REPORTS_DIR", PROJECT_ROOT / "reports")).resolve()
    return root / dataset if dataset else root


def mirror_dir(mirror: str | os.PathLike | None = None) -> Path | None:
    """The local MovieLens mirror: the argument if given, else ``$MOVIELENS_MIRROR``, else None."""
    value = mirror if mirror is not None else os.environ.get("MOVIELENS_MIRROR")
    return Path(value).expanduser().resolve() if value else None


# ---------------------------------------------------------------- parameters
#: keys whose value is one whole thing: a later layer's ``grid`` is the whole search it names, never
#: merged axis by axis over an earlier layer's (lists, ``variants`` among them, always replace)
REPLACED_KEYS = frozenset({"grid"})


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in REPLACED_KEYS:
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"mf.epochs=3"`` -> (["mf", "epochs"], 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like KEY=VALUE, e.g. mf.epochs=3")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    return key.strip().split("."), yaml.safe_load(raw)


def _override_items(overrides: list[str] | dict | None) -> list[tuple[list[str], Any]]:
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    return [(key.split(".") if isinstance(key, str) else list(key), value) for key, value in items]


def apply_overrides(params: dict, overrides: list[str] | dict | None) -> dict:
    out = copy.deepcopy(params)
    for path, value in _override_items(overrides):
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
        node[path[-1]] = value
    return out


def _profile_chain(profile: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """(file, contents) of ``params/<profile>.yaml`` and every profile it ``extends``, base first."""
    path = PARAMS_DIR / f"{profile}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml") if p.stem != "datasets")
        raise ConfigError(f"unknown profile {profile!r}: no {path}; valid profiles: {valid}")
    raw = yaml.safe_load(path.read_text()) or {}
    parent = raw.pop("extends", None)
    if parent in (*seen, profile):
        raise ConfigError(f"params/{profile}.yaml extends {parent!r}, which extends it back")
    chain = _profile_chain(parent, (*seen, profile)) if parent else []
    return [*chain, (f"params/{profile}.yaml", raw)]


def param_layers(profile: str = "full", dataset: str | None = None) -> list[tuple[str, dict]]:
    """The layers a run's parameters are merged from, first to last, each named by where it lives:
    the profiles ``extends`` chains (base first), ``params/datasets.yaml``'s ``default`` and the
    dataset's own section, then the profile's ``datasets.<name>`` section. A profile's ``datasets``
    adjustments are its own, never inherited: they are the budget caps of that profile's runs."""
    chain = _profile_chain(profile)
    layers = [(name, {k: v for k, v in raw.items() if k != "datasets"}) for name, raw in chain]
    if dataset is not None:
        table = yaml.safe_load((PARAMS_DIR / "datasets.yaml").read_text()) or {}
        family = "synthetic" if dataset.startswith("synthetic") and dataset not in table else dataset
        per_profile = chain[-1][1].get("datasets") or {}
        layers += [("params/datasets.yaml: default", table.get("default") or {}),
                   (f"params/datasets.yaml: {family}", table.get(family) or {}),
                   (f"{chain[-1][0]}: datasets.{dataset}", per_profile.get(dataset) or {}),
                   ("the dataset", {"dataset": dataset})]
    return [*layers, ("the profile", {"profile": profile})]


def load_params(profile: str = "full", dataset: str | None = None,
                overrides: list[str] | dict | None = None) -> dict:
    """Parameters of a run: the layers of ``param_layers`` merged in order (dicts key by key, a
    ``grid`` or a list replaced whole), then ``overrides`` ("section.key=value" strings or a
    dotted-key dict). ``python -m recsys_lib params`` prints where each value came from."""
    params: dict = {}
    for _, layer in param_layers(profile, dataset):
        params = _deep_merge(params, layer)
    return apply_overrides(params, overrides)


def _leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in _leaves(v, (*path, str(k)))]
    return [(path, node)]


def param_origins(profile: str = "full", dataset: str | None = None,
                  overrides: list[str] | dict | None = None) -> dict[tuple[str, ...], str]:
    """For every leaf of ``load_params(profile, dataset, overrides)``, the layer that set it."""
    origin: dict[tuple[str, ...], str] = {}

    def visit(layer: dict, name: str, path: tuple[str, ...]) -> None:
        for key, value in layer.items():
            p = (*path, str(key))
            merged_into = any(o[:len(p)] == p and len(o) > len(p) for o in origin)   # a section already
            if isinstance(value, dict) and key not in REPLACED_KEYS and (value or merged_into):
                origin.pop(p, None)
                visit(value, name, p)
                continue
            for old in [o for o in origin if o[:len(p)] == p]:     # a replaced value's old leaves go
                del origin[old]
            for leaf, _ in _leaves(value, p):
                origin[leaf] = name
    for name, layer in param_layers(profile, dataset):
        visit(layer, name, ())
    for path, value in _override_items(overrides):
        visit({path[-1]: value}, "--set", tuple(path[:-1]))
    return origin


# ---------------------------------------------------------------- runtime
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


THREADS_ENV = "RECSYS_TORCH_THREADS"
LGBM_THREADS_ENV = "RECSYS_LGBM_THREADS"


def lgbm_threads(configured: int) -> int:
    """LightGBM's thread count: ``$RECSYS_LGBM_THREADS`` (a positive integer) when set, else the
    params' ``reranker.lgbm.num_threads``. Why a variable beside the parameter: a machine running
    two jobs side by side (CI's `make test` beside `make test-demo`) gives each one core without
    editing params. The booster is trained with ``deterministic`` and ``force_row_wise``, so it
    is the same tree for tree under any thread count (tests/unit/test_lgbm_threads.py)."""
    value = os.environ.get(LGBM_THREADS_ENV, "").strip()
    if not value:
        return int(configured)
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{LGBM_THREADS_ENV}={value!r}: expected a positive integer (LightGBM threads), or unset")
    return int(value)


def torch_threads() -> int:
    """Apply ``$RECSYS_TORCH_THREADS`` (a positive integer) to torch's intra-op thread count, and
    return the count in force. Unset or empty: torch's own default (the cores it sees).

    Why: float sums are reduced in another order with another thread count, so the last bits of
    a training move and small trainings end elsewhere. One machine and one setting give the same
    numbers run after run; ``RECSYS_TORCH_THREADS=1`` stands in for another machine's CPU (the
    test suite passes under both). The pipeline's kernels and torchrun workers inherit the
    variable, and `experiment.Run.open` and the worker apply it."""
    import torch
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"{THREADS_ENV}={value!r}: expected a positive integer (torch threads), or unset")
        if torch.get_num_threads() != int(value):
            torch.set_num_threads(int(value))
    return torch.get_num_threads()


def resolve_device(name: str = "auto"):
    """``auto`` picks cuda, then mps, then cpu; anything else is passed to ``torch.device``."""
    import torch
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"DEVICE={name!r} is not a torch device; use auto, cpu, cuda or mps") from exc


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    names = ["torch", "numpy", "pandas", "pyarrow", "scipy", "papermill", "nbconvert", "seaborn"]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is renamed onto ``path``.

    Why: a reader (the next notebook, a cache check) must never see a half-written file, and a
    writer that raises must leave neither a partial ``path`` nor its temporary file behind. The
    temporary name keeps the suffix (``np.savez`` appends ``.npz`` to a name without it) and sits
    in the same folder (``os.replace`` is atomic only within one file system), and is unique per
    writer (PID and a random suffix), so two writers of one file never rename each other's::

        with atomic_write(path) as tmp:
            df.to_parquet(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")   # unique per writer
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write strict JSON atomically (`atomic_write`), so a crash leaves no half file: NaN and
    infinities become null (bare NaN is not JSON, and strict parsers refuse it)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(finite_json(obj), indent=2, default=_json_default, allow_nan=False))
    return Path(path)


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (python or numpy) replaced by None, recursively."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    if is_dataclass(obj) and not isinstance(obj, type):
        return finite_json(asdict(obj))
    return obj


#: modules whose classes files of earlier versions pickled (a run's ``data.pt`` holds a SplitData),
#: under their names since the move into stage sub-packages: such files still load
MOVED_MODULES = {"recsys_lib.features": "recsys_lib.protocol.splitdata",
                 "recsys_lib.evaluate": "recsys_lib.protocol.evaluate",
                 "recsys_lib.train": "recsys_lib.models.train",
                 "recsys_lib.models.reranker": "recsys_lib.stage2.rerankers"}


def _pickle_module():
    """``pickle`` with an Unpickler that finds classes under their moved modules (`MOVED_MODULES`)."""
    import pickle
    import types

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            return super().find_class(MOVED_MODULES.get(module, module), name)

    return types.SimpleNamespace(**{k: getattr(pickle, k) for k in ("load", "loads", "UnpicklingError")},
                                 Unpickler=Unpickler, __name__="pickle")


def load_torch(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a file this project wrote; a truncated or corrupt file raises
    PipelineError naming it. Rerunning the pipeline reruns the notebook that writes it, because
    the file no longer matches that notebook's completion record. Files pickled before a module
    moved load too (`MOVED_MODULES`)."""
    import pickle
    import zipfile

    import torch
    from .errors import PipelineError
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_pickle_module())
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise PipelineError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}); delete it "
                            f"and rerun the same pipeline command: the notebook that writes it runs "
                            f"again") from exc


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename folder ``tmp`` to ``target`` (same file system); an existing target is moved aside
    first and removed after, so readers never see a half-written folder."""
    import shutil
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def _json_default(obj: Any):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path) or type(obj).__name__ == "device":
        return str(obj)
    if is_dataclass(obj):
        return asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
