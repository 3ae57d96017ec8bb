"""A transition (first-order Markov) model: what other users rated right after the user's last items.

The split is temporal, so every model is asked what a user rates next. The set-based baselines
(EASE, iALS, MF) ignore order; this one is order alone. With ``T[i, j]`` the (gap-weighted) number
of times some user rated j within ``window`` ratings after i, normalised (``normalise``), a user
whose last ``history`` items are h_1 (most recent), h_2, ... scores

    score(j) = sum_p decay^(p - 1) T[h_p, j]

``T`` is this model's parameter, and like every model's it comes from the train rows only, at
validation and at test alike (``ctx.parameter_rows()``; docs/PROTOCOL.md, "One test-time rule"):
a test-time table never counts a validation row. The user's last items are a history, read from
the rows known at scoring time (``ctx.last_items``: train rows for validation, train and
validation rows for test), never from the scored period. ``fit`` stores the catalogue size only:
the table is counted when first scored and kept in the split's shared cache (``ctx.shared``), so
validation and test read one table. The re-ranker's sequence features
(`stage2.features.sequence_features`) count with the same `transition_counts`, on the same rows.
Items no transition reaches tie at 0 and are ordered by their train popularity (a 1e-12-scaled
tie-break that never reorders distinct scores of this size).

Ludewig & Jannach (2018) found such simple transition / session-neighbour models match neural
sequential recommenders; the study asks whether one already gets the re-ranker's gain.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from . import tuning
from ..errors import ConfigError
from ..protocol.splitdata import ScoringContext, SplitData
from .train import save_checkpoint
from . import Recommender

NORMALISE = ("none", "row", "sqrt")
TIE_BREAK = 1e-12          # popularity share in [0, 1) times this: orders only exact ties
KEEP_TABLES = 2            # transition tables a split's contexts keep (ctx.shared)
CHUNK_PAIRS = 1 << 25      # (row, gap) pairs counted at once (`transition_counts`): ~1 GB of work
BLOCK = 1 << 24            # table entries converted at once (`transition_matrix`)


@dataclass
class TransitionConfig:
    history: int = 3              # the user's last items whose transitions are summed
    decay: float = 1.0            # weight of the p-th most recent of them: decay ** (p - 1)
    window: int = 5               # j follows i when the same user rated j within this many ratings after i
    gap_decay: float = 1.0        # a transition d ratings apart weighs gap_decay ** (d - 1)
    positives_only: bool = False  # count, and read histories, over rows rated >= 4 only
    normalise: str = "row"        # none: counts; row: P(j | i); sqrt: count / sqrt(out(i) in(j))
    device: str = "auto"          # auto -> cuda, mps, cpu (the sparse product runs on cpu)
    seed: int | None = 0          # unused (deterministic); kept so every model takes one


def transition_counts(rows, n_items: int, window: int, gap_decay: float = 1.0,
                      positives_only: bool = False,
                      chunk_pairs: int = CHUNK_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """Item-to-item transitions in ``rows``: (sorted keys i * n_items + j, weights), where a pair
    counts for every time a user rated j within ``window`` ratings after i (each user's rows in time
    order; ties by item id, as the splits order them), weighing ``gap_decay ** (d - 1)`` at d ratings
    apart (1: plain counts). ``positives_only`` keeps the rows rated >= 4 first.

    The pairs are counted in chunks of source items of about ``chunk_pairs`` pairs each, so memory
    grows with the distinct pairs, not with every (row, gap) pair at once (ML-32M at window 40:
    193 M pairs). Each gap's pairs are put in source-item order once (a stable sort), so a chunk is
    a slice of each gap's, not a scan of all of them. Within a chunk the pairs are taken gap by
    gap and, for one source item, in row order, as in one pass over all of them, so every key's
    weights are summed in the same order: the counts do not depend on the chunk size
    (tests/unit/test_sequential.py)."""
    keep = rows.rating >= 4.0 if positives_only else np.ones(len(rows), bool)
    user = np.asarray(rows.user, np.int64)[keep]
    item = np.asarray(rows.item, np.int64)[keep]
    order = np.lexsort((item, np.asarray(rows.timestamp)[keep], user))
    u, it = user[order], item[order]
    gaps = range(1, int(window) + 1)                       # window is small: loop over gaps, not rows
    idx = np.int32 if len(u) < 2 ** 31 else np.int64
    same = {d: np.flatnonzero(u[d:] == u[:-d]).astype(idx) for d in gaps}   # row p pairs with row p + d
    if not any(len(s) for s in same.values()):
        return np.zeros(0, np.int64), np.zeros(0)
    starts = sum(np.bincount(it[s], minlength=n_items) for s in same.values())   # pairs by source item
    cut = np.searchsorted(np.cumsum(starts), np.arange(1, starts.sum() // max(int(chunk_pairs), 1) + 1)
                          * max(int(chunk_pairs), 1), side="right")
    bounds = np.unique(np.r_[0, cut, n_items].clip(0, n_items))
    at = {}                                                # each gap's rows by source item, row order kept
    for d, s in same.items():
        src = it[s]
        by_src = np.argsort(src, kind="stable")
        same[d] = s[by_src]
        at[d] = np.searchsorted(src[by_src], bounds)       # chunk c of gap d: same[d][at[d][c]:at[d][c + 1]]
        del src, by_src
    out_keys, out_weights = [], []
    for c in range(len(bounds) - 1):
        keys, weights = [], []
        for d, s in same.items():
            s = s[at[d][c]:at[d][c + 1]]
            keys.append(it[s] * n_items + it[s + d])
            weights.append(np.full(len(s), float(gap_decay) ** (d - 1)))
        uniq, inverse = np.unique(np.concatenate(keys), return_inverse=True)
        out_keys.append(uniq)
        out_weights.append(np.bincount(inverse, weights=np.concatenate(weights), minlength=len(uniq)))
        del keys, weights, inverse
    del same
    return concatenate_freeing(out_keys), concatenate_freeing(out_weights)


def concatenate_freeing(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts)``, emptying ``parts`` as it copies: the pages of the result are
    touched as each part is freed, so the peak is the result plus one part, not twice the result."""
    out = np.empty(sum(len(p) for p in parts), parts[0].dtype if parts else np.float64)
    pos = 0
    while parts:
        part = parts.pop(0)
        out[pos:pos + len(part)] = part
        pos += len(part)
    return out


