"""Full-catalogue evaluation under docs/PROTOCOL.md: every scored user against every train item.

Users are scored in batches; items a user rated before the period are masked, and under
``user_temporal`` so are the items not yet seen at the user's scoring cut (the causal catalogue,
docs/PROTOCOL.md); a per-batch top-K in torch keeps memory at (batch, n_items). Per-user metric
arrays are kept so that bootstrap CIs and paired comparisons can be computed
(recsys_lib.protocol.metrics).

Labels (positives, masks, histories) are precomputed by `Evaluator` *outside* any fitting
context, so early stopping on validation never lets fitting code read validation rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .. import dist
from . import metrics
from .splitdata import ScoringContext, SplitData

DEFAULT_KS = (10, 50, 100, 200, 500, 1000)
HEADLINE = "ndcg@10"


@dataclass(frozen=True)
class EvalConfig:
    """The params ``eval:`` section: how every model is scored (the same for all of them)."""

    ks: tuple[int, ...] = DEFAULT_KS  # Recall@K / nDCG@K cut-offs; the longest list scored is max(ks)
    batch_users: int = 1024           # users scored per batch in full-catalogue ranking
    n_bootstrap: int = 1000           # bootstrap resamples for the 95% CIs
    causal_catalogue: bool = True     # user_temporal: rank only items first seen before the user's scoring
                                      # cut (docs/PROTOCOL.md, "A causal catalogue"); no-op under global_temporal

    @classmethod
    def from_params(cls, section: dict | None) -> "EvalConfig":
        from ..errors import ConfigError
        section = dict(section or {})
        valid = {"ks", "batch_users", "n_bootstrap", "causal_catalogue"}
        unknown = sorted(set(section) - valid)
        if unknown:
            raise ConfigError(f"eval: unknown parameter(s) {unknown}; valid: {sorted(valid)}")
        if "ks" in section:
            section["ks"] = tuple(int(k) for k in section["ks"])
        return cls(**section)


class Scorer(Protocol):
    """What `evaluate` needs from a model: scores of a user batch against the whole catalogue.

    The returned tensor must be fresh (not a view of model state): seen items (and items outside the
    causal catalogue, ``ctx.catalogue``) are masked in place."""

    def score_all(self, users: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:  # (B, n_items)
        ...


@dataclass
class Labels:
    """The scored users of a period, their positives and the context a scorer may use."""

    period: str
    users: np.ndarray           # (U,) scored users, sorted
    positives: sp.csr_matrix    # (U, n_items) rows aligned with `users`
    ctx: ScoringContext         # seen items, histories and causal catalogue before the period (all users)
    n_items: int

    @classmethod
    def build(cls, data: SplitData, period: str, history_len: int = 5,
              max_users: int | None = None, seed: int = 0, causal_catalogue: bool | None = None) -> "Labels":
        """``causal_catalogue``: mask items not yet seen at each user's cut (`SplitData.causal`;
        None, the default, is on under ``user_temporal``)."""
        users = data.scored_users(period)
        if max_users is not None and len(users) > max_users:
            users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
        pos = data.positives(period)[users]
        return cls(period=period, users=users, positives=pos.tocsr(),
                   ctx=data.context(period, history_len, causal_catalogue), n_items=data.n_items)

    @property
    def n_pos(self) -> np.ndarray:
        return np.diff(self.positives.indptr)

    @property
    def n_blocked_pos(self) -> np.ndarray:
        """(U,) positives on items outside the user's causal catalogue: no model can recommend them,
        and they still count in Recall and nDCG (docs/PROTOCOL.md, "A causal catalogue")."""
        cat = self.ctx.catalogue
        if cat is None:
            return np.zeros(len(self.users), dtype=np.int64)
        rows = np.repeat(self.users, self.n_pos)
        return np.bincount(np.repeat(np.arange(len(self.users)), self.n_pos),
                           weights=cat.is_blocked(rows, self.positives.indices),
                           minlength=len(self.users)).astype(np.int64)

    def n_candidates(self) -> np.ndarray:
        """(U,) items a ranking may hold for each scored user: the catalogue minus seen items minus
        unseen items outside the causal catalogue."""
        seen = self.ctx.seen[self.users].tocsr()
        out = self.n_items - np.diff(seen.indptr)
        cat = self.ctx.catalogue
        if cat is not None:
            seen_rows = np.repeat(self.users, np.diff(seen.indptr))
            seen_blocked = np.bincount(np.repeat(np.arange(len(self.users)), np.diff(seen.indptr)),
                                       weights=cat.is_blocked(seen_rows, seen.indices), minlength=len(self.users))
            out = out - (cat.blocked_counts(self.users) - seen_blocked.astype(np.int64))
        return out

    def random_ndcg(self, k: int = 10) -> float:
        """Expected nDCG@k of a uniformly random ranking of each scored user's candidates (unseen,
        inside the causal catalogue) (`metrics.random_ndcg_at_k`): the floor a learnt model must clear."""
        if not len(self.users):
            return 0.0
        return float(metrics.random_ndcg_at_k(self.n_pos, self.n_candidates(), k,
                                              n_hittable=self.n_pos - self.n_blocked_pos).mean())


@dataclass
class EvalResult:
    """Per-user metrics of one model on one period, with the ranked top lists."""

    period: str
    users: np.ndarray                      # (U,)
    per_user: dict[str, np.ndarray]        # metric name -> (U,)
    coverage: dict[str, float]             # e.g. {"coverage@10": 0.12}
    topk: np.ndarray = field(repr=False)   # (U, k_keep) item ids, best first
    seconds: float = 0.0

    def means(self) -> dict[str, float]:
        out = {name: float(v.mean()) if len(v) else 0.0 for name, v in self.per_user.items()}
        out.update(self.coverage)
        return out

    def summary(self, n_bootstrap: int = 1000, seed: int = 0) -> dict:
        """Means, the headline's 95% bootstrap CI, users scored and seconds: JSON-ready."""
        out = self.means()
        ci = metrics.bootstrap_ci(self.per_user[HEADLINE], n_resamples=n_bootstrap, seed=seed)
        out[f"{HEADLINE}_ci"] = [float(ci["lo"]), float(ci["hi"])]
        out["users"] = int(len(self.users))
        out["seconds"] = float(self.seconds)
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per user: the per-user metric arrays (for paired comparisons on disk)."""
        return pd.DataFrame({"user": self.users, **self.per_user})


def _mask_seen(scores: torch.Tensor, seen: sp.csr_matrix, users: np.ndarray) -> None:
    rows = seen[users]
    counts = np.diff(rows.indptr)
    if rows.nnz:
        r = torch.from_numpy(np.repeat(np.arange(len(users)), counts)).to(scores.device)
        c = torch.from_numpy(rows.indices.astype(np.int64)).to(scores.device)
        scores[r, c] = -torch.inf


def mask_unavailable(scores: torch.Tensor, ctx: ScoringContext, users: np.ndarray) -> torch.Tensor | None:
    """Set to -inf, in place, what no ranking may hold for ``users`` (B,): the items each user rated
    before the period (``ctx.seen``) and, under ``user_temporal``, the items first seen at or after
    the user's scoring cut (``ctx.catalogue``, docs/PROTOCOL.md "A causal catalogue"). ``scores`` is
    (B, n_items); the causal mask is one (B, n_items) comparison, no loop over users. Returns that
    (B, n_items) bool mask (None without a catalogue)."""
    _mask_seen(scores, ctx.seen, users)
    if ctx.catalogue is None:
        return None
    blocked = ctx.catalogue.blocked(users, scores.device)                 # (B, n_items)
    scores.masked_fill_(blocked, -torch.inf)
    return blocked


@torch.no_grad()
def rank_topk(scorer: Scorer | Callable, users: np.ndarray, ctx: ScoringContext, k: int,
              n_items: int | None = None, batch_users: int = 1024, progress: bool = False,
              desc: str = "ranking", with_scores: bool = False):
    """Top-``k`` unseen items for each user, best first: (U, k) int64. Never builds U x items.
    Seen items and, under ``user_temporal``, items outside the user's causal catalogue are masked
    (`mask_unavailable`): every model's ranking and every candidate source goes through here.

    The one batched top-K loop of the library (evaluation, candidate generation). With
    ``with_scores`` also their scores, ((U, k) int64, (U, k) float32): a slot beyond a user's
    unseen items (a user who has seen all but fewer than ``k`` items) has score ``-inf``, and item
    ``-1`` (padding, never a hit) where it would hold an item outside the causal catalogue: such an
    item may be a positive, and a masked slot must never count as a hit.

    Inside a torchrun process group of N > 1 ranks every rank must call it with the same
    arguments: rank r scores batches r, r + N, ... (the very batches one process scores, so the
    same scores) and the lists are gathered; every rank returns the single-process result."""
    score = scorer.score_all if hasattr(scorer, "score_all") else scorer
    users = np.asarray(users, dtype=np.int64)
    n_items = n_items if n_items is not None else ctx.seen.shape[1]
    k = min(k, n_items)
    out = np.empty((len(users), k), dtype=np.int64)
    values = np.empty((len(users), k), dtype=np.float32) if with_scores else None
    starts = range(0, len(users), batch_users)
    for start in tqdm(dist.my_batches(starts), desc=desc, disable=not progress or not dist.is_main(),
                      leave=False):
        batch = users[start:start + batch_users]
        scores = score(torch.from_numpy(batch), ctx).float()        # (B, n_items)
        blocked = mask_unavailable(scores, ctx, batch)                # seen + causal catalogue
        top = torch.topk(scores, k, dim=1)                            # (B, k)
        idx = top.indices
        if blocked is not None:                                       # a masked slot: padding
            idx = idx.masked_fill(blocked.gather(1, idx), -1)
        out[start:start + len(batch)] = idx.cpu().numpy()
        if with_scores:
            values[start:start + len(batch)] = top.values.cpu().numpy()
    if dist.sharding():
        dist.share_rows(out, starts, batch_users)
        if with_scores:
            dist.share_rows(values, starts, batch_users)
    return (out, values) if with_scores else out


def metrics_from_ranking(topk: np.ndarray, labels: Labels, ks=DEFAULT_KS) -> tuple[dict, dict]:
    """Per-user metrics and coverage of ranked lists ``topk`` (U, K) against ``labels``.
    Lists shorter than a cut-off count the missing ranks as misses."""
    k_max = max(ks)
    hits = metrics.ranked_hits(topk, labels.positives)                # (U, K)
    if hits.shape[1] < k_max:
        hits = np.pad(hits, ((0, 0), (0, k_max - hits.shape[1])))
    n_pos = labels.n_pos
    per_user = {"ndcg@10": metrics.ndcg_at_k(hits, n_pos, 10)}
    for k in ks:
        per_user[f"recall@{k}"] = metrics.recall_at_k(hits, n_pos, k)
    per_user["hit_rate@10"] = metrics.hit_rate_at_k(hits, 10)
    per_user["mrr@10"] = metrics.mrr_at_k(hits, 10)
    coverage = {"coverage@10": float(metrics.coverage_at_k(topk, labels.n_items, min(10, topk.shape[1])))}
    return per_user, coverage


def evaluate_ranking(topk: np.ndarray, labels: Labels, ks=DEFAULT_KS, seconds: float = 0.0,
                     keep: int = 10) -> EvalResult:
    """Score ranked lists produced elsewhere (e.g. a re-ranker's top 10) under the protocol."""
    per_user, coverage = metrics_from_ranking(topk, labels, ks)
    return EvalResult(period=labels.period, users=labels.users, per_user=per_user,
                      coverage=coverage, topk=topk[:, :keep], seconds=seconds)


class Evaluator:
    """Precomputed labels for one period; call it with a scorer to get an EvalResult.

    Build it before fitting (e.g. for early stopping): it reads the period once, here."""

    def __init__(self, data: SplitData, period: str, ks=DEFAULT_KS, batch_users: int = 1024,
                 history_len: int = 5, max_users: int | None = None, seed: int = 0,
                 causal_catalogue: bool | None = None):
        self.labels = Labels.build(data, period, history_len, max_users, seed, causal_catalogue)
        self.ks = tuple(ks)
        self.batch_users = batch_users

    @property
    def period(self) -> str:
        return self.labels.period

    def metric(self, scorer: Scorer | Callable, metric: str = HEADLINE, full_lists: bool = False) -> float:
        """The mean of one metric (``ndcg@10``, ``recall@500``) of ``scorer``, ranking only the
        head of each list that metric reads (at least 10 items), not ``max(ks)``.

        Why: early stopping reads one number per epoch, and ranking the top 1,000 made a pass
        1.8x (ml-32m sizes) to 10x (the demo) slower than the top 10 (``make bench-speedups``,
        ``--users/--items/--rows`` for other sizes). ``torch.topk`` returns the same items in the same order
        for any k wherever no two scores tie, so for learnt scores this is the full lists' value;
        models whose scores tie (counts: popularity, transition) pass ``full_lists``, because the
        order of tied items may depend on k."""
        cut = int(metric.rsplit("@", 1)[1]) if "@" in metric else max(self.ks)
        k = max(self.ks) if full_lists else max(cut, 10)
        topk = rank_topk(scorer, self.labels.users, self.labels.ctx, k, self.labels.n_items, self.batch_users)
        per_user, coverage = metrics_from_ranking(topk, self.labels, (k,))
        values = per_user.get(metric)
        if values is None:
            return float(coverage[metric])
        return float(values.mean()) if len(values) else 0.0

    def __call__(self, scorer: Scorer | Callable, progress: bool = False, keep: int = 10) -> EvalResult:
        t0 = time.perf_counter()
        topk = rank_topk(scorer, self.labels.users, self.labels.ctx, max(self.ks),
                         self.labels.n_items, self.batch_users, progress, desc=f"scoring {self.period}")
        seconds = time.perf_counter() - t0
        return evaluate_ranking(topk, self.labels, self.ks, seconds=seconds, keep=keep)


def evaluate(scorer: Scorer | Callable, data: SplitData, period: str, ks=DEFAULT_KS,
             batch_users: int = 1024, history_len: int = 5, progress: bool = True,
             causal_catalogue: bool | None = None) -> EvalResult:
    """Score every scored user of ``period`` against the full train catalogue (seen items and, under
    ``user_temporal``, items outside the causal catalogue masked)."""
    return Evaluator(data, period, ks, batch_users, history_len,
                     causal_catalogue=causal_catalogue)(scorer, progress=progress)


def compare(a: EvalResult, b: EvalResult, metric: str = HEADLINE, n_bootstrap: int = 1000,
            seed: int = 0) -> dict:
    """Paired bootstrap of ``a - b`` on the users both scored (they must be the same users)."""
    if not np.array_equal(a.users, b.users):
        raise ValueError("paired comparison needs the same scored users; evaluate both on one Labels")
    return metrics.paired_bootstrap(a.per_user[metric], b.per_user[metric], n_resamples=n_bootstrap, seed=seed)
