"""The budgeted coordinate search (recsys_lib.models.search; docs/PROTOCOL.md "A budgeted search"):
the order it visits configurations in, the best it keeps, its edge steps and bounds, the table it
hands to tuning.summarize, and SASRec's tune using it with the params' sasrec section."""
import dataclasses
import json
import math

import pandas as pd
import pytest

from recsys_lib import config
from recsys_lib.errors import ConfigError
from recsys_lib.models import registry, sasrec, search, tuning
from recsys_lib.models.sasrec import SASRecConfig


class Fake:
    """A model whose validation score is a known function of its params (no training)."""

    def __init__(self, params: dict, score):
        self.params, self.score = dict(params), score


def fake_search(score, grid, start=None, max_steps=4, bounds=None):
    """Run the coordinate search with ``score(params) -> float``; returns (model, params, table,
    the params of every fit in order)."""
    visits = []

    def build(params):
        visits.append(dict(params))
        return Fake(params, score)

    def fit(model):
        return {"best_metric": model.score(model.params), "best_epoch": 3}

    model, params, table = search.coordinate_search(build, fit, grid, validate=lambda m: math.nan,
                                                    start=start, verbose=False, max_steps=max_steps,
                                                    bounds=bounds)
    return model, params, table, visits


def separable(a=None, b=None, c=None):
    """A sum of one term per axis: each axis's best value does not depend on the others."""
    def score(p):
        return a.get(p["a"], 0.0) + b.get(p["b"], 0.0) + c.get(p["c"], 0.0)
    return score


GRID = {"a": [1, 2, 4], "b": [10, 20], "c": ["x", "y"]}


def test_coordinate_rule_visits_axes_in_order_with_the_others_at_the_best():
    # a: 4 best of the list, 8 worse (one edge step, then stop); b: 10 best (lower edge, the step
    # to 5 worse); c (categorical): y best, no edge step
    score = separable(a={1: 0.1, 2: 0.2, 4: 0.3, 8: 0.25}, b={5: 0.0, 10: 0.05, 20: 0.01}, c={"x": 0.0, "y": 0.02})
    model, params, table, visits = fake_search(score, GRID, start={"a": 2, "b": 10, "c": "x"})
    assert visits == [
        {"a": 2, "b": 10, "c": "x"},                      # start
        {"a": 1, "b": 10, "c": "x"}, {"a": 4, "b": 10, "c": "x"},    # a's sweep
        {"a": 8, "b": 10, "c": "x"},                      # a's winner 4 is the top edge: one step out, worse
        {"a": 4, "b": 20, "c": "x"},                      # b's sweep at a = 4 (10 already fitted)
        {"a": 4, "b": 5, "c": "x"},                       # b's winner 10 is the bottom edge: 10 / 2
        {"a": 4, "b": 10, "c": "y"},                      # c's sweep: categorical, no edge step
    ]
    assert params == {"a": 4, "b": 10, "c": "y"} and model.params == params
    assert list(table["stage"]) == ["grid", "grid", "grid", "edge", "grid", "edge", "grid"]
    assert table[["a", "b", "c"]].to_dict("records") == visits            # rows in the order fitted
    assert table["best"].sum() == 1 and table.loc[table["best"], "valid_metric"].item() == pytest.approx(0.37)
    # the grid search's columns, so summarize and the report read it unchanged
    grid_cols = ["a", "b", "c", "valid_metric", "fit_seconds", "best_epoch", "stage", "best"]
    assert list(table.columns) == grid_cols


def test_start_defaults_to_the_first_values_and_the_fit_count_is_one_plus_the_others():
    score = separable(a={1: 0.3}, b={10: 0.1}, c={"x": 0.1})           # the start wins everywhere
    _, params, table, visits = fake_search(score, GRID, max_steps=0)
    assert visits[0] == {"a": 1, "b": 10, "c": "x"} and params == visits[0]
    assert len(visits) == search.planned_fits(GRID)[0] == 1 + 2 + 1 + 1
    assert (table["stage"] == "grid").all()                               # max_steps 0: no edge step
    assert search.planned_fits(GRID, 1) == (5, 7)                         # a and b are numeric


