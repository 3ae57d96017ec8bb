"""make bench-features: the re-ranker's sequence features at MovieLens-32M scale (ml-32m from 2018:
7.7M train rows, 52.7k users, 65.6k items; 500 candidates a user), time and peak RSS.

Random rows with a Zipf item law stand in for the real ones; the cost depends on the sizes, not on
the values. Prints one line of figures."""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from recsys_lib.stage2 import features as rf
from recsys_lib.protocol.splitdata import Period, last_items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=52_700)
    ap.add_argument("--items", type=int, default=65_600)
    ap.add_argument("--rows", type=int, default=7_700_000)
    ap.add_argument("--candidates", type=int, default=500, help="candidates per user")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    user = rng.integers(0, a.users, a.rows)
    item = (rng.zipf(1.3, a.rows) % a.items).astype(np.int64)
    ts = np.arange(a.rows, dtype=np.int64)                       # rows in time order
    rows = Period(user=user, item=item, rating=np.full(a.rows, 4.0, np.float32), timestamp=ts)
    hist = last_items(rows.user, rows.item, a.users, rf.SEQ_HISTORY)
    cand_user = np.repeat(np.arange(a.users), a.candidates)
    cand_item = rng.integers(0, a.items, len(cand_user))
    t0 = time.perf_counter()
    f = rf.sequence_features(rows, cand_user, cand_item, hist, a.items)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"sequence features: {len(cand_user):,} candidate rows over {a.rows:,} rows in {seconds:.1f} s, "
          f"peak RSS {peak:.2f} GB (whole process), {np.mean(f['seq_count_log'] > 0):.1%} rows with a transition")


if __name__ == "__main__":
    main()
