"""NeuMF (He et al., 2017, "Neural Collaborative Filtering"), trained with a BPR loss.

Two branches with separate embeddings: GMF, the element-wise product p_u * q_i, and an MLP over
the concatenation [p'_u, q'_i]; their outputs are concatenated into one linear layer that gives
the score. Training pairs each train positive (rating >= 4) with ``n_neg`` items the user did not
rate in train and minimises BPR, -log sigmoid(s(u, i+) - s(u, i-)), plus ``l2`` times the squared
norm of the batch's embeddings; Adam; train.fit_loop early-stops on validation nDCG@10.

Full-catalogue scoring needs the MLP over every (user, item) pair. ``score_all`` splits the first
layer, W1 [p'; q'] = W1u p' + W1i q', computes each side once, and runs the remaining layers on
(B, C) pairs for item chunks of C items, keeping each chunk under ``score_chunk`` pair-units.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import tuning
from ..errors import ConfigError
from ..protocol.splitdata import ScoringContext, SplitData
from . import PairwiseModule, Recommender


@dataclass
class NeuMFConfig:
    dim_gmf: int = 32                      # GMF embedding size
    dim_mlp: int = 32                      # MLP embedding size (per side; the MLP input is 2x)
    layers: list[int] = field(default_factory=lambda: [64, 32, 16])  # MLP hidden sizes
    epochs: int = 30                       # maximum epochs
    batch_size: int = 4096                 # positives per batch
    lr: float = 1e-3                       # Adam learning rate
    n_neg: int = 1                         # sampled negatives per positive (BPR pairs)
    l2: float = 1e-6                       # weight on the squared norm of the batch's embeddings
    patience: int = 3                      # validation checks without improvement before stopping
    eval_every: int = 1                    # epochs between validation checks
    init_std: float = 0.05                 # normal init of the embeddings
    score_chunk: int = 2 ** 20             # max B * C * hidden floats per scoring chunk (4 MB: stays
                                           # in cache; 2**24 made a validation pass 3-4x slower)
    device: str = "auto"                   # auto -> cuda, mps, cpu
    seed: int | None = 0                   # init, batch order and negatives
    progress: bool = True                  # tqdm bars
    verbose: bool = True                   # one line per epoch and the parameter count


class NeuMF(PairwiseModule, torch.nn.Module, Recommender):
    name = "neumf"
    Config = NeuMFConfig

    def build(self, n_users: int, n_items: int) -> "NeuMF":
        """Create the embeddings and layers (called by ``fit`` and ``load``)."""
        cfg = self.cfg
        if not cfg.layers:
            raise ConfigError("neumf.layers must list at least one MLP hidden size, e.g. [64, 32, 16]")
        if cfg.seed is not None:
            torch.manual_seed(int(cfg.seed))
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.user_gmf = torch.nn.Embedding(n_users, cfg.dim_gmf)     # (n_users, Dg)
        self.item_gmf = torch.nn.Embedding(n_items, cfg.dim_gmf)     # (n_items, Dg)
        self.user_mlp = torch.nn.Embedding(n_users, cfg.dim_mlp)     # (n_users, Dm)
        self.item_mlp = torch.nn.Embedding(n_items, cfg.dim_mlp)     # (n_items, Dm)
        for emb in (self.user_gmf, self.item_gmf, self.user_mlp, self.item_mlp):
            torch.nn.init.normal_(emb.weight, std=cfg.init_std)
        sizes = [2 * cfg.dim_mlp, *cfg.layers]
        self.mlp = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = torch.nn.Linear(cfg.dim_gmf + sizes[-1], 1)       # [GMF ; MLP] -> score
        return self.to(self.device)

    # ------------------------------------------------------------ model
    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of (user, item) pairs; ``items`` is (B,) or (B, K)."""
        if items.dim() == 2:
            users = users.unsqueeze(1).expand_as(items)                # (B, K)
        gmf = self.user_gmf(users) * self.item_gmf(items)              # (..., Dg)
        h = torch.cat([self.user_mlp(users), self.item_mlp(items)], -1)  # (..., 2 Dm)
        for layer in self.mlp:
            h = F.relu(layer(h))                                       # (..., H)
        return self.out(torch.cat([gmf, h], -1)).squeeze(-1)           # (...,)

    # ------------------------------------------------------------ fit (PairwiseModule.fit)
    @staticmethod
    def pair_loss(model: "NeuMF", batch, cfg: NeuMFConfig) -> torch.Tensor:
        """BPR of each positive against its sampled negatives, plus L2 on the batch's embeddings."""
        u, i, neg = batch
        s_pos = model(u, i)                                                        # (b,)
        s_neg = model(u, neg)                                                      # (b, n_neg)
        bpr = -F.logsigmoid(s_pos.unsqueeze(1) - s_neg).mean()
        reg = (model.user_gmf(u).pow(2).sum() + model.user_mlp(u).pow(2).sum()
               + model.item_gmf(i).pow(2).sum() + model.item_mlp(i).pow(2).sum()
               + model.item_gmf(neg).pow(2).sum() + model.item_mlp(neg).pow(2).sum())
        return bpr + cfg.l2 * reg / len(u)

    # ------------------------------------------------------------ score
    @torch.no_grad()
    def score_all(self, users: torch.Tensor, ctx: ScoringContext | None = None) -> torch.Tensor:
        u = users.to(self.device)
        dg = self.cfg.dim_gmf
        w_out = self.out.weight.squeeze(0)                                             # (Dg + H_last,)
        # GMF branch through the output layer: ((p_u * w_g) . q_i)
        scores = (self.user_gmf(u) * w_out[:dg]) @ self.item_gmf.weight.T              # (B, n_items)
        scores += self.out.bias
        # MLP branch: split the first layer into its user and item halves
        first, rest = self.mlp[0], self.mlp[1:]
        dm = self.cfg.dim_mlp
        a = self.user_mlp(u) @ first.weight[:, :dm].T + first.bias                    # (B, H1)
        c = self.item_mlp.weight @ first.weight[:, dm:].T                              # (n_items, H1)
        widest = max(layer.out_features for layer in self.mlp)
        chunk = max(1, self.cfg.score_chunk // max(1, len(u) * widest))
        w_mlp = w_out[dg:]                                                             # (H_last,)
        for start in range(0, self.n_items, chunk):
            h = F.relu(a.unsqueeze(1) + c[start:start + chunk].unsqueeze(0))           # (B, C, H1)
            for layer in rest:
                h = F.relu(layer(h))                                                   # (B, C, H)
            scores[:, start:start + chunk] += h @ w_mlp                                # (B, C)
        return scores                                                                  # (B, n_items)


def tune(data: SplitData, section: dict | None, validate=None, device: str | None = None,
         seed: int | None = None, verbose: bool = True, **fixed):
    """Grid-search NeuMF on validation from a params section -> (best model, table)."""
    return tuning.tune_model(NeuMF, data, section, validate, device=device, seed=seed, verbose=verbose, **fixed)
