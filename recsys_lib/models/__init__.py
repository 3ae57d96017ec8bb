"""Recommenders: one model per file, one contract for all.

Every model:
- ``fit(data: SplitData, validate: Callable[[Scorer], float] | None = None) -> dict`` learns from
  ``data.train`` only (the leakage guard enforces it when called inside ``guard.fitting``);
  ``validate`` is an early-stopping callback built before fitting (it returns validation nDCG@10).
- ``score_all(users: LongTensor (B,), ctx: ScoringContext) -> Tensor (B, n_items)``: higher is better;
  ``ctx`` carries what may be known at scoring time: histories (items seen before the period, last
  items) and the train rows, the only rows a parameter may count, at test too (docs/PROTOCOL.md,
  "One test-time rule").
- ``score_pairs(users (N,), items (N,), ctx) -> Tensor (N,)`` for the re-ranker's features.
- a ``@dataclass`` config with commented defaults, saved with the state dict.
"""
from __future__ import annotations

import torch

from ..config import resolve_device
from ..protocol.splitdata import ScoringContext
from . import train


class Recommender:
    """Base class: subclasses implement ``fit`` and ``score_all``; ``score_pairs`` may be faster.
    ``Config`` is the model's config dataclass; `configure` and `from_checkpoint` are what every
    model's ``__init__`` and ``load`` share."""

    name: str = "model"
    Config: type = object
    scores_tie: bool = False     # exact ties are common (counts): early stopping ranks full lists

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
        ckpt = train.load_checkpoint(path)
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
    items)`` scores pairs (MF, NeuMF): construction, pair scoring, and save/load of the state dict
    with the config."""

    def __init__(self, config=None, **overrides):
        super().__init__()
        self.configure(config, **overrides)
        self.n_users = self.n_items = 0
        self.curve = None                       # the learning curve (FitHistory) after fit

    @staticmethod
    def pair_loss(model, batch, cfg) -> torch.Tensor:  # pragma: no cover - interface
        """The training loss of one (users, positives, negatives (b, n_neg)) batch."""
        raise NotImplementedError

    def fit(self, data, validate=None) -> dict:
        """Train on sampled (positive, negatives) batches of ``data.train`` with ``pair_loss`` and
        Adam; ``validate(self) -> float`` (built before fitting) drives early stopping."""
        self.build(data.n_users, data.n_items)
        if self.cfg.verbose:
            print(f"{type(self).__name__}: {train.count_parameters(self):,} parameters on {self.device}", flush=True)
        cfg, dev = self.cfg, self.device
        batches, n_positives = train.positive_batches(data, cfg.batch_size, cfg.n_neg, int(cfg.seed or 0), dev)
        optimizer = train.adam(self.parameters(), lr=cfg.lr)
        loop = train.LoopConfig(epochs=cfg.epochs, patience=cfg.patience, eval_every=cfg.eval_every,
                                progress=cfg.progress, log_every_epoch=cfg.verbose)
        hist = train.fit_loop(self, batches, lambda model, batch: self.pair_loss(model, batch, cfg), optimizer, loop,
                        validate=(lambda: validate(self)) if validate is not None else None,
                        batch_size_of=lambda b: len(b[0]) * (1 + cfg.n_neg), name=self.name)
        self.curve = hist
        return {**hist.as_dict(), "n_parameters": train.count_parameters(self), "n_positives": n_positives}

    @torch.no_grad()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor, ctx: ScoringContext | None = None,
                    batch_users: int = 1024) -> torch.Tensor:
        return self(users.to(self.device), items.to(self.device)).float().cpu()       # (N,)

    def save(self, path) -> None:
        train.save_checkpoint(path, self, self.cfg, n_users=self.n_users, n_items=self.n_items)

    @classmethod
    def load(cls, path, device: str | None = None):
        model, ckpt = cls.from_checkpoint(path, device)
        model.build(ckpt["n_users"], ckpt["n_items"])
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()
