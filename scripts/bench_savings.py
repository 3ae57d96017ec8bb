"""Issue 41, item 3's exact savings, old path against new, side by side: time and peak memory.

Each row runs in a fresh Python process (so each peak RSS is its own: ``ru_maxrss``, and "added"
is that peak less the process's RSS once its inputs were built) and reports a hash of its result;
the old and new paths of a row must hash the same, or the script exits non-zero. The old paths
are kept verbatim in tests/unit/old_paths.py (the code at bcb38fe).

Rows (sizes are flags; the defaults fit in ~3 GB, far below ML-32M; on this project's 2 cores,
shared with two study runs, they took ~6 CPU minutes over 17 wall minutes):
- ``transition table``: `Transition.table` of a window-40 table on ``--rows`` synthetic rows
  (``--users`` x ``--items``, popular items drawn more often): the old count (every pair
  argsorted by np.unique), the new count (one stable sort by user, dense blocks or direct sorts)
  which also writes the table to a run's ``.cache/tables/``, and a later process that reads it.
- ``blend search``: `blend.tune` (``--steps`` greedy steps over ``--members`` members, nDCG@10 on
  ``--blend-users`` validation users x ``--blend-items`` items): every member's full z-score table
  in memory against the tables spilt to disk and read back a batch of users at a time
  (`models.blend_spill`). The members are factor models (a shared taste plus each member's own
  noise) and a popularity count (exact ties); no causal catalogue.
- ``negative samplers``: the samplers of a ``--fits``-fit search on one train matrix (``--users``
  x ``--items``, ``--known`` pairs), each drawing one 4,096 x 4 batch: each built from scratch
  (``cache=False``) against the process's shared membership (`train.membership`).

    PYTHONPATH=. python scripts/bench_savings.py                    # the defaults
    PYTHONPATH=. python scripts/bench_savings.py --only blend --blend-users 8000
Findings at the defaults (2026-12-06, docs of issue 41 item 3): the transition count 3.7x faster
and 2.3 GB -> 0.4 GB, a later notebook reads the table in 0.5 s; the samplers 6.6x faster.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit"))               # old_paths: the code paths replaced

from bench_speedups import random_known  # noqa: E402  (scripts/, beside this file)


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:12]


# ---------------------------------------------------------------- inputs
def synthetic_rows(n_rows: int, n_users: int, n_items: int, seed: int = 0):
    """A split's train period: rows in (time, user, item) order, popular items drawn more often."""
    from recsys_lib.protocol.splitdata import Period
    rng = np.random.default_rng(seed)
    user = rng.integers(0, n_users, n_rows)
    item = np.minimum((rng.pareto(1.2, n_rows) * n_items / 50).astype(np.int64), n_items - 1)
    ts = rng.integers(0, 10 ** 8, n_rows)
    o = np.lexsort((item, user, ts))
    return Period(user[o], item[o], rng.choice([2.0, 3.5, 4.0, 5.0], n_rows).astype(np.float32)[o], ts[o])


class Factors:
    """A member that scores users x items as u . v (+ a popularity term): nothing held per user."""

    def __init__(self, u: np.ndarray, v: np.ndarray, bias: np.ndarray):
        self.u, self.v, self.bias = torch.from_numpy(u), torch.from_numpy(v), torch.from_numpy(bias)

    def score_all(self, users, ctx):
        return self.u[users] @ self.v.T + self.bias                    # (B, n_items)


class Popularity:
    def __init__(self, counts: np.ndarray):
        self.counts = torch.from_numpy(counts.astype(np.float32))

    def score_all(self, users, ctx):
        return self.counts.expand(len(users), -1).clone()


def blend_inputs(n_users: int, n_items: int, n_members: int, seed: int = 0):
    """(members, labels): validation labels drawn from a hidden taste the members see noisily."""
    from recsys_lib.protocol.evaluate import Labels
    rng = np.random.default_rng(seed)
    d = 16
    taste_u = rng.standard_normal((n_users, d)).astype(np.float32)
    taste_v = rng.standard_normal((n_items, d)).astype(np.float32)
    pop = np.minimum((rng.pareto(1.2, 40 * n_items) * n_items / 50).astype(np.int64), n_items - 1)
    counts = np.bincount(pop, minlength=n_items)
    bias = (np.log1p(counts) / 2).astype(np.float32)
    members = {"popularity": Popularity(counts)}
    for j in range(n_members - 1):
        noise = 0.6 + 0.3 * j
        members[f"factors_{j}"] = Factors(taste_u + noise * rng.standard_normal(taste_u.shape).astype(np.float32),
                                          taste_v + noise * rng.standard_normal(taste_v.shape).astype(np.float32),
                                          bias * rng.uniform(0.3, 1.5))
    seen = random_known(n_users, n_items, 40 * n_users, seed=seed + 1)
    rows, cols = [], []
    for a in range(0, n_users, 1024):                                  # 10 positives a user, by taste
        s = taste_u[a:a + 1024] @ taste_v.T + bias + rng.gumbel(size=(min(1024, n_users - a), n_items))
        s[seen[a:a + 1024].nonzero()] = -np.inf
        top = np.argpartition(-s, 10, axis=1)[:, :10]
        rows.append(np.repeat(np.arange(a, a + len(top)), 10))
        cols.append(top.ravel())
    positives = sp.csr_matrix((np.ones(10 * n_users, np.float32), (np.concatenate(rows), np.concatenate(cols))),
                              shape=(n_users, n_items))
    ctx = type("Ctx", (), {"seen": seen, "period": "valid", "catalogue": None})()
    users = np.arange(n_users)
    return members, Labels(period="valid", users=users, positives=positives, ctx=ctx, n_items=n_items)


