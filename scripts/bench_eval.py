"""make bench-eval: full-catalogue evaluation speed and memory (issue goal: 40,000 users x 20,000
items, 64-dim dot-product scorer, seen items masked, top-1000, under 60 s and 4 GB on 2 cores).

Builds a random split of that size (60 train rows, 6 validation rows per user), then times
`Evaluator(...)(scorer)`: batched scoring, masking, per-batch top-K and every metric."""
from __future__ import annotations

import argparse
import resource
import time
import types

import numpy as np
import pandas as pd
import torch

from recsys_lib.protocol.evaluate import Evaluator
from recsys_lib.protocol.splitdata import SplitData


def random_split(n_users: int, n_items: int, train_per_user: int, valid_per_user: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    pop /= pop.sum()
    per = train_per_user + valid_per_user
    users = np.repeat(np.arange(n_users), per)
    items = rng.choice(n_items, size=n_users * per, p=pop)
    items[: n_items] = np.arange(n_items)                   # every item appears in train
    ts = np.tile(np.arange(per), n_users)
    df = pd.DataFrame({"user_id": users.astype(np.int32), "item_id": items.astype(np.int32),
                       "rating": rng.choice([3.0, 4.0, 5.0], size=len(users)).astype(np.float32),
                       "timestamp": ts.astype(np.int64)})
    is_valid = ts >= train_per_user
    empty = df.iloc[:0]
    return types.SimpleNamespace(train=df[~is_valid], valid=df[is_valid], test=empty,
                                 params={"strategy": "user_temporal"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=40_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--batch-users", type=int, default=1024)
    args = ap.parse_args()
    t0 = time.perf_counter()
    data = SplitData.from_split(random_split(args.users, args.items, 60, 6))
    ev = Evaluator(data, "valid", ks=(10, 50, 100, 200, 500, args.k), batch_users=args.batch_users)
    prep = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    U = torch.randn(data.n_users, args.dim, generator=gen)
    V = torch.randn(data.n_items, args.dim, generator=gen)

    class Dot:
        def score_all(self, users, ctx):
            return U[users] @ V.T                                  # (B, n_items)

    t1 = time.perf_counter()
    res = ev(Dot())
    seconds = time.perf_counter() - t1
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    n = len(ev.labels.users)
    print(f"torch threads        {torch.get_num_threads()}")
    print(f"users scored         {n:,} of {data.n_users:,}; items {data.n_items:,}; dim {args.dim}; top-{args.k}")
    print(f"labels (build)       {prep:.1f} s")
    print(f"evaluation           {seconds:.1f} s  ({n / seconds:,.0f} users/s)")
    print(f"peak RSS             {peak_gb:.2f} GB")
    print(f"ndcg@10 (random)     {res.means()['ndcg@10']:.4f}")


if __name__ == "__main__":
    main()
