"""Recommenders: one model per file, one contract for all.

Every model:
- ``fit(data: SplitData, validate: Callable[[Scorer], float] | None = None) -> dict`` learns from
  ``data.train`` only (the leakage guard enforces it when called inside ``guard.fitting``);
  ``validate`` is an early-stopping callback built before fitting (it returns validation nDCG@10).
- ``score_all(users: LongTensor (B,), ctx: ScoringContext) -> Tensor (B, n_items)``: higher is better;
  ``ctx`` carries what may be known at scoring time (items seen before the period, last items).
- ``score_pairs(users (N,), items (N,), ctx) -> Tensor (N,)`` for the re-ranker's features.
- a ``@dataclass`` config with commented defaults, saved with the state dict.
"""
from __future__ import annotations

import torch

from ..config import resolve_device
from ..protocol.splitdata import ScoringContext


class Recommender:
    """Base class: subclasses implement ``fit`` and ``score_all``; ``score_pairs`` may be faster.
    ``Config`` is the model's config dataclass; `configure` and `from_checkpoint` are what every
    model's ``__init__`` and ``load`` share."""

    name: str = "model"
    Config: type = object

    def configure(self, config=None, **overrides) -> None:
        """``self.cfg`` (``config``, or the defaults, with keyword ``overrides``) and ``self.device``."""
        cfg = config if config is not None else self.Config()
        if overrides:
            cfg = self.Config(**{**cfg.__dict__, **overrides})
        self.cfg = cfg
        self.device = resolve_device(cfg.device)

    @classmethod
    def from_checkpoint(cls, path, device: str | None = None) -> tuple["Recommender", dict]:
        """(an unfitted model with the saved config, on ``device`` if given; the checkpoint)."""
        from .train import load_checkpoint
        ckpt = load_checkpoint(path)
        cfg = cls.Config(**ckpt["config"])
        if device is not None:
            cfg.device = device
        return cls(cfg), ckpt

    def fit(self, data, validate=None) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def score_all(self, users: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor, ctx: ScoringContext,
                    batch_users: int = 1024) -> torch.Tensor:
        """Scores of (user, item) pairs via ``score_all`` on each distinct user (a generic fallback)."""
        uniq, inverse = torch.unique(users, return_inverse=True)
        out = torch.empty(len(users), dtype=torch.float32)
        for start in range(0, len(uniq), batch_users):
            chunk = uniq[start:start + batch_users]
            scores = self.score_all(chunk, ctx).float().cpu()             # (b, n_items)
            sel = (inverse >= start) & (inverse < start + len(chunk))
            out[sel] = scores[inverse[sel] - start, items[sel]]
        return out


class PairwiseModule:
    """For ``nn.Module`` recommenders built by ``build(n_users, n_items)`` whose ``forward(users,
    items)`` scores pairs (MF, NeuMF): pair scoring, and save/load of the state dict with the config."""

    @torch.no_grad()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor, ctx: ScoringContext | None = None,
                    batch_users: int = 1024) -> torch.Tensor:
        return self(users.to(self.device), items.to(self.device)).float().cpu()       # (N,)

    def save(self, path) -> None:
        from .train import save_checkpoint
        save_checkpoint(path, self, self.cfg, n_users=self.n_users, n_items=self.n_items)

    @classmethod
    def load(cls, path, device: str | None = None):
        model, ckpt = cls.from_checkpoint(path, device)
        model.build(ckpt["n_users"], ckpt["n_items"])
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()