# ---------------------------------------------------------------- one measurement
def run_one(name: str, args) -> dict:
    from recsys_lib import config
    from recsys_lib.models import blend, train, transition
    config.torch_threads()                                             # $RECSYS_TORCH_THREADS, as a notebook
    torch.manual_seed(0)
    extra = {}
    if name.startswith("transition"):
        rows = synthetic_rows(args.rows, args.users, args.items)
        model = transition.Transition(window=args.window, normalise="row")
        model.n_items = args.items
        ctx = type("Ctx", (), {"shared": {}, "table_dir": None, "parameter_rows": lambda self: rows,
                               "digest": lambda self, r: transition_digest(r)})()
        if name != "transition_old":
            ctx.table_dir = Path(args.cache_dir)
        if name == "transition_old":
            import old_paths
            transition.transition_counts = old_paths.old_transition_counts    # the old count, same matrix code
        before = rss_mb()
        t0 = time.perf_counter()
        T, tie = model.table(ctx)
        seconds = time.perf_counter() - t0
        out = digest(T.data, T.indices, T.indptr, tie)
        extra["note"] = f"{T.nnz:,} pairs from {len(rows):,} rows, window {args.window}"
    elif name.startswith("blend"):
        members, labels = blend_inputs(args.blend_users, args.blend_items, args.members)
        import old_paths
        before = rss_mb()
        t0 = time.perf_counter()
        if name == "blend_old":
            model, table = old_paths.old_blend_tune(members, labels, steps=args.steps, batch_users=1024)
        else:
            model, table = blend.tune(members, labels, steps=args.steps, batch_users=1024, verbose=False,
                                      spill_dir=args.cache_dir, in_memory_bytes=0)
        seconds = time.perf_counter() - t0
        out = hashlib.sha256((table.to_json() + json.dumps(model.weights, sort_keys=True)).encode()).hexdigest()[:12]
        best = table.loc[table["best"]].iloc[0]
        extra["note"] = (f"best step {int(best['step'])}, valid nDCG@10 {best['valid_metric']:.6f}, weights "
                         + ", ".join(f"{n} {w:.2f}" for n, w in model.weights.items()))
    else:
        known = random_known(args.users, args.items, args.known)
        users = np.random.default_rng(1).integers(0, args.users, 4096)
        cache = name == "sampler_new"
        before = rss_mb()
        t0 = time.perf_counter()
        draws = []
        for fit in range(args.fits):                                   # each fit makes its own sampler
            sampler = train.NegativeSampler(known.copy(), seed=fit, cache=cache)
            draws.append(sampler.sample(users, 4))
            del sampler
        seconds = time.perf_counter() - t0
        out = digest(*draws)
        extra["note"] = (f"{args.fits} fits, {args.users:,} x {args.items:,}, {known.nnz:,} known pairs; "
                         f"built {train.MEMBERSHIP_STATS['built']}, reused {train.MEMBERSHIP_STATS['reused']}")
    return {"seconds": seconds, "rss_before_mb": before, "peak_mb": peak_mb(), "digest": out, **extra}


def transition_digest(rows) -> str:
    from recsys_lib.protocol.splitdata import rows_digest
    return rows_digest(rows)


ROWS = [("transition table", [("old: count", "transition_old"), ("new: count + keep", "transition_new"),
                              ("new: later notebook reads", "transition_read")]),
        ("blend search", [("old: tables in memory", "blend_old"), ("new: tables on disk", "blend_spill")]),
        ("negative samplers", [("old: one per fit", "sampler_old"), ("new: shared", "sampler_new")])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_500_000, help="transition: train rows")
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--window", type=int, default=40)
    ap.add_argument("--blend-users", type=int, default=2_000)
    ap.add_argument("--blend-items", type=int, default=20_000)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--known", type=int, default=3_000_000, help="samplers: known pairs")
    ap.add_argument("--fits", type=int, default=6)
    ap.add_argument("--only", nargs="*", default=None, help="rows to run: transition, blend, samplers")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)), flush=True)
        return
    from recsys_lib.run.usage import speed_index
    print(f"speed index {speed_index()['speed_index']:.2f}, {torch.get_num_threads()} torch threads; "
          "each row a fresh process", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for stage, paths in ROWS:
            if args.only and not any(stage.startswith(o) or stage.endswith(o) for o in args.only):
                continue
            for label, name in paths:
                cmd = [sys.executable, __file__, "--one", name, "--cache-dir", cache_dir] + [
                    a for a in sys.argv[1:] if a not in ("--only", *(args.only or []))]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.append((stage, label, r))
                print(f"  {stage}, {label}: {r['seconds']:.2f} s", flush=True)
    width = max(len(f"{s}, {lab}") for s, lab, _ in results)
    print(f"\n{'row':<{width}}  {'seconds':>8}  {'peak MB':>8}  {'added MB':>8}  result        note")
    same = True
    for stage, paths in ROWS:
        rows = [r for s, _, r in results if s == stage]
        same &= len({r["digest"] for r in rows}) <= 1
        for s, lab, r in [(s, lab, r) for s, lab, r in results if s == stage]:
            print(f"{s + ', ' + lab:<{width}}  {r['seconds']:8.2f}  {r['peak_mb']:8.0f}  "
                  f"{r['peak_mb'] - r['rss_before_mb']:8.0f}  {r['digest']}  {r.get('note', '')}")
    if not same:
        raise SystemExit("a saving changed its result")
    print("every row's paths give the same result (hash)")


if __name__ == "__main__":
    main()
