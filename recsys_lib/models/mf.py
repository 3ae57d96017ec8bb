"""Matrix factorisation with sampled negatives (implicit feedback, binary cross-entropy).

score(u, i) = <p_u, q_i> + b_i. Train positives are train rows with rating >= 4; each positive
is paired with ``n_neg`` items drawn uniformly among those the user did not rate in train
(train.NegativeSampler). Loss: BCE on positives (label 1) and negatives (label 0), plus
``l2`` times the squared norm of the embeddings used in the batch (per example). Adam;
train.fit_loop early-stops on validation nDCG@10 and restores the best epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import tuning
from ..protocol.splitdata import ScoringContext, SplitData
from . import PairwiseModule, Recommender


@dataclass
class MFConfig:
    dim: int = 64               # embedding size
    epochs: int = 30            # maximum epochs (early stopping usually ends sooner)
    batch_size: int = 4096      # positives per batch (each with n_neg negatives)
    lr: float = 3e-3            # Adam learning rate
    n_neg: int = 4              # sampled negatives per positive
    l2: float = 1e-6            # weight on the squared norm of the batch's embeddings
    patience: int = 3           # validation checks without improvement before stopping
    eval_every: int = 1         # epochs between validation checks
    init_std: float = 0.05      # normal init of the embeddings
    device: str = "auto"        # auto -> cuda, mps, cpu
    seed: int | None = 0        # init, batch order and negatives
    progress: bool = True       # tqdm bars
    verbose: bool = True        # one line per epoch and the parameter count


class MF(PairwiseModule, torch.nn.Module, Recommender):
    name = "mf"
    Config = MFConfig

    def build(self, n_users: int, n_items: int) -> "MF":
        """Create the embeddings (called by ``fit`` and ``load``)."""
        if self.cfg.seed is not None:
            torch.manual_seed(int(self.cfg.seed))
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.user_emb = torch.nn.Embedding(n_users, self.cfg.dim)     # (n_users, D)
        self.item_emb = torch.nn.Embedding(n_items, self.cfg.dim)     # (n_items, D)
        self.item_bias = torch.nn.Embedding(n_items, 1)               # (n_items, 1)
        torch.nn.init.normal_(self.user_emb.weight, std=self.cfg.init_std)
        torch.nn.init.normal_(self.item_emb.weight, std=self.cfg.init_std)
        torch.nn.init.zeros_(self.item_bias.weight)
        return self.to(self.device)

    # ------------------------------------------------------------ model
    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits of (user, item) pairs; ``items`` may have extra trailing dims: (B,) or (B, K)."""
        p = self.user_emb(users)                                      # (B, D)
        q = self.item_emb(items)                                      # (B, D) or (B, K, D)
        if q.dim() == 3:
            p = p.unsqueeze(1)                                        # (B, 1, D)
        return (p * q).sum(-1) + self.item_bias(items).squeeze(-1)    # (B,) or (B, K)

    # ------------------------------------------------------------ fit (PairwiseModule.fit)
    @staticmethod
    def pair_loss(model: "MF", batch, cfg: MFConfig) -> torch.Tensor:
        """BCE: positives towards 1, sampled negatives towards 0, plus L2 on the batch's embeddings."""
        u, i, neg = batch
        pos_logit = model(u, i)                                                    # (b,)
        neg_logit = model(u, neg)                                                  # (b, n_neg)
        loss = F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit), reduction="sum")
        loss = loss + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit),
                                                         reduction="sum")
        reg = (model.user_emb(u).pow(2).sum() + model.item_emb(i).pow(2).sum()
               + model.item_emb(neg).pow(2).sum())
        return (loss + cfg.l2 * reg) / len(u)

    # ------------------------------------------------------------ score
    @torch.no_grad()
    def score_all(self, users: torch.Tensor, ctx: ScoringContext | None = None) -> torch.Tensor:
        u = users.to(self.device)
        return self.user_emb(u) @ self.item_emb.weight.T + self.item_bias.weight.T    # (B, n_items)


def tune(data: SplitData, section: dict | None, validate=None, device: str | None = None,
         seed: int | None = None, verbose: bool = True, **fixed):
    """Grid-search MF on validation from a params section -> (best model, table)."""
    return tuning.tune_model(MF, data, section, validate, device=device, seed=seed, verbose=verbose, **fixed)
