"""The sequential models (transition, SASRec) and the score blend: causality, the causal mask, the
full cross-entropy, the training windows, and the blend's z-scores and weights."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from recsys_lib.models import blend, sasrec, transition
from recsys_lib.protocol import guard
from recsys_lib.protocol.evaluate import Labels
from recsys_lib.protocol.splitdata import Period, SplitData
from recsys_lib.stage2 import features as rf


def _poisoned(data: SplitData, periods: tuple[str, ...], seed: int = 0) -> SplitData:
    """``data`` with the rows of ``periods`` replaced by random items (same users, times, ratings)."""
    rng = np.random.default_rng(seed)
    out = dict(data._periods)
    for p in periods:
        rows = data._periods[p]
        out[p] = Period(rows.user, rng.integers(0, data.n_items, len(rows)), rows.rating, rows.timestamp)
    return dataclasses.replace(data, _periods=out)


def _scores(model, data: SplitData, period: str) -> np.ndarray:
    ctx = data.context(period)
    users = torch.from_numpy(data.scored_users(period))
    return model.score_all(users, ctx).numpy()


# ---------------------------------------------------------------- transition
def test_transition_counts_weigh_gaps_and_keep_positives():
    rows = Period(user=np.array([0, 0, 0, 1, 1]), item=np.array([1, 2, 3, 1, 3]),
                  rating=np.array([4, 2, 5, 4, 4], np.float32), timestamp=np.array([1, 2, 3, 1, 2]))
    keys, w = transition.transition_counts(rows, 5, window=2, gap_decay=0.5)
    got = dict(zip(keys.tolist(), w.tolist()))
    assert got == {1 * 5 + 2: 1.0, 2 * 5 + 3: 1.0, 1 * 5 + 3: 0.5 + 1.0}    # 1 -> 3: two apart (u0), next (u1)
    keys, w = transition.transition_counts(rows, 5, window=1, positives_only=True)
    assert dict(zip(keys.tolist(), w.tolist())) == {1 * 5 + 3: 2.0}          # item 2 (rated 2) dropped
    T = transition.transition_matrix(rows, 5, window=2, gap_decay=0.5, normalise="row")
    np.testing.assert_allclose(np.asarray(T.sum(1)).ravel()[[1, 2]], [1.0, 1.0], rtol=1e-6)


def _one_pass_counts(rows, n_items, window, gap_decay):
    """Every (row, gap) pair at once, as transition_counts counted before it chunked."""
    order = np.lexsort((rows.item, rows.timestamp, rows.user))
    u, it = rows.user[order].astype(np.int64), rows.item[order].astype(np.int64)
    keys, weights = [], []
    for d in range(1, window + 1):
        same = u[d:] == u[:-d]
        keys.append(it[:-d][same] * n_items + it[d:][same])
        weights.append(np.full(int(same.sum()), gap_decay ** (d - 1)))
    uniq, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    return uniq, np.bincount(inverse, weights=np.concatenate(weights), minlength=len(uniq))


def _random_rows(n=3000, n_users=30, n_items=50, seed=0):
    rng = np.random.default_rng(seed)
    return Period(user=rng.integers(0, n_users, n), item=rng.integers(0, n_items, n),
                  rating=rng.choice([2.0, 4.0, 5.0], n).astype(np.float32), timestamp=rng.integers(0, 40, n))


@pytest.mark.parametrize("chunk_pairs", [1, 97, 1 << 25])
def test_transition_counts_do_not_depend_on_the_chunk_size(chunk_pairs):
    """Chunking by source item bounds memory; every weight is still summed in one pass's order."""
    rows = _random_rows()
    want_keys, want_w = _one_pass_counts(rows, 50, window=6, gap_decay=0.7)
    keys, w = transition.transition_counts(rows, 50, window=6, gap_decay=0.7, chunk_pairs=chunk_pairs)
    assert np.array_equal(keys, want_keys) and keys.dtype == np.int64
    assert np.array_equal(w, want_w)                                  # bit for bit, not approx


@pytest.mark.parametrize("normalise", transition.NORMALISE)
def test_transition_matrix_does_not_depend_on_its_block_size(normalise, monkeypatch):
    rows = _random_rows(seed=1)
    want = transition.transition_matrix(rows, 50, 4, 0.9, normalise=normalise)
    monkeypatch.setattr(transition, "BLOCK", 7)
    got = transition.transition_matrix(rows, 50, 4, 0.9, normalise=normalise)
    keys, w = _one_pass_counts(rows, 50, 4, 0.9)
    assert got.nnz == len(keys) and np.array_equal(got.indices, keys % 50)
    assert np.array_equal(got.indptr, want.indptr) and np.array_equal(got.data, want.data)
    if normalise == "none":
        assert np.array_equal(got.data, w.astype(np.float32))


