"""A causal catalogue (docs/PROTOCOL.md): under ``user_temporal`` no model may recommend an item
whose first interaction in the known rows is at or after the user's scoring cut.

The toy here staggers users in time (each is active for a short spell, users arrive over the whole
range) and releases items over time, as MovieLens does; the shared ``toy_data`` fixture does not
(every toy user spans the whole range, so no item is blocked there). Each check recomputes the
first times and cuts from the raw frames, independently of `CausalCatalogue`, and asserts that
the unmasked lists (``causal_catalogue=False``) break it, so the check can fail.
"""
from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_lib.errors import ConfigError
from recsys_lib.models import blend
from recsys_lib.models.ease import EASE
from recsys_lib.models.popularity import Popularity
from recsys_lib.params import check_overrides
from recsys_lib.protocol import guard, metrics
from recsys_lib.protocol.evaluate import EvalConfig, Evaluator, Labels, evaluate_ranking, rank_topk
from recsys_lib.protocol.split import global_temporal, user_temporal
from recsys_lib.protocol.splitdata import SplitData
from recsys_lib.stage2.candidates import add_sources, generate_candidates

T0, SPAN = 1_500_000_000, 100_000_000


def staggered_interactions(n_users: int = 240, n_items: int = 120, per_user: int = 25,
                           seed: int = 1) -> pd.DataFrame:
    """Users active for 5% of the range each, starting anywhere in its first 90%; items released
    over its first 80% (the first 40 at the start), newer items more popular."""
    rng = np.random.default_rng(seed)
    release = np.sort(np.r_[np.zeros(40), rng.uniform(0, 0.8, n_items - 40)]) * SPAN + T0
    taste = rng.normal(size=(n_users, 3)) @ rng.normal(size=(3, n_items))
    rows = []
    for u in range(n_users):
        start = T0 + rng.uniform(0, 0.9) * SPAN
        out = np.flatnonzero(release <= start)
        logits = taste[u, out] + 2.0 * (release[out] - T0) / SPAN            # new releases are popular
        p = np.exp(logits - logits.max()); p /= p.sum()
        items = rng.choice(out, size=min(per_user, len(out)), replace=False, p=p)
        ts = np.sort(rng.integers(int(start), int(start + 0.05 * SPAN), size=len(items)))
        rating = np.clip(np.round(3.0 + taste[u, items]) , 1.0, 5.0)
        rows.append(pd.DataFrame({"user_id": u + 1, "item_id": items + 1, "rating": rating, "timestamp": ts}))
    return pd.concat(rows, ignore_index=True).astype(
        {"user_id": "int32", "item_id": "int32", "rating": "float32", "timestamp": "int64"})


@pytest.fixture(scope="module")
def inter() -> pd.DataFrame:
    return staggered_interactions()


@pytest.fixture(scope="module")
def data(inter) -> SplitData:
    return SplitData.from_split(user_temporal(inter, core=5), name="staggered")


def future_items(data: SplitData, period: str) -> tuple[np.ndarray, np.ndarray]:
    """Independently of the library: (first time of each item in the known rows (n_items,),
    each user's first time in ``period`` (n_users,); int64 max where none), from plain pandas."""
    known = pd.concat([pd.DataFrame({"item": data.period(p).item, "t": data.period(p).timestamp})
                       for p in data.before(period)])
    first = np.full(data.n_items, np.iinfo(np.int64).max)
    g = known.groupby("item")["t"].min()
    first[g.index.to_numpy()] = g.to_numpy()
    rows = data.period(period)
    cut = np.full(data.n_users, np.iinfo(np.int64).max)
    c = pd.DataFrame({"user": rows.user, "t": rows.timestamp}).groupby("user")["t"].min()
    cut[c.index.to_numpy()] = c.to_numpy()
    return first, cut


def assert_causal(data: SplitData, period: str, users: np.ndarray, items: np.ndarray) -> None:
    """No (user, item) pair recommends an item first seen at or after the user's cut.
    ``users`` (U,) with ``items`` (U, K), or flat pairs (n,), (n,); item -1 is padding."""
    first, cut = future_items(data, period)
    items = np.asarray(items)
    users = np.asarray(users)
    if items.ndim == 2:
        users = np.repeat(users, items.shape[1])
        items = items.reshape(-1)
    bad = (items >= 0) & (first[items] >= cut[users])
    assert not bad.any(), (f"{int(bad.sum())} recommendations of items first seen at or after the user's "
                           f"{period} cut, e.g. user {users[bad][0]} item {items[bad][0]}")


