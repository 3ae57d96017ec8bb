"""Baselines (popularity, MF, NeuMF, EASE) and the validation grid search, on the toy split.

Each trained model must learn the planted taste structure (loss falls; validation nDCG@10 well
above a random ranking), read only the train period while fitting, and round-trip through
save/load with identical scores.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_lib.protocol import guard
from recsys_lib.models import tuning
from recsys_lib.errors import ConfigError, LeakageError
from recsys_lib.protocol.evaluate import Evaluator, rank_topk
from recsys_lib.protocol.splitdata import IdMap, Period, SplitData
from recsys_lib.models import Recommender
from recsys_lib.models.ease import EASE, EASEConfig, ease_weights, gram
from recsys_lib.models.mf import MF, MFConfig
from recsys_lib.models.neumf import NeuMF, NeuMFConfig
from recsys_lib.models.popularity import Popularity, PopularityConfig


QUIET = dict(device="cpu", progress=False, verbose=False)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def valid_eval(toy_data):
    return Evaluator(toy_data, "valid", ks=(10,))       # built before any fit (reads valid here)


@pytest.fixture(scope="module")
def validate(valid_eval):
    return tuning.validator(valid_eval)


class RandomScorer:
    def __init__(self, n_items: int, seed: int):
        self.n_items, self.gen = n_items, torch.Generator().manual_seed(seed)

    def score_all(self, users, ctx):
        return torch.rand(len(users), self.n_items, generator=self.gen)


@pytest.fixture(scope="module")
def random_ndcg(toy_data, validate):
    return float(np.mean([validate(RandomScorer(toy_data.n_items, s)) for s in range(3)]))


def _fit(model, data, validate=None):
    with guard.fitting(model.name):                     # the fit may read train rows only
        info = model.fit(data, validate)
    return model, info


@pytest.fixture(scope="module")
def fitted_mf(toy_data, validate):
    return _fit(MF(MFConfig(dim=16, epochs=6, batch_size=512, lr=0.03, patience=0, **QUIET)), toy_data, validate)


@pytest.fixture(scope="module")
def fitted_neumf(toy_data, validate):
    cfg = NeuMFConfig(dim_gmf=16, dim_mlp=16, layers=[32, 16], epochs=8, batch_size=512, lr=0.01,
                      patience=0, **QUIET)
    return _fit(NeuMF(cfg), toy_data, validate)


@pytest.fixture(scope="module")
def fitted_ease(toy_data):
    return _fit(EASE(EASEConfig(reg=100.0, device="cpu")), toy_data)


def tiny_data(rows: list[tuple[int, int, float, int]], n_users: int, n_items: int) -> SplitData:
    """A SplitData whose train period is ``rows`` (user, item, rating, timestamp); empty valid/test."""
    u, i, r, t = (np.array(c) for c in zip(*rows))
    order = np.lexsort((i, u, t))
    train = Period(user=u[order].astype(np.int64), item=i[order].astype(np.int64),
                   rating=r[order].astype(np.float32), timestamp=t[order].astype(np.int64))
    empty = Period(*(np.zeros(0, dt) for dt in (np.int64, np.int64, np.float32, np.int64)))
    return SplitData(name="tiny", users=IdMap(np.arange(n_users)), items=IdMap(np.arange(n_items)),
                     item_features=None, _periods={"train": train, "valid": empty, "test": empty})


# ---------------------------------------------------------------- popularity
def test_popularity_ranks_most_popular_unseen_item_first(toy_data):
    model, _ = _fit(Popularity(PopularityConfig(device="cpu")), toy_data)
    counts = np.bincount(toy_data.train.item, minlength=toy_data.n_items)
    ctx = toy_data.context("valid")
    users = np.arange(toy_data.n_users)
    top = rank_topk(model, users, ctx, 3, toy_data.n_items)
    seen = ctx.seen.toarray().astype(bool)
    for u in users[:50]:
        unseen_counts = np.where(seen[u], -1, counts)
        assert counts[top[u, 0]] == unseen_counts.max()
        assert not seen[u, top[u, 0]]
    # counts are non-increasing along every list
    assert np.all(np.diff(counts[top], axis=1) <= 0)


def test_popularity_score_all_is_a_fresh_tensor(toy_data):
    """Evaluation masks seen items in place: a view of the model's buffer would be corrupted."""
    model, _ = _fit(Popularity(PopularityConfig(device="cpu")), toy_data)
    before = model.scores.clone()
    s = model.score_all(torch.arange(4), None)
    s[:, :10] = -torch.inf
    assert torch.equal(model.scores, before)
    assert torch.equal(model.score_all(torch.arange(2), None)[1], before)