def test_concatenate_freeing_empties_its_parts():
    parts = [np.arange(3), np.arange(0), np.arange(5, 7)]
    out = transition.concatenate_freeing(parts)
    assert out.tolist() == [0, 1, 2, 5, 6] and parts == []


def test_sequence_features_count_with_the_transition_model():
    """The re-ranker's sequence features and the transition model share one count."""
    assert rf.transition_counts is transition.transition_counts


def test_transition_never_counts_a_row_after_the_scoring_cut(toy_data):
    data = toy_data
    model = transition.Transition(history=3, window=3, normalise="row")
    with guard.fitting("transition"):
        model.fit(data)
    valid = _scores(model, data, "valid")
    test = _scores(model, data, "test")
    # validation scores read train rows only: poisoning validation and test rows changes nothing
    np.testing.assert_array_equal(valid, _scores(model, _poisoned(data, ("valid", "test")), "valid"))
    # test scores read train and validation rows: poisoning test rows changes nothing ...
    np.testing.assert_array_equal(test, _scores(model, _poisoned(data, ("test",)), "test"))
    # ... and they do read the validation rows (the poisoning test can fail)
    assert not np.array_equal(test, _scores(model, _poisoned(data, ("valid",)), "test"))


def _plant_pair(data: SplitData, users: np.ndarray, a: int, b: int) -> SplitData:
    """``data`` whose validation rows of ``users`` are items a, b, a, b, ... in each user's time
    order (same users, times and ratings): a pair frequent in validation only."""
    v = data._periods["valid"]
    idx = np.flatnonzero(np.isin(v.user, users))
    o = idx[np.argsort(v.user[idx], kind="stable")]                # by user, time order kept
    u = v.user[o]
    starts = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    rank = np.arange(len(o)) - np.repeat(starts, np.diff(np.r_[starts, len(o)]))
    item = v.item.copy()
    item[o] = np.where(rank % 2 == 0, a, b)
    return dataclasses.replace(data, _periods={**data._periods, "valid": Period(v.user, item, v.rating, v.timestamp)})


