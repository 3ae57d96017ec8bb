"""One training loop for every trained model (MF, NeuMF, two-tower, re-ranker).

Batches are index tensors drawn from in-memory tensors (no per-row Dataset over a DataFrame);
negatives are sampled uniformly, excluding each user's known positives; early stopping keeps
the best state by a validation metric computed by a callback built outside the fitting
context (recsys_lib.protocol.evaluate.Evaluator).
"""
from __future__ import annotations

import copy
import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .. import dist
from ..config import atomic_write, load_torch


@dataclass
class LoopConfig:
    epochs: int = 20            # maximum epochs
    patience: int = 3           # epochs without improvement before stopping (0 = never stop early)
    eval_every: int = 1         # epochs between validation checks
    amp_bf16: bool = False      # bf16 autocast on CPU (and cuda) for the forward pass
    grad_clip: float = 0.0      # clip gradient norm when > 0
    progress: bool = True       # tqdm bars
    log_every_epoch: bool = True  # print one line per epoch (loss, metric, samples/s)


@dataclass
class FitHistory:
    """Per-epoch records and the best epoch; ``records`` are JSON-ready dicts."""

    records: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float = float("-inf")
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"records": self.records, "best_epoch": self.best_epoch,
                "best_metric": self.best_metric, "seconds": self.seconds}


def permuted_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random permutation of 0..n-1 cut into index batches (the last may be smaller)."""
    perm = torch.randperm(n, generator=generator)
    return list(torch.split(perm, batch_size))


def adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam, fused into one kernel where torch has it (cpu, cuda).

    Why: the models' embedding tables get dense gradients, and the per-tensor Adam update over
    them dominates a step on a CPU: at ml-32m sizes (the two-tower's 15M parameters) 63 ms of a
    183 ms step, against 10 ms fused (``make bench-step``; same update rule)."""
    params = list(params)
    device = next((p.device.type for p in params if isinstance(p, torch.Tensor)), "cpu")
    fused = True if device in ("cpu", "cuda") else None
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)


@dataclass(frozen=True)
class Membership:
    """Who knows what, for `NegativeSampler`: the known matrix (sorted, no duplicates), its sorted
    pair keys ``user * n_items + item`` and, for ``lookup="bitmap"``, their packed bitmap. Read
    only (the arrays are locked), so samplers of the same rows share one."""

    known: sp.csr_matrix
    keys: np.ndarray
    bits: np.ndarray | None
    n_items: int


MEMBERSHIP_CACHE = 2       # memberships a process keeps (`membership`): the train rows and the label window's
_MEMBERSHIPS: "OrderedDict[tuple, Membership]" = OrderedDict()
MEMBERSHIP_STATS = {"built": 0, "reused": 0}   # counted, so a test can see the cache hit


def _known_digest(known: sp.csr_matrix) -> str:
    """A content hash of a canonical csr matrix (shape, row pointers, column indices): two
    matrices of the same known pairs, built apart (``data.train.matrix`` makes a new one each
    call), hash the same, and any other pairs do not."""
    h = hashlib.sha256(f"{known.shape};{known.indptr.dtype.str};{known.indices.dtype.str};".encode())
    h.update(memoryview(np.ascontiguousarray(known.indptr)).cast("B"))
    h.update(memoryview(np.ascontiguousarray(known.indices)).cast("B"))
    return h.hexdigest()


def membership(known: sp.csr_matrix, lookup: str, cache: bool = True) -> Membership:
    """The `Membership` of ``known`` for ``lookup`` ("bitmap" or "search"), built once per process
    for the same known pairs: the last ``MEMBERSHIP_CACHE`` are kept, keyed by their content
    (`_known_digest`). Why: every MF, NeuMF and two-tower fit made its own sampler, and at ML-32M
    size the bitmap alone took 8.7 s and 412 MiB each, for the same train rows in every fit of a
    search. The sampler only reads it, so a shared one draws the same negatives as its own.
    ``cache=False`` builds a fresh one (the old path; tests and benchmarks)."""
    canonical = isinstance(known, sp.csr_matrix) and known.has_canonical_format   # train.matrix's are
    mat = known
    if not canonical:
        mat = sp.csr_matrix(known, copy=True)
        mat.sum_duplicates()                                 # sorted column indices per row
    key = (_known_digest(mat), lookup) if cache else None
    if key is not None and key in _MEMBERSHIPS:
        _MEMBERSHIPS.move_to_end(key)
        MEMBERSHIP_STATS["reused"] += 1
        return _MEMBERSHIPS[key]
    if mat is known:
        mat = sp.csr_matrix(known, copy=True)                # the caller's matrix stays theirs
    coo = mat.tocoo()
    n_items = mat.shape[1]
    keys = np.unique(coo.row.astype(np.int64) * n_items + coo.col)
    n_bytes = (mat.shape[0] * n_items + 7) // 8
    bits = packed_bitmap(keys, n_bytes) if lookup == "bitmap" else None
    for a in (mat.data, mat.indices, mat.indptr, keys) + ((bits,) if bits is not None else ()):
        a.flags.writeable = False
    m = Membership(known=mat, keys=keys, bits=bits, n_items=n_items)
    MEMBERSHIP_STATS["built"] += 1
    if key is not None:
        while len(_MEMBERSHIPS) >= MEMBERSHIP_CACHE:
            _MEMBERSHIPS.popitem(last=False)
        _MEMBERSHIPS[key] = m
    return m


