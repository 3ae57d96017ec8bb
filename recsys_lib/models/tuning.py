"""Hyper-parameter search on validation, with the same small effort for every model.

docs/PROTOCOL.md: every model, baselines included, is tuned on validation with comparable effort, and
the report says what was searched. ``grid_search`` tries each configuration, fits it, scores it
with a validation callback built *before* fitting (recsys_lib.protocol.evaluate.Evaluator) and keeps the
best; its table (one row per configuration: parameters, validation score, fit seconds) is what
the report shows. ``tune_model`` does it for one model class from a ``params/<profile>.yaml``
section, fitting inside ``guard.fitting`` so a fit that reads validation or test rows fails.

A notebook's whole tuning step::

    validate = tuning.validator(Evaluator(data, "valid", ks=(10,)))
    model, table = mf.tune(data, params["mf"], validate, device=DEVICE, seed=SEED)
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import math
import time
from typing import Any, Callable, Iterable

import pandas as pd

from ..protocol import guard
from ..config import seed_everything
from ..errors import ConfigError
from ..protocol.evaluate import HEADLINE

SEARCH_KEYS = ("grid", "max_edge_steps")     # params keys that steer the search, not the model


def validator(evaluator, metric: str = HEADLINE, full_lists: bool = False) -> Callable[[Any], float]:
    """``validate(scorer) -> float``: ``metric`` of ``scorer`` on the evaluator's period, from
    the head of the ranked lists the metric reads (`Evaluator.metric`; ``full_lists`` ranks the
    evaluator's longest lists, for scores with exact ties).

    Build the evaluator (e.g. ``Evaluator(data, "valid", ks=(10,))``) outside any fitting context:
    it reads the period's labels once, at construction; calling this callback reads no rows."""
    def validate(scorer) -> float:
        return evaluator.metric(scorer, metric, full_lists)
    validate.evaluator = evaluator  # type: ignore[attr-defined]
    validate.full_lists = full_lists  # type: ignore[attr-defined]
    return validate


def expand_grid(grid: dict[str, list] | Iterable[dict] | None) -> list[dict]:
    """Every combination of a ``{name: [values]}`` grid (in key order), or a given list of dicts.
    An empty or missing grid is one configuration with no overrides."""
    if grid is None:
        return [{}]
    if isinstance(grid, dict):
        if not grid:
            return [{}]
        keys = list(grid)
        for k in keys:
            if not isinstance(grid[k], (list, tuple)):
                raise ConfigError(f"grid[{k!r}] must be a list of values, got {grid[k]!r}")
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    combos = [dict(c) for c in grid]
    return combos or [{}]


def grid_search(build: Callable[[dict], Any], fit: Callable[[Any], dict],
                grid: dict[str, list] | Iterable[dict] | None,
                validate: Callable[[Any], float], verbose: bool = True, extend: bool = True,
                max_steps: int = 4) -> tuple[Any, dict, pd.DataFrame]:
    """Fit ``build(params)`` for every configuration of ``grid`` and keep the best on validation;
    then, with ``extend``, push every numeric axis whose best value sits on the grid's edge further
    out until validation stops improving (``extend_axes``).

    ``fit(model) -> dict`` trains the model (it may early-stop on the same ``validate``);
    ``validate(model) -> float`` is evaluated once more after fitting (higher is better), unless
    the fit reports a finite ``best_metric``: the model early-stopped on ``validate`` and holds
    the state that scored it (train.fit_loop restores it), so scoring it again gives that number.
    Returns ``(best_model, best_params, table)``: one row per configuration with its parameters,
    ``valid_metric``, ``fit_seconds``, ``best_epoch`` (when the fit reports one), ``stage``
    (``grid`` or ``edge``) and ``best``."""
    rows: list[dict] = []
    state = {"model": None, "params": None, "score": float("-inf")}

    def run(params: dict, stage: str, label: str) -> float:
        model = build(params)
        t0 = time.perf_counter()
        info = fit(model) or {}
        fit_seconds = time.perf_counter() - t0
        score = float(info.get("best_metric", float("nan")))
        if not math.isfinite(score):
            score = float(validate(model))
        row = {**{k: _cell(v) for k, v in params.items()}, "valid_metric": score, "fit_seconds": fit_seconds}
        if "best_epoch" in info:
            row["best_epoch"] = info["best_epoch"]
        row["stage"] = stage
        rows.append(row)
        if verbose:
            print(f"{label} {params}: valid {score:.4f} ({fit_seconds:.1f}s)", flush=True)
        if score > state["score"] or state["model"] is None:
            state.update(model=model, params=dict(params), score=score)
        else:
            del model
            gc.collect()
        return score

    combos = expand_grid(grid)
    for n, params in enumerate(combos):
        run(params, "grid", f"config {n + 1}/{len(combos)}")
    if extend and isinstance(grid, dict):
        extend_axes(grid, rows, state, run, max_steps)
    table = pd.DataFrame(rows)
    table["best"] = False
    if len(table):
        table.loc[table["valid_metric"].idxmax(), "best"] = True
    return state["model"], state["params"], table


def numeric_axes(grid: dict[str, list] | None) -> list[str]:
    """Grid axes that are searched along a numeric scale: two or more distinct positive numbers
    (booleans, strings, None and lists are categorical: nothing lies beyond their edge)."""
    axes = []
    for name, values in (grid or {}).items():
        if not isinstance(values, (list, tuple)):
            continue
        numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numeric) == len(values) and len(set(numeric)) >= 2 and min(numeric) > 0:
            axes.append(name)
    return axes


