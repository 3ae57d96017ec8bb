"""Contiguous ids, histories, item features and the leakage guard on SplitData."""
import types

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_lib.protocol import guard
from recsys_lib.errors import LeakageError
from recsys_lib.protocol.splitdata import IdMap, SplitData, histories_before_rows, last_items


def naive_histories(user, item, n, prefix=None):
    out = np.zeros((len(user), n), dtype=np.int64)
    seen: dict[int, list[int]] = {}
    for r, (u, i) in enumerate(zip(user, item)):
        past = seen.setdefault(u, [] if prefix is None else [x - 1 for x in prefix[u].tolist() if x > 0])
        h = past[-n:]
        out[r, n - len(h):] = np.array(h, dtype=np.int64) + 1
        past.append(i)
    return out


def test_idmap_round_trip_and_unknown():
    m = IdMap(np.array([3, 10, 42]))
    assert m.encode([42, 3, 7]).tolist() == [2, 0, -1]
    assert m.decode([0, 2]).tolist() == [3, 42]


@pytest.mark.parametrize("n", [1, 3, 5])
def test_histories_before_rows_match_naive(n):
    rng = np.random.default_rng(n)
    user = rng.integers(0, 7, 80)
    item = rng.integers(0, 30, 80)
    got = histories_before_rows(user, item, n).numpy()
    assert np.array_equal(got, naive_histories(user, item, n))


def test_histories_with_prefix_continue_the_earlier_period():
    rng = np.random.default_rng(0)
    u1, i1 = rng.integers(0, 5, 40), rng.integers(0, 20, 40)
    u2, i2 = rng.integers(0, 5, 30), rng.integers(0, 20, 30)
    prefix = last_items(u1, i1, 5, 4)
    got = histories_before_rows(u2, i2, 4, prefix=prefix).numpy()
    full = naive_histories(np.r_[u1, u2], np.r_[i1, i2], 4)[len(u1):]
    assert np.array_equal(got, full)


def test_last_items_are_right_aligned_most_recent_last():
    user = np.array([0, 1, 0, 0, 1])
    item = np.array([5, 6, 7, 8, 9])
    h = last_items(user, item, 3, 2).tolist()
    assert h == [[8, 9], [7, 10], [0, 0]]


def test_periods_positives_seen_and_scored_users(toy_data):
    d = toy_data
    assert d.train.user.max() < d.n_users and d.valid.item.max() < d.n_items
    seen_test = d.seen_before("test")
    seen_valid = d.seen_before("valid")
    # every validation row is seen when scoring test, not when scoring validation
    assert np.all(seen_test[d.valid.user, d.valid.item] == 1)
    assert seen_valid.nnz == d.train.matrix(d.n_users, d.n_items).nnz
    pos = d.positives("valid")
    assert pos.nnz == len(np.unique(d.valid.user[d.valid.positive] * d.n_items + d.valid.item[d.valid.positive]))
    assert set(d.scored_users("valid")) == set(d.valid.user[d.valid.positive])


def test_history_for_test_includes_validation_rows(toy_data):
    h = toy_data.history("test", 3).numpy()
    v = toy_data.valid
    last_valid = {}
    for u, i in zip(v.user, v.item):          # rows are in time order
        last_valid[u] = i
    for u, i in list(last_valid.items())[:20]:
        assert h[u, -1] == i + 1


def test_item_features_use_train_period_tags_only():
    train = pd.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [10, 20, 10, 20], "rating": [4.0] * 4,
                          "timestamp": [1, 2, 3, 4]})
    valid = pd.DataFrame({"user_id": [1], "item_id": [10], "rating": [5.0], "timestamp": [100]})
    split = types.SimpleNamespace(train=train, valid=valid, test=valid.iloc[:0], params={"strategy": "global_temporal"})
    items = pd.DataFrame({"item_id": [10, 20], "title": ["A (1999)", "B"], "year": pd.array([1999, None], dtype="Int16"),
                          "genres": [["Drama", "Comedy"], []]})
    tags = pd.DataFrame({"user_id": [1, 2, 1, 2, 1, 2], "item_id": [10, 10, 20, 20, 10, 10],
                         "tag": ["Old", "old ", "x", "x", "Future", "future"], "timestamp": [1, 2, 3, 4, 200, 300]})
    d = SplitData.from_split(split, items, tags)
    f = d.item_features
    assert "future" not in f.tag_vocab and {"old", "x"} <= set(f.tag_vocab)
    assert f.tags[0, 0] == f.tag_vocab.index("old") + 1
    assert f.year.tolist()[1] == 0 and f.year.tolist()[0] > 0
    assert sorted(f.genre_vocab) == ["Comedy", "Drama"] and (f.genres[1] == 0).all()


