"""iALS: implicit-feedback alternating least squares (Hu, Koren & Volinsky, 2008), through the
``implicit`` package, the field's standard CPU and GPU implementation (Rendle et al., 2022, show a
well-tuned iALS is a strong baseline).

X is the binary (n_users, n_items) train matrix (every rated row, or positives only); the
confidence of an observed pair is ``alpha`` (implicit's convention: ``C = alpha * X``, unobserved
pairs weigh 1 with preference 0). ``implicit`` alternates exact least-squares solves for the
user and item factors for ``iterations`` rounds with L2 weight ``regularization``.

Scoring folds users in (``recalculate_user``): with the item factors fixed, each scored user's
factors are the exact least-squares solution for their row of the same kind of matrix the model
was fit on, built from the rows before the scored period (``ctx.input_matrix``): train rows for
validation, train and validation rows for test. So a user's test-time vector sees their validation
rows, and no model parameter does.

A search (`tune`) tries several iteration counts of otherwise equal configurations. ALS is a chain:
iteration k+1 reads only the user and item factors after iteration k, and implicit's CPU solver
gives the same numbers for the same state. So inside `warm_start_cache` a fit of n iterations
resumes from the factors a fit of the same configuration left after k <= n iterations and runs
the remaining n - k: the 20-iteration model is the 10-iteration one run 10 rounds further, bit for
bit the model a fresh 20-iteration fit gives (an exact reuse; the GPU solver is not cached).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
import torch

from . import tuning
from ..protocol.splitdata import ScoringContext, SplitData
from .train import save_checkpoint
from . import Recommender


@dataclass
class IALSConfig:
    factors: int = 64                  # latent dimension
    regularization: float = 1.0        # L2 weight on user and item factors
    alpha: float = 10.0                # confidence of an observed pair (unobserved pairs weigh 1)
    iterations: int = 15               # ALS rounds (each solves users, then items)
    positives_only: bool = True        # X from positives (rating >= 4) only, else every rated row
    device: str = "auto"               # cuda uses implicit's GPU solver when it was built with CUDA
    seed: int | None = 0               # factor initialisation


def _als(cfg: IALSConfig, use_gpu: bool):
    """implicit's ALS object. BLAS is held to one thread while it is made (it checks, and warns)
    and while it runs: implicit parallelises over users itself."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, "blas"):
        return AlternatingLeastSquares(factors=int(cfg.factors), regularization=float(cfg.regularization),
                                   alpha=float(cfg.alpha), iterations=int(cfg.iterations),
                                   random_state=cfg.seed, use_gpu=use_gpu)


_STATES: "dict | None" = None     # the active `warm_start_cache` (None: every fit starts afresh)


@contextmanager
def warm_start_cache():
    """Within it, a CPU fit resumes from the latest state (iterations, user and item factors) of an
    earlier fit of the same data, input kind, factors, regularization, alpha and seed that ran no
    more iterations than it asks for; each key keeps the state of its last fit (~15 MB at
    ML-32M size and 32 factors)."""
    global _STATES
    outer = _STATES
    _STATES = {}
    try:
        yield _STATES
    finally:
        _STATES = outer


def _state_key(data: SplitData, cfg: IALSConfig) -> tuple:
    return (id(data), bool(cfg.positives_only), int(cfg.factors), float(cfg.regularization),
            float(cfg.alpha), cfg.seed)


def _gpu_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import implicit.gpu
        return bool(implicit.gpu.HAS_CUDA)
    except ImportError:
        return False


