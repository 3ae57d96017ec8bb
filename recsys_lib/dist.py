"""Distributed plumbing: torch.distributed under torchrun, on CPUs (gloo) or GPUs (NCCL).

Why one small module: the models keep their single-process code; `train.fit_loop` and
`evaluate.rank_topk` ask here whether they run inside a process group of more than one rank and,
if so, do three things differently:

- **Training.** Every rank draws the same *global* batch (same seeded generators, same
  negatives), takes its contiguous block of rows (`shard_range`) and computes the loss of those
  rows only, scaled by ``rows * world / global rows``; DistributedDataParallel averages the
  gradients, so each update is the single-process update of the whole batch up to the order of
  floating-point sums. Dropout draws the mask of the whole batch and keeps its rows
  (`ShardDropout`), so the same rows get the same mask as in one process.
- **In-batch softmax** needs every rank's item embeddings: `all_gather_rows` (with gradient).
- **Scoring.** Full-catalogue ranking hands out whole user batches round-robin (`my_batches`),
  so each batch is scored exactly as one process scores it, and `share_rows` gathers the top-K
  lists: every rank ends with the single-process lists.

Outside a process group (or with one rank) every helper is a no-op: the in-process path is the
code that ran before this module existed.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

# (lo, hi, n): the block of rows [lo, hi) of a global batch of n rows this rank is computing
_ROWS: tuple[int, int, int] | None = None


# ---------------------------------------------------------------- who am I
def initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if initialized() else 0


def world() -> int:
    return tdist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the one that prints and writes files."""
    return rank() == 0


def sharding() -> bool:
    """True inside a process group of more than one rank: training and scoring split work."""
    return initialized() and world() > 1


def init(device: str = "auto", timeout_minutes: float = 30.0) -> torch.device:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT) and return this rank's device: ``cuda:LOCAL_RANK`` with NCCL
    when ``device`` resolves to cuda, else the cpu with gloo. Started without torchrun (no
    WORLD_SIZE in the environment) it joins nothing: one process, the in-process code path."""
    from .config import resolve_device
    dev = resolve_device(device)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")                    # mps or cpu: gloo on the cpu
        backend = "gloo"
    if not initialized() and "WORLD_SIZE" in os.environ:
        tdist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                                 device_id=dev if dev.type == "cuda" else None)
    return dev


def shutdown() -> None:
    if initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if initialized():
        tdist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors live: the rank's GPU under NCCL, the cpu under gloo."""
    if initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_float(value: float) -> float:
    """``value`` summed over the ranks (itself outside a process group)."""
    if not sharding():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t)
    return float(t.item())


# ---------------------------------------------------------------- training
def shard_range(n: int, r: int | None = None, size: int | None = None) -> tuple[int, int]:
    """Rank ``r``'s contiguous block [lo, hi) of ``n`` rows; block sizes differ by at most one."""
    r = rank() if r is None else r
    size = world() if size is None else size
    base, extra = divmod(n, size)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def shard_rows(batch: Any, lo: int, hi: int) -> Any:
    """Rows [lo, hi) of every tensor of ``batch`` (a tensor, or a tuple/list of tensors and None):
    the default for batches whose tensors all have one row per example."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(None if b is None else b[lo:hi] for b in batch)
    return batch[lo:hi]


def rows_of(batch: Any) -> int:
    """Examples in a global batch: the length of its (first) tensor."""
    return len(batch[0] if isinstance(batch, (tuple, list)) else batch)


@contextmanager
def rows(lo: int, hi: int, n: int) -> Iterator[None]:
    """While computing rows [lo, hi) of a global batch of ``n`` rows (read by `ShardDropout`)."""
    global _ROWS
    before, _ROWS = _ROWS, (lo, hi, n)
    try:
        yield
    finally:
        _ROWS = before


class ShardDropout(nn.Dropout):
    """Dropout that, inside `rows`, draws the mask of the *whole* global batch and keeps this
    rank's rows. Why: one process draws one (n, H) mask per layer; for N ranks to reproduce its
    updates each must apply that mask's rows, not a mask of its own. A tensor with ``f`` rows per
    example (a (B, K) candidate list flattened) maps to rows [lo f, hi f) of n f: rows must be
    example-major, as in every model here but the BPR two-tower's item tower over
    cat([pos, neg]) (its dropout is 0; with dropout > 0 it draws valid masks, not the same ones).
    Outside `rows` it is ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _ROWS is None or not self.training or self.p == 0:
            return super().forward(x)
        lo, hi, n = _ROWS
        per, rem = divmod(x.shape[0], hi - lo)
        if rem:
            raise ValueError(f"ShardDropout: {x.shape[0]} rows for {hi - lo} examples")
        noise = x.new_empty((n * per, *x.shape[1:])).bernoulli_(1 - self.p)[lo * per:hi * per]
        return x * noise.div_(1 - self.p)


