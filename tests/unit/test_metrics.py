"""Tests of recsys_lib.protocol.metrics: hand-computed cases, limits, agreement with ranx, bootstrap."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from recsys_lib.protocol import metrics as M

L2 = np.log2


# ---------------------------------------------------------------- hand-computed cases
def test_hand_computed():
    hits = np.array([[1, 0, 1, 0],       # hits at ranks 1 and 3, 3 positives
                     [0, 1, 0, 0],       # hit at rank 2, 1 positive
                     [0, 0, 0, 0],       # no hit, 2 positives
                     [0, 0, 0, 1]], bool)
    n_pos = np.array([3, 1, 2, 5])
    k = 3
    ndcg = M.ndcg_at_k(hits, n_pos, k)
    np.testing.assert_allclose(ndcg, [
        (1 + 1 / L2(4)) / (1 + 1 / L2(3) + 1 / L2(4)),
        (1 / L2(3)) / 1.0,
        0.0,
        0.0,                              # the hit at rank 4 is outside the top 3
    ], rtol=0, atol=1e-15)
    np.testing.assert_allclose(M.recall_at_k(hits, n_pos, k), [2 / 3, 1, 0, 0])
    np.testing.assert_allclose(M.recall_at_k(hits, n_pos, 4), [2 / 3, 1, 0, 1 / 5])
    np.testing.assert_allclose(M.hit_rate_at_k(hits, k), [1, 1, 0, 0])
    np.testing.assert_allclose(M.mrr_at_k(hits, k), [1, 1 / 2, 0, 0])
    np.testing.assert_allclose(M.mrr_at_k(hits, 4), [1, 1 / 2, 0, 1 / 4])
    np.testing.assert_allclose(M.precision_at_k(hits, k), [2 / 3, 1 / 3, 0, 0])
    # n_pos > k: IDCG uses min(n_pos, k) = 3 hits; the last user's 5 positives give IDCG@4
    np.testing.assert_allclose(M.ndcg_at_k(hits, n_pos, 4)[3],
                               (1 / L2(5)) / sum(1 / L2(r + 1) for r in range(1, 5)))


def test_limits():
    k = 10
    perfect = np.zeros((3, 20), bool)
    perfect[0, :4] = True                # 4 positives, all at the top
    perfect[1, :10] = True               # 15 positives (> k), top 10 all hits
    perfect[2, :1] = True
    n_pos = np.array([4, 15, 1])
    np.testing.assert_allclose(M.ndcg_at_k(perfect, n_pos, k), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(M.recall_at_k(perfect, n_pos, k), [1, 10 / 15, 1])
    empty = np.zeros((3, 20), bool)
    assert (M.ndcg_at_k(empty, n_pos, k) == 0).all()
    assert (M.recall_at_k(empty, n_pos, k) == 0).all()
    assert (M.hit_rate_at_k(empty, k) == 0).all() and (M.mrr_at_k(empty, k) == 0).all()
    # users with no positive get 0, without a division warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.ndcg_at_k(perfect, np.zeros(3), k).tolist() == [0, 0, 0]
        assert M.recall_at_k(perfect, np.zeros(3), k).tolist() == [0, 0, 0]
    # no users
    assert M.ndcg_at_k(np.zeros((0, 10), bool), np.zeros(0), 10).shape == (0,)
    with pytest.raises(ValueError):
        M.ndcg_at_k(np.zeros((2, 5), bool), np.ones(2), 10)      # fewer than k columns
    with pytest.raises(ValueError):
        M.ndcg_at_k(np.zeros((2, 10), bool), np.ones(3), 10)     # n_pos of the wrong length


def test_coverage():
    top = np.array([[0, 1, 2, 9], [1, 2, 3, 9], [2, -1, -1, -1]])
    assert M.coverage_at_k(top, n_items=10, k=3) == pytest.approx(4 / 10)   # 0 1 2 3
    assert M.coverage_at_k(top, n_items=10, k=4) == pytest.approx(5 / 10)   # + 9, not -1
    with pytest.raises(ValueError):
        M.coverage_at_k(top, 10, 5)


def test_ranked_hits_matches_dense_lookup():
    rng = np.random.default_rng(0)
    U, n_items, K = 300, 80, 25
    dense = rng.random((U, n_items)) < 0.1
    dense[5] = False                                          # a user with no positive
    pos = sp.csr_matrix(dense)
    top = np.argsort(rng.random((U, n_items)), axis=1)[:, :K]
    top[7, -3:] = -1                                          # padding is never a hit
    got = M.ranked_hits(top, pos)
    want = np.take_along_axis(dense, np.where(top >= 0, top, 0), axis=1) & (top >= 0)
    assert got.dtype == bool and got.shape == (U, K)
    np.testing.assert_array_equal(got, want)
    # explicit zeros and unsorted indices in the sparse matrix are handled
    weird = sp.csr_matrix((np.array([1, 0, 1]), np.array([3, 1, 0]), np.array([0, 3])),
                          shape=(1, 5))
    np.testing.assert_array_equal(M.ranked_hits(np.array([[0, 1, 3, 4]]), weird),
                                  [[True, False, True, False]])
    assert not M.ranked_hits(np.array([[0, 1]]), sp.csr_matrix((1, 5))).any()


# ---------------------------------------------------------------- agreement with ranx
@pytest.fixture(scope="module")
def ranx_case():
    """200 users, 50 items, distinct random scores, random positives (>= 1 per user),
    scored by ranx once (its first call compiles numba: ~30-40 s)."""
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(42)
    U, n_items = 200, 50
    scores = rng.permutation(U * n_items).reshape(U, n_items) / (U * n_items)   # no ties
    dense = rng.random((U, n_items)) < rng.uniform(0.02, 0.5, size=(U, 1))
    dense[np.arange(U), rng.integers(0, n_items, U)] = True
    qrels = ranx.Qrels({f"u{u}": {f"i{i}": 1 for i in np.flatnonzero(dense[u])} for u in range(U)})
    run = ranx.Run({f"u{u}": {f"i{i}": float(scores[u, i]) for i in range(n_items)}
                    for u in range(U)})
    names = ["ndcg@10", "ndcg@5", "recall@10", "recall@30", "hit_rate@10", "mrr@10",
             "precision@10"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranx.evaluate(qrels, run, names, return_mean=False)
    ref = {m: np.array([run.scores[m][f"u{u}"] for u in range(U)]) for m in names}
    top = np.argsort(-scores, axis=1)                         # full ranking
    hits = M.ranked_hits(top, sp.csr_matrix(dense))
    return hits, dense.sum(axis=1), ref


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["ndcg@10", "ndcg@5", "recall@10", "recall@30",
                                    "hit_rate@10", "mrr@10", "precision@10"])
def test_agrees_with_ranx(ranx_case, metric):
    hits, n_pos, ref = ranx_case
    name, k = metric.split("@")
    k = int(k)
    ours = {"ndcg": lambda: M.ndcg_at_k(hits, n_pos, k),
            "recall": lambda: M.recall_at_k(hits, n_pos, k),
            "hit_rate": lambda: M.hit_rate_at_k(hits, k),
            "mrr": lambda: M.mrr_at_k(hits, k),
            "precision": lambda: M.precision_at_k(hits, k)}[name]()
    assert ref[metric].std() > 0                              # a non-trivial comparison
    np.testing.assert_allclose(ours, ref[metric], rtol=0, atol=1e-9)


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_ci_contains_mean_narrows_and_is_deterministic():
    rng = np.random.default_rng(0)
    small = rng.random(100)
    big = rng.random(10_000)
    ci_small = M.bootstrap_ci(small, n_resamples=500, seed=1)
    ci_big = M.bootstrap_ci(big, n_resamples=500, seed=1)
    for ci, v in ((ci_small, small), (ci_big, big)):
        assert set(ci) == {"mean", "lo", "hi"}
        assert ci["mean"] == pytest.approx(v.mean())
        assert ci["lo"] < ci["mean"] < ci["hi"]
    assert ci_big["hi"] - ci_big["lo"] < (ci_small["hi"] - ci_small["lo"]) / 4
    # about the normal-theory width 2 * 1.96 * sd / sqrt(n)
    assert ci_big["hi"] - ci_big["lo"] == pytest.approx(2 * 1.96 * big.std() / 100, rel=0.2)
    assert M.bootstrap_ci(small, n_resamples=500, seed=1) == ci_small
    assert M.bootstrap_ci(small, n_resamples=500, seed=2) != ci_small
    # the chunked draw gives the same answer as a single draw
    assert M._resampled_means(small, 300, 3, max_cells=1000).tolist() == \
        M._resampled_means(small, 300, 3).tolist()
    constant = M.bootstrap_ci(np.full(50, 0.25))
    assert constant == {"mean": 0.25, "lo": 0.25, "hi": 0.25}
    assert np.isnan(M.bootstrap_ci(np.array([]))["mean"])


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.random(2000)
    same = M.paired_bootstrap(a, a.copy())
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_value": 1.0}
    better = M.paired_bootstrap(a + 0.05, a + rng.normal(0, 0.01, a.size), seed=3)
    assert better["diff"] > 0 and better["lo"] > 0 and better["p_value"] < 0.01
    worse = M.paired_bootstrap(a, a + 0.05 + rng.normal(0, 0.01, a.size), seed=3)
    assert worse["diff"] < 0 and worse["hi"] < 0 and worse["p_value"] < 0.01
    noise = M.paired_bootstrap(a, rng.permutation(a), seed=3)
    assert noise["lo"] < 0 < noise["hi"] and noise["p_value"] > 0.05
    assert M.paired_bootstrap(a, a[::-1], seed=5) == M.paired_bootstrap(a, a[::-1], seed=5)
    with pytest.raises(ValueError):
        M.paired_bootstrap(a, a[:10])


def test_random_ndcg_is_the_mean_over_every_ordering_and_matches_a_simulation():
    import itertools
    # exact: 2 positives among 4 candidates, every one of the 24 orderings equally likely
    hits = np.array([list(p) for p in itertools.permutations([1, 1, 0, 0])], dtype=bool)
    exact = M.ndcg_at_k(hits, np.full(len(hits), 2), 3).mean()
    assert M.random_ndcg_at_k([2], [4], 3)[0] == pytest.approx(exact, abs=1e-12)
    # fewer candidates than k: ranks beyond the list hold nothing
    assert M.random_ndcg_at_k([1], [2], 10)[0] == pytest.approx((1 + 1 / np.log2(3)) / 2, abs=1e-12)
    assert M.random_ndcg_at_k([0, 3], [5, 3], 10)[0] == 0.0 and M.random_ndcg_at_k([3], [3], 10)[0] == 1.0
    # simulated shuffles of 200 candidates, 7 of them positives
    rng = np.random.default_rng(0)
    sims = np.array([rng.permutation(200)[:10] < 7 for _ in range(20_000)])
    assert M.ndcg_at_k(sims, np.full(len(sims), 7), 10).mean() == pytest.approx(
        M.random_ndcg_at_k([7], [200], 10)[0], rel=0.03)
    with pytest.raises(ValueError):
        M.random_ndcg_at_k([5], [4], 10)
