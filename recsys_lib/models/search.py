"""Budgeted hyper-parameter search: a coordinate search, for a model too slow to grid-search.

docs/PROTOCOL.md ("A budgeted search: SASRec"): a full grid over five axes of three values is 162 fits, and a
SASRec fit on ml-latest-small costs ~2-3 min on 2 cores. The coordinate rule instead visits the
axes one at a time, in the order the params section's ``grid`` lists them:

1. fit the *start* configuration: every axis at the section's own value (at its list's first value
   when the list does not hold the section's value);
2. for each axis in turn, fit every other listed value with the other axes at the best values found
   so far, and keep the best (ties keep the earlier fit);
3. right after an axis's sweep, when its best value is the smallest or largest tried on a numeric
   axis, step further out along it (`tuning.step_out`: the same log-scale step as the grid's edge
   rule) with the other axes at the best, while a step improves validation, at most
   ``max_edge_steps`` steps (per axis and direction); an optional bound per axis clamps a step
   (``search.bounds``: ``{max_len: [null, 200]}``), and no step goes past it;
4. then move to the next axis. No axis is visited twice; a configuration already fitted is never
   fitted again.

Every fit runs to its own early stopping (``epochs``, ``patience``): nothing is pruned early, so a
lower learning rate always has its epochs. Fits: 1 + sum over axes of (len(values) - 1), plus at
most one run of edge steps per axis. The table is the grid search's (`tuning.grid_search`): one row
per fit with the value of every axis, ``valid_metric``, ``fit_seconds``, ``best_epoch``, ``stage``
(``grid`` for listed values, ``edge`` for steps beyond them) and ``best``; rows in the order
fitted. `tuning.summarize` reads it unchanged.

A params section selects the rule with a ``search`` key (absent: the grid)::

    sasrec:
      max_len: 20              # start values
      search: {rule: coordinate, bounds: {max_len: [null, 200]}}
      max_edge_steps: 1
      grid: {max_len: [20, 50, 200], lr: [5.0e-4, 1.0e-3, 2.0e-3]}
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import math
import time
from typing import Any, Callable

import pandas as pd

from . import tuning
from ..config import seed_everything
from ..errors import ConfigError
from ..protocol import guard

RULES = ("grid", "coordinate")
SEARCH_KEY = "search"                         # the params key naming the rule (and its bounds)


def search_spec(section: dict | None) -> dict:
    """``{"rule": ..., "bounds": {axis: (low, high)}}`` from a params section's ``search`` key:
    a rule name (``coordinate``) or ``{rule: ..., bounds: {axis: [low, high]}}`` (null: no bound).
    No ``search`` key: the grid. ConfigError for an unknown rule or a malformed bound."""
    spec = (section or {}).get(SEARCH_KEY)
    if spec is None:
        spec = {}
    elif isinstance(spec, str):
        spec = {"rule": spec}
    elif not isinstance(spec, dict):
        raise ConfigError(f"search must be a rule name or {{rule: ..., bounds: ...}}, got {spec!r}")
    unknown = sorted(set(spec) - {"rule", "bounds"})
    if unknown:
        raise ConfigError(f"search: unknown key(s) {unknown}; valid: ['bounds', 'rule']")
    rule = spec.get("rule") or "grid"
    if rule not in RULES:
        raise ConfigError(f"search.rule must be one of {RULES}, got {rule!r}")
    bounds = {}
    for axis, pair in (spec.get("bounds") or {}).items():
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ConfigError(f"search.bounds[{axis!r}] must be [low, high] (null: none), got {pair!r}")
        low, high = pair
        if low is not None and high is not None and low > high:
            raise ConfigError(f"search.bounds[{axis!r}]: low {low} above high {high}")
        bounds[axis] = (low, high)
    return {"rule": rule, "bounds": bounds}


def start_config(grid: dict[str, list], base: dict) -> dict:
    """The coordinate search's first configuration: each axis at ``base[axis]`` (the section's own
    value) when its list holds it, else at the list's first value."""
    start = {}
    for axis, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"grid[{axis!r}] must be a non-empty list of values, got {values!r}")
        start[axis] = base[axis] if axis in base and base[axis] in list(values) else values[0]
    return start


def planned_fits(grid: dict[str, list], max_edge_steps: int = 0) -> tuple[int, int]:
    """(fits before edge steps, the most fits in all) of a coordinate search over ``grid``:
    1 + sum(len(values) - 1), plus up to ``max_edge_steps`` per numeric axis (one direction each:
    a best value sits on one edge)."""
    sweep = 1 + sum(len(v) - 1 for v in grid.values())
    return sweep, sweep + max_edge_steps * len(tuning.numeric_axes(grid))


def _clamp(new: Any, edge: Any, up: bool, bound: tuple | None) -> Any | None:
    """``new`` (a step beyond ``edge``) clamped to the axis's bound; None when the edge already is
    the bound (no step left)."""
    if new is None or bound is None:
        return new
    low, high = bound
    if up and high is not None:
        new = min(new, high)
    if not up and low is not None:
        new = max(new, low)
    if (new <= edge) if up else (new >= edge):
        return None
    return new


