"""Ranking helpers of the second stage: candidate rows -> each user's ordered top list, and the
user splits its fits learn and are judged on.

A candidate frame has one row per (user, item) with ``retriever_rank``; scores are one float per
row. Lists are (len(users), k) item ids in the order of ``users``, padded with -1 (never a hit).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..protocol import evaluate as ev

RETRIEVER_ORDER = "retriever_order"   # the retriever's own order, a row of every re-ranker table


def order_topk(cands: pd.DataFrame, scores: np.ndarray, users: np.ndarray, k_keep: int = 10) -> np.ndarray:
    """Each user's ``k_keep`` best candidates by ``scores`` (ties: better retriever rank first):
    (len(users), k_keep) item ids in the order of ``users``, padded with -1. Candidates of users
    not in ``users`` are ignored."""
    users = np.asarray(users, dtype=np.int64)
    u = cands["user"].to_numpy(np.int64)
    it = cands["item"].to_numpy(np.int64)
    tie = cands["retriever_rank"].to_numpy(np.int64) if "retriever_rank" in cands else it
    order = np.lexsort((tie, -np.asarray(scores, dtype=np.float64), u))
    u, it = u[order], it[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1] if len(u) else np.zeros(0, np.int64)
    pos = np.arange(len(u)) - np.repeat(starts, np.diff(np.r_[starts, len(u)]))
    sorter = np.argsort(users, kind="stable")
    where = np.searchsorted(users, u, sorter=sorter).clip(0, max(len(users) - 1, 0))
    row = sorter[where] if len(users) else where
    keep = (pos < k_keep) & (len(users) > 0) & (users[row] == u if len(users) else False)
    out = np.full((len(users), k_keep), -1, dtype=np.int64)
    out[row[keep], pos[keep]] = it[keep]
    return out


class RepeatedTopK:
    """`order_topk` for one fixed candidate frame and user set, scored many times (a LightGBM
    early-stopping metric runs after every boosting round). The sort by user and tie key is done
    once; each call fills a (users, longest list) score matrix, keeps the entries at or above
    each row's k-th best score and orders only those. Same lists as `order_topk`, ties included;
    on 1,590 users x ~800 candidates a call takes ~20 ms instead of ~450 ms."""

    def __init__(self, cands: pd.DataFrame, users: np.ndarray, k_keep: int = 10):
        users = np.asarray(users, dtype=np.int64)
        u = cands["user"].to_numpy(np.int64)
        tie = cands["retriever_rank" if "retriever_rank" in cands else "item"].to_numpy(np.int64)
        order = np.lexsort((tie, u))                      # stable: equal ties keep the frame's order
        sorter = np.argsort(users, kind="stable")
        where = np.searchsorted(users, u[order], sorter=sorter).clip(0, max(len(users) - 1, 0))
        row = sorter[where] if len(users) else where
        inside = (users[row] == u[order]) if len(users) else np.zeros(len(order), bool)
        self._order, u_in, self._row = order[inside], u[order][inside], row[inside]
        starts = np.r_[0, np.flatnonzero(np.diff(u_in)) + 1] if len(u_in) else np.zeros(0, np.int64)
        self._col = np.arange(len(u_in)) - np.repeat(starts, np.diff(np.r_[starts, len(u_in)]))
        self._width = int(self._col.max()) + 1 if len(u_in) else 1
        self._items = np.full((len(users), self._width), -1, dtype=np.int64)
        self._items[self._row, self._col] = cands["item"].to_numpy(np.int64)[self._order]
        self.k_keep = k_keep

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """(len(users), k_keep) item ids, as `order_topk(cands, scores, users, k_keep)`; scores finite."""
        n, k = len(self._items), self.k_keep
        S = np.full((n, self._width), -np.inf)
        S[self._row, self._col] = np.asarray(scores, dtype=np.float64)[self._order]
        kk = min(k, self._width)
        kth = -np.partition(-S, kk - 1, axis=1)[:, kk - 1:kk]   # each row's k-th best score
        r, c = np.nonzero((S >= kth) & (S > -np.inf))             # row-major: tie order within a row
        o = np.lexsort((c, -S[r, c], r))
        r, c = r[o], c[o]
        starts = np.r_[0, np.flatnonzero(np.diff(r)) + 1] if len(r) else np.zeros(0, np.int64)
        pos = np.arange(len(r)) - np.repeat(starts, np.diff(np.r_[starts, len(r)]))
        keep = pos < k
        out = np.full((n, k), -1, dtype=np.int64)
        out[r[keep], pos[keep]] = self._items[r[keep], c[keep]]
        return out


def retriever_order(cands: pd.DataFrame, users: np.ndarray, k_keep: int = 10) -> np.ndarray:
    """The retriever's own ordering of the candidates, in ``order_topk``'s format."""
    return order_topk(cands, -cands["retriever_rank"].to_numpy(np.float64), users, k_keep)


def subset_labels(labels: ev.Labels, users: np.ndarray) -> ev.Labels:
    """The Labels of a subset of ``labels.users`` (same period, context and positives)."""
    idx = np.searchsorted(labels.users, users)
    if not np.array_equal(labels.users[idx.clip(0, len(labels.users) - 1)], users):
        raise ValueError("users must be a subset of labels.users")
    return ev.Labels(period=labels.period, users=np.asarray(users), positives=labels.positives[idx].tocsr(),
                     ctx=labels.ctx, n_items=labels.n_items)


def ndcg_of(topk: np.ndarray, labels: ev.Labels, k: int = 10) -> float:
    """Mean protocol nDCG@k of ranked lists (rows aligned with ``labels.users``)."""
    return float(ndcg_per_user(topk, labels, k).mean()) if len(labels.users) else 0.0


def ndcg_per_user(topk: np.ndarray, labels: ev.Labels, k: int = 10) -> np.ndarray:
    """(len(labels.users),) protocol nDCG@k of each user's list (IDCG counts all their positives)."""
    return ev.evaluate_ranking(topk, labels, ks=(k,), keep=k).per_user[f"ndcg@{k}"]


