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

import hashlib
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from . import tuning
from ..config import atomic_write
from ..errors import ConfigError
from ..protocol.splitdata import ScoringContext, SplitData
from .train import save_checkpoint
from . import Recommender

_SOURCE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()   # the counting code, for `table_name`

NORMALISE = ("none", "row", "sqrt")
TIE_BREAK = 1e-12          # popularity share in [0, 1) times this: orders only exact ties
KEEP_TABLES = 2            # transition tables a split's contexts keep (ctx.shared)
TABLE_FORMAT = 1           # bump when what `save_table` writes changes
CHUNK_PAIRS = 1 << 25      # (row, gap) pairs counted at once (`transition_counts`): ~1 GB of work
DENSE_ENTRIES = 1 << 23    # table entries a chunk spans at most (a dense block: 64 MB of float64)
DENSE_RATIO = 8            # a chunk is summed densely when it spans at most this many entries a pair
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


def user_time_order(user: np.ndarray, timestamp: np.ndarray, item: np.ndarray) -> np.ndarray:
    """The permutation that puts rows in (user, time, item) order, ties in row order: exactly
    ``np.lexsort((item, timestamp, user))``. A split's periods are already in (time, user, item)
    order (`Period`), and then one stable sort by user gives the same permutation (within a user
    the rows keep their (time, item) order), for a third of a three-key lexsort's work; rows in
    any other order are lexsorted."""
    n = len(user)
    if n > 1:
        dt, du = np.diff(timestamp), np.diff(user)
        in_order = (dt > 0) | ((dt == 0) & ((du > 0) | ((du == 0) & (np.diff(item) >= 0))))
        del dt, du
        if not in_order.all():
            return np.lexsort((item, timestamp, user))
    return np.argsort(user, kind="stable")