def test_edge_steps_continue_while_improving_up_to_the_cap_and_the_bound():
    up = separable(a={1: 0.1, 2: 0.2, 4: 0.3, 8: 0.4, 10: 0.45, 16: 0.5, 32: 0.6}, b={10: 0.0}, c={"x": 0.0})
    grid = {"a": [1, 2, 4]}
    start = {"b": 10, "c": "x"}
    _, params, table, _ = fake_search(up, grid, start={"a": 1, **start}, max_steps=2)
    assert list(table["a"]) == [1, 2, 4, 8, 16] and params["a"] == 16       # two steps: the cap
    assert tuning.summarize(table, grid)["at_edge"] == ["a"]             # still improving: flagged
    _, params, table, _ = fake_search(up, grid, start={"a": 1, **start}, max_steps=4, bounds={"a": (None, 10)})
    assert list(table["a"]) == [1, 2, 4, 8, 10] and params["a"] == 10       # 16 clamped to the bound, then none
    _, _, table, _ = fake_search(up, grid, start={"a": 1, **start}, max_steps=4, bounds={"a": (None, 4)})
    assert list(table["a"]) == [1, 2, 4]                                  # the edge is the bound: no step
    down = separable(a={0.5: 0.2, 1: 0.1, 2: 0.0}, b={10: 0.0}, c={"x": 0.0})
    _, params, table, _ = fake_search(down, {"a": [1.0, 2.0]}, start={"a": 2.0, **start}, max_steps=3)
    assert list(table["a"]) == [2, 1, 0.5, 0.25] and params["a"] == 0.5    # down while improving, then stop
    _, params, table, _ = fake_search(down, {"a": [1, 2]}, start={"a": 2, **start}, max_steps=3)
    assert list(table["a"]) == [2, 1] and params["a"] == 1                 # an integer axis stops at 1


def test_ties_keep_the_earlier_fit_and_nothing_is_fitted_twice():
    flat = separable(a={}, b={}, c={})                                    # every config scores 0
    _, params, table, visits = fake_search(flat, GRID, start={"a": 2, "b": 20, "c": "y"}, max_steps=0)
    assert params == {"a": 2, "b": 20, "c": "y"}                          # the start: first of the ties
    keys = [tuple(v.values()) for v in visits]
    assert len(keys) == len(set(keys)) == 5


def test_search_spec_reads_the_rule_and_refuses_typos():
    assert search.search_spec({}) == {"rule": "grid", "bounds": {}}
    assert search.search_spec({"search": "coordinate"})["rule"] == "coordinate"
    spec = search.search_spec({"search": {"rule": "coordinate", "bounds": {"max_len": [None, 200]}}})
    assert spec["bounds"] == {"max_len": (None, 200)}
    for bad in ({"search": "random"}, {"search": {"rule": "coordinate", "bound": {}}},
                {"search": {"rule": "coordinate", "bounds": {"lr": [0.1]}}},
                {"search": {"rule": "coordinate", "bounds": {"lr": [0.1, 0.01]}}}):
        with pytest.raises(ConfigError):
            search.search_spec(bad)


def test_summarize_lists_the_searched_axes_and_flags_the_held_values():
    """The full profile's sasrec search table through tuning.summarize: every grid axis searched
    (tried, chosen, at_edge), everything else held ("not searched")."""
    grid = config.load_params("full", "ml-latest-small")["sasrec"]["grid"]
    assert list(grid) == ["max_len", "batch_size", "lr", "dim", "dropout"]   # the stated order
    best = {"max_len": 50, "batch_size": 16, "lr": 2e-3, "dim": 64, "dropout": 0.5}

    def score(p):                                     # peaks at ``best``; 0.5 is dropout's top edge
        return -sum(abs(math.log(p[k] / best[k])) for k in best)

    _, params, table, visits = fake_search(score, grid, start=search.start_config(grid, dataclasses.asdict(
        SASRecConfig(max_len=20, batch_size=16, lr=1e-3, dim=64, dropout=0.2))),
        max_steps=1, bounds=search.search_spec(config.load_params("full")["sasrec"])["bounds"])
    assert params == best
    # 10 sweep fits and two edge steps: batch_size 16 (bottom edge) -> 4, clamped to its bound 8;
    # lr 2e-3 (top edge) -> 4e-3; none for max_len and dim (interior) or dropout (0.5 is its bound)
    assert len(visits) == 12
    edges = table.loc[table["stage"] == "edge", ["batch_size", "lr"]].values.tolist()
    assert edges == [[8, 1e-3], [16, 4e-3]]
    assert [tuple(v.values()) for v in visits[:4]] == [(20, 16, 1e-3, 64, 0.2), (50, 16, 1e-3, 64, 0.2),
                                                      (200, 16, 1e-3, 64, 0.2), (50, 64, 1e-3, 64, 0.2)]
    cfg = SASRecConfig(**{**best, "device": "cpu", "seed": 42, "progress": False, "patience": 8})
    summary = tuning.summarize(table, grid, epochs=cfg.epochs, config=cfg)
    assert list(summary["axes"]) == list(grid) and summary["configs"] == 12 and summary["edge_steps"] == 2
    assert {k: a["chosen"] for k, a in summary["axes"].items()} == best
    assert summary["axes"]["max_len"]["tried"] == [20, 50, 200]
    assert summary["axes"]["batch_size"]["tried"] == [8, 16, 64]
    assert summary["axes"]["lr"]["tried"] == [5e-4, 1e-3, 2e-3, 4e-3]
    assert summary["at_edge"] == ["dropout"]          # at its bound: still flagged
    assert summary["fixed"] == []
    assert summary["held"] == {"blocks": 2, "heads": 1, "patience": 8, "eval_every": 1, "loss": "full",
                               "positives_only": False}
    assert "not searched (held): blocks=2, heads=1, patience=8" in tuning.describe(summary)
    assert json.loads(json.dumps(summary)) == summary