def test_popularity_positives_and_recent_window():
    day = 86_400
    rows = ([(u, 0, 3.0, 0) for u in range(5)]                   # item 0: most rows, all old, negative
            + [(u, 1, 5.0, 0) for u in range(3)]                 # item 1: most positives, old
            + [(0, 2, 2.0, 99 * day), (1, 2, 2.0, 99 * day)]     # item 2: recent, two rows
            + [(2, 3, 4.0, 98 * day), (3, 4, 4.0, 100 * day)])   # items 3, 4: recent, one row each
    data = tiny_data(rows, n_users=6, n_items=6)
    order = lambda m: torch.argsort(m.score_all(torch.arange(1), None)[0], descending=True).tolist()
    m_all = _fit(Popularity(PopularityConfig(device="cpu")), data)[0]
    assert order(m_all)[:2] == [0, 1]
    m_pos = _fit(Popularity(PopularityConfig(positives_only=True, device="cpu")), data)[0]
    assert order(m_pos)[0] == 1
    m_win = _fit(Popularity(PopularityConfig(window_days=5, device="cpu")), data)[0]
    # window counts first: item 2 (2 recent rows); then items 3, 4 (1 each, ties by global count,
    # then id); then the items never seen in the window by global count (0 before 1); 5 last
    assert order(m_win) == [2, 3, 4, 0, 1, 5]


# ---------------------------------------------------------------- MF
def test_mf_learns(fitted_mf, random_ndcg, validate):
    model, info = fitted_mf
    losses = [r["loss"] for r in info["records"]]
    assert losses[-1] < 0.7 * losses[0]
    assert info["best_metric"] == pytest.approx(validate(model))      # best state restored
    assert model.curve.best_epoch == info["best_epoch"]             # the learning curve is kept
    assert validate(model) > max(0.15, 3 * random_ndcg)


