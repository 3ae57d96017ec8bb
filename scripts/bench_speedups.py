"""make bench-speedups: issue 27's exact speed-ups, before and after, side by side in one run.

Each row times the code path the library used before (still callable) and the one it uses now,
on the same inputs, and checks that both give the same answer (same negatives, same scores, same
metric): the ratio is the figure to read, because the machine is noisy. Sizes default to
synthetic-32m from 2018 (52,702 users, 65,583 items, 7.65 M train rows; ``make bench``'s data);
``--users/--items/--rows`` give the demo's (3,000 / 1,990 / 242,736) or anything else.

Rows:
- ``negative sampler``: `train.NegativeSampler.sample` of one MF batch (4,096 x 4), binary search
  of the known pairs (``lookup="search"``) against the packed bitmap (the default).
- ``NeuMF scoring``: `NeuMF.score_all` of 1,024 users, ``score_chunk`` 2**24 against 2**20.
- ``early-stopping pass``: one validation nDCG@10 of an MF model over ``--valid-users`` users,
  the full top-max(ks) evaluation (`Evaluator.__call__`) against the head the metric reads
  (`Evaluator.metric`, the callback of every learnt model now).
- ``EASE Gram matrices``: the X^T X of a search's six fits (three lambdas x two input kinds, as
  ``make bench``'s grid), each computed by its fit, against `ease.gram_cache` (two computed, four
  copies), over the ``--ease-items`` most-rated items (``make bench``: 20,000).
- ``iALS search``: the fits of iterations {10, 20} of one configuration (16 factors, ``make
  bench``'s grid), each from scratch, against `ials.warm_start_cache` (the 20-iteration fit
  resumes from the 10-iteration state): same item factors.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
import torch

from recsys_lib.models import ease, ials
from recsys_lib.models.mf import MF
from recsys_lib.models.neumf import NeuMF, NeuMFConfig
from recsys_lib.models.train import NegativeSampler
from recsys_lib.protocol import evaluate as ev
from recsys_lib.protocol.splitdata import ScoringContext


def best_of(fn, repeat: int) -> tuple[float, object]:
    """(the fastest of ``repeat`` calls in seconds, the last result)."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def random_known(n_users: int, n_items: int, n_rows: int, seed: int = 0) -> sp.csr_matrix:
    """(n_users, n_items) 0/1 with about ``n_rows`` entries, popular items drawn more often."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_rows)
    items = np.minimum((rng.pareto(1.2, n_rows) * n_items / 50).astype(np.int64), n_items - 1)
    m = sp.csr_matrix((np.ones(n_rows, np.float32), (users, items)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def bench_sampler(known: sp.csr_matrix, repeat: int) -> dict:
    users = np.random.default_rng(1).integers(0, known.shape[0], 4096)
    t_build_s, search = best_of(lambda: NegativeSampler(known, seed=0, lookup="search"), 1)
    t_build_b, bitmap = best_of(lambda: NegativeSampler(known, seed=0, lookup="bitmap"), 1)
    before, a = best_of(lambda: search.sample(users, 4), repeat)
    after, b = best_of(lambda: bitmap.sample(users, 4), repeat)
    return {"stage": "negative sampler (one 4,096 x 4 MF batch)", "before_s": before, "after_s": after,
            "same": bool(np.array_equal(a, b)),
            "note": f"bitmap {bitmap.bits.nbytes / 2**20:,.0f} MiB, built in {t_build_b:.1f}s "
                    f"(search keys {t_build_s:.1f}s)"}


def bench_neumf(n_users: int, n_items: int, repeat: int) -> dict:
    model = NeuMF(NeuMFConfig(seed=0, device="cpu", verbose=False, progress=False)).build(n_users, n_items)
    users = torch.arange(min(1024, n_users))

    def scores(chunk: int):
        model.cfg.score_chunk = chunk
        return model.score_all(users)
    before, a = best_of(lambda: scores(2 ** 24), repeat)
    after, b = best_of(lambda: scores(NeuMFConfig.score_chunk), repeat)
    return {"stage": f"NeuMF scoring ({len(users):,} users x {n_items:,} items)", "before_s": before,
            "after_s": after, "same": bool(torch.equal(a, b)), "note": "score_chunk 2**24 -> 2**20"}


def bench_early_stopping(known: sp.csr_matrix, n_valid: int, repeat: int) -> dict:
    n_users, n_items = known.shape
    rng = np.random.default_rng(2)
    users = np.sort(rng.choice(n_users, min(n_valid, n_users), replace=False))
    positives = random_known(len(users), n_items, 10 * len(users), seed=3)
    ctx = ScoringContext("valid", known, torch.zeros((n_users, 1), dtype=torch.long))
    evaluator = ev.Evaluator.__new__(ev.Evaluator)          # labels built here, not from a split
    evaluator.labels = ev.Labels("valid", users, positives, ctx, n_items)
    evaluator.ks, evaluator.batch_users = ev.DEFAULT_KS, 1024
    model = MF(dim=64, device="cpu", verbose=False, progress=False).build(n_users, n_items)
    before, a = best_of(lambda: evaluator(model).means()["ndcg@10"], repeat)
    after, b = best_of(lambda: evaluator.metric(model, "ndcg@10"), repeat)
    return {"stage": f"early-stopping pass (MF, {len(users):,} users)", "before_s": before, "after_s": after,
            "same": a == b, "note": f"top-{max(ev.DEFAULT_KS)} -> top-10; nDCG@10 {b:.5f}"}


def bench_ease_grams(known: sp.csr_matrix, n_items: int, repeat: int) -> dict:
    pop = np.asarray(known.sum(axis=0)).ravel()
    kept = np.sort(np.argsort(-pop, kind="stable")[:n_items])
    x = known[:, kept]
    kinds = {False: x, True: x[: x.shape[0] // 2]}      # two input kinds (every row / positives only)
    fits = [kind for kind in (False, True) for _ in range(3)]

    def grams(cached: bool) -> list[torch.Tensor]:
        def one(kind):
            key = (kind, n_items)
            return ease.cached_gram(key, lambda: ease.gram(kinds[kind], torch.float32, torch.device("cpu")))
        if not cached:
            return [ease.gram(kinds[k], torch.float32, torch.device("cpu")) for k in fits]
        with ease.gram_cache():
            return [one(k) for k in fits]
    before, a = best_of(lambda: grams(False), repeat)
    after, b = best_of(lambda: grams(True), repeat)
    return {"stage": f"EASE Gram matrices of a 6-fit search ({n_items:,} items)", "before_s": before,
            "after_s": after, "same": all(torch.equal(u, v) for u, v in zip(a, b)),
            "note": "2 computed + 4 copies, not 6 computed"}


class _Rows:
    """The part of a SplitData an iALS fit reads: the train matrix and its sizes."""

    def __init__(self, known: sp.csr_matrix):
        self.n_users, self.n_items = known.shape
        self.train = self
        self._known = known

    def matrix(self, n_users, n_items, positives_only=False):
        return self._known


def bench_ials_search(known: sp.csr_matrix, repeat: int) -> dict:
    data = _Rows(known)

    def search(resume: bool) -> torch.Tensor:
        def fits():
            for it in (10, 20):
                model = ials.IALS(ials.IALSConfig(factors=16, regularization=100.0, alpha=10.0, iterations=it,
                                                  device="cpu", seed=0))
                model.fit(data)
            return model.item_factors
        if not resume:
            return fits()
        with ials.warm_start_cache():
            return fits()
    before, a = best_of(lambda: search(False), repeat)
    after, b = best_of(lambda: search(True), repeat)
    return {"stage": "iALS search: iterations {10, 20}, 16 factors", "before_s": before, "after_s": after,
            "same": bool(torch.equal(a, b)), "note": "30 ALS rounds -> 20 (20 resumes from 10)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=52_702)
    ap.add_argument("--items", type=int, default=65_583)
    ap.add_argument("--rows", type=int, default=7_650_000)
    ap.add_argument("--valid-users", type=int, default=8_000)
    ap.add_argument("--ease-items", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{args.users:,} users x {args.items:,} items, {args.rows:,} known pairs; "
          f"{torch.get_num_threads()} torch threads; best of {args.repeat}", flush=True)
    known = random_known(args.users, args.items, args.rows)
    rows = [bench_sampler(known, args.repeat), bench_neumf(args.users, args.items, args.repeat),
            bench_early_stopping(known, args.valid_users, args.repeat),
            bench_ease_grams(known, min(args.ease_items, args.items), max(1, args.repeat // 3)),
            bench_ials_search(known, max(1, args.repeat // 3))]
    width = max(len(r["stage"]) for r in rows)
    print(f"{'stage':<{width}}  {'before s':>9}  {'after s':>9}  {'ratio':>6}  same  note")
    for r in rows:
        print(f"{r['stage']:<{width}}  {r['before_s']:9.4f}  {r['after_s']:9.4f}  "
              f"{r['before_s'] / max(r['after_s'], 1e-12):5.1f}x  {'yes' if r['same'] else 'NO '}   {r['note']}")
    if not all(r["same"] for r in rows):
        raise SystemExit("a speed-up changed its result")


if __name__ == "__main__":
    main()
