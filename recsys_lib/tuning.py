"""Hyper-parameter search on validation, with the same small effort for every model.

PROTOCOL.md: every model, baselines included, is tuned on validation with comparable effort, and
the report says what was searched. ``grid_search`` tries each configuration, fits it, scores it
with a validation callback built *before* fitting (recsys_lib.evaluate.Evaluator) and keeps the
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
import time
from typing import Any, Callable, Iterable

import pandas as pd

from . import guard
from .config import seed_everything
from .errors import ConfigError

HEADLINE = "ndcg@10"


def validator(evaluator, metric: str = HEADLINE) -> Callable[[Any], float]:
    """``validate(scorer) -> float``: ``metric`` of ``scorer`` on the evaluator's period.

    Build the evaluator (e.g. ``Evaluator(data, "valid", ks=(10,))``) outside any fitting context:
    it reads the period's labels once, at construction; calling this callback reads no rows."""
    def validate(scorer) -> float:
        return float(evaluator(scorer).means()[metric])
    validate.evaluator = evaluator  # type: ignore[attr-defined]
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
                validate: Callable[[Any], float], verbose: bool = True) -> tuple[Any, dict, pd.DataFrame]:
    """Fit ``build(params)`` for every configuration of ``grid`` and keep the best on validation.

    ``fit(model) -> dict`` trains the model (it may early-stop on the same ``validate``);
    ``validate(model) -> float`` is evaluated once more after fitting (higher is better).
    Returns ``(best_model, best_params, table)``: one row per configuration with its parameters,
    ``valid_metric``, ``fit_seconds``, ``best_epoch`` (when the fit reports one) and ``best``."""
    rows: list[dict] = []
    best_model, best_params, best_score = None, None, float("-inf")
    combos = expand_grid(grid)
    for n, params in enumerate(combos):
        model = build(params)
        t0 = time.perf_counter()
        info = fit(model) or {}
        fit_seconds = time.perf_counter() - t0
        score = float(validate(model))
        row = {**{k: _cell(v) for k, v in params.items()}, "valid_metric": score, "fit_seconds": fit_seconds}
        if "best_epoch" in info:
            row["best_epoch"] = info["best_epoch"]
        rows.append(row)
        if verbose:
            print(f"config {n + 1}/{len(combos)} {params}: valid {score:.4f} ({fit_seconds:.1f}s)", flush=True)
        if score > best_score or best_model is None:
            best_model, best_params, best_score = model, dict(params), score
        else:
            del model
            gc.collect()
    table = pd.DataFrame(rows)
    table["best"] = False
    if len(table):
        table.loc[table["valid_metric"].idxmax(), "best"] = True
    return best_model, best_params, table


def _cell(value: Any) -> Any:
    """Lists in a table cell become tuples (hashable, printable)."""
    return tuple(value) if isinstance(value, list) else value


def make_config(config_cls, section: dict | None, **fixed) -> Any:
    """A config dataclass from a params section (its ``grid`` key removed) plus ``fixed`` values.
    Unknown keys raise ConfigError naming the valid ones (a typo in params/*.yaml fails loudly)."""
    section = {k: v for k, v in (section or {}).items() if k != "grid"}
    section.update({k: v for k, v in fixed.items() if v is not None})
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ConfigError(f"{config_cls.__name__}: unknown parameter(s) {unknown}; valid: {sorted(names)}")
    return config_cls(**section)


def tune_model(model_cls, data, section: dict | None, validate: Callable[[Any], float] | None,
               device: str | None = None, seed: int | None = None, verbose: bool = True,
               **fixed) -> tuple[Any, pd.DataFrame]:
    """Grid-search ``model_cls`` (a Recommender with a ``Config`` dataclass) on validation.

    ``section`` is the model's params section: config defaults plus an optional ``grid``
    (``{name: [values]}`` or a list of dicts). Each configuration is seeded with ``seed`` and fit
    inside ``guard.fitting(model_cls.name)`` with ``validate`` for early stopping. With
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
    model, _params, table = grid_search(build, fit, grid, validate, verbose=verbose)
    return model, table