def _fit(model, data):
    with guard.fitting(model.name):
        model.fit(data)
    return model


@pytest.fixture(scope="module")
def models(data) -> dict:
    """Two models of the library, cheap to fit: popularity and a personalised one (EASE)."""
    return {"popularity": _fit(Popularity(device="cpu"), data),
            "ease": _fit(EASE(device="cpu"), data)}


def test_the_toy_blocks_items_and_a_few_positives(data):
    """The staggered toy has what the check needs: items first seen after some users' cuts."""
    blocked_positives = 0
    for period in ("valid", "test"):
        labels = Labels.build(data, period)
        cat = labels.ctx.catalogue
        assert cat is not None
        first, cut = future_items(data, period)
        np.testing.assert_array_equal(cat.item_first, first)             # the library agrees with pandas
        np.testing.assert_array_equal(cat.cut, cut)
        blocked = cat.blocked_counts(labels.users)
        assert (blocked > 0).mean() > 0.3 and blocked.max() > 0.2 * data.n_items
        dense = cat.blocked(labels.users).numpy()                           # (U, n_items)
        np.testing.assert_array_equal(dense.sum(1), blocked)
        seen = labels.ctx.seen[labels.users].toarray() > 0
        np.testing.assert_array_equal(labels.n_candidates(), (~seen & ~dense).sum(1))
        pos = labels.positives.toarray() > 0
        np.testing.assert_array_equal(labels.n_blocked_pos, (pos & dense).sum(1))
        blocked_positives += labels.n_blocked_pos.sum()
    assert blocked_positives > 0


class NewestFirst:
    """The worst case for the rule, whatever the model: scores items by their last train row's time."""

    def __init__(self, data):
        first = np.full(data.n_items, 0, dtype=np.int64)
        np.maximum.at(first, data.train.item, data.train.timestamp)
        self.score = torch.from_numpy((first - first.min()).astype(np.float32))

    def score_all(self, users, ctx):
        return self.score.expand(len(users), -1).clone()


@pytest.mark.parametrize("period", ["valid", "test"])
@pytest.mark.parametrize("name", ["popularity", "ease", "newest_first"])
def test_no_model_recommends_an_item_first_seen_after_the_cut(data, models, period, name):
    model = models[name] if name in models else NewestFirst(data)
    ev = Evaluator(data, period, ks=(10, 50))
    res = ev(model)                                                       # the report's path
    assert_causal(data, period, res.users, res.topk)
    top = rank_topk(model, ev.labels.users, ev.labels.ctx, 50)            # the longest lists
    assert_causal(data, period, ev.labels.users, top)
    off = Evaluator(data, period, ks=(10, 50), causal_catalogue=False)
    assert off.labels.ctx.catalogue is None
    with pytest.raises(AssertionError, match="first seen at or after"):   # without the mask, it fails
        assert_causal(data, period, off.labels.users, off(model).topk)
    # the users and labels are the same: a blocked positive still counts (nothing is dropped)
    np.testing.assert_array_equal(ev.labels.users, off.labels.users)
    assert (ev.labels.positives != off.labels.positives).nnz == 0


def test_the_early_stopping_pass_is_masked_too(data, models):
    """`Evaluator.metric` (the early-stopping callback) ranks through the same mask."""
    model = models["popularity"]
    ev = Evaluator(data, "valid", ks=(10,))
    top = rank_topk(model, ev.labels.users, ev.labels.ctx, 1000)
    masked = evaluate_ranking(top, ev.labels, ks=(10,)).means()["ndcg@10"]
    assert ev.metric(model, full_lists=True) == pytest.approx(masked)
    off = Evaluator(data, "valid", ks=(10,), causal_catalogue=False)
    assert off.metric(model, full_lists=True) != pytest.approx(masked)


def test_the_blend_is_tuned_and_ranked_under_the_mask(data, models):
    labels = Labels.build(data, "valid")
    b, table = blend.tune(models, labels, steps=4, verbose=False)
    ev = Evaluator(data, "valid", ks=(10,))
    assert_causal(data, "valid", ev.labels.users, ev(b).topk)
    # the weights were chosen on the very number the masked evaluation gives
    assert table["valid_metric"].max() == pytest.approx(ev.metric(b), abs=1e-9)