def transition_matrix(rows, n_items: int, window: int, gap_decay: float = 1.0, positives_only: bool = False,
                      normalise: str = "row") -> sp.csr_matrix:
    """(n_items, n_items) float32 csr of `transition_counts`, normalised: ``none`` (weights), ``row``
    (divided by i's total: P(j | i)) or ``sqrt`` (divided by sqrt(out(i) * in(j)), a cosine)."""
    if normalise not in NORMALISE:
        raise ConfigError(f"transition.normalise must be one of {NORMALISE}, got {normalise!r}")
    keys, w = transition_counts(rows, n_items, window, gap_decay, positives_only)
    src, dst = np.empty(len(keys), np.int32), np.empty(len(keys), np.int32)
    for a in range(0, len(keys), BLOCK):                                # int32, without int64 temporaries
        src[a:a + BLOCK], dst[a:a + BLOCK] = np.divmod(keys[a:a + BLOCK], n_items)
    del keys
    out_deg = np.bincount(src, weights=w, minlength=n_items)
    in_deg = np.bincount(dst, weights=w, minlength=n_items)
    data = np.empty(len(w), np.float32)
    for a in range(0, len(w), BLOCK):                                   # elementwise: same values
        b, s, d = slice(a, a + BLOCK), src[a:a + BLOCK], dst[a:a + BLOCK]
        if normalise == "row":
            data[b] = w[b] / out_deg[s]
        elif normalise == "sqrt":
            data[b] = w[b] / np.sqrt(out_deg[s] * in_deg[d])
        else:
            data[b] = w[b]
    del w
    indptr = np.r_[0, np.cumsum(np.bincount(src, minlength=n_items))]   # keys are sorted: csr order
    del src
    return sp.csr_matrix((data, dst, indptr), shape=(n_items, n_items))