def clear_membership_cache() -> None:
    """Drop the kept memberships (their memory goes with the last sampler that holds one)."""
    _MEMBERSHIPS.clear()


class NegativeSampler:
    """Uniform negatives that exclude each user's known items.

    Vectorised rejection sampling for ``rounds`` rounds; the few collisions left (users who know
    most of the catalogue) are then drawn exactly from the user's unknown items. A user who knows
    every item keeps a random (known) item: there is no negative to give.

    Membership is a packed bitmap of the (user, item) grid, one bit a pair, when it fits in
    ``max_bitmap_bytes`` (412 MiB at ml-32m's 52.7k x 65.6k): a lookup is one gather, against a
    binary search of every known pair (``lookup="search"``, the fallback for larger grids): one
    4,096 x 4 MF batch drew in 0.3 ms against 11.4 ms at that size (``make bench-speedups``). Both
    give the same answers, so the same random stream draws the same negatives.

    The membership (matrix, keys, bitmap) is built once per process for the same known pairs and
    shared (`membership`); each sampler has its own random stream only."""

    def __init__(self, known: sp.csr_matrix, seed: int = 0, rounds: int = 5, lookup: str = "auto",
                 max_bitmap_bytes: int = 2 ** 30, cache: bool = True):
        if lookup not in ("auto", "bitmap", "search"):
            raise ValueError(f"NegativeSampler lookup must be auto, bitmap or search, got {lookup!r}")
        self.rng = np.random.default_rng(seed)
        self.rounds = rounds
        n_bytes = (known.shape[0] * known.shape[1] + 7) // 8
        self.lookup = lookup if lookup != "auto" else ("bitmap" if n_bytes <= max_bitmap_bytes else "search")
        m = membership(known, self.lookup, cache)
        self.known, self.keys, self.bits, self.n_items = m.known, m.keys, m.bits, m.n_items

    def is_known(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users.astype(np.int64) * self.n_items + items
        if self.bits is not None:
            return ((self.bits[keys >> 3] >> (keys & 7).astype(np.uint8)) & 1).astype(bool)
        pos = np.searchsorted(self.keys, keys).clip(0, max(len(self.keys) - 1, 0))
        return self.keys[pos] == keys if len(self.keys) else np.zeros(keys.shape, bool)

    def _exact(self, user: int) -> int:
        """A uniform draw from the items ``user`` does not know (the r-th unknown item)."""
        row = self.known.indices[self.known.indptr[user]:self.known.indptr[user + 1]]
        n_free = self.n_items - len(row)
        if n_free <= 0:
            return int(self.rng.integers(0, self.n_items))
        r = int(self.rng.integers(0, n_free))
        j = r
        while True:                                          # j = r + #known items <= j, to a fixed point
            nxt = r + int(np.searchsorted(row, j, side="right"))
            if nxt == j:
                return j
            j = nxt

    def sample(self, users: np.ndarray, n_neg: int = 1) -> np.ndarray:
        """(len(users), n_neg) item ids, none of them known to its user (where possible)."""
        users = np.repeat(np.asarray(users)[:, None], n_neg, axis=1)
        items = self.rng.integers(0, self.n_items, size=users.shape)
        for _ in range(self.rounds):
            bad = self.is_known(users, items)
            if not bad.any():
                return items
            items[bad] = self.rng.integers(0, self.n_items, size=int(bad.sum()))
        bad = np.argwhere(self.is_known(users, items))
        for r, c in bad:                                     # rare: exact draws for what is left
            items[r, c] = self._exact(int(users[r, c]))
        return items


def packed_bitmap(keys: np.ndarray, n_bytes: int) -> np.ndarray:
    """(n_bytes,) uint8 with bit ``k & 7`` of byte ``k >> 3`` set for every key of sorted unique
    ``keys``: the keys of one byte are OR-ed together by one ``reduceat``."""
    bits = np.zeros(n_bytes, dtype=np.uint8)
    if len(keys):
        byte = keys >> 3
        starts = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
        bits[byte[starts]] = np.bitwise_or.reduceat((1 << (keys & 7)).astype(np.uint8), starts)
    return bits


def positive_batches(data, batch_size: int, n_neg: int, seed: int, device: torch.device):
    """Batches of (users (b,), positive items (b,), negatives (b, n_neg)) over the train period's
    positives (rating >= 4) in a fresh random order each epoch, negatives excluding each user's
    known train items: ``(batches(epoch), n_positives)`` for `fit_loop` (MF, NeuMF)."""
    train = data.train
    users = torch.from_numpy(train.user[train.positive]).long()       # (P,)
    items = torch.from_numpy(train.item[train.positive]).long()       # (P,)
    sampler = NegativeSampler(train.matrix(data.n_users, data.n_items), seed=seed)
    gen = torch.Generator().manual_seed(seed)

    def batches(epoch: int):
        for idx in permuted_batches(len(users), batch_size, gen):
            u, i = users[idx], items[idx]                                          # (b,)
            neg = torch.from_numpy(sampler.sample(u.numpy(), n_neg))               # (b, n_neg)
            yield u.to(device), i.to(device), neg.to(device)
    return batches, len(users)


def fit_loop(model: torch.nn.Module, batches: Callable[[int], Iterable[Any]],
             loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], optimizer: torch.optim.Optimizer,
             cfg: LoopConfig, validate: Callable[[], float] | None = None,
             scheduler: Any = None, batch_size_of: Callable[[Any], int] | None = None,
             name: str = "model", shard: Callable[[Any, int, int], Any] | None = None) -> FitHistory:
    """Train ``model``; after each ``eval_every`` epochs call ``validate()`` (higher is better),
    keep the best state and stop after ``patience`` checks without improvement. The best state
    is restored before returning. ``batches(epoch)`` yields whatever ``loss_fn`` takes.

    Under torchrun with more than one rank (`recsys_lib.dist`), every rank iterates the same
    global batches and computes the loss of its block of rows, cut by ``shard(batch, lo, hi)``
    (default: rows [lo, hi) of every tensor), inside DistributedDataParallel; the logged loss is
    the global batch's. ``validate`` runs on every rank (its scoring is sharded), so all ranks
    take the same early-stopping decisions."""
    history = FitHistory()
    best_state = None
    bad_checks = 0
    t_start = time.perf_counter()
    device_type = next(model.parameters()).device.type
    # bf16 autocast where asked, except on a GPU without bf16 units (pre-Ampere), where it fails
    amp = cfg.amp_bf16 and (device_type != "cuda" or torch.cuda.is_bf16_supported())
    ddp = dist.data_parallel(model, loss_fn, shard) if dist.sharding() else None
    for epoch in range(cfg.epochs):
        (model if ddp is None else ddp).train()
        t0 = time.perf_counter()
        total, steps, samples = 0.0, 0, 0
        bar = tqdm(batches(epoch), desc=f"{name} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress or not dist.is_main(), leave=False)
        for batch in bar:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model, batch) if ddp is None else ddp(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach())
            steps += 1
            samples += batch_size_of(batch) if batch_size_of else 0
        if ddp is not None:
            total = dist.sum_float(total) / dist.world()        # ranks' scaled shares -> global mean
        train_seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "loss": total / max(steps, 1), "train_seconds": train_seconds,
                  "samples_per_s": samples / train_seconds if samples and train_seconds > 0 else None}
        if validate is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            model.eval()
            with torch.no_grad():
                metric = float(validate())
            record["valid_metric"] = metric
            if metric > history.best_metric:
                history.best_metric, history.best_epoch = metric, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
                bad_checks = 0
            else:
                bad_checks += 1
        history.records.append(record)
        if cfg.log_every_epoch:
            rate = f", {record['samples_per_s']:,.0f} samples/s" if record["samples_per_s"] else ""
            val = f", valid {record['valid_metric']:.4f}" if "valid_metric" in record else ""
            print(f"{name} epoch {epoch + 1}: loss {record['loss']:.4f}{val}{rate}", flush=True)
        if validate is not None and cfg.patience and bad_checks >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    if validate is None:
        history.best_epoch = len(history.records)
    history.seconds = time.perf_counter() - t_start
    model.eval()
    return history


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, config: Any, **extra: Any) -> Path:
    """state dict + config (a dataclass or dict) + extras, written atomically."""
    cfg = asdict(config) if is_dataclass(config) else dict(config)
    with atomic_write(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "config": cfg, **extra}, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    return load_torch(path, map_location=map_location)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