def step_out(values: list[float], edge: float, up: bool) -> float | None:
    """The next value beyond ``edge`` on a log scale: the ratio between the edge and its nearest
    tried neighbour, applied once more (200, 1000 -> 5000; 64, 128 -> 256). Integers stay integers
    (and at least 1); an integer step that rounds onto the edge moves by one instead; None when
    no value lies beyond (an integer axis at 1)."""
    inner = sorted(v for v in values if (v < edge if up else v > edge))
    neighbour = inner[-1] if up else inner[0]
    ratio = edge / neighbour if up else neighbour / edge                # > 1
    new = float(f"{edge * ratio if up else edge / ratio:.6g}")          # 0.009, not 0.009000000000000001
    if all(isinstance(v, int) for v in values):
        new = int(round(new))
        if new == edge:
            new = edge + (1 if up else -1)
        new = max(new, 1)
        if new == edge:
            return None                                                 # integers stop at 1
    return new


def extend_axes(grid: dict[str, list], rows: list[dict], state: dict,
                run: Callable[[dict, str, str], float], max_steps: int = 4) -> None:
    """Edge extension (docs/PROTOCOL.md: a best value on the edge of its grid is searched further out
    along that axis until validation stops improving). Each round looks at every numeric axis of
    the current best configuration; where its value is the smallest or largest tried, the next value
    out (``step_out``) is fitted with the other parameters held at the best. Rounds go on while a
    step improves validation, at most ``max_steps`` steps per axis and direction; a best value still
    on an edge afterwards is reported as such by ``summarize``."""
    axes = numeric_axes(grid)
    steps = {(a, up): 0 for a in axes for up in (False, True)}
    improved = True
    while improved:
        improved = False
        for axis in axes:
            best = state["params"]
            tried = sorted({r[axis] for r in rows if axis in r})
            value = best[axis]
            if value not in (tried[0], tried[-1]):
                continue                                                # interior: done with this axis
            up = value == tried[-1]
            if steps[(axis, up)] >= max_steps:
                continue                                                # budget cap: summarize flags it
            steps[(axis, up)] += 1
            new = step_out(tried, value, up)
            if new is None:
                continue
            before = state["score"]
            run({**best, axis: new}, "edge", f"edge step {axis}={new}")
            improved |= state["score"] > before


#: Config fields that are not hyper-parameters: never listed as held ("not searched"). Every other
#: field is listed (in doubt, it is: a stopping patience, a validation interval, a batch size, a loss).
NOT_HYPERPARAMETERS = frozenset({
    "epochs",                            # a maximum under early stopping: flagged as the epoch cap
    "device", "seed", "progress", "verbose", "log_every_epoch",  # where it runs, its draws, its printing
    "name", "members",                   # labels; the blend's members are listed in its params
    "k_eval",                            # the re-ranker's selection metric (held-out nDCG@k)
    "float64_max_items", "gram_chunk",   # EASE: float precision and chunking of the same solve
    "score_chunk", "num_threads", "amp_bf16",  # scoring chunks, threads, bf16 autocast: speed
})

#: Held fields a configuration never reads: field -> (the field that decides, its values under which
#: the field is unused). A config without the deciding field reads the field (MF's n_neg).
UNREAD = {
    "n_neg": ("loss", ("full",)),                      # SASRec: full cross-entropy samples nothing
    "negatives": ("loss", ("softmax",)),               # feature MLP: bpr only
    "batch_size": ("loss", ("softmax",)),              # feature MLP: bpr only (softmax: users_per_batch)
    "users_per_batch": ("loss", ("bpr",)),             # feature MLP: softmax only
    "temperature": ("variant", ("bpr",)),              # two-tower: softmax only
    "logq": ("variant", ("bpr",)),
    "n_uniform_neg": ("variant", ("bpr",)),
    "attn_layers": ("user_encoder", ("lstm",)),        # two-tower: attention encoder only
    "attn_heads": ("user_encoder", ("lstm",)),
    "lstm_hidden": ("user_encoder", ("attention",)),   # two-tower: LSTM encoder only
}