def transition_counts(rows, n_items: int, window: int, gap_decay: float = 1.0,
                      positives_only: bool = False,
                      chunk_pairs: int = CHUNK_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """Item-to-item transitions in ``rows``: (sorted keys i * n_items + j, weights), where a pair
    counts for every time a user rated j within ``window`` ratings after i (each user's rows in time
    order; ties by item id, as the splits order them), weighing ``gap_decay ** (d - 1)`` at d ratings
    apart (1: plain counts). ``positives_only`` keeps the rows rated >= 4 first.

    How, and why it needs no full sort of the pairs (ML-32M at window 40: about a billion (row,
    gap) pairs, which ``np.unique`` once argsorted in chunks):
    - the rows are put in (user, time) order once (`user_time_order`: one stable sort by user),
      and in source-item order once (a stable argsort of the items, row order kept). Row p pairs
      with row p + d for every d up to the number of the user's rows after it, so no per-gap
      array of pairs is kept (40 of them, 3.8 GB at ML-32M size, before);
    - the pairs are counted in chunks of source items [lo, hi) of at most ``chunk_pairs`` pairs and
      ``DENSE_ENTRIES`` table entries. A chunk whose key range (hi - lo) * n_items is at most
      ``DENSE_RATIO`` times its pairs is summed by one ``np.bincount`` into a dense block (no
      sort); a sparser one sorts its keys directly (``np.sort``, not an argsort), with the gap in
      the low digits, and sums each key's run.
    Either way every key's weights are added one at a time in the same order as one pass over all
    pairs would: gap by gap, and within a gap the same weight. So the weights are bit for bit those
    of that pass, whatever the chunking (tests/unit/test_sequential.py)."""
    keep = rows.rating >= 4.0 if positives_only else np.ones(len(rows), bool)
    user = np.asarray(rows.user, np.int64)[keep]
    item = np.asarray(rows.item, np.int64)[keep]
    order = user_time_order(user, np.asarray(rows.timestamp)[keep], item)
    u, it = user[order], item[order]
    del user, item, order
    n, w_max = len(u), max(int(window), 0)
    if n < 2 or w_max == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    first = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])                    # each user's first row
    sizes = np.diff(np.r_[first, n])
    after = np.minimum(np.repeat(first + sizes, sizes) - 1 - np.arange(n), w_max)   # pairs row p starts
    after = after.astype(np.int16 if w_max < 2 ** 15 else np.int64)
    del first, sizes, u
    if not after.any():
        return np.zeros(0, np.int64), np.zeros(0)
    starts = np.bincount(it, weights=after, minlength=n_items)              # pairs by source item
    step = max(int(chunk_pairs), 1)
    cut = np.searchsorted(np.cumsum(starts), np.arange(1, int(starts.sum()) // step + 1) * step, side="right")
    span = max(1, DENSE_ENTRIES // max(n_items, 1))                        # items per chunk at most
    bounds = np.unique(np.r_[0, cut, np.arange(0, n_items, span), n_items].clip(0, n_items))
    del starts, cut
    idx = np.int32 if n < 2 ** 31 else np.int64
    by_src = np.argsort(it.astype(idx), kind="stable").astype(idx)          # source-item order, row order kept
    at = np.searchsorted(it[by_src], bounds)                                # chunk c: by_src[at[c]:at[c + 1]]
    wtab = np.array([float(gap_decay) ** (d - 1) for d in range(1, w_max + 1)])
    unit = bool((wtab == 1.0).all())                                       # plain counts: exact integers
    out_keys, out_weights = [], []
    for c in range(len(bounds) - 1):
        if at[c] == at[c + 1]:
            continue
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        r = by_src[at[c]:at[c + 1]]                                         # the chunk's source rows
        a, src = after[r], (it[r] - lo) * n_items                           # local keys: (i - lo) * n + j
        top = int(a.max())
        if top == 0:
            continue
        keys, per_gap = [], []
        for d in range(1, top + 1):                                # gap by gap, as one pass
            m = a >= d
            keys.append(src[m] + it[r[m] + d])
            per_gap.append(len(keys[-1]))
        k = np.concatenate(keys)
        del keys, a, src, r
        size = (hi - lo) * n_items
        if size <= DENSE_RATIO * len(k):                                    # dense block: no sort
            if unit:
                acc = np.bincount(k, minlength=size).astype(np.float64)
                local = np.flatnonzero(acc)
            else:
                acc = np.bincount(k, weights=np.repeat(wtab[:len(per_gap)], per_gap), minlength=size)
                local = np.flatnonzero(acc if (wtab > 0).all() else np.bincount(k, minlength=size))
            weights = acc[local]
            del acc
        elif unit:                                                          # sparse: sort the keys
            k.sort()
            head = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
            local, weights = k[head], np.diff(np.r_[head, len(k)]).astype(np.float64)
        else:                                                               # gap in the low digits
            k = k * w_max + np.repeat(np.arange(len(per_gap)), per_gap)
            k.sort()
            key, gap = np.divmod(k, w_max)
            head = np.r_[True, key[1:] != key[:-1]]
            local = key[head]
            weights = np.bincount(np.cumsum(head) - 1, weights=wtab[gap], minlength=len(local))
            del key, gap, head
        del k
        out_keys.append(local + lo * n_items)
        out_weights.append(weights)
    del by_src, after
    if not out_keys:
        return np.zeros(0, np.int64), np.zeros(0)
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


def count_table(rows, window: int, gap_decay: float, positives_only: bool, normalise: str,
                n_items: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """(T, tie): `transition_matrix` of ``rows`` and the train-popularity tie-break (each item's
    popularity rank over the rows counted, / n_items * ``TIE_BREAK``): what `Transition.table`
    keeps, in `Transition.table`'s key order."""
    T = transition_matrix(rows, n_items, window, gap_decay, positives_only, normalise)
    keep = rows.rating >= 4.0 if positives_only else slice(None)
    pop = np.bincount(rows.item[keep], minlength=n_items)
    tie = (pop.argsort(kind="stable").argsort() / max(n_items, 1) * TIE_BREAK).astype(np.float32)
    return T, tie


def table_name(rows_digest: str, window: int, gap_decay: float, positives_only: bool, normalise: str,
               n_items: int) -> str:
    """The cache file of the table counted on the rows of ``rows_digest`` (`protocol.splitdata.
    rows_digest`) with these options, by this module's code: a hash of all of them and of this
    file's source, so a table counted by other code, options or rows is never read."""
    h = hashlib.sha256(f"{TABLE_FORMAT};{rows_digest};{int(window)};{float(gap_decay)!r};"
                       f"{bool(positives_only)};{normalise};{int(n_items)};".encode())
    h.update(_SOURCE_DIGEST.encode())
    return f"transition-{h.hexdigest()[:32]}.npz"


def save_table(path: str | os.PathLike, T: sp.csr_matrix, tie: np.ndarray) -> None:
    """Write (T, tie) to ``path`` atomically (`config.atomic_write`: a reader never sees half a
    file, and two processes writing the same table never tear it), uncompressed: reading ~1 GB at
    ML-32M size takes seconds, against minutes to count it. A failed write (a full disk) only
    costs the next process a count."""
    try:
        with atomic_write(path) as tmp:
            np.savez(tmp, data=T.data, indices=T.indices, indptr=T.indptr,
                     shape=np.asarray(T.shape, np.int64), tie=tie)
    except OSError as e:
        print(f"transition: could not keep the table in {path}: {e}", flush=True)


def load_table(path: str | os.PathLike) -> tuple[sp.csr_matrix, np.ndarray] | None:
    """(T, tie) as `save_table` wrote them, or None when ``path`` is absent or unreadable (then
    the caller counts it again): the same arrays, bit for bit."""
    try:
        with np.load(path) as z:
            T = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(int(x) for x in z["shape"]))
            return T, z["tie"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


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
        gap weighting, rows and normalisation.

        Once per run, too: where the context names a folder (``ctx.table_dir``, the run's), the
        table is also written there (`save_table`) and read back by any later process that asks
        for the same one, so 15_transition counts it and 17_blend, 25_label_window, 30_reranker,
        35_ablations and 40_evaluation read it (at ML-32M size each count of a window-40 table
        took ~190 s). The file's name (`table_name`) holds everything the table depends on."""
        cfg = self.cfg
        key = (int(cfg.window), float(cfg.gap_decay), bool(cfg.positives_only), cfg.normalise, self.n_items)
        tables = ctx.shared.setdefault("transition_tables", {})
        if key not in tables:
            t0 = time.perf_counter()
            rows = ctx.parameter_rows()
            path = None if ctx.table_dir is None else Path(ctx.table_dir) / table_name(ctx.digest(rows), *key)
            got = load_table(path) if path is not None else None
            how = "read from the run's cache"
            if got is None:
                got = count_table(rows, *key)
                how = "counted"
                if path is not None:
                    save_table(path, *got)
            while len(tables) >= KEEP_TABLES:
                tables.pop(next(iter(tables)))
            tables[key] = got
            if len(rows) > 1_000_000:
                print(f"transition: {got[0].nnz:,} pairs from {len(rows):,} train rows {how} in "
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