def test_the_full_profile_search_stays_within_its_budget():
    for dataset in ("ml-latest-small", "ml-100k"):
        section = config.load_params("full", dataset)["sasrec"]
        assert search.search_spec(section)["rule"] == "coordinate"
        sweep, most = search.planned_fits(section["grid"], section["max_edge_steps"])
        assert (sweep, most) == (10, 15)
        cfg = tuning.make_config(SASRecConfig, {k: v for k, v in section.items() if k != "search"})
        assert search.start_config(section["grid"], dataclasses.asdict(cfg)) == {
            "max_len": 20, "batch_size": 16, "lr": 1e-3, "dim": 64, "dropout": 0.2}
    section = config.load_params("full", "ml-32m")["sasrec"]              # a budget cap: one configuration
    assert search.planned_fits(section["grid"], section["max_edge_steps"]) == (1, 1)
    section = config.load_params("full", "synthetic")["sasrec"]           # the demo: an lr sweep and one edge step
    assert search.planned_fits(section["grid"], section["max_edge_steps"]) == (3, 4)


def test_sasrec_tune_runs_the_quick_profiles_coordinate_search(toy_data):
    """The registry's sasrec tune reads the params' ``search`` key (make_config would refuse it)
    and visits the quick profile's 3 configurations in the stated order."""
    from recsys_lib.protocol.evaluate import Evaluator
    assert registry.spec("sasrec").tune is sasrec.tune
    section = config.load_params("quick", "synthetic-tiny")["sasrec"]
    assert section["grid"] == {"max_len": [5, 10], "lr": [0.01, 0.02]} and section["max_edge_steps"] == 0
    section = {**section, "epochs": 1, "progress": False, "verbose": False}
    validate = tuning.validator(Evaluator(toy_data, "valid", ks=(10,)))
    model, table = sasrec.tune(toy_data, section, validate, device="cpu", seed=0, verbose=False)
    assert len(table) == 3 and (table["stage"] == "grid").all()
    assert table.loc[0, ["max_len", "lr"]].tolist() == [5, 0.01]          # start: the section's values
    assert table.loc[1, ["max_len", "lr"]].tolist() == [10, 0.01]
    best_len = 5 if table.loc[0, "valid_metric"] >= table.loc[1, "valid_metric"] else 10
    assert table.loc[2, ["max_len", "lr"]].tolist() == [best_len, 0.02]
    chosen = table.loc[table["best"]].iloc[0]
    assert (model.cfg.max_len, model.cfg.lr) == (chosen["max_len"], chosen["lr"])
    summary = tuning.summarize(table, section["grid"], epochs=1, config=model.cfg)
    assert set(summary["axes"]) == {"max_len", "lr"} and "max_len" not in summary["held"]
    assert summary["held"]["dim"] == 16 and summary["held"]["batch_size"] == 256


def test_no_search_key_is_the_grid_search(toy_data):
    from recsys_lib.protocol.evaluate import Evaluator
    validate = tuning.validator(Evaluator(toy_data, "valid", ks=(10,)))
    section = {"max_len": 5, "dim": 8, "blocks": 1, "epochs": 1, "batch_size": 256, "progress": False,
               "verbose": False, "max_edge_steps": 0, "grid": {"max_len": [5, 10], "lr": [0.01, 0.02]}}
    _, table = sasrec.tune(toy_data, section, validate, device="cpu", seed=0, verbose=False)
    assert len(table) == 4                                                # every combination
    with pytest.raises(ConfigError, match="unknown axis"):
        sasrec.tune(toy_data, {**section, "search": "coordinate", "grid": {"max_lenn": [5, 10]}},
                    validate, device="cpu", seed=0, verbose=False)


def test_an_empty_grid_is_one_fit_at_the_start():
    """A further seed pins every searched axis and empties the grid (pipeline.seed_pins): the
    coordinate rule then fits the section's own values once, with no edge step."""
    _, params, table, visits = fake_search(lambda p: 0.1, {}, start={}, max_steps=4)
    assert visits == [{}] and params == {} and len(table) == 1 and table["best"].all()
    assert tuning.summarize(table, {})["configs"] == 1
