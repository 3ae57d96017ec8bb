"""Two-tower retriever: a user tower (id + recent items) and an item tower (id + side features).

The seed design is one configuration (``variant="bpr"``):
- user tower: user-id embedding and an LSTM (hidden 64) over the embeddings of the user's last 5
  items (item-id embeddings shared with the item tower; 0 = padding), concatenated, then an MLP
  256 -> 128 -> 128;
- item tower: item-id embedding, masked mean of genre embeddings, year embedding, masked mean of
  the item's top-3 tag embeddings, concatenated, then an MLP -> 128;
- BPR on (user, history at that time, positive rated >= 4, one uniform negative) from the train
  period; Adam with a cyclic learning rate.

A stronger variant (``variant="softmax"``) trains the same towers with an in-batch sampled softmax
(other rows' positives are the negatives), a log-popularity (logQ) correction for the in-batch
sampling bias (Yi et al., RecSys 2019), L2-normalised embeddings with a temperature, optionally
extra shared uniform negatives (mixed negative sampling) and a longer history.

Padding: histories are left-padded (most recent item last). The LSTM is run step by step and a
step whose input is padding leaves the state unchanged, so the state stays at zero until the
first real item: the output depends only on the real items, whatever the padding length.

Fitting reads ``data.train`` (and ``data.item_features``) only; scoring uses ``ctx.history``,
the last items before the scored period (for test that includes validation rows).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
import torch.nn.functional as F

from .. import dist
from ..protocol import guard
from ..config import seed_everything
from ..errors import ConfigError
from ..protocol.evaluate import DEFAULT_KS
from ..protocol.splitdata import CHUNK_ROWS, ScoringContext, SplitData, histories_before_rows
from .train import (LoopConfig, NegativeSampler, adam, count_parameters, fit_loop, permuted_batches, save_checkpoint)
from . import Recommender
from .layers import mlp

@dataclass
class TwoTowerConfig:
    variant: str = "bpr"              # "bpr" (the seed design) or "softmax" (in-batch sampled softmax + logQ)
    dim: int = 128                    # item-id / user-id embedding size and output size of both towers
    side_dim: int = 32                # genre, year and tag embedding size
    lstm_hidden: int = 64             # LSTM state size over the history
    user_encoder: str = "lstm"        # "lstm" (the seed design) or "attention" (SASRec-style, causal)
    attn_layers: int = 2              # attention: transformer blocks over the history
    attn_heads: int = 2               # attention: heads per block
    history_len: int = 5              # last items fed to the user tower
    user_hidden: list[int] = field(default_factory=lambda: [256, 128])  # user MLP hidden layers (then -> dim)
    item_hidden: list[int] = field(default_factory=lambda: [128])       # item MLP hidden layers (then -> dim)
    dropout: float = 0.0              # dropout between MLP layers
    # objective
    temperature: float = 0.05         # softmax: logits = cos / temperature
    normalize: bool | None = None     # L2-normalise both towers' outputs (None: True for softmax, False for seed)
    logq: bool = True                 # softmax: subtract log(sampling probability) of each negative
    n_uniform_neg: int = 0            # softmax: extra uniform negatives shared by the batch
    # optimisation
    batch_size: int = 4096            # triplets per step
    lr: float = 1e-4                  # CyclicLR base learning rate (Adam)
    max_lr: float = 3e-3              # CyclicLR peak learning rate
    clr_half_cycle_epochs: float = 0.5  # epochs from base to peak; 0.5 -> each epoch ends at the base lr
    weight_decay: float = 0.0         # Adam weight decay
    epochs: int = 15                  # maximum epochs
    patience: int = 3                 # epochs without validation improvement before stopping
    amp_bf16: bool = False            # bf16 autocast for the forward pass
    progress: bool = False            # tqdm bars per epoch
    device: str = "auto"              # auto -> cuda, mps, cpu
    seed: int = 0                     # init, negatives and batch order

    def __post_init__(self):
        if self.variant not in VARIANTS:
            renamed = " (the variant called seed is now bpr: seed is the random seed)" if self.variant == "seed" else ""
            raise ConfigError(f"two_tower variant {self.variant!r}; one of {VARIANTS}{renamed}")
        if self.user_encoder not in ("lstm", "attention"):
            raise ConfigError(f"two_tower user_encoder {self.user_encoder!r}; lstm or attention")
        if self.normalize is None:
            self.normalize = OBJECTIVES[self.variant].normalize
        self.user_hidden = list(self.user_hidden)
        self.item_hidden = list(self.item_hidden)


def _masked_mean(emb: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    """Mean of the embeddings of the nonzero indices of each row; zeros for an all-padding row."""
    vec = emb(idx)                                                   # (N, K, d), padding rows are 0
    count = (idx > 0).sum(dim=1, keepdim=True).clamp(min=1)          # (N, 1)
    return vec.sum(dim=1) / count.to(vec.dtype)                      # (N, d)


class TwoTowerNet(nn.Module):
    """The two towers. Item ids are 0..n_items-1; histories are item + 1 with 0 = padding."""

    def __init__(self, cfg: TwoTowerConfig, n_users: int, n_items: int, genres: torch.Tensor,
                 year: torch.Tensor, tags: torch.Tensor, n_genres: int, n_years: int, n_tags: int,
                 log_pop: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        d, s = cfg.dim, cfg.side_dim
        self.user_emb = nn.Embedding(n_users, d)
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)  # row i + 1 = item i (shared)
        self.genre_emb = nn.Embedding(n_genres + 1, s, padding_idx=0)
        self.year_emb = nn.Embedding(n_years + 1, s, padding_idx=0)
        self.tag_emb = nn.Embedding(n_tags + 1, s, padding_idx=0)
        if cfg.user_encoder == "attention":
            self.pos_emb = nn.Embedding(cfg.history_len, d)              # position from the most recent
            block = nn.TransformerEncoderLayer(d, cfg.attn_heads, dim_feedforward=d, dropout=cfg.dropout,
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(block, cfg.attn_layers, enable_nested_tensor=False)
            state = d
        else:
            self.lstm = nn.LSTMCell(d, cfg.lstm_hidden)
            state = cfg.lstm_hidden
        self.user_mlp = mlp([d + state, *cfg.user_hidden, d], cfg.dropout)
        self.item_mlp = mlp([d + 3 * s, *cfg.item_hidden, d], cfg.dropout)
        for emb in (self.user_emb, self.item_emb, self.genre_emb, self.year_emb, self.tag_emb):
            nn.init.normal_(emb.weight, std=0.05)
            if emb.padding_idx is not None:
                with torch.no_grad():
                    emb.weight[emb.padding_idx].zero_()
        self.register_buffer("genres", genres.long().clone())        # (n_items, G)
        self.register_buffer("year", year.long().clone())            # (n_items,)
        self.register_buffer("tags", tags.long().clone())            # (n_items, T)
        self.register_buffer("log_pop", log_pop.float().clone())     # (n_items,) log P(item is a positive)
        self._item_cache: torch.Tensor | None = None

    # --------------------------------------------------------------- cache of the item tower
    def train(self, mode: bool = True):
        self._item_cache = None                  # weights may change: recompute on next use
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):
        self._item_cache = None
        return super().load_state_dict(*args, **kwargs)

    # --------------------------------------------------------------- towers
    def history_state(self, hist: torch.Tensor) -> torch.Tensor:
        """Left-padded histories (B, L) -> one state per user (the LSTM's or the attention's)."""
        if self.cfg.user_encoder == "attention":
            return self.attention_state(hist)
        return self.lstm_state(hist)

    def attention_state(self, hist: torch.Tensor) -> torch.Tensor:
        """SASRec-style: causal self-attention over the item embeddings of left-padded histories
        (B, L), each position seeing itself and earlier items only; the output at the last
        position (the most recent item) is the state (B, D). A user with no history gets zeros."""
        L = hist.shape[1]
        pos = torch.arange(L - 1, -1, -1, device=hist.device)               # (L,) 0 = most recent
        real = hist > 0                                                      # (B, L)
        x = (self.item_emb(hist) + self.pos_emb(pos)) * real.unsqueeze(2)    # (B, L, D)
        # allowed keys of each query: real items at or before it, and itself (so a padding query
        # has one key and no empty softmax; a real query never sees padding)
        earlier = torch.tril(torch.ones(L, L, dtype=torch.bool, device=hist.device))   # (L, L)
        allowed = (earlier & real.unsqueeze(1)) | torch.eye(L, dtype=torch.bool, device=hist.device)
        mask = ~allowed.repeat_interleave(self.cfg.attn_heads, dim=0)      # (B * heads, L, L)
        out = self.encoder(x, mask=mask)                                     # (B, L, D)
        return out[:, -1] * real.any(dim=1, keepdim=True)                    # (B, D)

    def lstm_state(self, hist: torch.Tensor) -> torch.Tensor:
        """LSTM over left-padded histories (B, L) -> last state (B, H); padding steps are skipped."""
        x = self.item_emb(hist)                                          # (B, L, D)
        h = x.new_zeros(hist.shape[0], self.cfg.lstm_hidden)             # (B, H)
        c = torch.zeros_like(h)
        for t in range(hist.shape[1]):
            real = (hist[:, t] > 0).unsqueeze(1)                         # (B, 1)
            if not bool(real.any()):
                continue                                                 # an all-padding column
            h_new, c_new = self.lstm(x[:, t], (h, c))
            h = torch.where(real, h_new.to(h.dtype), h)
            c = torch.where(real, c_new.to(c.dtype), c)
        return h

    def user_tower(self, users: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        z = torch.cat([self.user_emb(users), self.history_state(hist)], dim=1)  # (B, D + H)
        out = self.user_mlp(z)                                            # (B, D)
        return F.normalize(out.float(), dim=1) if self.cfg.normalize else out

    def item_tower(self, items: torch.Tensor) -> torch.Tensor:
        z = torch.cat([self.item_emb(items + 1),                          # (N, D)
                       _masked_mean(self.genre_emb, self.genres[items]),  # (N, S)
                       self.year_emb(self.year[items]),                   # (N, S)
                       _masked_mean(self.tag_emb, self.tags[items])],     # (N, S)
                      dim=1)
        out = self.item_mlp(z)                                            # (N, D)
        return F.normalize(out.float(), dim=1) if self.cfg.normalize else out

    def all_items(self) -> torch.Tensor:
        """(n_items, D) item tower output; cached while in eval mode."""
        if self.training:
            return self.item_tower(torch.arange(self.n_items, device=self.log_pop.device))
        if self._item_cache is None:
            with torch.no_grad():
                chunks = [self.item_tower(idx) for idx in
                          torch.arange(self.n_items, device=self.log_pop.device).split(CHUNK_ROWS)]
            self._item_cache = torch.cat(chunks).float()
        return self._item_cache

    # --------------------------------------------------------------- losses
    def bpr_loss(self, batch) -> torch.Tensor:
        users, hist, pos, neg = batch
        u = self.user_tower(users, hist)                                  # (B, D)
        items = self.item_tower(torch.cat([pos, neg]))                   # (2B, D)
        p, n = items.float().chunk(2)
        u = u.float()
        diff = (u * p).sum(1) - (u * n).sum(1)                            # (B,)
        return -F.logsigmoid(diff).mean()

    def softmax_loss(self, batch) -> torch.Tensor:
        """Sampled softmax over the batch's positives (+ shared uniform extras) as negatives:
        logit(i, j) = <u_i, v_j> / temperature - log Q(j), where Q(j) is the expected number of
        draws of item j as a column (B * P(j is a positive) in-batch, M / n_items for the uniform
        extras); other columns holding row i's own positive item are masked (not negatives).

        Distributed (`shard_softmax`): ``batch`` ends with (lo, hi); ``users`` and ``hist`` are
        rows [lo, hi) of the global batch, ``pos`` and ``extra`` the whole batch's columns, whose
        item-tower outputs the ranks compute a block each and gather (`dist.gathered`)."""
        users, hist, pos, extra, *rows = batch
        lo, hi = rows[0] if rows else (0, len(pos))
        u = self.user_tower(users, hist).float() / self.cfg.temperature  # (b, D), scaled once
        cand = pos if extra is None else torch.cat([pos, extra])          # (B + M,)
        v = (dist.gathered(self.item_tower, cand) if rows else self.item_tower(cand)).float()  # (B + M, D)
        b = len(pos)
        if self.cfg.logq:
            bias = -(self.log_pop[pos] + math.log(b))                     # (B,)
            if extra is not None:
                bias = torch.cat([bias, bias.new_full((len(extra),), -math.log(len(extra) / self.n_items))])
            logits = torch.addmm(bias.unsqueeze(0), u, v.T)               # (B, B + M), one pass
        else:
            logits = u @ v.T                                              # (B, B + M)
        same, cols = _same_item_pairs(pos[lo:hi], cand, lo)
        if len(same):
            logits = logits.index_put((same, cols), logits.new_tensor(float("-inf")))
        return F.cross_entropy(logits, torch.arange(lo, hi, device=pos.device))


def shard_softmax(batch, lo: int, hi: int):
    """A rank's part of a softmax batch: rows [lo, hi) of users and histories, all the columns
    (positives and extras), and (lo, hi) (`TwoTowerNet.softmax_loss`)."""
    users, hist, pos, extra = batch
    return users[lo:hi], hist[lo:hi], pos, extra, (lo, hi)


class BPRObjective:
    """``bpr``, the seed design's objective: BPR over one uniformly sampled unseen negative per
    positive, drawn afresh each epoch."""

    name = "bpr"
    normalize = False              # dot products of raw tower outputs
    shard = None                   # DDP splits the batch's rows as they are
    reads_temperature = False

    @staticmethod
    def epoch_negatives(sampler: NegativeSampler, users: np.ndarray, device) -> torch.Tensor:
        return torch.from_numpy(sampler.sample(users, 1)[:, 0]).to(device)        # (n,)

    @staticmethod
    def batch_negatives(epoch_negatives, idx, cfg: "TwoTowerConfig", n_items: int, gen, device):
        return epoch_negatives[idx]

    @staticmethod
    def loss(net: "TwoTowerNet", batch) -> torch.Tensor:
        return net.bpr_loss(batch)


class SampledSoftmaxObjective:
    """``softmax``: in-batch sampled softmax with logQ correction (and ``n_uniform_neg`` shared
    uniform negatives per batch), at ``temperature`` over normalised tower outputs."""

    name = "softmax"
    normalize = True
    shard = staticmethod(shard_softmax)  # every rank needs all the batch's positives as columns
    reads_temperature = True

    @staticmethod
    def epoch_negatives(sampler, users, device) -> None:
        return None

    @staticmethod
    def batch_negatives(epoch_negatives, idx, cfg: "TwoTowerConfig", n_items: int, gen, device):
        if cfg.n_uniform_neg > 0:
            return torch.randint(0, n_items, (cfg.n_uniform_neg,), generator=gen).to(device)
        return None

    @staticmethod
    def loss(net: "TwoTowerNet", batch) -> torch.Tensor:
        return net.softmax_loss(batch)


#: the retriever's training objectives, by the ``variant`` that names them
OBJECTIVES = {o.name: o for o in (BPRObjective(), SampledSoftmaxObjective())}
VARIANTS = tuple(OBJECTIVES)


def _same_item_pairs(pos: torch.Tensor, cand: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) pairs with cand[column] == pos[row] and column != row + ``offset`` (rows
    ``pos`` are rows offset.. of the batch whose columns are ``cand``), without a B x B mask."""
    sorted_cand, order = torch.sort(cand)                                 # (C,)
    lo = torch.searchsorted(sorted_cand, pos, right=False)                # (B,)
    hi = torch.searchsorted(sorted_cand, pos, right=True)                 # (B,)
    counts = hi - lo                                                      # >= 1 (the diagonal)
    total = int(counts.sum())
    if total == len(pos):                                                 # only the diagonal
        empty = pos.new_empty(0)
        return empty, empty
    rows = torch.repeat_interleave(torch.arange(len(pos), device=pos.device), counts)   # (P,)
    start = torch.repeat_interleave(lo - torch.cumsum(counts, 0) + counts, counts)     # (P,)
    cols = order[start + torch.arange(total, device=pos.device)]          # (P,)
    keep = cols != rows + offset
    return rows[keep], cols[keep]