def candidate_labels(cands: pd.DataFrame, labels: ev.Labels) -> np.ndarray:
    """(n_rows,) 1 where the candidate is a positive of ``labels`` (users outside labels: 0)."""
    pos = labels.positives.tocoo()
    n = labels.n_items
    keys = np.unique(labels.users[pos.row].astype(np.int64) * n + pos.col)
    q = cands["user"].to_numpy(np.int64) * n + cands["item"].to_numpy(np.int64)
    if len(keys) == 0:
        return np.zeros(len(q), np.float32)
    at = np.searchsorted(keys, q).clip(0, len(keys) - 1)
    return (keys[at] == q).astype(np.float32)


def per_user_zscore(users: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Values standardised within each user's candidate rows: (value - user's mean) / user's std
    (population std; 0 for a user whose values are constant). Used for features (a score's
    position within its list) and to average ensemble members on one scale."""
    users = np.asarray(users)
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return v.copy()
    _, inv = np.unique(users, return_inverse=True)
    n = np.bincount(inv).astype(np.float64)
    dev = v - (np.bincount(inv, v) / n)[inv]
    sd = np.sqrt(np.bincount(inv, dev * dev) / n)[inv]
    return np.where(sd > 1e-12, dev / np.where(sd > 1e-12, sd, 1.0), 0.0)


# ---------------------------------------------------------------- user splits
def split_users(users: np.ndarray, held_out_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train users, held-out users), both sorted; a fixed-seed permutation of ``users``."""
    users = np.asarray(users)
    perm = np.random.default_rng(seed).permutation(len(users))
    n_held = int(round(held_out_share * len(users)))
    if len(users) >= 2:
        n_held = min(max(n_held, 1), len(users) - 1)
    return np.sort(users[perm[n_held:]]), np.sort(users[perm[:n_held]])


def fold_users(users: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint sorted user sets covering ``users`` (a fixed-seed permutation cut into
    near-equal parts): the cross-fitting folds of the re-ranker."""
    users = np.asarray(users)
    if folds < 2 or folds > len(users):
        raise ValueError(f"need 2 <= folds <= {len(users)} users, got folds={folds}")
    perm = np.random.default_rng(seed).permutation(len(users))
    return [np.sort(users[part]) for part in np.array_split(perm, folds)]
