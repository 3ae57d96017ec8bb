"""Popularity baseline: every user gets the train period's most popular items they have not seen.

Counts either all train rows or only positives (rating >= 4); optionally only the rows of the
last ``window_days`` before the end of the train period ("what is popular now"), with global
train popularity breaking ties (and ranking the items never seen in the window). Scores are
ranks (n_items for the top item, 1 for the last), exact in float32 for any catalogue.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import tuning
from ..protocol.splitdata import ScoringContext, SplitData
from .train import save_checkpoint
from . import Recommender

SECONDS_PER_DAY = 86_400


@dataclass
class PopularityConfig:
    positives_only: bool = False        # count only train rows with rating >= 4 (else every row)
    window_days: float | None = None    # count only the last N days of train (None = whole period)
    device: str = "auto"                # auto -> cuda, mps, cpu
    seed: int | None = 0                # unused (deterministic); kept so every model takes one


class Popularity(torch.nn.Module, Recommender):
    name = "popularity"
    scores_tie = True             # counts: tied items' order may depend on the list length
    Config = PopularityConfig

    def __init__(self, config: PopularityConfig | None = None, **overrides):
        super().__init__()
        self.configure(config, **overrides)
        self.register_buffer("scores", torch.zeros(0))          # (n_items,) rank score, higher first
        self.register_buffer("counts", torch.zeros(0, dtype=torch.int64))  # (n_items,) primary count

    # ------------------------------------------------------------ fit
    def fit(self, data: SplitData, validate=None) -> dict:
        """Count train rows per item; nothing to early-stop (``validate`` is unused)."""
        t0 = time.perf_counter()
        train = data.train
        n_items = data.n_items
        keep = train.positive if self.cfg.positives_only else np.ones(len(train), bool)
        global_counts = np.bincount(train.item[keep], minlength=n_items)                 # (n_items,)
        if self.cfg.window_days is not None and len(train):
            start = train.timestamp.max() - float(self.cfg.window_days) * SECONDS_PER_DAY
            recent = keep & (train.timestamp > start)
            primary = np.bincount(train.item[recent], minlength=n_items)                 # (n_items,)
        else:
            primary = global_counts
        # order: primary count desc, then global count desc, then item id asc (deterministic)
        order = np.lexsort((np.arange(n_items), -global_counts, -primary))               # best first
        ranks = np.empty(n_items, dtype=np.float32)
        ranks[order] = np.arange(n_items, 0, -1, dtype=np.float32)                       # n_items .. 1
        self.scores = torch.from_numpy(ranks).to(self.device)
        self.counts = torch.from_numpy(primary.astype(np.int64)).to(self.device)
        info = {"seconds": time.perf_counter() - t0, "n_items": n_items,
                "items_with_counts": int((primary > 0).sum())}
        return info

    # ------------------------------------------------------------ score
    @torch.no_grad()
    def score_all(self, users: torch.Tensor, ctx: ScoringContext | None = None) -> torch.Tensor:
        # a fresh tensor, not an expanded view: callers mask seen items in place
        return self.scores.unsqueeze(0).repeat(len(users), 1)                            # (B, n_items)

    @torch.no_grad()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor, ctx: ScoringContext | None = None,
                    batch_users: int = 1024) -> torch.Tensor:
        return self.scores[items.to(self.scores.device)].float().cpu()                    # (N,)

    # ------------------------------------------------------------ persistence
    def save(self, path) -> None:
        save_checkpoint(path, self, self.cfg, n_items=int(self.scores.numel()))

    @classmethod
    def load(cls, path, device: str | None = None) -> "Popularity":
        model, ckpt = cls.from_checkpoint(path, device)
        n = ckpt["n_items"]
        model.scores = torch.zeros(n)
        model.counts = torch.zeros(n, dtype=torch.int64)
        model.load_state_dict(ckpt["state_dict"])
        return model.to(model.device)


def tune(data: SplitData, section: dict | None, validate=None, device: str | None = None,
         seed: int | None = None, verbose: bool = True):
    """Grid-search the popularity variants of ``section`` on validation -> (model, table)."""
    return tuning.tune_model(Popularity, data, section, validate, device=device, seed=seed, verbose=verbose)