def test_mf_score_all_matches_pairs(fitted_mf, toy_data):
    model, _ = fitted_mf
    users = torch.arange(7)
    s = model.score_all(users, None)                                   # (7, n_items)
    assert s.shape == (7, toy_data.n_items)
    pairs = model.score_pairs(users.repeat_interleave(toy_data.n_items), torch.arange(toy_data.n_items).repeat(7))
    torch.testing.assert_close(s.flatten(), pairs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- NeuMF
def test_neumf_learns(fitted_neumf, random_ndcg, validate):
    model, info = fitted_neumf
    losses = [r["loss"] for r in info["records"]]
    assert losses[-1] < 0.7 * losses[0]
    assert validate(model) > max(0.15, 3 * random_ndcg)


def test_neumf_batched_scoring_equals_pairwise_forward(fitted_neumf, toy_data):
    model, _ = fitted_neumf
    users = torch.arange(9)
    full = model.score_all(users, None)                                # one chunk
    model.cfg.score_chunk = 9 * 32 * 7                                 # 7 items per chunk
    try:
        chunked = model.score_all(users, None)
    finally:
        model.cfg.score_chunk = NeuMFConfig.score_chunk
    pairs = model(users.repeat_interleave(toy_data.n_items), torch.arange(toy_data.n_items).repeat(9))
    torch.testing.assert_close(full, chunked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.flatten(), pairs.detach(), rtol=1e-5, atol=1e-5)


def test_neumf_scores_do_not_depend_on_the_chunk_size():
    """The default chunk (2**20) was 2**24: every item's scores are computed alone either way, so
    the rankings, early stopping and metrics are bit for bit those of the larger chunk."""
    model = NeuMF(NeuMFConfig(seed=0, device="cpu", verbose=False, progress=False)).build(1100, 3001)
    users = torch.arange(1024)
    scores = {}
    for chunk in (2 ** 24, NeuMFConfig.score_chunk, 2 ** 16):
        model.cfg.score_chunk = chunk
        scores[chunk] = model.score_all(users)
    assert NeuMFConfig.score_chunk == 2 ** 20
    assert torch.equal(scores[2 ** 24], scores[2 ** 20]) and torch.equal(scores[2 ** 24], scores[2 ** 16])


def test_neumf_needs_an_mlp_layer(toy_data):
    with pytest.raises(ConfigError):
        NeuMF(NeuMFConfig(layers=[], **QUIET)).build(3, 4)


# ---------------------------------------------------------------- EASE
def test_ease_closed_form_matches_numpy():
    rng = np.random.default_rng(0)
    x = (rng.random((12, 7)) < 0.4).astype(np.float64)
    lam = 2.5
    p = np.linalg.inv(x.T @ x + lam * np.eye(7))
    expected = np.eye(7) - p / np.diag(p)[None, :]                    # B = I - P diagMat(1/diag P)
    np.testing.assert_allclose(np.diag(expected), 0, atol=1e-12)
    import scipy.sparse as sp
    g = gram(sp.csr_matrix(x), torch.float64, torch.device("cpu"), chunk=3)
    np.testing.assert_allclose(g.numpy(), x.T @ x)
    b = ease_weights(g, lam).numpy()
    np.testing.assert_allclose(b, expected, rtol=1e-10, atol=1e-12)


def test_ease_learns_and_scores_from_seen_items(fitted_ease, toy_data, validate, random_ndcg):
    model, info = fitted_ease
    assert model.B.shape == (toy_data.n_items, toy_data.n_items)
    assert torch.all(model.B.diagonal() == 0)
    assert validate(model) > max(0.15, 3 * random_ndcg)
    # score = seen-before-period row @ B; test-time history includes validation rows
    ctx = toy_data.context("test")
    users = torch.arange(5)
    expected = torch.from_numpy(ctx.seen[:5].toarray()).double() @ model.B.double()
    torch.testing.assert_close(model.score_all(users, ctx).double(), expected, rtol=1e-5, atol=1e-6)
    pairs = model.score_pairs(torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]), ctx)
    torch.testing.assert_close(pairs.double(), expected[[0, 1, 2], [5, 6, 7]], rtol=1e-5, atol=1e-6)
    # pairs in any order, users repeated, spread over several user batches
    u = torch.tensor([4, 0, 4, 2, 1, 0, 3, 4])
    i = torch.tensor([1, 9, 3, 0, 2, 5, 7, 8])
    got = model.score_pairs(u, i, ctx, batch_users=2)
    torch.testing.assert_close(got.double(), expected[u, i], rtol=1e-5, atol=1e-6)


def test_ease_positives_only_uses_fewer_rows(toy_data):
    _, all_rows = _fit(EASE(EASEConfig(reg=100.0, device="cpu")), toy_data)
    _, pos_rows = _fit(EASE(EASEConfig(reg=100.0, positives_only=True, device="cpu")), toy_data)
    assert pos_rows["nnz"] == int(toy_data.train.positive.sum())   # toy rows are unique per user-item
    assert pos_rows["nnz"] < all_rows["nnz"] == len(toy_data.train)


def test_ease_positives_only_scores_from_positives(toy_data):
    """Score as fitted: a positives-only EASE builds x_u from the user's positives before the period
    (train for valid, train + valid for test), never from every rated item."""
    model, _ = _fit(EASE(EASEConfig(reg=100.0, positives_only=True, device="cpu")), toy_data)
    users = torch.arange(toy_data.n_users)
    for period in ("valid", "test"):
        ctx = toy_data.context(period)
        pos = toy_data.seen_before(period, positives_only=True)
        assert (ctx.seen_positive != pos).nnz == 0
        assert ctx.seen_positive.nnz < ctx.seen.nnz                     # the toy has ratings < 4
        from_pos = torch.from_numpy(pos.toarray()).double() @ model.B.double()
        from_all = torch.from_numpy(ctx.seen.toarray()).double() @ model.B.double()
        got = model.score_all(users, ctx).double()
        torch.testing.assert_close(got, from_pos, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, from_all, rtol=1e-3, atol=1e-4)
    # test-time positives include the validation positives
    assert toy_data.seen_before("test", True).nnz > toy_data.seen_before("valid", True).nnz


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("which", ["popularity", "mf", "neumf", "ease"])
def test_save_load_round_trip(which, toy_data, fitted_mf, fitted_neumf, fitted_ease, tmp_path):
    models = {"mf": fitted_mf[0], "neumf": fitted_neumf[0], "ease": fitted_ease[0],
              "popularity": _fit(Popularity(PopularityConfig(window_days=30, device="cpu")), toy_data)[0]}
    model = models[which]
    path = tmp_path / f"{which}.pt"
    model.save(path)
    loaded = type(model).load(path)
    assert loaded.cfg == model.cfg
    ctx = toy_data.context("test")
    users = torch.arange(toy_data.n_users)
    assert torch.equal(model.score_all(users, ctx), loaded.score_all(users, ctx))


