"""Ranking metrics over a boolean hit matrix, as docs/PROTOCOL.md, "Metrics", defines them.

Every metric takes ``hits``, a ``(U, >= k)`` boolean matrix where ``hits[u, r]`` says whether
the item user ``u`` was shown at rank ``r + 1`` is one of that user's positives (binary
relevance), and returns one value per user; average them (``.mean()``) for the reported
number and keep them for confidence intervals (``bootstrap_ci``) and paired comparisons
(``paired_bootstrap``). ``ranked_hits`` builds the matrix from top-k item ids and a sparse
positives matrix. Users with no positive (``n_pos == 0``) get 0 in every metric: the protocol
scores only users with at least one positive, so callers should leave them out.

The formulas agree with ranx (tests/unit/test_metrics.py) to 1e-9.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["ndcg_at_k", "recall_at_k", "hit_rate_at_k", "mrr_at_k", "precision_at_k",
           "coverage_at_k", "ranked_hits", "bootstrap_ci", "paired_bootstrap", "discounts",
           "random_ndcg_at_k"]


def _top(hits: np.ndarray, k: int) -> np.ndarray:
    hits = np.asarray(hits)
    if hits.ndim != 2:
        raise ValueError(f"hits must be a (users, k) matrix, got shape {hits.shape}")
    if k < 1 or hits.shape[1] < k:
        raise ValueError(f"k={k} needs 1 <= k <= hits.shape[1] = {hits.shape[1]}")
    return hits[:, :k].astype(bool, copy=False)


def _n_pos(n_pos: np.ndarray, n_users: int) -> np.ndarray:
    n_pos = np.asarray(n_pos, dtype=np.int64).reshape(-1)
    if n_pos.shape[0] != n_users:
        raise ValueError(f"n_pos has {n_pos.shape[0]} entries for {n_users} users")
    return n_pos


def discounts(k: int) -> np.ndarray:
    """``1 / log2(r + 1)`` for ranks r = 1..k."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def ndcg_at_k(hits: np.ndarray, n_pos: np.ndarray, k: int) -> np.ndarray:
    """nDCG@k with binary gain (Järvelin & Kekäläinen), per user.

        DCG@k  = sum_{r=1..k} hits[r] / log2(r + 1)
        IDCG@k = sum_{r=1..min(n_pos, k)} 1 / log2(r + 1)
        nDCG@k = DCG@k / IDCG@k,   and 0 for users with n_pos == 0.

    ``n_pos`` is the user's number of positives in the scored period (all of them, not only
    those ranked), so a positive the model failed to rank still lowers nDCG.
    """
    top = _top(hits, k)
    n_pos = _n_pos(n_pos, top.shape[0])
    disc = discounts(k)
    dcg = top @ disc
    ideal = np.concatenate([[0.0], np.cumsum(disc)])[np.minimum(n_pos, k).clip(0)]
    out = np.zeros(top.shape[0], dtype=np.float64)
    np.divide(dcg, ideal, out=out, where=ideal > 0)
    return out


def random_ndcg_at_k(n_pos: np.ndarray, n_candidates: np.ndarray, k: int,
                     n_hittable: np.ndarray | None = None) -> np.ndarray:
    """Expected nDCG@k of a uniformly random ranking, per user, where ``n_candidates`` items are
    ranked and ``n_hittable`` of them (default ``n_pos``) are among the user's ``n_pos`` positives:

        E[DCG@k] = n_hittable / n_candidates * sum_{r=1..min(k, n_candidates)} 1 / log2(r + 1)

    (every rank holds a positive with probability n_hittable / n_candidates), divided by IDCG@k
    over all ``n_pos`` positives as in `ndcg_at_k` (a positive no ranking may hold, such as one
    outside the causal catalogue, still counts in IDCG). The floor any learnt model must clear by a
    wide margin; 0 when n_pos == 0."""
    n_pos = np.asarray(n_pos, dtype=np.float64).reshape(-1)
    n_cand = np.asarray(n_candidates, dtype=np.int64).reshape(-1)
    hit = n_pos if n_hittable is None else np.asarray(n_hittable, dtype=np.float64).reshape(-1)
    if n_cand.shape != n_pos.shape or hit.shape != n_pos.shape:
        raise ValueError(f"n_candidates / n_hittable have {n_cand.shape[0]} / {hit.shape[0]} entries "
                         f"for {n_pos.shape[0]} users")
    if (hit > n_cand).any() or (hit > n_pos).any() or (hit < 0).any():
        raise ValueError("a user has more positives than ranked candidates")
    cum = np.concatenate([[0.0], np.cumsum(discounts(k))])
    dcg = np.divide(hit, n_cand, out=np.zeros_like(hit), where=n_cand > 0) * cum[np.minimum(n_cand, k)]
    ideal = cum[np.minimum(n_pos.astype(np.int64), k)]
    out = np.zeros_like(n_pos)
    np.divide(dcg, ideal, out=out, where=ideal > 0)
    return out


