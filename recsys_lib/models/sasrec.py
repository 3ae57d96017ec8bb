"""SASRec (Kang & McAuley, 2018) as a single-stage model, trained with full cross-entropy.

Causal self-attention over a user's last ``max_len`` items; the output at every position predicts
the item rated next, scored against every item of the catalogue with the item embeddings shared
between input and output. Klenitskiy & Vasilev (2023) show that SASRec trained with cross-entropy
over the whole catalogue beats its negative-sampling version and BERT4Rec; at these catalogue sizes
the full softmax is cheap. For a large catalogue (ml-32m: 65k items) ``loss: sampled`` replaces it
with a sampled softmax over ``n_neg`` items drawn by train popularity, with the logQ correction
(each logit minus the log of its sampling probability), and the report says which loss ran.

Training sequences come from the train rows only: each user's items in time order, cut from the
end into windows of ``max_len`` inputs (position t predicts item t + 1). Scoring reads a user's last
``max_len`` items known at scoring time (``ctx.last_items``: train rows for validation, train and
validation rows for test) and ranks the catalogue by the last position's output. Early stopping
on validation nDCG@10 (a callback built before fitting); nothing reads validation or test rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..protocol.splitdata import POSITIVE_RATING, ScoringContext, SplitData
from . import Recommender, train

LOSSES = ("full", "sampled")


@dataclass
class SASRecConfig:
    max_len: int = 50             # L: last items read (training windows and scoring histories)
    dim: int = 64                 # item / position embedding and hidden size
    blocks: int = 2               # self-attention blocks
    heads: int = 1                # attention heads per block
    dropout: float = 0.2          # on embeddings, attention and feed-forward
    lr: float = 1.0e-3            # Adam learning rate
    batch_size: int = 128         # training windows per step
    epochs: int = 50              # maximum epochs (early stopping on validation nDCG@10)
    patience: int = 5             # validation checks without improvement before stopping
    eval_every: int = 1           # epochs between validation checks
    loss: str = "full"            # full: cross-entropy over the catalogue; sampled: n_neg + logQ
    n_neg: int = 1024             # loss = sampled: negatives per batch, drawn by train popularity
    positives_only: bool = False  # sequences of rows rated >= 4 only (else every rated row)
    device: str = "auto"          # auto -> cuda, mps, cpu
    seed: int | None = 0          # initialisation, window order and sampled negatives
    progress: bool = True         # tqdm bars per epoch
    verbose: bool = True          # one line per epoch

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"sasrec.loss must be one of {LOSSES}, got {self.loss!r}")
        if int(self.dim) % int(self.heads):
            raise ConfigError(f"sasrec.dim ({self.dim}) must be a multiple of sasrec.heads ({self.heads})")


def training_windows(user: np.ndarray, item: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-item training windows from rows sorted by time: (inputs, targets), each (W, max_len)
    int64 of item + 1, left-padded with 0. Each user's sequence s_0 .. s_{n-1} is cut from its end
    into windows of ``max_len`` targets s_t, each with input s_{t-1} at the same position; a user
    with fewer than two rows gives none."""
    order = np.argsort(user, kind="stable")                   # group by user, keep time order
    u, i = user[order], item[order]
    if len(u) == 0:
        empty = np.zeros((0, max_len), np.int64)
        return empty, empty.copy()
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    sizes = np.diff(np.r_[starts, len(u)])
    pos = np.arange(len(u)) - np.repeat(starts, sizes)        # t within the user's sequence
    n = np.repeat(sizes, sizes)
    from_end = n - 1 - pos                                     # 0 for the user's last row
    target = pos >= 1                                          # s_0 is never a target
    n_windows = np.where(sizes > 1, (sizes - 2) // max_len + 1, 0)          # ceil((n - 1) / L)
    first = np.r_[0, np.cumsum(n_windows)[:-1]]
    window = np.repeat(first, sizes) + from_end // max_len
    slot = max_len - 1 - from_end % max_len
    inputs = np.zeros((int(n_windows.sum()), max_len), np.int64)
    targets = np.zeros_like(inputs)
    rows = np.flatnonzero(target)
    targets[window[rows], slot[rows]] = i[rows] + 1
    inputs[window[rows], slot[rows]] = i[rows - 1] + 1
    return inputs, targets


def full_cross_entropy(hidden: torch.Tensor, item_weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-item prediction over the catalogue at every real position:
    ``hidden`` (B, L, D), ``item_weights`` (n_items, D), ``targets`` (B, L) item + 1 (0: padding,
    not scored). log-sum-exp over all items minus the target's logit."""
    real = targets > 0
    h = hidden[real]                                           # (N, D)
    logits = h @ item_weights.T                                # (N, n_items)
    target = targets[real] - 1                                 # (N,)
    return (torch.logsumexp(logits.float(), dim=1) - logits.float().gather(1, target[:, None]).squeeze(1)).mean()


def sampled_cross_entropy(hidden: torch.Tensor, item_weights: torch.Tensor, targets: torch.Tensor,
                          negatives: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Sampled softmax: each real position's target against ``negatives`` (K,) shared by the batch,
    every logit minus log q of its item (``log_q`` (n_items,), the sampling distribution), so the
    estimate is not biased toward popular items; a negative equal to the target is masked."""
    real = targets > 0
    h = hidden[real]                                           # (N, D)
    target = targets[real] - 1                                 # (N,)
    pos = (h * item_weights[target]).sum(1) - log_q[target]    # (N,)
    neg = h @ item_weights[negatives].T - log_q[negatives]     # (N, K)
    neg = neg.masked_fill(negatives[None, :] == target[:, None], -torch.inf)
    logits = torch.cat([pos[:, None], neg], dim=1).float()
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


class SASRecNet(nn.Module):
    def __init__(self, cfg: SASRecConfig, n_items: int):
        super().__init__()
        d = int(cfg.dim)
        self.cfg = cfg
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)   # row 0 = padding; shared with the output
        self.pos_emb = nn.Embedding(int(cfg.max_len), d)
        self.drop = nn.Dropout(cfg.dropout)
        block = nn.TransformerEncoderLayer(d, int(cfg.heads), dim_feedforward=d, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, int(cfg.blocks), enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.item_emb.weight, std=1.0 / math.sqrt(d))
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @property
    def item_weights(self) -> torch.Tensor:
        return self.item_emb.weight[1:]                              # (n_items, D)

    def forward(self, hist: torch.Tensor) -> torch.Tensor:
        """Left-padded histories (B, L) of item + 1 -> hidden states (B, L, D). Position t attends
        to real items at or before t (and to itself, so a padding query has a key); a later item
        never changes an earlier position's output."""
        B, L = hist.shape
        real = hist > 0                                              # (B, L)
        pos = torch.arange(L, device=hist.device) + (self.pos_emb.num_embeddings - L)   # right-aligned
        x = self.drop(self.item_emb(hist) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(pos))
        x = x * real.unsqueeze(2)
        earlier = torch.tril(torch.ones(L, L, dtype=torch.bool, device=hist.device))     # (L, L)
        allowed = (earlier & real.unsqueeze(1)) | torch.eye(L, dtype=torch.bool, device=hist.device)
        mask = ~allowed.repeat_interleave(int(self.cfg.heads), dim=0)                  # (B * heads, L, L)
        return self.norm(self.encoder(x, mask=mask)) * real.unsqueeze(2)


class SASRec(Recommender):
    name = "sasrec"
    Config = SASRecConfig

    def __init__(self, config: SASRecConfig | None = None, **overrides):
        self.configure(config, **overrides)
        self.net: SASRecNet | None = None
        self.n_items = 0
        self.curve = None

    def build(self, n_items: int) -> None:
        self.n_items = int(n_items)
        self.net = SASRecNet(self.cfg, self.n_items).to(self.device)

    # ------------------------------------------------------------ fit
    def fit(self, data: SplitData, validate=None) -> dict:
        """Next-item cross-entropy on train windows; ``validate(self) -> float`` (built before
        fitting) drives early stopping and the best epoch's weights are kept."""
        cfg, dev = self.cfg, self.device
        self.build(data.n_items)
        rows = data.train
        keep = rows.rating >= POSITIVE_RATING if cfg.positives_only else np.ones(len(rows), bool)
        inputs, targets = training_windows(rows.user[keep], rows.item[keep], int(cfg.max_len))
        inputs, targets = torch.from_numpy(inputs), torch.from_numpy(targets)
        pop = np.bincount(rows.item[keep], minlength=data.n_items).astype(np.float64) + 1.0
        q = torch.from_numpy(pop / pop.sum()).float().to(dev)
        log_q = q.log()
        gen = torch.Generator().manual_seed(int(cfg.seed or 0))
        neg_gen = torch.Generator(device=dev).manual_seed(int(cfg.seed or 0))

        def batches(epoch: int):
            for idx in train.permuted_batches(len(inputs), int(cfg.batch_size), gen):
                yield inputs[idx].to(dev), targets[idx].to(dev)

        def loss_fn(net, batch):
            hist, tgt = batch
            hidden = net(hist)
            if cfg.loss == "full":
                return full_cross_entropy(hidden, net.item_weights, tgt)
            neg = torch.multinomial(q, int(cfg.n_neg), replacement=True, generator=neg_gen)
            return sampled_cross_entropy(hidden, net.item_weights, tgt, neg, log_q)

        if cfg.verbose:
            print(f"SASRec: {train.count_parameters(self.net):,} parameters, {len(inputs):,} windows of "
                  f"{cfg.max_len}, {cfg.loss} loss on {dev}", flush=True)
        loop = train.LoopConfig(epochs=int(cfg.epochs), patience=int(cfg.patience), eval_every=int(cfg.eval_every),
                                progress=cfg.progress, log_every_epoch=cfg.verbose)
        hist = train.fit_loop(self.net, batches, loss_fn, train.adam(self.net.parameters(), lr=float(cfg.lr)), loop,
                              validate=(lambda: validate(self)) if validate is not None else None,
                              batch_size_of=lambda b: int((b[1] > 0).sum()), name=self.name)
        self.curve = hist
        return {**hist.as_dict(), "n_parameters": train.count_parameters(self.net), "n_windows": len(inputs)}

    # ------------------------------------------------------------ score
    @torch.no_grad()
    def user_states(self, users: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        """(B, D) the last position's output over each user's last ``max_len`` known items."""
        hist = ctx.last_items(int(self.cfg.max_len), self.cfg.positives_only)[users.cpu()].to(self.device)
        self.net.eval()
        return self.net(hist)[:, -1]

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, ctx: ScoringContext) -> torch.Tensor:
        return (self.user_states(users, ctx) @ self.net.item_weights.T).float()      # (B, n_items)

    # ------------------------------------------------------------ persistence
    def save(self, path) -> None:
        train.save_checkpoint(path, self.net, self.cfg, n_items=self.n_items)

    @classmethod
    def load(cls, path, device: str | None = None) -> "SASRec":
        model, ckpt = cls.from_checkpoint(path, device)
        model.build(ckpt["n_items"])
        model.net.load_state_dict(ckpt["state_dict"])
        model.net.eval()
        return model


def tune(data: SplitData, section: dict | None, validate=None, device: str | None = None,
         seed: int | None = None, verbose: bool = True):
    """Search the section's ``grid`` on validation by the rule its ``search`` key names (early
    stopping picks the epochs) -> (model, table). params/full.yaml: a coordinate search over
    max_len, batch_size, lr, dim and dropout (`recsys_lib.models.search`; docs/PROTOCOL.md,
    "A budgeted search: SASRec"); no ``search`` key: the grid (`tuning.tune_model`)."""
    from . import search          # imported here: only the kernel that tunes SASRec loads it
    return search.tune_model(SASRec, data, section, validate, device=device, seed=seed, verbose=verbose)