# ---------------------------------------------------------------- leakage guard
class LeakyModel(Recommender):
    """Reads a period it may not learn from."""

    name = "leaky"

    def __init__(self, read):
        self.read = read

    def fit(self, data, validate=None):
        self.read(data)
        return {}


@pytest.mark.parametrize("read", [lambda d: d.test, lambda d: d.valid, lambda d: d.context("test"),
                                  lambda d: d.positives("test")])
def test_leaky_fit_raises(toy_data, read):
    with pytest.raises(LeakageError):
        _fit(LeakyModel(read), toy_data)


def test_honest_fit_reads_train(toy_data):
    _fit(LeakyModel(lambda d: d.train), toy_data)                  # allowed


def test_tune_fits_inside_guard(toy_data, validate):
    with pytest.raises(LeakageError):
        tuning.tune_model(_LeakyTunable, toy_data, {}, validate, verbose=False)


class _LeakyTunable(Recommender):
    @dataclass
    class Config:
        device: str = "cpu"
        seed: int | None = 0

    name = "leaky-tunable"

    def __init__(self, cfg):
        self.cfg = cfg

    def fit(self, data, validate=None):
        _ = data.test
        return {}


# ---------------------------------------------------------------- grid search
def test_grid_search_tries_every_combination_and_keeps_best():
    built = []

    def build(params):
        built.append(params)
        return dict(params)

    def fit(model):
        return {"best_epoch": model["a"]}

    score = lambda m: -(m["a"] - 2) ** 2 + 0.1 * m["b"]            # best: a=2, b=1
    best, params, table = tuning.grid_search(build, fit, {"a": [1, 2, 3], "b": [0, 1]}, score, verbose=False)
    assert len(built) == 6 and len(table) == 6
    assert params == {"a": 2, "b": 1} and best == params
    assert list(table.columns) == ["a", "b", "valid_metric", "fit_seconds", "best_epoch", "stage", "best"]
    assert (table["stage"] == "grid").all()                      # a = 2 is interior, b has 0: no steps
    assert table["best"].sum() == 1
    assert table.loc[table["best"], "valid_metric"].item() == pytest.approx(0.1)
    assert (table["fit_seconds"] >= 0).all()
    # a list of dicts is tried as given
    _, params, table = tuning.grid_search(build, fit, [{"a": 3, "b": 0}, {"a": 1, "b": 1}], score, verbose=False)
    assert params == {"a": 1, "b": 1} and len(table) == 2


def test_grid_search_extends_an_edge_until_validation_stops_improving():
    """The optimum (reg = 5000) lies far above the first grid (10, 50): the search steps out on a log
    scale (x5: 250, 1250, 6250, then 31250 is worse) and ends with the chosen value interior."""
    score = lambda m: -abs(np.log(m["reg"] / 5000.0)) + (0.01 if m["pos"] else 0.0)
    build = lambda params: dict(params)
    best, params, table = tuning.grid_search(build, lambda m: {}, {"reg": [10.0, 50.0], "pos": [False, True]},
                                             score, verbose=False)
    assert params == {"reg": 6250.0, "pos": True}
    edge = table[table["stage"] == "edge"]
    assert edge["reg"].tolist() == [250.0, 1250.0, 6250.0, 31250.0]
    summary = tuning.summarize(table, {"reg": [10.0, 50.0], "pos": [False, True]})
    assert summary["axes"]["reg"] == {"tried": [10.0, 50.0, 250.0, 1250.0, 6250.0, 31250.0],
                                      "chosen": 6250.0, "at_edge": False}
    assert summary["axes"]["pos"]["at_edge"] is False               # categorical: never an edge
    assert summary["at_edge"] == [] and summary["edge_steps"] == 4
    # downwards, integers, and a step budget that runs out: still at the edge, and said so
    score = lambda m: -m["dim"]                                       # smaller is always better
    _, params, table = tuning.grid_search(build, lambda m: {}, {"dim": [64, 128]}, score, verbose=False,
                                          max_steps=2)
    assert params == {"dim": 16} and table["dim"].tolist() == [64, 128, 32, 16]
    summary = tuning.summarize(table, {"dim": [64, 128]})
    assert summary["at_edge"] == ["dim"] and "STILL AT THE EDGE" in tuning.describe(summary)
    # extend=False keeps the grid as given
    _, params, table = tuning.grid_search(build, lambda m: {}, {"dim": [64, 128]}, score, verbose=False,
                                          extend=False)
    assert params == {"dim": 64} and len(table) == 2