def test_candidates_obey_the_mask(data, models):
    """Stage 2's candidate lists: the retriever's and every other source's (`add_sources`)."""
    for period in ("valid", "test"):
        labels = Labels.build(data, period)
        cands = generate_candidates(models["ease"], labels, k=50)
        cands = add_sources(cands, models["ease"], {"popularity": models["popularity"]}, labels.ctx, k=50)
        assert_causal(data, period, cands["user"].to_numpy(), cands["item"].to_numpy())
        off = Labels.build(data, period, causal_catalogue=False)
        loose = generate_candidates(models["ease"], off, k=50)
        with pytest.raises(AssertionError, match="first seen at or after"):
            assert_causal(data, period, loose["user"].to_numpy(), loose["item"].to_numpy())


class Oracle:
    """Scores the period's positives highest, blocked ones included: an upper bound."""

    def __init__(self, data, period):
        self.pos = torch.tensor(data.positives(period).toarray())

    def score_all(self, users, ctx):
        return self.pos[users] + 1e-3 * torch.rand(len(users), self.pos.shape[1])


@pytest.mark.parametrize("period", ["valid", "test"])
def test_blocked_positives_are_misses_and_padding_never_hits(data, period):
    """A positive on an item outside the user's catalogue stays in the labels and counts as a miss
    for every model, the oracle included; masked slots at the end of a short list are -1."""
    ev = Evaluator(data, period, ks=(10, data.n_items))
    res = ev(Oracle(data, period))
    n_pos, n_blocked = ev.labels.n_pos, ev.labels.n_blocked_pos       # one blocked positive on valid
    np.testing.assert_allclose(res.per_user[f"recall@{data.n_items}"], (n_pos - n_blocked) / n_pos)
    top = rank_topk(Oracle(data, period), ev.labels.users, ev.labels.ctx, data.n_items)   # every item
    np.testing.assert_array_equal((top == -1).sum(1), ev.labels.ctx.catalogue.blocked_counts(ev.labels.users))


def test_global_temporal_is_a_no_op(models, toy_rows):
    """Under a global split every known row precedes every scored row: no catalogue is built,
    and one built anyway would block nothing strictly later than a cut. (The staggered toy has
    almost no user in both the train and the test period of a global split: the conftest toy.)"""
    g = SplitData.from_split(global_temporal(toy_rows, train_core=2, eval_core=1), name="global")
    for period in ("valid", "test"):
        on, off = Labels.build(g, period), Labels.build(g, period, causal_catalogue=False)
        assert on.ctx.catalogue is None and not g.causal(True)
        pop = _fit(Popularity(device="cpu"), g)
        np.testing.assert_array_equal(rank_topk(pop, on.users, on.ctx, 20), rank_topk(pop, off.users, off.ctx, 20))
        first, cut = future_items(g, period)
        assert first.max() <= cut[on.users].min()                          # ties at the cut's second only
        cat = g.causal_catalogue(period)                                    # built on request only
        assert cat.item_first.max() <= cat.cut[on.users].min()


def test_random_floor_counts_blocked_positives_as_misses():
    """`random_ndcg_at_k` with ``n_hittable``: blocked positives stay in IDCG, out of the DCG."""
    k3 = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    both = metrics.random_ndcg_at_k([2], [4], 3)[0]
    one = metrics.random_ndcg_at_k([2], [4], 3, n_hittable=[1])[0]
    assert one == pytest.approx(both / 2) and both == pytest.approx(2 / 4 * k3 / (1 + 1 / np.log2(3)))
    assert metrics.random_ndcg_at_k([3], [5], 10, n_hittable=[0])[0] == 0.0
    with pytest.raises(ValueError):
        metrics.random_ndcg_at_k([1], [5], 10, n_hittable=[2])


def test_the_parameter(data):
    assert EvalConfig().causal_catalogue is True
    assert EvalConfig.from_params({"causal_catalogue": False}).causal_catalogue is False
    with pytest.raises(ConfigError, match="causal_catalogue"):
        EvalConfig.from_params({"causal_catalog": False})
    check_overrides({"eval": {"causal_catalogue": True}}, ["eval.causal_catalogue=false"])
    with pytest.raises(ConfigError):
        check_overrides({"eval": {"causal_catalogue": True}}, ["eval.causal_catalogue=3"])
    assert Labels.build(data, "valid", causal_catalogue=True).ctx.catalogue is not None