def test_test_time_parameters_never_count_validation_rows(toy_data):
    """One test-time rule (docs/PROTOCOL.md): at test, no parameter (the transition table and its
    tie-break, the re-ranker's item counts, windows and sequence counts) counts a validation row,
    while a user's history (last items, own rows) still includes theirs. Planting a pair that is
    frequent in other users' validation rows only must leave a user's test-time transition scores
    and features untouched, and the test table must be the train rows' table."""
    data = toy_data
    window = 3
    keys, _ = transition.transition_counts(data.train, data.n_items, window)
    pop = np.bincount(data.train.item, minlength=data.n_items)
    rare = np.argsort(pop, kind="stable")[:20]                     # a pair train never has, either way
    a, b = next((int(x), int(y)) for x in rare for y in rare
                if x < y and not np.isin([x * data.n_items + y, y * data.n_items + x], keys).any())
    scored = data.scored_users("test")
    kept, planted_users = scored[::2], np.setdiff1d(np.unique(data.valid.user), scored[::2])
    planted = _plant_pair(data, planted_users, a, b)
    # the planted rows would change a table counted on the rows known at test (so this test can fail)
    known_T = transition.transition_matrix(planted.rows_before("test"), data.n_items, window, normalise="none")
    assert known_T[a, b] > transition.transition_matrix(data.rows_before("test"), data.n_items, window,
                                                        normalise="none")[a, b] + 10

    # the transition model: the test table is the train rows' table, the one validation reads
    model = transition.Transition(history=3, window=window, normalise="row")
    model.fit(planted)
    ctx_valid, ctx_test = planted.context("valid"), planted.context("test")
    T_test, tie_test = model.table(ctx_test)
    T_train = transition.transition_matrix(data.train, data.n_items, window, normalise="row")
    assert T_test[a, b] == 0 and (T_test != T_train).nnz == 0
    np.testing.assert_array_equal(np.argsort(tie_test, kind="stable"), np.argsort(pop, kind="stable"))
    T_valid, tie_valid = model.table(ctx_valid)
    assert T_test is T_valid and tie_test is tie_valid                       # counted once per split
    # ... while the histories at test include the validation rows: the planted users' last items are a, b
    last = ctx_test.last_items(1)[torch.from_numpy(planted_users)].numpy().ravel() - 1
    assert set(last.tolist()) <= {a, b}
    users = torch.from_numpy(kept)
    np.testing.assert_array_equal(model.score_all(users, ctx_test).numpy(),
                                  model.score_all(users, data.context("test")).numpy())

    # the re-ranker's features: a kept user's test-time features do not see the planted rows
    rng = np.random.default_rng(0)
    items = np.r_[np.full(len(kept), a), np.full(len(kept), b), rng.integers(0, data.n_items, 8 * len(kept))]
    cands = pd.DataFrame({"user": np.tile(kept, 10), "item": items, "retriever_score": np.float32(0.0),
                          "retriever_rank": np.repeat(np.arange(1, 11), len(kept))})   # a, b ranked 1, 2
    cands = cands.sort_values(["user", "retriever_rank"], kind="stable").reset_index(drop=True)
    X_planted, names = rf.build_features(cands, planted, ctx_test, "test")
    X_data, names_data = rf.build_features(cands, data, data.context("test"), "test")
    assert names == names_data
    for col in ("item_log_pop", "item_log_pop_30d", "item_log_pop_90d", "item_log_pop_user_30d",
                "item_log_pop_user_365d", "item_pop_share_user_30d", "item_pop_share_user_365d",
                "item_pop_trend_user", "item_age", "seq_count_log", "seq_last_log", "seq_prob_mean",
                "seq_prob_max", "seq_lift_max"):
        j = names.index(col)
        np.testing.assert_array_equal(X_planted[:, j], X_data[:, j], err_msg=col)
    np.testing.assert_array_equal(X_planted, X_data)                          # every column
    # the item counts at test are the validation ones: the train rows'
    X_valid, _ = rf.build_features(cands, planted, ctx_valid, "valid")
    for col in ("item_log_pop", "item_log_pop_30d", "item_log_pop_90d", "item_age"):
        j = names.index(col)
        np.testing.assert_array_equal(X_planted[:, j], X_valid[:, j], err_msg=col)


def test_transition_scores_are_the_decayed_sum_of_rows_of_the_table(toy_data):
    data = toy_data
    model = transition.Transition(history=2, decay=0.5, window=2, normalise="none")
    model.fit(data)
    ctx = data.context("valid")
    T = transition.transition_matrix(data.train, data.n_items, 2, normalise="none").toarray()
    hist = ctx.last_items(2)
    users = torch.arange(5)
    want = np.zeros((5, data.n_items))
    for u in range(5):
        for col, weight in ((1, 1.0), (0, 0.5)):                 # the most recent item weighs 1
            if hist[u, col] > 0:
                want[u] += weight * T[hist[u, col] - 1]
    got = model.score_all(users, ctx).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)             # the tie-break is below 1e-11


# ---------------------------------------------------------------- SASRec
def test_training_windows_cut_each_sequence_from_its_end():
    user = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    item = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    inputs, targets = sasrec.training_windows(user, item, max_len=3)
    # user 0: targets 1..4 -> windows [2, 3, 4] and [_, _, 1]; user 1: [_, _, 6]; user 2: none
    assert targets.tolist() == [[3, 4, 5], [0, 0, 2], [0, 0, 7]]
    assert inputs.tolist() == [[2, 3, 4], [0, 0, 1], [0, 0, 6]]