def test_step_out_and_numeric_axes():
    assert tuning.step_out([200.0, 1000.0], 1000.0, up=True) == 5000.0
    assert tuning.step_out([200.0, 1000.0], 200.0, up=False) == 40.0
    assert tuning.step_out([1, 2], 1, up=False) is None                # nothing below 1
    assert tuning.step_out([2, 3], 2, up=False) == 1
    assert tuning.step_out([0.001, 0.003], 0.003, up=True) == 0.009
    assert tuning.step_out([4, 5], 5, up=True) == 6
    assert tuning.numeric_axes({"a": [1, 2], "b": [True, False], "c": [None, 30], "d": [0.0, 1.0],
                                "e": [3], "f": [[1], [2]]}) == ["a"]


def test_summarize_flags_an_epoch_cap():
    table = pd.DataFrame({"lr": [0.1, 0.3], "valid_metric": [0.2, 0.3], "best_epoch": [3, 5],
                          "stage": ["grid", "grid"]})
    summary = tuning.summarize(table, {"lr": [0.1, 0.3]}, epochs=5)
    assert summary["epoch_cap"] and summary["at_edge"] == ["lr"]
    assert not tuning.summarize(table, {"lr": [0.1, 0.3]}, epochs=8)["epoch_cap"]
    none = pd.DataFrame({"window_days": [None, 30, None, 30], "pos": [False, False, True, True],
                         "valid_metric": [0.1, 0.2, 0.3, 0.1], "stage": ["grid"] * 4})
    axes = tuning.summarize(none, {"window_days": [None, 30], "pos": [False, True]})["axes"]
    assert axes["window_days"] == {"tried": [30, None], "chosen": None, "at_edge": False}
    one = tuning.summarize(table.iloc[[1]], {"lr": [0.3]})
    assert one["fixed"] == ["lr"] and one["at_edge"] == [] and "NOT SEARCHED" in tuning.describe(one)


def test_summarize_lists_every_held_value():
    """Issue 40, item 5: every hyper-parameter held at one value is listed (``held``), not only the
    grid's keys: a config field outside the grid and a one-value axis; a two-value axis is not;
    epochs (the epoch cap), device, seed and printing are no hyper-parameters."""
    from recsys_lib.models.sasrec import SASRecConfig
    grid = {"max_len": [10, 20], "lr": [1e-3, 2e-3], "dim": [64], "blocks": [2], "dropout": [0.2]}
    combos = tuning.expand_grid(grid)
    table = pd.DataFrame([{**c, "valid_metric": 0.1 * i, "best_epoch": 3, "stage": "grid"}
                          for i, c in enumerate(combos)])
    cfg = SASRecConfig(max_len=20, lr=2e-3, batch_size=16, device="cpu", seed=42, progress=False)
    summary = tuning.summarize(table, grid, epochs=cfg.epochs, config=cfg)
    held = summary["held"]
    assert held == {"dim": 64, "blocks": 2, "heads": 1, "dropout": 0.2, "batch_size": 16, "patience": 5,
                    "eval_every": 1, "loss": "full", "positives_only": False}
    assert "max_len" not in held and "lr" not in held                 # searched with two values
    assert not {"epochs", "device", "seed", "progress", "verbose"} & set(held)
    assert "n_neg" not in held                                         # the full loss never reads it
    assert summary["fixed"] == ["blocks", "dim", "dropout"]            # the older key stays
    assert json.loads(json.dumps(summary))["held"] == held             # plain JSON for metrics/<model>.json
    assert "not searched (held): dim=64, blocks=2, heads=1" in tuning.describe(summary)
    sampled = tuning.summarize(table, grid, config=SASRecConfig(loss="sampled"))["held"]
    assert sampled["n_neg"] == 1024 and sampled["loss"] == "sampled"
    # without a config only the one-value axes are known; MF's reg-like fields outside a grid are held
    assert tuning.summarize(table, grid)["held"] == {"dim": 64, "blocks": 2, "dropout": 0.2}
    mf = tuning.summarize(pd.DataFrame({"lr": [0.001, 0.003], "valid_metric": [0.1, 0.2]}),
                          {"lr": [0.001, 0.003]}, config=MFConfig(lr=0.003, l2=1e-5))["held"]
    assert mf["l2"] == 1e-5 and mf["dim"] == 64 and "lr" not in mf and "epochs" not in mf
    # named variants (the two-tower): a column with two values was searched, one that a variant
    # leaves empty (None) with one value elsewhere was held
    variants = pd.DataFrame({"name": ["bpr", "softmax"], "variant": ["bpr", "softmax"], "dim": [128, 128],
                             "temperature": [None, 0.05], "valid_metric": [0.3, 0.4]})
    assert tuning.searched_names(variants, None) >= {"name", "variant", "valid_metric"}
    assert not {"dim", "temperature"} & tuning.searched_names(variants, None)
    assert tuning.searched_names(None, {"window_days": [None, 30], "x": [1]}) == {"window_days"}