def searched_names(table: pd.DataFrame | None, grid: dict[str, list] | Iterable[dict] | None) -> set[str]:
    """What a search varied: grid axes with two or more distinct values, and any column of its
    table with two or more distinct non-missing values (a list-of-dicts grid, the two-tower's named
    variants, whose table leaves a value a variant does not read empty). A one-value axis is held."""
    names = set()
    for name, values in (grid.items() if isinstance(grid, dict) else []):
        if isinstance(values, (list, tuple)) and len({repr(_plain(v)) for v in values}) >= 2:
            names.add(name)
    if table is not None:
        for col in table.columns:
            values = {repr(_plain(v)) for v in table[col].tolist() if _plain(v) is not None}
            if len(values) >= 2:
                names.add(str(col))
    return names


def varied_fields(configs: list) -> set[str]:
    """Fields whose value differs between ``configs`` (dataclasses of one class: named variants)."""
    if not configs:
        return set()
    first = configs[0]
    return {f.name for f in dataclasses.fields(first)
            if any(getattr(c, f.name, None) != getattr(first, f.name) for c in configs[1:])}


def held(config: Any, searched: Iterable[str] = (), exclude: Iterable[str] = ()) -> dict:
    """Every hyper-parameter of ``config`` (the chosen configuration, a dataclass) that was not
    searched with two or more values: ``{name: value}`` in field order, JSON-ready. Left out: the
    ``searched`` names, ``NOT_HYPERPARAMETERS`` (``epochs``, a maximum, is the epoch cap; device,
    seed, printing, labels, precision and chunking), ``exclude``, and a field the configuration
    never reads (``UNREAD``: SASRec's ``n_neg`` under the full loss)."""
    if config is None or not dataclasses.is_dataclass(config):
        return {}
    skip = set(searched) | NOT_HYPERPARAMETERS | set(exclude)
    out = {}
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        unread = UNREAD.get(f.name)
        if unread and hasattr(config, unread[0]) and getattr(config, unread[0]) in unread[1]:
            continue
        out[f.name] = _json(getattr(config, f.name))
    return out


def summarize(table: pd.DataFrame, grid: dict[str, list] | None,
              epochs: int | None = None, config: Any = None) -> dict:
    """What a search tried and chose, JSON-ready: for every searched axis the values tried, the
    chosen one, and ``at_edge`` (chosen value is the smallest or largest tried on a numeric axis);
    ``epoch_cap`` when the chosen fit's best epoch is its last allowed epoch (still improving).

    ``held``: every value not searched with two or more values, ``{name: value}``: each one-value
    grid axis (also listed as ``fixed``, an older key) and, given the chosen ``config`` (a
    dataclass), each of its hyper-parameters outside the search (`held`: not ``epochs``, device,
    seed and the other `NOT_HYPERPARAMETERS`). The report lists them as "not searched"."""
    if table is None or not len(table) or "valid_metric" not in table:
        return {}
    best = table.loc[table["valid_metric"].idxmax()]
    numeric = set(numeric_axes(grid))
    axes = {}
    for name in (grid or {}) if isinstance(grid, dict) else []:
        if name not in table:
            continue
        tried = []
        for v in table[name].tolist():
            if _plain(v) not in tried:
                tried.append(_plain(v))
        tried.sort(key=_sort_key)
        chosen = _plain(best[name])
        axes[name] = {"tried": tried, "chosen": chosen,
                      "at_edge": bool(name in numeric and chosen in (tried[0], tried[-1]))}
        if len(tried) == 1:
            axes[name]["fixed"] = True                                  # one value: not searched
    fixed = {a: _json(v["chosen"]) for a, v in axes.items() if v.get("fixed")}
    kept = held(config, searched_names(table, grid))
    out = {"axes": axes, "configs": int(len(table)),
           "edge_steps": int((table["stage"] == "edge").sum()) if "stage" in table else 0,
           "valid_metric": float(best["valid_metric"]),
           "at_edge": sorted(a for a, v in axes.items() if v["at_edge"]),
           "fixed": sorted(fixed),
           "held": {**kept, **{a: v for a, v in fixed.items() if a not in kept}}}
    if epochs is not None and "best_epoch" in table and pd.notna(best.get("best_epoch")):
        out["best_epoch"] = int(best["best_epoch"])
        out["max_epochs"] = int(epochs)
        out["epoch_cap"] = bool(int(best["best_epoch"]) >= int(epochs))
    return out