def shard_dropout(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Dropout`` of ``model`` for a `ShardDropout` (same p; no parameters, so
    state dicts are unchanged). Functional dropout (inside attention) is not reached: with an
    attention encoder and dropout > 0, N ranks follow the same distribution, not the same draws."""
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, ShardDropout(child.p, child.inplace))
    return model


class _ShardedLoss(nn.Module):
    """``loss_fn(net, this rank's rows of batch)`` scaled so that the ranks' average is the
    global batch's mean loss: the module DistributedDataParallel wraps (its forward is the loss,
    so the models' own loss functions run unchanged under DDP)."""

    def __init__(self, net: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 shard: Callable[[Any, int, int], Any]):
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.shard = shard

    def forward(self, batch: Any) -> torch.Tensor:
        n = rows_of(batch)
        lo, hi = shard_range(n)
        weight = (hi - lo) * world() / n            # DDP divides the summed gradients by world()
        if hi == lo:                                 # a last batch smaller than world(): this rank
            lo, hi = 0, 1                            # still runs (DDP needs every rank), at weight 0
        with rows(lo, hi, n):
            return self.loss_fn(self.net, self.shard(batch, lo, hi)) * weight


def data_parallel(net: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                  shard: Callable[[Any, int, int], Any] | None = None) -> nn.Module:
    """``batch -> loss`` for `train.fit_loop` inside a process group: ``net``'s dropout made
    shard-aware and the sharded loss wrapped in DistributedDataParallel. ``shard(batch, lo, hi)``
    cuts a global batch to rows [lo, hi) (default `shard_rows`).

    ``find_unused_parameters`` for a net with an LSTM: a shard whose users all lack a history
    (a last batch may leave a rank one row) skips it; no sync of buffers on each forward: they
    are constants."""
    from torch.nn.parallel import DistributedDataParallel
    dev = next(net.parameters()).device
    module = _ShardedLoss(shard_dropout(net), loss_fn, shard or shard_rows)
    skips = any(isinstance(m, (nn.LSTMCell, nn.LSTM)) for m in net.modules())
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   forward_sync_buffers=False, find_unused_parameters=skips)


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` ((sizes[r], ...) on rank r) in rank order, with gradient:
    the gradient of each rank's rows flows back to that rank (summed over the ranks' losses)."""
    import warnings

    from torch.distributed.nn.functional import all_gather
    width = max(max(sizes), 1)
    pad = torch.cat([x, x.new_zeros((width - len(x), *x.shape[1:]))]) if len(x) < width else x
    with warnings.catch_warnings():                  # deprecated for a private replacement; still public
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def gathered(fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """``fn(ids)`` for all ``ids`` with each rank computing only its block of them (e.g. the item
    tower over a global batch's items, for an in-batch softmax on every rank)."""
    sizes = [hi - lo for lo, hi in (shard_range(len(ids), r) for r in range(world()))]
    lo, hi = shard_range(len(ids))
    with rows(lo, hi, len(ids)):                     # dropout inside fn: the rows of the (len(ids), H) mask
        out = fn(ids[lo:hi])
    return all_gather_rows(out, sizes)


# ---------------------------------------------------------------- scoring
def my_batches(starts: Sequence[int]) -> Sequence[int]:
    """This rank's share of batch starts (round-robin: every world()-th batch from rank())."""
    return starts[rank()::world()] if sharding() else starts


def share_rows(out: np.ndarray, starts: Sequence[int], batch: int) -> None:
    """Fill the rows of ``out`` that the other ranks computed (each rank filled the rows of its
    `my_batches`): afterwards every rank holds all rows, as one process would."""
    if not sharding():
        return
    n, size = len(out), world()
    owned = []
    for r in range(size):
        blocks = [np.arange(s, min(s + batch, n)) for s in starts[r::size]]
        owned.append(np.concatenate(blocks) if blocks else np.zeros(0, np.int64))
    width = max(max(len(o) for o in owned), 1)
    dev = _comm_device()
    mine = torch.from_numpy(np.ascontiguousarray(out[owned[rank()]]))
    pad = torch.zeros((width, *out.shape[1:]), dtype=mine.dtype)
    pad[:len(mine)] = mine
    parts = [torch.empty_like(pad, device=dev) for _ in range(size)]
    tdist.all_gather(parts, pad.to(dev))
    for r in range(size):
        out[owned[r]] = parts[r][:len(owned[r])].cpu().numpy()