def test_guard_blocks_test_rows_while_fitting(toy_data):
    with guard.fitting("mf"):
        assert len(toy_data.train) > 0
        with pytest.raises(LeakageError, match="test"):
            toy_data.test
        with pytest.raises(LeakageError):
            toy_data.history("test", 5)         # derived from validation rows
        with pytest.raises(LeakageError):
            toy_data.positives("valid")
    with guard.fitting("reranker", allow=("train", "valid")):
        toy_data.positives("valid")
        with pytest.raises(LeakageError):
            toy_data.seen_before("test") if False else toy_data.positives("test")
    with pytest.raises(LeakageError):
        with guard.fitting("cheat", allow=("train", "test")):
            pass
    assert len(toy_data.test) > 0                # outside a fit, scoring may read it


def test_run_clear_records_removes_only_the_family(tmp_path):
    from recsys_lib.run.experiment import Run
    run = Run.open("synthetic-tiny", "quick", tmp_path)
    for name in ("two_stage", "two_stage_lgbm", "ease"):
        run.path("metrics", f"{name}.json").write_text("{}")
        run.path("per_user", f"{name}-test.parquet").write_text("")
    removed = run.clear_records("two_stage")
    assert sorted(removed) == sorted(["two_stage.json", "two_stage_lgbm.json", "two_stage-test.parquet",
                                      "two_stage_lgbm-test.parquet"])
    assert (tmp_path / "metrics" / "ease.json").exists() and (tmp_path / "per_user" / "ease-test.parquet").exists()


def test_label_window_user_temporal(toy_data):
    """Each user's last max(1, floor(0.1 n)) train rows form the window; the rest is its train."""
    w = toy_data.label_window(0.1)
    train = toy_data.train
    assert len(w.train) + len(w.valid) == len(train) and len(w.test) == 0
    assert w.n_users == toy_data.n_users and w.n_items == toy_data.n_items
    n = np.bincount(train.user, minlength=toy_data.n_users)
    per_user = np.bincount(w.valid.user, minlength=toy_data.n_users)
    np.testing.assert_array_equal(per_user[n > 0], np.maximum(1, n[n > 0] // 10))
    # the window holds each user's latest rows
    last_pre = np.full(toy_data.n_users, -1)
    np.maximum.at(last_pre, w.train.user, w.train.timestamp)
    first_win = np.full(toy_data.n_users, np.iinfo(np.int64).max)
    np.minimum.at(first_win, w.valid.user, w.valid.timestamp)
    assert (last_pre <= first_win).all()
    # its "valid" scoring context is built from the pre-window rows only
    ctx = w.context("valid")
    assert ctx.seen.nnz == len(np.unique(w.train.user * w.n_items + w.train.item))


def test_label_window_global_temporal(toy_data):
    import dataclasses
    g = dataclasses.replace(toy_data, split_params={**toy_data.split_params, "strategy": "global_temporal"})
    w = g.label_window(0.1)
    n = len(toy_data.train)
    assert len(w.valid) == n - (n * 9) // 10
    assert w.train.timestamp.max() <= w.valid.timestamp.min()


def test_time_features_skip_the_sort_of_rows_in_time_order_with_the_same_result():
    """time_features sorts the known rows' timestamps only when they are out of order (the split's
    rows come in time order): the features are the same for the rows in order and shuffled."""
    from recsys_lib.protocol.splitdata import Period
    from recsys_lib.stage2.features import time_features
    rng = np.random.default_rng(0)
    n, n_users, n_items = 4000, 60, 90
    ts = np.sort(rng.integers(1_500_000_000, 1_600_000_000, n))
    rows = Period(rng.integers(0, n_users, n), rng.integers(0, n_items, n), rng.integers(1, 6, n).astype(np.float32), ts)
    perm = rng.permutation(n)
    shuffled = Period(rows.user[perm], rows.item[perm], rows.rating[perm], rows.timestamp[perm])
    users, items = rng.integers(0, n_users, 500), rng.integers(0, n_items, 500)
    years = rng.uniform(1950, 2020, n_items)
    a = time_features(rows, users, items, years, n_users)
    b = time_features(shuffled, users, items, years, n_users)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