def held_text(values: dict) -> str:
    """``blocks=2, heads=1, hidden=[256,128]``: held values, compact (3 significant digits below 1)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1 else f"{v:g}"
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(fmt(x) for x in v) + "]"
        return str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in values.items())


def describe(summary: dict, metric: str = HEADLINE) -> str:
    """One line per searched axis: values tried, chosen, and an edge warning; then the values held
    (not searched)."""
    if not summary:
        return "no search"
    name = metric.replace("ndcg", "nDCG").replace("recall", "Recall")
    lines = [f"{summary['configs']} configurations ({summary['edge_steps']} edge steps); "
             f"best validation {name} {summary['valid_metric']:.4f}"]
    for name, a in summary["axes"].items():
        flag = ("  <- STILL AT THE EDGE of what was searched" if a["at_edge"] else
                "  <- one value: NOT SEARCHED (a budget cap)" if a.get("fixed") else "")
        lines.append(f"  {name}: tried {a['tried']}, chose {a['chosen']}{flag}")
    if summary.get("epoch_cap"):
        lines.append(f"  epochs: best epoch {summary['best_epoch']} = the cap of {summary['max_epochs']} "
                     f"(still improving when stopped)")
    if summary.get("held"):
        lines.append(f"  not searched (held): {held_text(summary['held'])}")
    return "\n".join(lines)


def _json(value: Any) -> Any:
    """A config value as plain JSON: numpy scalars -> Python, tuples -> lists (nested too)."""
    value = _plain(value)
    return [_json(v) for v in value] if isinstance(value, list) else value


def _plain(value: Any) -> Any:
    """numpy scalars -> Python (JSON), tuples -> lists."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None                                                     # a table's NaN was a None
    return list(value) if isinstance(value, tuple) else value


def _sort_key(value: Any):
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (value is None, not number, value if number else str(value))


def _cell(value: Any) -> Any:
    """Lists in a table cell become tuples (hashable, printable)."""
    return tuple(value) if isinstance(value, list) else value


def make_config(config_cls, section: dict | None, **fixed) -> Any:
    """A config dataclass from a params section (its ``grid`` key removed) plus ``fixed`` values.
    Unknown keys raise ConfigError naming the valid ones (a typo in params/*.yaml fails loudly)."""
    section = {k: v for k, v in (section or {}).items() if k not in SEARCH_KEYS}
    section.update({k: v for k, v in fixed.items() if v is not None})
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ConfigError(f"{config_cls.__name__}: unknown parameter(s) {unknown}; valid: {sorted(names)}")
    return config_cls(**section)


def tune_model(model_cls, data, section: dict | None, validate: Callable[[Any], float] | None,
               device: str | None = None, seed: int | None = None, verbose: bool = True,
               extend: bool = True, **fixed) -> tuple[Any, pd.DataFrame]:
    """Grid-search ``model_cls`` (a Recommender with a ``Config`` dataclass) on validation.

    ``section`` is the model's params section: config defaults plus an optional ``grid``
    (``{name: [values]}`` or a list of dicts). Each configuration is seeded with ``seed`` and fit
    inside ``guard.fitting(model_cls.name)`` with ``validate`` for early stopping; numeric axes
    whose best value is on the grid's edge are searched further out (``extend``; at most
    ``section["max_edge_steps"]`` steps per axis and direction, 4 by default). With
    ``validate=None`` the first configuration is fit without selection.
    Returns ``(best_model, table)``; the table has one row per configuration."""
    section = copy.deepcopy(section or {})
    grid = section.get("grid")
    device = str(device) if device is not None else None         # a torch.device is fine too
    base = make_config(model_cls.Config, section, device=device, seed=seed, **fixed)

    def build(params: dict):
        cfg = dataclasses.replace(base, **params)
        if cfg.seed is not None:
            seed_everything(int(cfg.seed))
        return model_cls(cfg)

    def fit(model) -> dict:
        with guard.fitting(model_cls.name):
            return model.fit(data, validate)

    if validate is None:
        combos = expand_grid(grid)[:1]
        model = build(combos[0])
        t0 = time.perf_counter()
        info = fit(model) or {}
        table = pd.DataFrame([{**{k: _cell(v) for k, v in combos[0].items()}, "valid_metric": float("nan"),
                               "fit_seconds": time.perf_counter() - t0,
                               **({"best_epoch": info["best_epoch"]} if "best_epoch" in info else {}),
                               "best": True}])
        return model, table
    model, _params, table = grid_search(build, fit, grid, validate, verbose=verbose, extend=extend,
                                        max_steps=int(section.get("max_edge_steps", 4)))
    return model, table