def test_held_values_of_the_blend_and_of_named_variants():
    from recsys_lib.models.blend import BlendConfig
    from recsys_lib.stage2.rerankers.config import IdMLPConfig, LGBMConfig
    assert tuning.held(BlendConfig(members=["ease", "mf"])) == {"steps": 20, "max_users": None}
    a, b = LGBMConfig(name="a"), LGBMConfig(name="b", num_leaves=7, drop_features=["time"])
    assert tuning.varied_fields([a, b]) == {"name", "num_leaves", "drop_features"}
    held = tuning.held(b, tuning.varied_fields([a, b]), exclude=("variant",))
    assert "num_leaves" not in held and held["learning_rate"] == 0.05
    assert not {"num_threads", "seed", "k_eval", "name", "variant"} & set(held)
    assert tuning.held(IdMLPConfig(), exclude=("variant",))["hidden"] == [256, 128]   # JSON: a list
    assert tuning.held(None) == {} and tuning.held_text({"hidden": [256, 128], "lr": 0.001}) == "hidden=[256,128], lr=0.001"


def test_make_config_rejects_unknown_keys():
    cfg = tuning.make_config(MFConfig, {"dim": 8, "grid": {"lr": [1]}}, device="cpu", seed=None)
    assert cfg.dim == 8 and cfg.device == "cpu" and cfg.seed == 0  # None leaves the default
    with pytest.raises(ConfigError, match="dimm"):
        tuning.make_config(MFConfig, {"dimm": 8})


def test_tune_from_params_section(toy_data, validate):
    """The notebook path: a params section with a grid -> best model and its search table."""
    from recsys_lib.config import load_params
    from recsys_lib.models import ease, popularity
    params = load_params("quick")
    model, table = popularity.tune(toy_data, params["popularity"], validate, device="cpu", seed=1, verbose=False)
    assert isinstance(model, Popularity) and len(table) == 2
    assert table["valid_metric"].max() == pytest.approx(validate(model))
    model, table = ease.tune(toy_data, params["ease"], validate, device="cpu", verbose=False)
    assert isinstance(model, EASE) and len(table) >= 2
    assert model.cfg.reg == table.loc[table["best"], "reg"].item()
    assert tuning.summarize(table, params["ease"]["grid"])["at_edge"] == []   # edge steps made it interior


def test_tune_quick_mf_and_neumf_sections(toy_data, validate):
    from recsys_lib.config import load_params
    from recsys_lib.models import mf, neumf
    params = load_params("quick")
    for mod in (mf, neumf):
        section = {**params[mod.__name__.rsplit(".", 1)[1]], "grid": {"lr": [0.01]}}
        model, table = mod.tune(toy_data, section, validate, device="cpu", seed=0, verbose=False, progress=False)
        assert len(table) == 1 and table["best_epoch"].item() >= 1
        assert table["valid_metric"].item() == pytest.approx(validate(model))