def coordinate_search(build: Callable[[dict], Any], fit: Callable[[Any], dict], grid: dict[str, list],
                      validate: Callable[[Any], float], start: dict | None = None, verbose: bool = True,
                      max_steps: int = 4, bounds: dict | None = None) -> tuple[Any, dict, pd.DataFrame]:
    """The coordinate rule (module docstring) over ``grid`` (``{axis: [values]}``, visited in key
    order) from ``start`` (default: every axis at its first value). ``build``, ``fit`` and
    ``validate`` as in `tuning.grid_search`, and the same ``(best_model, best_params, table)``."""
    if not isinstance(grid, dict):
        raise ConfigError(f"the coordinate search needs a {{name: [values]}} grid, got {grid!r}")
    start = {**start_config(grid, {}), **(start or {})}
    bounds = bounds or {}
    numeric = set(tuning.numeric_axes(grid))
    rows: list[dict] = []
    fitted: dict[tuple, float] = {}
    state = {"model": None, "params": None, "score": float("-inf")}
    planned = planned_fits(grid)[0]

    def key(params: dict) -> tuple:
        return tuple(repr(tuning._plain(params[a])) for a in grid)

    def run(params: dict, stage: str, label: str) -> float:
        if key(params) in fitted:                                      # e.g. the best's own value
            return fitted[key(params)]
        model = build(params)
        t0 = time.perf_counter()
        info = fit(model) or {}
        fit_seconds = time.perf_counter() - t0
        score = float(info.get("best_metric", float("nan")))
        if not math.isfinite(score):
            score = float(validate(model))
        fitted[key(params)] = score
        row = {**{k: tuning._cell(v) for k, v in params.items()}, "valid_metric": score,
               "fit_seconds": fit_seconds}
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

    run(dict(start), "grid", f"config 1/{planned} (start)")
    for axis, values in grid.items():
        for value in values:
            params = {**state["params"], axis: value}
            if key(params) not in fitted:
                run(params, "grid", f"config {len(rows) + 1}/{planned} ({axis})")
        if axis in numeric:
            _extend(axis, rows, state, run, max_steps, bounds.get(axis))
    table = pd.DataFrame(rows)
    table["best"] = False
    if len(table):
        table.loc[table["valid_metric"].idxmax(), "best"] = True
    return state["model"], state["params"], table


def _extend(axis: str, rows: list[dict], state: dict, run: Callable[[dict, str, str], float],
            max_steps: int, bound: tuple | None) -> None:
    """Edge steps along one axis right after its sweep: while the best value is the smallest or
    largest tried, fit the next value out (`tuning.step_out`, clamped to ``bound``) with the other
    axes at the best; stop at the first step that does not improve validation, after ``max_steps``
    steps per direction, or at the bound. A best value still on an edge is flagged by summarize."""
    steps = {False: 0, True: 0}
    while True:
        best = state["params"]
        tried = sorted({r[axis] for r in rows if axis in r})
        value = best[axis]
        if len(tried) < 2 or value not in (tried[0], tried[-1]):
            return                                                      # interior: done with this axis
        up = value == tried[-1]
        if steps[up] >= max_steps:
            return                                                      # budget cap: summarize flags it
        new = _clamp(tuning.step_out(tried, value, up), value, up, bound)
        if new is None:
            return                                                      # at the bound, or an integer at 1
        steps[up] += 1
        before = state["score"]
        run({**best, axis: new}, "edge", f"edge step {axis}={new}")
        if not state["score"] > before:
            return


def tune_model(model_cls, data, section: dict | None, validate: Callable[[Any], float] | None,
               device: str | None = None, seed: int | None = None, verbose: bool = True,
               **fixed) -> tuple[Any, pd.DataFrame]:
    """`tuning.tune_model` with the rule the section's ``search`` key names: ``grid`` (or none)
    hands the section (less that key) to `tuning.tune_model`; ``coordinate`` runs
    `coordinate_search` over ``section["grid"]`` from the section's own values, each fit seeded with
    ``seed`` inside ``guard.fitting(model_cls.name)``, at most ``section["max_edge_steps"]`` (4 by
    default) edge steps per axis and direction. With ``validate=None`` the start configuration is
    fit without selection. Returns ``(best_model, table)``."""
    section = copy.deepcopy(section or {})
    spec = search_spec(section)
    section.pop(SEARCH_KEY, None)
    if spec["rule"] == "grid":
        return tuning.tune_model(model_cls, data, section, validate, device=device, seed=seed,
                                 verbose=verbose, **fixed)
    grid = section.get("grid") or {}
    device = str(device) if device is not None else None
    base = tuning.make_config(model_cls.Config, section, device=device, seed=seed, **fixed)
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted((set(grid) | set(spec["bounds"])) - fields)
    if unknown:
        raise ConfigError(f"{model_cls.__name__} search: unknown axis {unknown}; valid: {sorted(fields)}")
    start = start_config(grid, dataclasses.asdict(base))

    def build(params: dict):
        cfg = dataclasses.replace(base, **params)
        if cfg.seed is not None:
            seed_everything(int(cfg.seed))
        return model_cls(cfg)

    def fit(model) -> dict:
        with guard.fitting(model_cls.name):
            return model.fit(data, validate)

    if validate is None:
        model = build(start)
        t0 = time.perf_counter()
        info = fit(model) or {}
        table = pd.DataFrame([{**{k: tuning._cell(v) for k, v in start.items()}, "valid_metric": float("nan"),
                               "fit_seconds": time.perf_counter() - t0,
                               **({"best_epoch": info["best_epoch"]} if "best_epoch" in info else {}),
                               "best": True}])
        return model, table
    if verbose:
        sweep, most = planned_fits(grid, int(section.get("max_edge_steps", 4)))
        print(f"coordinate search over {list(grid)} (in this order) from {start}: {sweep} fits, "
              f"at most {most} with edge steps", flush=True)
    model, _params, table = coordinate_search(build, fit, grid, validate, start=start, verbose=verbose,
                                              max_steps=int(section.get("max_edge_steps", 4)),
                                              bounds=spec["bounds"])
    return model, table
