"""EASE (Steck, 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): closed form.

X is the binary (n_users, n_items) train matrix: every rated row, or positives only (a flag to
pick on validation). With G = X^T X + lambda I and P = G^-1, the item-item weights are
B = I - P / diag(P), i.e. B_ij = -P_ij / P_jj off the diagonal and B_jj = 0.

Scores are x_u B where x_u is the user's row of the same kind of matrix B was learnt from, built
from the rows *before the scored period*: every rated item (``ctx.seen``), or with
``positives_only`` the positives only (``ctx.seen_positive``); train rows for validation, train and
validation rows for test (docs/PROTOCOL.md: histories at scoring time include earlier periods, and a
model scores a user from the same kind of input it was fit on). B comes from train rows only.

Memory: G, its Cholesky factor and B are dense (n_items, n_items); float64 for catalogues up to
``float64_max_items``, float32 above. ``max_items`` caps the dense part for large catalogues
(ml-32m from 2018 has ~65k train items: 17 GB per float32 matrix): B is learnt over the
``max_items`` most-rated train items, and the other items score below every kept item (ordered by
train popularity among themselves). X^T X is accumulated in item-column chunks so the sparse
product never materialises more than ``gram_chunk`` columns at once. A search (`tune`) fits EASE
once per configuration, but X^T X depends only on the input kind (every rated row or positives
only), not on lambda: inside `gram_cache` each kind's Gram matrix is computed once and copied for
every fit (an exact reuse; at ML-32M size a Gram matrix costs ~10 s and 1.6 GB).
"""
from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from . import tuning
from ..protocol.splitdata import ScoringContext, SplitData
from .train import save_checkpoint
from . import Recommender


@dataclass
class EASEConfig:
    reg: float = 500.0                 # lambda, the L2 weight on B (larger = smoother)
    positives_only: bool = False       # X from positives (rating >= 4) only, else from every rated row
    float64_max_items: int = 8192      # solve in float64 up to this catalogue size, float32 above
    gram_chunk: int = 4096             # item columns per chunk of the sparse X^T X product
    max_items: int | None = None       # learn B over the N most-rated train items only (None: all)
    device: str = "auto"               # auto -> cuda, mps, cpu (mps solves in float32)
    seed: int | None = 0               # unused (closed form); kept so every model takes one


def gram(x: sp.csr_matrix, dtype: torch.dtype, device: torch.device, chunk: int = 4096) -> torch.Tensor:
    """Dense X^T X as a torch tensor, from a sparse X, computed ``chunk`` item columns at a time."""
    n = x.shape[1]
    xt = x.T.tocsr()                                                   # (n_items, n_users)
    xc = x.tocsc()
    out = torch.empty((n, n), dtype=dtype, device=device)              # (n_items, n_items)
    for start in range(0, n, chunk):
        block = (xt @ xc[:, start:start + chunk]).toarray()            # (n_items, C)
        out[:, start:start + chunk] = torch.from_numpy(block).to(device=device, dtype=dtype)
    return out


_GRAMS: "OrderedDict | None" = None     # the active `gram_cache` (None: every fit computes its own)
_GRAMS_SIZE = 2


@contextmanager
def gram_cache(size: int = 2):
    """Within it, EASE fits on the same train matrix reuse its Gram matrix: the last ``size`` are
    kept, keyed by the data set object and the input (kind, kept items, dtype, device). Two is a
    search's whole need: its configurations differ in lambda and in the input kind."""
    global _GRAMS, _GRAMS_SIZE
    outer = (_GRAMS, _GRAMS_SIZE)
    _GRAMS, _GRAMS_SIZE = OrderedDict(), max(int(size), 1)
    try:
        yield _GRAMS
    finally:
        _GRAMS, _GRAMS_SIZE = outer


def cached_gram(key: tuple, compute) -> torch.Tensor:
    """``compute()``, or a copy of the cached result for ``key`` inside `gram_cache` (a copy: the
    solve overwrites its input)."""
    if _GRAMS is None:
        return compute()
    if key not in _GRAMS:
        while len(_GRAMS) >= _GRAMS_SIZE:
            _GRAMS.popitem(last=False)
        _GRAMS[key] = compute()
    _GRAMS.move_to_end(key)
    return _GRAMS[key].clone()


def ease_weights(g: torch.Tensor, reg: float) -> torch.Tensor:
    """B = I - P / diag(P) with P = (G + reg I)^-1; ``g`` is overwritten (it can be large)."""
    g.diagonal().add_(reg)                                             # G + lambda I
    chol = torch.linalg.cholesky(g)                                    # (n, n) lower factor
    del g
    p = torch.cholesky_inverse(chol)                                   # (n, n) P
    del chol
    d = p.diagonal().clone()                                           # (n,) P_jj
    p.div_(-d.unsqueeze(0))                                            # column j divided by -P_jj
    p.diagonal().zero_()                                               # B_jj = 0
    return p                                                           # (n, n) B