class Transition(torch.nn.Module, Recommender):
    name = "transition"
    scores_tie = True             # counts: tied items' order may depend on the list length
    Config = TransitionConfig

    def __init__(self, config: TransitionConfig | None = None, **overrides):
        super().__init__()
        self.configure(config, **overrides)
        if self.cfg.normalise not in NORMALISE:
            raise ConfigError(f"transition.normalise must be one of {NORMALISE}, got {self.cfg.normalise!r}")
        self.n_items = 0

    def fit(self, data: SplitData, validate=None) -> dict:
        """Nothing is stored but the catalogue size: the counts come from the train rows when first
        scored (`table`; the module docstring). ``validate`` is unused (grid_search scores)."""
        self.n_items = data.n_items
        return {"seconds": 0.0, "n_items": self.n_items}

    def table(self, ctx: ScoringContext) -> tuple[sp.csr_matrix, np.ndarray]:
        """(T counted on the train rows, ``ctx.parameter_rows()``, the train-popularity tie-break):
        never on validation rows, at test too. Built once per split: the split's contexts share the
        last ``KEEP_TABLES`` (``ctx.shared``), so the test context reads the table validation
        counted, and a search that varies the history and decay fastest counts once per window,
        gap weighting, rows and normalisation."""
        cfg = self.cfg
        key = (int(cfg.window), float(cfg.gap_decay), bool(cfg.positives_only), cfg.normalise, self.n_items)
        tables = ctx.shared.setdefault("transition_tables", {})
        if key not in tables:
            t0 = time.perf_counter()
            rows = ctx.parameter_rows()
            T = transition_matrix(rows, self.n_items, cfg.window, cfg.gap_decay, cfg.positives_only, cfg.normalise)
            keep = rows.rating >= 4.0 if cfg.positives_only else slice(None)
            pop = np.bincount(rows.item[keep], minlength=self.n_items)
            tie = (pop.argsort(kind="stable").argsort() / max(self.n_items, 1) * TIE_BREAK).astype(np.float32)
            while len(tables) >= KEEP_TABLES:
                tables.pop(next(iter(tables)))
            tables[key] = (T, tie)
            if len(rows) > 1_000_000:
                print(f"transition: {T.nnz:,} pairs from {len(rows):,} train rows in "
                      f"{time.perf_counter() - t0:.1f}s", flush=True)
        return tables[key]

    def user_rows(self, users: torch.Tensor, ctx: ScoringContext) -> sp.csr_matrix:
        """(B, n_items) each user's last ``history`` known items, weighted decay^(p - 1), p = 1 the
        most recent (an item seen twice adds both weights)."""
        m = int(self.cfg.history)
        hist = ctx.last_items(m, self.cfg.positives_only)[users.cpu()].numpy()    # (B, m), item + 1
        weights = float(self.cfg.decay) ** np.arange(m - 1, -1, -1, dtype=np.float64)   # last column: 1
        r, c = np.nonzero(hist)
        x = sp.csr_matrix((np.broadcast_to(weights, hist.shape)[r, c].astype(np.float32), (r, hist[r, c] - 1)),
                          shape=(len(hist), self.n_items))
        x.sum_duplicates()
        return x

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        """Decayed sum of the rows of T of the user's last items, plus the popularity tie-break."""
        T, tie = self.table(ctx)
        scores = np.asarray((self.user_rows(users, ctx) @ T).todense(), dtype=np.float32)   # (B, n_items)
        return torch.from_numpy(scores + tie).to(self.device)

    # ------------------------------------------------------------ persistence
    def save(self, path) -> None:
        save_checkpoint(path, self, self.cfg, n_items=int(self.n_items))

    @classmethod
    def load(cls, path, device: str | None = None) -> "Transition":
        model, ckpt = cls.from_checkpoint(path, device)
        model.n_items = int(ckpt["n_items"])
        return model


def tune(data: SplitData, section: dict | None, validate=None, device: str | None = None,
         seed: int | None = None, verbose: bool = True):
    """Grid-search history, decay, window, gap weighting, rows and normalisation on validation."""
    return tuning.tune_model(Transition, data, section, validate, device=device, seed=seed, verbose=verbose)
