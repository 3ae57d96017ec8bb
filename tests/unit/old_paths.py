"""The code paths issue 41, item 3 replaced, kept verbatim as the reference its equality tests
(tests/unit/test_savings.py) and its benchmark (scripts/bench_savings.py) compare the new paths
with: the transition counts before they stopped sorting every pair (`old_transition_counts`,
recsys_lib/models/transition.py at bcb38fe) and the blend's search over full users x items z-score
tables (`old_blend_tune`, recsys_lib/models/blend.py at bcb38fe, before `blend.tune` grew the
spilled tables of `models.blend_spill`). The negative sampler's
old path is the library's own, uncached (``NegativeSampler(..., cache=False)``).
Imported with tests/unit on sys.path (pytest puts it there; the benchmark adds it)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from recsys_lib.models import blend
from recsys_lib.models.transition import CHUNK_PAIRS, concatenate_freeing


def old_transition_counts(rows, n_items: int, window: int, gap_decay: float = 1.0,
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


def old_blend_tune(members: dict, labels, steps: int = 20, batch_users: int = 1024,
                   verbose: bool = False) -> tuple[blend.Blend, pd.DataFrame]:
    """Greedy forward selection of simplex weights (multiples of 1/steps) on ``labels`` (validation:
    `protocol.evaluate.Labels`) -> (the blend of the best prefix, one table row per step)."""
    z = blend.member_scores(members, labels.users, labels.ctx, batch_users)
    seen = labels.ctx.seen[labels.users]
    cat = getattr(labels.ctx, "catalogue", None)                       # the causal catalogue, if any
    blocked = None if cat is None else (lambda rows: cat.blocked(labels.users[rows]))
    counts = {n: 0 for n in members}
    rows, best = [], (-np.inf, dict(counts))
    for step in range(1, int(steps) + 1):
        tried = {}
        for name in members:
            trial = {**counts, name: counts[name] + 1}
            tried[name] = blend.blend_ndcg(z, {n: c / step for n, c in trial.items()}, seen, labels.positives,
                                     batch_users=batch_users, blocked=blocked)
        pick = max(tried, key=lambda n: (tried[n], -list(members).index(n)))   # ties: the earlier member
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
    return blend.Blend(members, best[1]), table
