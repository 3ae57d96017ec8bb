"""make bench-step: where a two-tower training step spends its time, at ml-32m sizes.

The seed design (embedding 128, LSTM 64 over 5 items, MLPs 256-128-128, batch 4096) with the
table sizes of synthetic-32m from 2018 (52,702 users, 65,583 items), on random batches: mean
forward, backward and optimizer milliseconds per step over ``--steps`` steps (after 2 warm-up
steps) and the triplets/s they imply, for Adam as torch's default picks it and for
``recsys_lib.models.train.adam`` (fused where available), which every model uses."""
from __future__ import annotations

import argparse
import time

import torch

from recsys_lib.config import resolve_device
from recsys_lib.models.two_tower import TwoTowerConfig, TwoTowerNet
from recsys_lib.models.train import adam


def time_steps(net: TwoTowerNet, opt: torch.optim.Optimizer, batches: list, warmup: int = 2) -> dict:
    parts = {"forward_ms": 0.0, "backward_ms": 0.0, "optimizer_ms": 0.0}
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss = net.bpr_loss(batch)
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= warmup:
            parts["forward_ms"] += (t1 - t0) * 1e3
            parts["backward_ms"] += (t2 - t1) * 1e3
            parts["optimizer_ms"] += (t3 - t2) * 1e3
    n = len(batches) - warmup
    out = {k: v / n for k, v in parts.items()}
    out["triplets_per_s"] = len(batches[0][0]) / (sum(out.values()) / 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=52_702)
    ap.add_argument("--items", type=int, default=65_583)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    nu, ni, b = args.users, args.items, args.batch
    genres, year, tags = (torch.randint(0, 20, (ni, 3), generator=gen), torch.randint(0, 30, (ni,), generator=gen),
                          torch.randint(0, 100, (ni, 3), generator=gen))
    batches = [tuple(t.to(dev) for t in (torch.randint(0, nu, (b,), generator=gen),
                                         torch.randint(1, ni + 1, (b, 5), generator=gen),
                                         torch.randint(0, ni, (b,), generator=gen),
                                         torch.randint(0, ni, (b,), generator=gen)))
               for _ in range(args.steps + 2)]
    print(f"two-tower seed design, {nu:,} users x {ni:,} items, batch {b}, {torch.get_num_threads()} "
          f"threads on {dev}")
    for name, make in (("torch.optim.Adam (default)", lambda p: torch.optim.Adam(p, lr=1e-3)),
                       ("recsys_lib.models.train.adam (fused)", lambda p: adam(p, lr=1e-3))):
        torch.manual_seed(0)
        net = TwoTowerNet(TwoTowerConfig(variant="bpr"), nu, ni, genres, year, tags, 20, 30, 100,
                          torch.zeros(ni)).to(dev)
        r = time_steps(net, make(list(net.parameters())), batches)
        print(f"  {name:<32} forward {r['forward_ms']:6.1f} ms  backward {r['backward_ms']:6.1f} ms  "
              f"optimizer {r['optimizer_ms']:6.1f} ms  -> {r['triplets_per_s']:,.0f} triplets/s")


if __name__ == "__main__":
    main()