def recall_at_k(hits: np.ndarray, n_pos: np.ndarray, k: int) -> np.ndarray:
    """Recall@k = (hits in the top k) / n_pos per user; 0 when n_pos == 0.

    The denominator is n_pos, not min(n_pos, k): a user with more than k positives cannot
    reach 1 (as in ranx, pytrec_eval and RecBole)."""
    top = _top(hits, k)
    n_pos = _n_pos(n_pos, top.shape[0])
    out = np.zeros(top.shape[0], dtype=np.float64)
    np.divide(top.sum(axis=1, dtype=np.float64), n_pos, out=out, where=n_pos > 0)
    return out


def precision_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """Precision@k = (hits in the top k) / k per user (a short list still divides by k)."""
    return _top(hits, k).sum(axis=1, dtype=np.float64) / k


def hit_rate_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """HitRate@k = 1 if any of the top k items is a positive, else 0, per user."""
    return _top(hits, k).any(axis=1).astype(np.float64)


def mrr_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """MRR@k = 1 / (rank of the first hit) if there is a hit in the top k, else 0, per user
    (ranks are 1-based)."""
    top = _top(hits, k)
    first = top.argmax(axis=1)                      # index of the first True (0 if none)
    return np.where(top.any(axis=1), 1.0 / (first + 1.0), 0.0)


def coverage_at_k(topk_items: np.ndarray, n_items: int, k: int) -> float:
    """Catalogue coverage@k = |distinct items in anyone's top k| / n_items.

    Negative ids (padding for users with fewer than k candidates) are not counted."""
    top = np.asarray(topk_items)
    if top.ndim != 2 or top.shape[1] < k:
        raise ValueError(f"topk_items must be (users, >= {k}), got shape {top.shape}")
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    items = np.unique(top[:, :k])
    return float((items >= 0).sum() / n_items)


def ranked_hits(topk_items: np.ndarray, positives: sp.csr_matrix) -> np.ndarray:
    """``hits[u, r] = positives[u, topk_items[u, r]] != 0`` without a per-user loop.

    ``topk_items`` is (U, K) item ids (negative = padding, never a hit); ``positives`` is a
    (U, n_items) sparse matrix whose nonzero entries are the user's positives. Works by a
    binary search of the keys ``u * n_items + item`` in the matrix's sorted nonzero keys.
    """
    top = np.asarray(topk_items)
    if top.ndim != 2:
        raise ValueError(f"topk_items must be a (users, K) matrix, got shape {top.shape}")
    pos = sp.csr_matrix(positives, copy=True)
    if pos.shape[0] != top.shape[0]:
        raise ValueError(f"positives has {pos.shape[0]} rows for {top.shape[0]} users")
    pos.eliminate_zeros()
    pos.sum_duplicates()                            # also sorts the column indices
    n_items = np.int64(pos.shape[1])
    rows = np.repeat(np.arange(pos.shape[0], dtype=np.int64), np.diff(pos.indptr))
    pos_keys = rows * n_items + pos.indices.astype(np.int64)       # sorted, row-major
    valid = (top >= 0) & (top < n_items)
    query = np.arange(top.shape[0], dtype=np.int64)[:, None] * n_items + np.where(valid, top, 0)
    if pos_keys.size == 0:
        return np.zeros(top.shape, dtype=bool)
    at = np.searchsorted(pos_keys, query).clip(max=pos_keys.size - 1)
    return valid & (pos_keys[at] == query)


# ---------------------------------------------------------------- bootstrap over users
def _resampled_means(values: np.ndarray, n_resamples: int, seed: int,
                     max_cells: int = 4_000_000) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement, size n) of ``values``; the index
    matrix is drawn in chunks of at most ``max_cells`` entries to bound memory."""
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, max_cells // max(n, 1))
    out = np.empty((n_resamples,) + values.shape[1:], dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def bootstrap_ci(values: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict:
    """Percentile bootstrap CI of the mean over users.

    Draw ``n_resamples`` samples of the n per-user values with replacement (fixed ``seed``),
    take each sample's mean; ``lo`` and ``hi`` are the alpha/2 and 1 - alpha/2 quantiles of
    those means, ``mean`` the mean of ``values``. Empty input gives NaNs."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    means = _resampled_means(values, n_resamples, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi)}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> dict:
    """Paired bootstrap of mean(a - b) over the same users (same resampled users for a and b).

    ``diff`` = mean(a - b); ``lo``/``hi`` the percentile CI of the resampled mean differences;
    ``p_value`` two-sided: twice the share of resamples whose mean difference is on the other
    side of 0 than ``diff`` (or is 0), capped at 1; 1.0 when ``diff`` is 0."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same users: {a.shape} vs {b.shape}")
    if a.size == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"),
                "p_value": float("nan")}
    d = a - b
    diffs = _resampled_means(d, n_resamples, seed)
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    diff = float(d.mean())
    if diff > 0:
        p = 2.0 * float(np.mean(diffs <= 0))
    elif diff < 0:
        p = 2.0 * float(np.mean(diffs >= 0))
    else:
        p = 1.0
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "p_value": min(1.0, p)}