class TwoTower(Recommender):
    """Two-tower retriever (``score_all``, ``user_embeddings``, ``item_embeddings``, ``score_pairs``)."""

    name = "two_tower"
    Config = TwoTowerConfig

    def __init__(self, cfg: TwoTowerConfig | None = None, **overrides):
        self.configure(cfg, **overrides)
        self.net: TwoTowerNet | None = None
        self.sizes: dict = {}
        self.curve: dict = {}                      # learning curve after fit (FitHistory.as_dict)

    # --------------------------------------------------------------- building
    def _build(self, data: SplitData) -> None:
        f = data.item_features
        n = data.n_items
        if f is None:
            genres, year, tags = (torch.zeros((n, 1), dtype=torch.long), torch.zeros(n, dtype=torch.long),
                                  torch.zeros((n, 1), dtype=torch.long))
            ng = ny = nt = 0
        else:
            genres, year, tags = f.genres, f.year, f.tags
            ng, ny, nt = f.n_genres, f.n_years, f.n_tags
        train = data.train
        pos_items = train.item[train.positive]
        counts = np.bincount(pos_items, minlength=n).astype(np.float64) + 1.0   # +1: no log(0)
        log_pop = torch.from_numpy(np.log(counts / counts.sum()))
        self.sizes = dict(n_users=data.n_users, n_items=n, n_genres=ng, n_years=ny, n_tags=nt,
                          genre_width=int(genres.shape[1]), tag_width=int(tags.shape[1]))
        torch.manual_seed(self.cfg.seed)
        self.net = TwoTowerNet(self.cfg, data.n_users, n, genres, year, tags, ng, ny, nt, log_pop).to(self.device)
        print(f"two_tower ({self.cfg.variant}): {count_parameters(self.net):,} parameters on {self.device}",
              flush=True)

    @staticmethod
    def training_tensors(data: SplitData, history_len: int) -> dict[str, torch.Tensor]:
        """Training triplets of the train period: every positive row (rating >= 4) with the user's
        ``history_len`` previous train items of any rating (left-padded, item + 1)."""
        train = data.train
        hist = histories_before_rows(train.user, train.item, history_len)   # (rows, L)
        keep = torch.from_numpy(train.positive)
        return {"users": torch.from_numpy(train.user)[keep], "hist": hist[keep],
                "pos": torch.from_numpy(train.item)[keep]}

    # --------------------------------------------------------------- fitting
    @property
    def objective(self):
        """How the towers learn (`OBJECTIVES`): what a batch holds and its loss."""
        return OBJECTIVES[self.cfg.variant]

    def _batches(self, tensors: dict, sampler: NegativeSampler, gen: torch.Tensor):
        cfg, dev, obj = self.cfg, self.device, self.objective
        users, hist, pos = (tensors[k].to(dev) for k in ("users", "hist", "pos"))
        n = len(users)
        users_np = tensors["users"].numpy()
        n_items = self.sizes["n_items"]

        def batches(epoch: int):
            negatives = obj.epoch_negatives(sampler, users_np, dev)
            for idx in permuted_batches(n, cfg.batch_size, gen):
                idx = idx.to(dev)
                yield users[idx], hist[idx], pos[idx], obj.batch_negatives(negatives, idx, cfg, n_items, gen, dev)
        return batches, n

    def _optimizer(self, steps_per_epoch: int):
        cfg = self.cfg
        opt = adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        step_up = max(1, int(round(steps_per_epoch * cfg.clr_half_cycle_epochs)))
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=cfg.lr, max_lr=cfg.max_lr,
                                                  step_size_up=step_up, mode="triangular",
                                                  cycle_momentum=False)
        return opt, sched

    def _loss_fn(self):
        return self.objective.loss

    def fit(self, data: SplitData, validate: Callable[[Any], float] | None = None) -> dict:
        """Train on ``data.train``; ``validate(self) -> float`` (built before fitting, higher is
        better) drives early stopping and the best epoch is restored."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        self._build(data)
        tensors = self.training_tensors(data, cfg.history_len)
        sampler = NegativeSampler(data.train.matrix(data.n_users, data.n_items), seed=cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        batches, n = self._batches(tensors, sampler, gen)
        steps = math.ceil(n / cfg.batch_size)
        opt, sched = self._optimizer(steps)
        loop = LoopConfig(epochs=cfg.epochs, patience=cfg.patience, amp_bf16=cfg.amp_bf16,
                          progress=cfg.progress)
        print(f"two_tower ({cfg.variant}): {n:,} training triplets, {steps} steps/epoch", flush=True)
        hist = fit_loop(self.net, batches, self._loss_fn(), opt, loop,
                        validate=(lambda: validate(self)) if validate is not None else None,
                        scheduler=sched, batch_size_of=lambda b: len(b[0]), name=f"two_tower[{cfg.variant}]",
                        shard=self.objective.shard)
        self.net.eval()
        self.curve = hist.as_dict()
        return {"best_epoch": hist.best_epoch, "best_metric": hist.best_metric,
                "epochs": len(hist.records), "seconds": hist.seconds, "n_triplets": n,
                "records": hist.records}

    # --------------------------------------------------------------- scoring
    def _check(self):
        if self.net is None:
            raise RuntimeError("two_tower: fit or load the model before scoring")

    def _history(self, users: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        hist = ctx.history[users.cpu()]
        if hist.shape[1] < self.cfg.history_len:
            warnings.warn(f"two_tower: the scoring context holds {hist.shape[1]} history items, the "
                          f"model uses {self.cfg.history_len}; build Labels/contexts with "
                          f"history_len >= {self.cfg.history_len}", stacklevel=3)
        return hist[:, -self.cfg.history_len:].to(self.device)

    @torch.no_grad()
    def user_embeddings(self, users: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        """(B, D) user tower output from the user id and ``ctx.history`` (float32, model device)."""
        self._check()
        users = torch.as_tensor(users, dtype=torch.long)
        return self.net.user_tower(users.to(self.device), self._history(users, ctx)).float()

    @torch.no_grad()
    def item_embeddings(self) -> torch.Tensor:
        """(n_items, D) item tower output (cached in eval mode; float32, model device)."""
        self._check()
        return self.net.all_items()

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        return self.user_embeddings(users, ctx) @ self.item_embeddings().T       # (B, n_items)

    @torch.no_grad()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor, ctx: ScoringContext,
                    batch_users: int = CHUNK_ROWS) -> torch.Tensor:
        """Dot products of (user, item) pairs: (N,) float32 on the CPU."""
        users = torch.as_tensor(users, dtype=torch.long)
        items = torch.as_tensor(items, dtype=torch.long)
        v = self.item_embeddings()
        out = torch.empty(len(users), dtype=torch.float32)
        for start in range(0, len(users), batch_users):
            u = self.user_embeddings(users[start:start + batch_users], ctx)       # (b, D)
            it = items[start:start + batch_users].to(self.device)
            out[start:start + len(it)] = (u * v[it]).sum(1).cpu()
        return out

    # --------------------------------------------------------------- persistence
    def save(self, path) -> Any:
        self._check()
        return save_checkpoint(path, self.net, self.cfg, sizes=self.sizes, curve=self.curve)

    @classmethod
    def load(cls, path, device: str | None = None) -> "TwoTower":
        model, ckpt = cls.from_checkpoint(path, device)
        cfg, s = model.cfg, ckpt["sizes"]
        state = ckpt["state_dict"]
        model.sizes = s
        model.curve = ckpt.get("curve", ckpt.get("history", {}))   # "history": files before the rename
        model.net = TwoTowerNet(cfg, s["n_users"], s["n_items"], state["genres"], state["year"], state["tags"],
                                s["n_genres"], s["n_years"], s["n_tags"], state["log_pop"])
        model.net.load_state_dict(state)
        model.net.to(model.device).eval()
        return model


# ------------------------------------------------------------------- tuning and benchmarks
def _metrics_of(result) -> dict[str, float]:
    if isinstance(result, dict):
        return {k: float(v) for k, v in result.items() if isinstance(v, (int, float, np.floating))}
    if hasattr(result, "means"):
        return result.means()
    return {"recall@500": float(result)}


def _variant_configs(section: dict, device: str | None, seed: int | None) -> list[tuple[str, TwoTowerConfig]]:
    """(name, config) for each entry of ``section["variants"]``: a variant name, or a dict with
    ``name``/``variant`` and config overrides. Other keys of the section that are config fields
    are shared by all variants; non-config keys (``candidate_k``...) are ignored here."""
    names = {f for f in TwoTowerConfig.__dataclass_fields__}
    common = {k: v for k, v in section.items() if k in names and k != "variant"}
    if device is not None:
        common["device"] = device
    if seed is not None:
        common["seed"] = seed
    out = []
    for entry in section.get("variants", ["bpr"]):
        spec = {"variant": entry} if isinstance(entry, str) else dict(entry)
        label = spec.pop("name", spec.get("variant", "bpr"))
        unknown = sorted(set(spec) - names)
        if unknown:
            raise ConfigError(f"two_tower variant {label!r}: unknown parameter(s) {unknown}; valid: {sorted(names)}")
        out.append((label, TwoTowerConfig(**{**common, **spec})))
    return out


def history_len_needed(params_section: dict) -> int:
    """The longest history any variant of ``params_section`` uses: build the validation Evaluator /
    Labels and the candidate contexts with at least this ``history_len``."""
    return max(cfg.history_len for _, cfg in _variant_configs(params_section, None, None))


def selection_metric(candidate_k: int, n_items: int, available=DEFAULT_KS) -> str:
    """``recall@candidate_k`` (the re-ranker's ceiling); when the catalogue has no more than
    ``candidate_k`` items that recall is always 1, so the largest available K below ``n_items``."""
    if candidate_k < n_items:
        return f"recall@{candidate_k}"
    below = [k for k in available if k < n_items]
    return f"recall@{max(below)}" if below else f"recall@{candidate_k}"


def tune(data: SplitData, params_section: dict, validate_recall: Callable[[Any], Any],
         device: str | None = None, seed: int | None = None,
         metric: str | None = None) -> tuple[TwoTower, pd.DataFrame]:
    """Fit every variant of ``params_section["variants"]`` inside ``guard.fitting("two_tower")``
    and keep the best by validation Recall@candidate_k (500: the re-ranker's ceiling).

    ``validate_recall(model)`` is built before fitting (its Labels with
    ``history_len >= history_len_needed(section)``); it returns a dict of metrics, an EvalResult
    (e.g. ``lambda m: Evaluator(data, "valid", ks=(10, 50, 500))(m)``) or a float (the selection
    metric itself). Early stopping and selection use ``metric`` (default: ``selection_metric``
    of the section's ``candidate_k``). When it returns a float and carries an ``evaluator``
    attribute (recsys_lib.models.tuning.validator) the evaluator is called once after fitting for the
    table's Recall@50/500 and nDCG@10. Returns ``(best_model, table)``: one row per variant.

    This is the tuning contract of every model (`Run.fit_model`), so 20_two_tower calls
    ``run.fit_model("two_tower", tune, metric=selection_metric(K, n_items), history_len=H)``: the
    validation callback is then `tuning.validator` of that metric, a float."""
    k = int(params_section.get("candidate_k", 500))
    device = str(device) if device is not None else None          # a torch.device is fine too
    metric = metric or selection_metric(k, data.n_items)
    if metric != f"recall@{k}":
        warnings.warn(f"two_tower.tune: selecting on {metric} (recall@{k} is 1 with {data.n_items} items)")
    rows, best, best_score = [], None, float("-inf")

    def score(model) -> float:
        m = _metrics_of(validate_recall(model))
        return float(m.get(metric, m.get("recall@500", float("nan"))))

    for label, cfg in _variant_configs(params_section, device, seed):
        model = TwoTower(cfg)
        t0 = time.perf_counter()
        with guard.fitting(TwoTower.name):
            info = model.fit(data, score)
        fit_seconds = time.perf_counter() - t0
        if hasattr(validate_recall, "evaluator"):     # one full pass gives the table's metrics and the value
            m = validate_recall.evaluator(model).means()
        else:
            m = _metrics_of(validate_recall(model))
        value = float(m.get(metric, m.get("recall@500", float("nan"))))
        rates = [r["samples_per_s"] for r in info["records"] if r.get("samples_per_s")]
        softmax = OBJECTIVES[cfg.variant].reads_temperature
        row = {"name": label, "variant": cfg.variant, "dim": cfg.dim, "history_len": cfg.history_len,
               "batch_size": cfg.batch_size, "temperature": cfg.temperature if softmax else None,
               "n_uniform_neg": cfg.n_uniform_neg if softmax else None,
               "recall@50": m.get("recall@50", float("nan")), "recall@500": m.get("recall@500", float("nan")),
               "ndcg@10": m.get("ndcg@10", float("nan")), "selected_on": metric, "valid_metric": value,
               "epochs": info["epochs"], "best_epoch": info["best_epoch"], "fit_seconds": fit_seconds,
               "triplets_per_s": float(np.median(rates)) if rates else float("nan")}
        rows.append(row)
        print(f"two_tower tune {label}: valid {metric} {value:.4f} "
              f"({info['epochs']} epochs, {fit_seconds:.1f}s)", flush=True)
        if value > best_score or best is None:
            best, best_score = model, value
    table = pd.DataFrame(rows)
    table["best"] = False
    if len(table):
        table.loc[table["valid_metric"].idxmax(), "best"] = True
    return best, table


def measure_throughput(data: SplitData, cfg: TwoTowerConfig, n_batches: int = 20, warmup: int = 3) -> float:
    """Training triplets per second of ``cfg`` on ``data`` (forward, backward, Adam step), timed
    over ``n_batches`` batches of ``cfg.batch_size`` after ``warmup`` batches. Batches are drawn
    with replacement, so small data sets can time large batches."""
    model = TwoTower(cfg)
    model._build(data)
    tensors = TwoTower.training_tensors(data, cfg.history_len)
    sampler = NegativeSampler(data.train.matrix(data.n_users, data.n_items), seed=cfg.seed)
    dev = model.device
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(tensors["users"])
    opt, sched = model._optimizer(max(1, n // cfg.batch_size))
    loss_fn = model._loss_fn()
    net = model.net.train()
    t0 = None
    for step in range(warmup + n_batches):
        if step == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        users = tensors["users"][idx]
        obj = model.objective
        last = obj.batch_negatives(obj.epoch_negatives(sampler, users.numpy(), dev), slice(None), cfg,
                                   data.n_items, gen, dev)
        batch = (users.to(dev), tensors["hist"][idx].to(dev), tensors["pos"][idx].to(dev),
                 last.to(dev) if last is not None else None)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.amp_bf16):
            loss = loss_fn(net, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n_batches * cfg.batch_size / (time.perf_counter() - t0)
