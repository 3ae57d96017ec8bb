"""A score blend of the single-stage models: the simplest ensemble a reviewer would try before a
re-ranker, and one the two-stage system must beat.

Each member's scores are z-scored per user over the items the user has not seen (mean 0, std 1
over the unseen catalogue; a score at or below ``FLOOR``, a model's "below every scored item",
such as EASE's items outside a capped catalogue, is left out of the mean and std and takes the
user's lowest z), then summed with weights on the simplex. The weights are chosen on validation
nDCG@10 by greedy forward selection with replacement (Caruana et al., 2004): ``steps`` times,
add 1/steps of weight to the member that most improves the blend; the best prefix is kept, so a
member that never helps gets weight 0. The members are fit on train; only their weights see
validation labels, as every model's hyper-parameters do.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..protocol import metrics
from ..protocol.splitdata import ScoringContext
from . import Recommender

FLOOR = -1e5               # scores at or below it mean "below every scored item" (EASE's cap)


@dataclass
class BlendConfig:
    """The params ``blend:`` section."""
    members: list[str] = field(default_factory=list)  # single-stage models blended ([]: the registry's declared members)
    steps: int = 20                   # greedy steps: weights are multiples of 1 / steps
    max_users: int | None = None      # validation users the weights are chosen on (null: all)

    @classmethod
    def from_params(cls, section: dict | None) -> "BlendConfig":
        from ..errors import ConfigError
        section = dict(section or {})
        unknown = sorted(set(section) - {"members", "steps", "max_users"})
        if unknown:
            raise ConfigError(f"blend: unknown parameter(s) {unknown}; valid: ['max_users', 'members', 'steps']")
        return cls(**section)


def summarize(table: pd.DataFrame, weights: dict[str, float], steps: int) -> dict:
    """The blend's search for the report's tuning table (`tuning.summarize`'s shape): the weights
    searched on the simplex and the ones kept; a simplex has no edge to search beyond."""
    chosen = ", ".join(f"{n} {w:.2f}" for n, w in sorted(weights.items(), key=lambda x: -x[1]) if w > 0)
    best = table.loc[table["valid_metric"].idxmax()]
    axes = {"weights": {"tried": [f"simplex in steps of 1/{steps}, greedy"], "chosen": chosen, "at_edge": False}}
    return {"axes": axes, "configs": int(len(table) * sum(c.startswith("w_") for c in table.columns)),
            "edge_steps": 0, "valid_metric": float(best["valid_metric"]), "at_edge": [], "fixed": [],
            "best_step": int(best["step"])}


def unseen_zscore(scores: torch.Tensor, seen: sp.csr_matrix, users: np.ndarray) -> torch.Tensor:
    """(B, n_items) per-user z-scores over each user's unseen items with a score above ``FLOOR``;
    seen items get 0 (rankings mask them), floored items the row's lowest z."""
    scores = scores.double()
    mask = torch.from_numpy(np.asarray(seen[users].todense(), dtype=bool)).to(scores.device)   # (B, n_items)
    valid = ~mask & (scores > FLOOR)
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = torch.where(valid, scores, 0.0).sum(1, keepdim=True) / n
    var = torch.where(valid, (scores - mean) ** 2, 0.0).sum(1, keepdim=True) / n
    z = (scores - mean) / var.sqrt().clamp(min=1e-12)
    low = torch.where(valid, z, torch.inf).min(1, keepdim=True).values
    z = torch.where(valid, z, torch.where(mask, 0.0, low.expand_as(z)))
    return z.float()


class Blend(Recommender):
    """Weighted sum of the members' per-user z-scores (`unseen_zscore`)."""

    name = "blend"

    def __init__(self, members: dict[str, Recommender], weights: dict[str, float]):
        self.members = members
        self.weights = {n: float(w) for n, w in weights.items() if w > 0}
        self.device = torch.device("cpu")

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        out = None
        for name, w in self.weights.items():
            z = w * unseen_zscore(self.members[name].score_all(users, ctx).float().cpu(), ctx.seen, users.numpy())
            out = z if out is None else out + z
        return out                                                       # (B, n_items)


def zscore_batches(model: Recommender, users: np.ndarray, ctx: ScoringContext, batch_users: int = 1024):
    """Yield ``model``'s (b, n_items) float32 z-scores (`unseen_zscore`) of ``users``, ``batch_users``
    rows at a time, in order."""
    for s in range(0, len(users), batch_users):
        b = torch.from_numpy(users[s:s + batch_users])
        yield unseen_zscore(model.score_all(b, ctx).float().cpu(), ctx.seen, b.numpy()).numpy()


def member_scores(members: dict[str, Recommender], users: np.ndarray, ctx: ScoringContext,
                  batch_users: int = 1024) -> dict[str, np.ndarray]:
    """Each member's (U, n_items) float32 z-scores of ``users`` (their seen items -inf for ranking)."""
    return {name: np.concatenate(list(zscore_batches(model, users, ctx, batch_users)))
            for name, model in members.items()}


def batch_ndcg(z_rows: dict[str, np.ndarray], weights: dict[str, float], seen_rows: sp.csr_matrix,
               positives: sp.csr_matrix, k: int = 10, blocked_rows: torch.Tensor | None = None) -> np.ndarray:
    """Per-user nDCG@k of one batch of users: the blend of their z-score rows ``z_rows`` with
    ``weights`` (summed in the weights' order), their seen items (``seen_rows``) and, when given,
    ``blocked_rows`` ((b, n_items) bool: outside the causal catalogue) masked."""
    total = sum(w * z_rows[n] for n, w in weights.items() if w > 0)
    t = torch.from_numpy(np.ascontiguousarray(total, dtype=np.float32))
    r, c = seen_rows.nonzero()
    t[torch.from_numpy(r), torch.from_numpy(c)] = -torch.inf
    if blocked_rows is not None:
        t.masked_fill_(blocked_rows, -torch.inf)
    top = torch.topk(t, k, dim=1).indices.numpy()
    return metrics.ndcg_at_k(metrics.ranked_hits(top, positives), np.diff(positives.indptr), k)


def blend_ndcg(z: dict[str, np.ndarray], weights: dict[str, float], seen_rows: sp.csr_matrix,
               positives: sp.csr_matrix, k: int = 10, batch_users: int = 1024, blocked=None) -> float:
    """Mean nDCG@k of the blend of ``z`` with ``weights`` (seen items masked), ``batch_users`` rows
    at a time: the sum and top-k are per user, so the batches only bound the temporaries (at
    ML-32M size one full-size sum is 1.25 GB). ``blocked(rows: slice) -> (b, n_items) bool`` also
    masks the rows' items outside the causal catalogue (docs/PROTOCOL.md), as every ranking does."""
    per_user = []
    for a in range(0, seen_rows.shape[0], int(batch_users)):
        b = slice(a, a + int(batch_users))
        per_user.append(batch_ndcg({n: z[n][b] for n in z}, weights, seen_rows[b], positives[b], k,
                                   None if blocked is None else blocked(b)))
    return float(np.concatenate(per_user).mean())


#: above this many bytes of z-score tables (members x users x items, float32), `tune` keeps them on
#: disk (`models.blend_spill`) when given a folder: ML-32M's validation users make ~14 GB
IN_MEMORY_BYTES = 2 * 1024 ** 3


def tune(members: dict[str, Recommender], labels, steps: int = 20, batch_users: int = 1024,
         verbose: bool = True, spill_dir=None,
         in_memory_bytes: int = IN_MEMORY_BYTES) -> tuple[Blend, pd.DataFrame]:
    """Greedy forward selection of simplex weights (multiples of 1/steps) on ``labels`` (validation:
    `protocol.evaluate.Labels`) -> (the blend of the best prefix, one table row per step).

    The members' z-score tables are held in memory, or, when they would pass ``in_memory_bytes``
    and ``spill_dir`` is given, written there and read back a batch of users at a time
    (`blend_spill.SpilledTables`): the same float operations on the same rows, so the same table
    and weights, bit for bit (tests/unit/test_savings.py), with memory bounded by the batch."""
    seen = labels.ctx.seen[labels.users]
    cat = getattr(labels.ctx, "catalogue", None)                       # the causal catalogue, if any
    blocked = None if cat is None else (lambda rows: cat.blocked(labels.users[rows]))
    size = 4 * len(members) * len(labels.users) * int(labels.n_items)
    if spill_dir is not None and size > in_memory_bytes:
        from .blend_spill import SpilledTables            # imported only by a run this large
        tables = SpilledTables(members, labels, spill_dir, batch_users, blocked)
        try:
            return greedy(list(members), tables.evaluate, members, steps, verbose)
        finally:
            tables.remove()
    z = member_scores(members, labels.users, labels.ctx, batch_users)

    def evaluate(trials: list[dict[str, float]]) -> list[float]:
        return [blend_ndcg(z, w, seen, labels.positives, batch_users=batch_users, blocked=blocked) for w in trials]
    return greedy(list(members), evaluate, members, steps, verbose)


def greedy(names: list[str], evaluate, members: dict[str, Recommender], steps: int,
           verbose: bool) -> tuple[Blend, pd.DataFrame]:
    """The greedy search itself: at each step, ``evaluate`` (a list of trial weights -> their
    validation nDCG@10) scores adding 1/steps to each member in turn; ties go to the earlier member."""
    counts = {n: 0 for n in names}
    rows, best = [], (-np.inf, dict(counts))
    for step in range(1, int(steps) + 1):
        trials = [{n: c / step for n, c in {**counts, name: counts[name] + 1}.items()} for name in names]
        tried = dict(zip(names, evaluate(trials)))
        pick = max(tried, key=lambda n: (tried[n], -names.index(n)))   # ties: the earlier member
        counts[pick] += 1
        rows.append({"step": step, "added": pick, "valid_metric": tried[pick],
                     **{f"w_{n}": c / step for n, c in counts.items()}})
        if verbose:
            print(f"blend step {step}: + {pick} -> valid {tried[pick]:.4f}", flush=True)
        if tried[pick] > best[0]:
            best = (tried[pick], {n: c / step for n, c in counts.items()})
    table = pd.DataFrame(rows)
    table["best"] = False
    table.loc[table["valid_metric"].idxmax(), "best"] = True          # the first best step, as kept
    return Blend(members, best[1]), table
