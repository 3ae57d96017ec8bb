"""The re-ranker's production features for (user, candidate item) rows, vectorised.

`build_features(cands, data, ctx, period, ...)` turns a candidate frame
(user, item, retriever_score, retriever_rank) into a float32 matrix (n_rows, F) and its
column names. Never from the scored period's own rows, and under one test-time rule
(docs/PROTOCOL.md, "One test-time rule"):

- *Parameters*: statistics counted over many users' rows (the item's popularity and its
  recent-window counts, the item counts at the user's time and their window totals, the
  sequence features' transition counts, the reference time of the item's age) come from the
  train rows only (``ctx.parameter_rows()``), at validation and at test alike. The recent
  windows (``item_log_pop_30d/_90d``) and the item age's reference time end at the end of the
  train rows, at test too; a window that ends at the user's own time is cut at the end of the
  train rows. So a test feature never counts a validation row, and the re-ranker scores test
  lists with features on the footing of the validation lists it learnt from.
- *Histories*: what describes the user's own rows (their last items, activity, genre taste,
  recent ratings and their span, their own time, fold-in scores from their rows) comes from every
  row before the period (``ctx.known_rows()`` = ``data.rows_before(period)``: train for
  validation, train + validation for test), as every model's history does.

Leakage guard: features of a period's candidates are that period's data, so building them
for ``period`` asks the guard first (``guard.check_read(period)``). Inside
``guard.fitting("reranker", allow=("train", "valid"))`` building test features raises
LeakageError; at test time the features are built outside any fitting context.

Columns (in order; the retriever/scorer ones only when those are given):
  retriever_score, retriever_log_rank, retriever_score_z (z-score within the user's list)
  <source>_log_rank, n_sources   with several candidate sources: each source's log rank
                          (log(k + 1) when it did not propose the item), how many proposed it
  item_log_pop            log(1 + train rows of the item)
  item_log_pop_30d/_90d   log(1 + train rows of the item in the last 30/90 days before the
                          end of the train rows)
  item_age, item_year_missing   reference year (end of the train rows) - release year (NaN ->
                          median age)
  item_age_at_user, item_log_pop_user_30d/_365d, item_pop_share_user_30d/_365d,
  item_pop_trend_user, user_recent_mean_rating, user_recent_span_log_days
                          time features at the user's own time (their last known rating;
                          the item counts from train rows, cut at the end of train): see
                          ``time_features``
  user_log_activity       log(1 + the user's known rows)  (a history)
  user_genre_dot, user_genre_cos   the user's genre distribution over known positive rows
                          (a history) against the item's genre multi-hot
  hist_sim_mean, hist_sim_max   cosine of the item's retriever embedding with the embeddings
                          of the user's last items (ctx.history); 0 when the user has none
  retriever_dot           frozen retriever user embedding . item embedding
  seq_count_log, seq_last_log, seq_prob_mean, seq_prob_max, seq_lift_max
                          sequence features (``sequence_features``): how often other users
                          rated the candidate soon after the user's last items (counts from
                          train rows; the last items from known rows)
  <name>_score, <name>_score_z   ``extra_scorers[name].score_pairs(users, items, ctx)``
  <name>_last<N>_score, <name>_last<N>_score_z   the same scorer from the user's last N known
                          rows only (``recent_context``), for N in ``recent_items`` (params:
                          ``reranker.recent_items``) and each scorer that builds a user from
                          their rows (``builds_user_from_rows``: EASE, iALS): tastes drift, and
                          the last items say more about the next ones
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..models.transition import transition_counts
from ..protocol import guard
from ..protocol.splitdata import CHUNK_ROWS, POSITIVE_RATING, ScoringContext, SplitData
from .ranking import per_user_zscore

DAY = 86_400
RECENT_DAYS = (30, 90)
# Sequence features: chosen on out-of-fold validation nDCG@10 of the LightGBM re-ranker on
# ml-latest-small (window 2, 3, 5, 10 x history 2, 3, 5, 10, 20; docs/experiments.md, 2026-11-28).
SEQ_WINDOW = 5             # transitions: item j rated within this many ratings after item i
SEQ_HISTORY = 3            # the user's last items whose transitions are looked up
                           # (3: the *_z columns use ranking.per_user_zscore, same values to float32)


# named groups of columns, for ablations (a re-ranker's ``drop_features`` may name a group)
FEATURE_GROUPS = {
    "time": ("item_age_at_user", "item_log_pop_user_30d", "item_log_pop_user_365d", "item_pop_share_user_30d",
             "item_pop_share_user_365d", "item_pop_trend_user", "user_recent_mean_rating",
             "user_recent_span_log_days"),
    "sequence": ("seq_count_log", "seq_last_log", "seq_prob_mean", "seq_prob_max", "seq_lift_max"),
}


def kept_columns(names: list[str], drop: list[str] | tuple[str, ...] = ()) -> list[int]:
    """Positions of the columns of ``names`` left after dropping ``drop`` (column or group names;
    an unknown name is an error, so a typo cannot silently ablate nothing)."""
    dropped: set[str] = set()
    for d in drop:
        if d in FEATURE_GROUPS:
            dropped.update(FEATURE_GROUPS[d])
        elif d in names:
            dropped.add(d)
        else:
            raise ValueError(f"drop_features: {d!r} is neither a feature of {names} nor a group of "
                             f"{sorted(FEATURE_GROUPS)}")
    return [j for j, n in enumerate(names) if n not in dropped]


# ---------------------------------------------------------------- helpers
def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _normalise_rows(m: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norm > 0, norm, 1.0)


def recent_item_counts(rows, n_items: int, days: int) -> np.ndarray:
    """(n_items,) rows of each item in the last ``days`` days before the end of ``rows``."""
    if len(rows) == 0:
        return np.zeros(n_items, dtype=np.int64)
    end = int(rows.timestamp.max())
    keep = rows.timestamp > end - days * DAY
    return np.bincount(rows.item[keep], minlength=n_items)


def item_counts_before(rows, items: np.ndarray, at: np.ndarray, days: float) -> np.ndarray:
    """(n,) rows of item ``items[r]`` with a timestamp in (at[r] - days, at[r]]: each candidate's
    popularity in the ``days`` before a time of its own (e.g. its user's last known rating), from
    ``rows`` (the train rows: a parameter); never counts a row after ``at[r]``."""
    if len(rows) == 0:
        return np.zeros(len(items), np.int64)
    span = int(rows.timestamp.max()) - int(rows.timestamp.min()) + int(days * DAY) + 2
    base = int(rows.timestamp.min()) - int(days * DAY) - 1
    keys = np.sort(rows.item.astype(np.int64) * span + (rows.timestamp - base))   # (item, time) order
    hi = items.astype(np.int64) * span + np.clip(at - base, 0, span - 1)
    lo = items.astype(np.int64) * span + np.clip(at - base - int(days * DAY), 0, span - 1)
    return np.searchsorted(keys, hi, side="right") - np.searchsorted(keys, lo, side="right")


def time_features(rows, users: np.ndarray, items: np.ndarray, years: np.ndarray,
                  n_users: int, count_rows=None) -> dict[str, np.ndarray]:
    """Time features at each user's own time (their last known rating, ``rows``: the rows known
    at scoring time): the item's age then, its popularity in the 30 and 365 days before it (log
    counts, share of all ratings in that window, and the trend between the two windows), and the
    user's recent rating mean and count. Under a per-user split users live at different times, so
    "popular now" must mean popular at the user's time, not at the end of the data.

    The user's time, age at it, recent mean and span are histories, read from ``rows``. The item
    counts and the window totals are parameters, counted on ``count_rows`` (the train rows;
    None: ``rows``), in windows that end at the user's time or at the end of ``count_rows``,
    whichever is earlier (docs/PROTOCOL.md, "One test-time rule"): at test a user whose last
    rating is a validation row gets the counts of the train rows' last days, not a window cut
    short by the rows it may not count."""
    count_rows = rows if count_rows is None else count_rows
    last = np.full(n_users, np.iinfo(np.int64).min)
    np.maximum.at(last, rows.user, rows.timestamp)
    has = last > np.iinfo(np.int64).min
    last = np.where(has, last, int(rows.timestamp.max()) if len(rows) else 0)
    at = last[users]                                                       # (n,) user's time
    out: dict[str, np.ndarray] = {}
    at_year = 1970 + at / (365.2425 * DAY)
    age = at_year - years[items]
    out["item_age_at_user"] = np.where(np.isnan(age), np.nanmedian(age) if np.isfinite(age).any() else 0.0, age)
    ts = count_rows.timestamp
    ts_sorted = ts if bool(np.all(ts[1:] >= ts[:-1])) else np.sort(ts)     # periods' rows come in time order
    at_count = np.minimum(at, int(ts.max())) if len(ts) else at             # (n,) the count windows' end
    for days in (30, 365):
        c = item_counts_before(count_rows, items, at_count, days)
        total = (np.searchsorted(ts_sorted, at_count, side="right")
                 - np.searchsorted(ts_sorted, at_count - days * DAY, side="right"))
        out[f"item_log_pop_user_{days}d"] = np.log1p(c)
        out[f"item_pop_share_user_{days}d"] = c / np.maximum(total, 1)
    out["item_pop_trend_user"] = (np.log1p(out["item_pop_share_user_30d"] * 1e4)
                                  - np.log1p(out["item_pop_share_user_365d"] * 1e4))
    # the user's last 10 ratings: mean rating and their time span (a proxy for session pace)
    u_order = np.lexsort((rows.timestamp, rows.user))
    uu, rr_, tt = rows.user[u_order], rows.rating[u_order], rows.timestamp[u_order]
    ends = np.searchsorted(uu, np.arange(n_users), side="right")
    starts = np.maximum(np.searchsorted(uu, np.arange(n_users), side="left"), ends - 10)
    csum = np.r_[0.0, np.cumsum(rr_.astype(np.float64))]
    n_recent = ends - starts
    mean_recent = np.where(n_recent > 0, (csum[ends] - csum[starts]) / np.maximum(n_recent, 1), 0.0)
    span_days = np.where(n_recent > 1, (tt[np.maximum(ends - 1, 0)] - tt[np.minimum(starts, len(tt) - 1)]) / DAY, 0.0)
    out["user_recent_mean_rating"] = mean_recent[users]
    out["user_recent_span_log_days"] = np.log1p(np.maximum(span_days, 0.0))[users]
    return out


def item_genre_matrix(data: SplitData) -> sp.csr_matrix:
    """(n_items, n_genres) multi-hot genres of the train catalogue (empty when no item features)."""
    f = data.item_features
    if f is None or f.n_genres == 0:
        return sp.csr_matrix((data.n_items, 1), dtype=np.float32)
    g = f.genres.numpy()
    r, c = np.nonzero(g)
    m = sp.csr_matrix((np.ones(len(r), np.float32), (r, g[r, c] - 1)), shape=(data.n_items, f.n_genres))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def user_genre_distribution(rows, item_genres: sp.csr_matrix, n_users: int) -> np.ndarray:
    """(n_users, n_genres) each user's share of genre mentions over their positive ``rows``."""
    pos = rows.rating >= POSITIVE_RATING
    ui = sp.csr_matrix((np.ones(int(pos.sum()), np.float32), (rows.user[pos], rows.item[pos])),
                       shape=(n_users, item_genres.shape[0]))
    counts = np.asarray((ui @ item_genres).todense(), dtype=np.float64)   # (n_users, G)
    total = counts.sum(axis=1, keepdims=True)
    return counts / np.where(total > 0, total, 1.0)