def test_sasrec_later_items_never_change_an_earlier_position():
    torch.manual_seed(0)
    net = sasrec.SASRecNet(sasrec.SASRecConfig(max_len=6, dim=16, blocks=2, heads=2, dropout=0.0), n_items=20).eval()
    hist = torch.tensor([[0, 0, 3, 5, 7, 9], [1, 2, 3, 4, 5, 6]])
    changed = hist.clone()
    changed[:, 4:] = torch.tensor([[11, 12], [13, 14]])                 # positions 4 and 5 differ
    a, b = net(hist), net(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    assert torch.all(a[0, :2] == 0)                                      # padding positions output 0


def test_full_cross_entropy_equals_torch_cross_entropy():
    torch.manual_seed(0)
    hidden, weights = torch.randn(3, 4, 8), torch.randn(30, 8)
    targets = torch.tensor([[0, 5, 7, 30], [0, 0, 1, 2], [9, 10, 11, 12]])   # item + 1, 0 = padding
    real = targets > 0
    want = F.cross_entropy(hidden[real] @ weights.T, targets[real] - 1)
    torch.testing.assert_close(sasrec.full_cross_entropy(hidden, weights, targets), want)
    # sampled softmax over every item with a uniform q is the full loss shifted by nothing
    all_items = torch.arange(30)
    log_q = torch.full((30,), -np.log(30.0))
    got = sasrec.sampled_cross_entropy(hidden, weights, targets, all_items, log_q)
    torch.testing.assert_close(got, want)


def test_sasrec_fits_early_stops_and_reloads(toy_data, tmp_path):
    from recsys_lib.models import tuning
    from recsys_lib.protocol.evaluate import Evaluator
    data = toy_data
    validate = tuning.validator(Evaluator(data, "valid", ks=(10,)))
    model = sasrec.SASRec(max_len=8, dim=16, blocks=1, epochs=3, patience=1, batch_size=16, lr=3e-3,
                          progress=False, verbose=False, device="cpu")
    with guard.fitting("sasrec"):
        info = model.fit(data, validate)
    assert 1 <= info["best_epoch"] <= 3 and info["n_windows"] > 0
    model.save(tmp_path / "s.pt")
    again = sasrec.SASRec.load(tmp_path / "s.pt", device="cpu")
    users = torch.arange(4)
    ctx = data.context("test")
    torch.testing.assert_close(model.score_all(users, ctx), again.score_all(users, ctx))


# ---------------------------------------------------------------- blend
def test_unseen_zscore_ignores_seen_and_floored_items():
    scores = torch.tensor([[1.0, 2.0, 3.0, -1e6, 100.0]])
    seen = sp.csr_matrix(np.array([[0, 0, 0, 0, 1]], np.float32))
    z = blend.unseen_zscore(scores, seen, np.array([0]))[0]
    ref = (np.array([1.0, 2.0, 3.0]) - 2.0) / np.std([1.0, 2.0, 3.0])
    np.testing.assert_allclose(z[:3].numpy(), ref, rtol=1e-6)
    assert z[3] == z[:3].min() and z[4] == 0


class _Fixed:
    """A scorer with fixed (n_users, n_items) scores."""

    def __init__(self, table):
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def score_all(self, users, ctx):
        return self.table[users].clone()


def test_blend_weights_the_model_that_ranks_the_labels():
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 30
    positives = sp.csr_matrix((rng.random((n_users, n_items)) < 0.1).astype(np.float32))
    good = positives.toarray() + 0.1 * rng.random((n_users, n_items))        # ranks the labels first
    noise = rng.random((n_users, n_items))
    seen = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    users = np.flatnonzero(np.diff(positives.indptr) > 0)
    ctx = type("Ctx", (), {"seen": seen, "period": "valid"})()
    labels = Labels(period="valid", users=users, positives=positives[users], ctx=ctx, n_items=n_items)
    model, table = blend.tune({"noise": _Fixed(noise), "good": _Fixed(good)}, labels, steps=4, verbose=False)
    assert model.weights == {"good": 1.0}
    assert table["best"].sum() == 1 and table.loc[table["best"], "valid_metric"].iloc[0] == pytest.approx(1.0)
    got = model.score_all(torch.from_numpy(users), ctx).numpy()
    assert (got.argmax(1) == np.argmax(good[users], 1)).all()


def test_blend_ndcg_does_not_depend_on_the_user_batch():
    """Batches bound the temporaries only: same per-user top-k (ties included), same mean."""
    rng = np.random.default_rng(3)
    n_users, n_items = 23, 40
    z = {"a": rng.integers(0, 3, (n_users, n_items)).astype(np.float32),    # many exact ties
         "b": rng.standard_normal((n_users, n_items)).astype(np.float32)}
    seen = sp.csr_matrix((rng.random((n_users, n_items)) < 0.2).astype(np.float32))
    positives = sp.csr_matrix(((rng.random((n_users, n_items)) < 0.15) & (seen.toarray() == 0)).astype(np.float32))
    for weights in ({"a": 1.0}, {"a": 0.25, "b": 0.75}):
        whole = blend.blend_ndcg(z, weights, seen, positives, k=10, batch_users=n_users)
        assert 0 < whole < 1
        for batch in (1, 5, 1024):
            assert blend.blend_ndcg(z, weights, seen, positives, k=10, batch_users=batch) == whole