class IALS(torch.nn.Module, Recommender):
    name = "ials"
    builds_user_from_rows = True   # scores a user from ctx.input_matrix (rerank_features.recent_context)
    Config = IALSConfig

    def __init__(self, config: IALSConfig | None = None, **overrides):
        super().__init__()
        self.configure(config, **overrides)
        self.register_buffer("item_factors", torch.zeros(0, 0))      # (n_items, factors)
        self._solver = None                                            # CPU ALS object for fold-in

    # ------------------------------------------------------------ fit
    def fit(self, data: SplitData, validate=None) -> dict:
        """ALS on the train matrix; the iteration count is a searched hyper-parameter, so nothing
        early-stops (``validate`` is unused: tuning.grid_search scores each fit)."""
        from threadpoolctl import threadpool_limits
        t0 = time.perf_counter()
        x = data.train.matrix(data.n_users, data.n_items, positives_only=self.cfg.positives_only)
        use_gpu = _gpu_available(self.device)
        cache = _STATES if not use_gpu else None
        key = _state_key(data, self.cfg)
        done, user_f, item_f = cache.get(key, (0, None, None)) if cache is not None else (0, None, None)
        if done > self.cfg.iterations:
            done, user_f, item_f = 0, None, None                     # a longer run: no way back
        als = _als(replace(self.cfg, iterations=self.cfg.iterations - done), use_gpu)
        if done:
            als.user_factors, als.item_factors = user_f.copy(), item_f.copy()   # fit updates in place
        if als.iterations > 0:
            with threadpool_limits(1, "blas"):
                als.fit(x.astype(np.float32), show_progress=False)
        if use_gpu:
            als = als.to_cpu()
        if cache is not None:
            cache[key] = (self.cfg.iterations, als.user_factors.copy(), als.item_factors.copy())
        self._set_solver(np.asarray(als.item_factors, dtype=np.float32))
        info = {"seconds": time.perf_counter() - t0, "nnz": int(x.nnz), "gpu": use_gpu, "resumed_from": done}
        resumed = f" (resumed after {done})" if done else ""
        print(f"iALS: {self.cfg.factors} factors, reg={self.cfg.regularization:g}, alpha={self.cfg.alpha:g}, "
              f"{self.cfg.iterations} iterations{resumed} on {'cuda' if use_gpu else 'cpu'}, {info['seconds']:.1f}s",
              flush=True)
        return info

    def _set_solver(self, item_factors: np.ndarray) -> None:
        self.item_factors = torch.from_numpy(item_factors)
        solver = _als(self.cfg, use_gpu=False)
        solver.item_factors = item_factors
        solver.user_factors = np.zeros((1, item_factors.shape[1]), dtype=np.float32)
        self._solver = solver

    # ------------------------------------------------------------ score
    def user_factors(self, users: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        """(B, factors) fold-in: least-squares user factors from their rows before ``ctx.period``
        (the kind of matrix the model was fit on), item factors fixed."""
        from threadpoolctl import threadpool_limits
        rows = ctx.input_matrix(self.cfg.positives_only)[users.cpu().numpy()]
        rows = sp.csr_matrix(rows, dtype=np.float32)
        with threadpool_limits(1, "blas"):
            factors = self._solver.recalculate_user(np.arange(rows.shape[0]), rows)
        return torch.from_numpy(np.asarray(factors, dtype=np.float32).reshape(rows.shape[0], -1))

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        """User factors folded in from the rows before ``ctx.period``, dotted with every item's."""
        u = self.user_factors(users, ctx).to(self.device)              # (B, f)
        return u @ self.item_factors.to(self.device).T                 # (B, n_items)

    # ------------------------------------------------------------ persistence
    def save(self, path) -> None:
        save_checkpoint(path, self, self.cfg, n_items=int(self.item_factors.shape[0]))

    @classmethod
    def load(cls, path, device: str | None = None) -> "IALS":
        model, ckpt = cls.from_checkpoint(path, device)
        model._set_solver(ckpt["state_dict"]["item_factors"].numpy().astype(np.float32))
        return model.to(model.device)


def tune(data: SplitData, section: dict | None, validate=None, device: str | None = None,
         seed: int | None = None, verbose: bool = True):
    """Grid-search factors, regularization, alpha and iterations on validation -> (model, table);
    a configuration resumes from a shorter run of the same one (`warm_start_cache`), so a fit's
    ``fit_seconds`` counts only its own iterations."""
    with warm_start_cache():
        return tuning.tune_model(IALS, data, section, validate, device=device, seed=seed, verbose=verbose)