def history_similarity(users: np.ndarray, items: np.ndarray, history: torch.Tensor,
                       item_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and max cosine between each candidate item's embedding and the embeddings of the
    user's last items (``history``: (n_users, H), item + 1, 0 = padding); 0 without history."""
    emb = _normalise_rows(np.asarray(item_emb, dtype=np.float32))           # (n_items, D)
    emb = np.vstack([np.zeros((1, emb.shape[1]), np.float32), emb])         # row 0 = padding
    hist = _as_np(history).astype(np.int64)                                  # (n_users, H)
    mean = np.zeros(len(users), np.float32)
    mx = np.zeros(len(users), np.float32)
    for s in range(0, len(users), CHUNK_ROWS):
        u, it = users[s:s + CHUNK_ROWS], items[s:s + CHUNK_ROWS]
        h = hist[u]                                                          # (c, H)
        valid = h > 0
        sims = np.einsum("chd,cd->ch", emb[h], emb[it + 1])                  # (c, H)
        n = valid.sum(axis=1)
        mean[s:s + len(u)] = np.where(n > 0, (sims * valid).sum(axis=1) / np.maximum(n, 1), 0.0)
        mx[s:s + len(u)] = np.where(n > 0, np.where(valid, sims, -np.inf).max(axis=1), 0.0)
    return mean, mx


def sequence_features(rows, users: np.ndarray, items: np.ndarray, history: torch.Tensor, n_items: int,
                      window: int = SEQ_WINDOW) -> dict[str, np.ndarray]:
    """What other users rated soon after the user's last items (``history``: (n_users, H), item + 1,
    0 = padding, most recent last: a history, from the rows known at scoring time), counted on
    ``rows`` (the train rows, at test too: a parameter; the module docstring): a temporal split asks
    "what comes next", which the set-based models (EASE, iALS, the retriever's dot product) do
    not model. Per candidate: log of the transition count summed over the history, from the last
    item alone, the mean and max transition probability P(candidate | history item), and the max
    lift count / sqrt(out-degree(history item) * in-degree(candidate))."""
    keys, counts = transition_counts(rows, n_items, window)             # the transition model's counts
    out_deg = np.maximum(np.bincount(keys // n_items, weights=counts, minlength=n_items), 1.0)
    in_deg = np.maximum(np.bincount(keys % n_items, weights=counts, minlength=n_items), 1.0)
    hist = _as_np(history).astype(np.int64)
    names = ("seq_count_log", "seq_last_log", "seq_prob_mean", "seq_prob_max", "seq_lift_max")
    out = {n: np.zeros(len(users), np.float32) for n in names}
    if len(keys) == 0:
        return out
    for s in range(0, len(users), CHUNK_ROWS):
        sl = slice(s, s + CHUNK_ROWS)
        h = hist[users[sl]]                                                  # (c, H)
        valid = h > 0
        prev = (h - 1).clip(0)
        q = prev * n_items + items[sl, None]                                  # (c, H)
        at = np.searchsorted(keys, q).clip(0, len(keys) - 1)
        c = np.where((keys[at] == q) & valid, counts[at], 0).astype(np.float64)   # (c, H)
        prob = c / out_deg[prev]
        out["seq_count_log"][sl] = np.log1p(c.sum(1))
        out["seq_last_log"][sl] = np.log1p(c[:, -1])
        out["seq_prob_mean"][sl] = prob.sum(1) / np.maximum(valid.sum(1), 1)
        out["seq_prob_max"][sl] = prob.max(1)
        out["seq_lift_max"][sl] = (c / np.sqrt(out_deg[prev] * in_deg[items[sl], None])).max(1)
    return out


def retriever_user_table(retriever, users: np.ndarray, ctx: ScoringContext, n_users: int,
                         batch_users: int = 4096) -> np.ndarray:
    """(n_users, D) frozen retriever user embeddings for ``users`` under ``ctx`` (zeros elsewhere)."""
    users = np.unique(np.asarray(users, dtype=np.int64))
    first = _as_np(retriever.user_embeddings(torch.from_numpy(np.array(users[:1])), ctx))
    out = np.zeros((n_users, first.shape[1]), np.float32)
    with torch.no_grad():
        for s in range(0, len(users), batch_users):
            b = users[s:s + batch_users]
            out[b] = _as_np(retriever.user_embeddings(torch.from_numpy(np.array(b)), ctx))
    return out


def last_rows_matrix(rows, n_users: int, n_items: int, n: int, positives_only: bool = False) -> sp.csr_matrix:
    """(n_users, n_items) 1 at each user's last ``n`` rows of ``rows`` by time (ties: the larger
    item id is the later row, as in the splits); ``positives_only``: their last ``n`` positives."""
    keep = rows.rating >= POSITIVE_RATING if positives_only else np.ones(len(rows), bool)
    u, i, t = rows.user[keep], rows.item[keep], rows.timestamp[keep]
    order = np.lexsort((i, t, u))[::-1]                                   # each user's newest first
    u, i = u[order], i[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
    rank = np.arange(len(u)) - np.repeat(starts, np.diff(np.r_[starts, len(u)]))
    m = rank < n
    return sp.csr_matrix((np.ones(int(m.sum()), np.float32), (u[m], i[m])), shape=(n_users, n_items))


def recent_context(ctx: ScoringContext, rows, n_users: int, n_items: int, n: int) -> ScoringContext:
    """``ctx`` with each user's rows cut to their last ``n`` of ``rows`` (the rows known at scoring
    time): a model that builds a user from their rows (EASE's x_u, iALS's fold-in) then scores
    from the user's recent taste only."""
    return ScoringContext(period=ctx.period, history=ctx.history,
                          seen=last_rows_matrix(rows, n_users, n_items, n),
                          seen_positive=last_rows_matrix(rows, n_users, n_items, n, positives_only=True),
                          rows=ctx.rows, train_rows=ctx.train_rows, shared=ctx.shared,
                          table_dir=ctx.table_dir)


def _pair_scores(scorer, users: np.ndarray, items: np.ndarray, ctx: ScoringContext,
                 chunk: int = 1_000_000) -> np.ndarray:
    out = np.empty(len(users), np.float32)
    with torch.no_grad():
        for s in range(0, len(users), chunk):
            out[s:s + chunk] = _as_np(scorer.score_pairs(torch.from_numpy(np.array(users[s:s + chunk])),
                                                         torch.from_numpy(np.array(items[s:s + chunk])), ctx))
    return out


# ---------------------------------------------------------------- the feature matrix
def build_features(cands: pd.DataFrame, data: SplitData, ctx: ScoringContext, period: str,
                   retriever=None, extra_scorers: Mapping[str, object] | None = None,
                   user_emb: np.ndarray | None = None,
                   recent_items: Sequence[int] = ()) -> tuple[np.ndarray, list[str]]:
    """Features of candidate rows ``cands`` (user, item, retriever_score, retriever_rank) for
    scoring ``period`` with context ``ctx``: (X float32 (n_rows, F), feature names).

    ``retriever`` (optional) must offer ``item_embeddings()`` and ``user_embeddings(users, ctx)``;
    ``user_emb`` may pass a precomputed (n_users, D) table (`retriever_user_table`).
    ``extra_scorers`` maps a name to a model with ``score_pairs(users, items, ctx)``; those that
    build a user from their rows also score from the user's last N rows, N in ``recent_items``.
    """
    guard.check_read(period, what="candidates (re-ranker features)")
    if ctx.period != period:
        raise ValueError(f"ctx is for period {ctx.period!r}, features asked for {period!r}")
    users = cands["user"].to_numpy(np.int64)
    items = cands["item"].to_numpy(np.int64)
    cols: dict[str, np.ndarray] = {}

    # retriever's own signal
    score = cands["retriever_score"].to_numpy(np.float32)
    cols["retriever_score"] = score
    cols["retriever_log_rank"] = np.log(cands["retriever_rank"].to_numpy(np.float64))
    cols["retriever_score_z"] = per_user_zscore(users, score)
    # other candidate sources (candidates.add_sources): their ranks (k + 1 = not proposed)
    for col in [c for c in cands.columns if c.endswith("_rank") and c != "retriever_rank"]:
        cols[f"{col[:-5]}_log_rank"] = np.log(cands[col].to_numpy(np.float64))
    if "n_sources" in cands:
        cols["n_sources"] = cands["n_sources"].to_numpy(np.float32)

    # One test-time rule (module docstring): parameters count train rows, histories known rows
    known = data.rows_before(period)           # histories: train (valid) or train + valid (test)
    train = ctx.parameter_rows()               # parameters: the train rows, at test too

    # item popularity: all train rows; the train rows of the last days before the end of train
    cols["item_log_pop"] = np.log1p(np.bincount(train.item, minlength=data.n_items))[items]
    for days in RECENT_DAYS:
        cols[f"item_log_pop_{days}d"] = np.log1p(recent_item_counts(train, data.n_items, days))[items]

    # item age at the reference time (end of the train rows, as the windows above)
    years = data.item_features.years if data.item_features is not None else np.full(data.n_items, np.nan)
    ref_ts = int(train.timestamp.max()) if len(train) else 0
    ref_year = pd.Timestamp(ref_ts, unit="s").year + pd.Timestamp(ref_ts, unit="s").dayofyear / 366.0
    age = ref_year - years
    fill = float(np.nanmedian(age)) if np.isfinite(age).any() else 0.0
    cols["item_age"] = np.where(np.isnan(age), fill, age)[items]
    cols["item_year_missing"] = np.isnan(years)[items].astype(np.float32)
    cols.update(time_features(known, users, items, years, data.n_users, count_rows=train))

    # user activity and genre taste: histories (the user's own rows), so from known rows
    cols["user_log_activity"] = np.log1p(np.bincount(known.user, minlength=data.n_users))[users]
    ig = item_genre_matrix(data)
    dist = user_genre_distribution(known, ig, data.n_users)                # (n_users, G)
    igd = np.asarray(ig.todense(), dtype=np.float64)                       # (n_items, G)
    dot = np.empty(len(users), np.float64)
    for s in range(0, len(users), CHUNK_ROWS):                             # bounded memory
        dot[s:s + CHUNK_ROWS] = np.einsum("rg,rg->r", dist[users[s:s + CHUNK_ROWS]], igd[items[s:s + CHUNK_ROWS]])
    du = np.linalg.norm(dist, axis=1)[users]
    di = np.linalg.norm(igd, axis=1)[items]
    cols["user_genre_dot"] = dot
    cols["user_genre_cos"] = np.where(du * di > 0, dot / np.where(du * di > 0, du * di, 1.0), 0.0)

    # the frozen retriever's embeddings
    if retriever is not None:
        item_emb = _as_np(retriever.item_embeddings()).astype(np.float32)  # (n_items, D)
        cols["hist_sim_mean"], cols["hist_sim_max"] = history_similarity(users, items, ctx.history, item_emb)
        if user_emb is None:
            user_emb = retriever_user_table(retriever, users, ctx, data.n_users)
        rd = np.empty(len(users), np.float32)
        for s in range(0, len(users), CHUNK_ROWS):
            rd[s:s + CHUNK_ROWS] = np.einsum("cd,cd->c", user_emb[users[s:s + CHUNK_ROWS]],
                                             item_emb[items[s:s + CHUNK_ROWS]])
        cols["retriever_dot"] = rd

    # what other users rated right after the user's last items: counts from train rows, last items known
    cols.update(sequence_features(train, users, items, ctx.last_items(SEQ_HISTORY), data.n_items))

    # classical models' scores of the candidate
    for name, scorer in (extra_scorers or {}).items():
        s = _pair_scores(scorer, users, items, ctx)
        cols[f"{name}_score"] = s
        cols[f"{name}_score_z"] = per_user_zscore(users, s)
    from_rows = {name: m for name, m in (extra_scorers or {}).items() if getattr(m, "builds_user_from_rows", False)}
    for n_last in recent_items if from_rows else ():
        rctx = recent_context(ctx, known, data.n_users, data.n_items, n_last)
        for name, scorer in from_rows.items():
            s = _pair_scores(scorer, users, items, rctx)
            cols[f"{name}_last{n_last}_score"] = s
            cols[f"{name}_last{n_last}_score_z"] = per_user_zscore(users, s)

    names = list(cols)
    X = np.empty((len(users), len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        X[:, j] = cols[name]
    np.nan_to_num(X, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return X, names