def test_tune_without_validation_fits_the_first_config(toy_data):
    model, table = tuning.tune_model(EASE, toy_data, {"grid": {"reg": [30.0, 300.0]}}, None, device="cpu")
    assert model.cfg.reg == 30.0 and len(table) == 1 and bool(table["best"].item())
    assert np.isnan(table["valid_metric"].item())


def test_ease_item_cap_keeps_the_most_rated_items_and_ranks_the_rest_last(toy_data, tmp_path):
    import numpy as np
    import torch
    from recsys_lib.models.ease import EASE, EASEConfig
    ctx = toy_data.context("valid")
    users = torch.arange(20)
    full = EASE(EASEConfig(reg=200.0, device="cpu"))
    full.fit(toy_data)
    same = EASE(EASEConfig(reg=200.0, device="cpu", max_items=toy_data.n_items + 5))
    same.fit(toy_data)
    torch.testing.assert_close(full.score_all(users, ctx), same.score_all(users, ctx))
    cap = 50
    capped = EASE(EASEConfig(reg=200.0, device="cpu", max_items=cap))
    capped.fit(toy_data)
    assert capped.B.shape == (cap, cap)
    pop = np.bincount(toy_data.train.item, minlength=toy_data.n_items)
    kept = set(capped.kept.tolist())
    assert kept == set(np.argsort(-pop, kind="stable")[:cap].tolist())
    scores = capped.score_all(users, ctx)
    inside = torch.tensor(sorted(kept))
    outside = torch.tensor(sorted(set(range(toy_data.n_items)) - kept))
    assert (scores[:, inside].min(dim=1).values > scores[:, outside].max(dim=1).values).all()
    items = torch.randint(0, toy_data.n_items, (20,))
    torch.testing.assert_close(capped.score_pairs(users, items, ctx), scores[torch.arange(20), items])
    capped.save(tmp_path / "ease.pt")
    torch.testing.assert_close(EASE.load(tmp_path / "ease.pt").score_all(users, ctx), scores)


def test_grid_search_takes_the_early_stopped_score_and_it_is_the_models(toy_data, validate):
    """grid_search records the fit's best_metric instead of validating once more: the model holds
    the early-stopped state, so that is the score a fresh validation pass gives (bit for bit)."""
    section = {"dim": 8, "epochs": 3, "patience": 1, "grid": {"lr": [0.003, 0.01]}, "max_edge_steps": 0}
    model, table = tuning.tune_model(MF, toy_data, section, validate, **QUIET, seed=0)
    best = table.loc[table["best"]].iloc[0]
    assert best["valid_metric"] == validate(model)
    assert best["valid_metric"] == model.curve.best_metric
    # tie-prone models validate on the full lists (the notebooks' callback, Run.early_stopping_metric)
    assert Popularity.scores_tie and not MF.scores_tie


def test_ease_search_computes_each_input_kinds_gram_once_with_the_same_weights(toy_data, validate, monkeypatch):
    """issue 27: `ease.tune` reuses X^T X across lambdas (`gram_cache`); the search table and the
    chosen B are those of fits that each compute their own."""
    from recsys_lib.models import ease
    section = {"grid": {"reg": [10.0, 100.0, 1000.0], "positives_only": [False, True]}, "max_edge_steps": 1}
    uncached, table0 = tuning.tune_model(EASE, toy_data, section, validate, device="cpu", verbose=False)
    calls = []
    real = ease.gram
    monkeypatch.setattr(ease, "gram", lambda *a, **k: calls.append(a[0].nnz) or real(*a, **k))
    cached, table1 = ease.tune(toy_data, section, validate, device="cpu", verbose=False)
    assert len(table1) >= 6 and len(calls) == 2 and len(set(calls)) == 2   # one Gram per input kind
    pd.testing.assert_frame_equal(table0.drop(columns="fit_seconds"), table1.drop(columns="fit_seconds"))
    assert torch.equal(uncached.B, cached.B)
    assert ease._GRAMS is None                                            # the cache ends with the search
    calls.clear()
    EASE(EASEConfig(reg=5.0, device="cpu")).fit(toy_data)                 # outside a search: no cache
    EASE(EASEConfig(reg=5.0, device="cpu")).fit(toy_data)
    assert len(calls) == 2