class EASE(torch.nn.Module, Recommender):
    name = "ease"
    builds_user_from_rows = True   # scores a user from ctx.input_matrix (rerank_features.recent_context)
    Config = EASEConfig

    def __init__(self, config: EASEConfig | None = None, **overrides):
        super().__init__()
        self.configure(config, **overrides)
        self.register_buffer("B", torch.zeros(0, 0))                 # (n_kept, n_kept)
        self.register_buffer("kept", torch.zeros(0, dtype=torch.long))  # (n_kept,) item ids in B
        self.register_buffer("floor", torch.zeros(0))                 # (n_items,) score of uncapped items

    def _dtype(self, n_items: int) -> torch.dtype:
        if n_items <= self.cfg.float64_max_items and self.device.type != "mps":
            return torch.float64
        return torch.float32

    # ------------------------------------------------------------ fit
    def fit(self, data: SplitData, validate=None) -> dict:
        """Closed form from the train matrix; nothing to early-stop (``validate`` is unused: lambda is
        chosen by tuning.grid_search)."""
        t0 = time.perf_counter()
        x = data.train.matrix(data.n_users, data.n_items, positives_only=self.cfg.positives_only)
        pop = np.bincount(data.train.item, minlength=data.n_items)
        n_kept = min(self.cfg.max_items or data.n_items, data.n_items)
        kept = np.sort(np.argsort(-pop, kind="stable")[:n_kept])        # most-rated items, id order
        dtype = self._dtype(n_kept)
        key = (id(data), self.cfg.positives_only, kept.tobytes(), dtype, str(self.device))
        g = cached_gram(key, lambda: gram(x[:, kept], dtype, self.device, self.cfg.gram_chunk))  # (n_kept, n_kept)
        self.B = ease_weights(g, float(self.cfg.reg))                  # (n_kept, n_kept)
        self.kept = torch.from_numpy(kept).to(self.device)
        # uncapped items rank below every kept item, by popularity (rank in [0, 1) below -1e6)
        rank = pop.argsort(kind="stable").argsort() / max(data.n_items, 1)
        self.floor = torch.from_numpy(-1e6 + rank).float().to(self.device)
        info = {"seconds": time.perf_counter() - t0, "n_items": data.n_items, "n_kept": n_kept,
                "nnz": int(x.nnz), "dtype": str(dtype).replace("torch.", "")}
        print(f"EASE: {n_kept:,} x {n_kept:,} weights ({info['dtype']}) on {self.device}, "
              f"lambda={self.cfg.reg:g}, {info['seconds']:.1f}s", flush=True)
        return info

    # ------------------------------------------------------------ score
    def _history(self, users: torch.Tensor, seen: sp.csr_matrix) -> torch.Tensor:
        """(B, n_kept) binary rows of the users' seen items among the kept ones.

        CSR on cpu and cuda (``csr @ dense`` is a threaded sparse kernel there: ~8x faster than a
        COO ``torch.sparse.mm`` on 2 cores at 20k items), dense elsewhere (mps has no CSR mm)."""
        rows = seen[users.cpu().numpy()][:, self.kept.cpu().numpy()].tocsr()  # (B, n_kept)
        rows.sort_indices()
        if self.B.device.type in ("cpu", "cuda"):
            with warnings.catch_warnings():                            # "CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                return torch.sparse_csr_tensor(
                    torch.from_numpy(rows.indptr.astype(np.int64)),
                    torch.from_numpy(rows.indices.astype(np.int64)),
                    torch.ones(rows.nnz, dtype=self.B.dtype), size=rows.shape,
                    check_invariants=False).to(self.B.device)
        return torch.from_numpy(rows.toarray()).to(device=self.B.device, dtype=self.B.dtype)

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        """x_u B with x_u the user's row before ``ctx.period`` (train; train + valid for test), of the
        kind B was fit on: every rated item, or positives only."""
        x = self._history(users, ctx.input_matrix(self.cfg.positives_only))  # (B, n_kept)
        scores = (x @ self.B).float()                                  # (B, n_kept)
        if len(self.kept) == len(self.floor):
            return scores                                              # (B, n_items)
        out = self.floor.expand(len(users), -1).clone()                # (B, n_items)
        out[:, self.kept] = scores
        return out

    @torch.no_grad()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor, ctx: ScoringContext,
                    batch_users: int = 1024) -> torch.Tensor:
        """Scores of (user, item) pairs: each distinct user's full row once (``score_all``, in
        batches of ``batch_users``), then gathered. Re-ranker candidates come hundreds per user, so
        this costs one ranking pass over their users, not one B product per pair."""
        users, items = users.cpu(), items.cpu()
        uniq, inv = torch.unique(users, return_inverse=True)          # (U,), (N,)
        order = torch.argsort(inv, stable=True)                         # pairs grouped by user
        bounds = torch.searchsorted(inv[order], torch.arange(0, len(uniq) + batch_users, batch_users))
        out = torch.empty(len(users), dtype=torch.float32)
        for b, start in enumerate(range(0, len(uniq), batch_users)):
            idx = order[bounds[b]:bounds[b + 1]]                       # pairs of this user batch
            scores = self.score_all(uniq[start:start + batch_users], ctx).cpu()  # (b, n_items)
            out[idx] = scores[inv[idx] - start, items[idx]]
        return out

    # ------------------------------------------------------------ persistence
    def save(self, path) -> None:
        save_checkpoint(path, self, self.cfg, n_items=int(self.floor.shape[0]), dtype=str(self.B.dtype))

    @classmethod
    def load(cls, path, device: str | None = None) -> "EASE":
        model, ckpt = cls.from_checkpoint(path, device)
        state = ckpt["state_dict"]
        model.B = state["B"]
        model.kept = state.get("kept", torch.arange(state["B"].shape[0]))
        model.floor = state.get("floor", torch.zeros(state["B"].shape[0]))
        return model.to(model.device)


def tune(data: SplitData, section: dict | None, validate=None, device: str | None = None,
         seed: int | None = None, verbose: bool = True):
    """Grid-search lambda and the positives-only flag on validation -> (best model, table); each
    input kind's Gram matrix is computed once (`gram_cache`)."""
    with gram_cache():
        return tuning.tune_model(EASE, data, section, validate, device=device, seed=seed, verbose=verbose)
