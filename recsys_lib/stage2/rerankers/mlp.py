"""The torch kinds: ``id_mlp`` and ``mlp_features``, one training loop between them.

- ``id_mlp`` (`IdMLPReranker`): the design this project starts from: user-id embedding, the
  retriever's frozen item embedding, genre / year / tag embeddings -> MLP (256 -> 128 -> 1,
  dropout 0.3), BPR loss over (positive, sampled negative candidates of the same user). A user-id
  embedding only helps users trained on; others keep their near-zero initial vector.
- ``mlp_features`` (`FeatureMLPReranker`): the production features (`recsys_lib.stage2.features`,
  standardised with train-user statistics) + frozen retriever user and item embeddings -> MLP;
  BPR or listwise softmax loss over each user's candidate list.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ...models.layers import mlp
from ...models.train import LoopConfig, adam, fit_loop, permuted_batches
from ...protocol.splitdata import CHUNK_ROWS
from .. import features as rf
from ..inputs import Prepared, StageInputs, WindowLists, held_out_ndcg
from .base import Reranker
from .config import FeatureMLPConfig, IdMLPConfig, MLPConfig


# ---------------------------------------------------------------- networks
class IdMLPNet(nn.Module):
    """[user-id emb, frozen retriever item emb, genre, year, tag emb] -> MLP."""

    def __init__(self, n_users: int, n_items: int, item_dim: int, n_genres: int, g_slots: int,
                 n_years: int, n_tags: int, t_slots: int, emb_dim: int = 32,
                 hidden: Sequence[int] = (256, 128), dropout: float = 0.3):
        super().__init__()
        self.user = nn.Embedding(n_users, emb_dim)
        nn.init.normal_(self.user.weight, std=0.01)          # unseen users stay close to 0
        self.register_buffer("item_emb", torch.zeros(n_items, item_dim))   # frozen, scaled to unit std
        self.register_buffer("genres", torch.zeros(n_items, g_slots, dtype=torch.long))
        self.register_buffer("year", torch.zeros(n_items, dtype=torch.long))
        self.register_buffer("tags", torch.zeros(n_items, t_slots, dtype=torch.long))
        self.genre = nn.EmbeddingBag(n_genres + 1, emb_dim, mode="mean", padding_idx=0)
        self.year_emb = nn.Embedding(n_years + 1, emb_dim, padding_idx=0)
        self.tag = nn.EmbeddingBag(n_tags + 1, emb_dim, mode="mean", padding_idx=0)
        self.mlp = mlp([4 * emb_dim + item_dim, *hidden, 1], dropout)

    def forward(self, user: torch.Tensor, item: torch.Tensor, x=None, u_emb=None) -> torch.Tensor:
        h = torch.cat([self.user(user),                     # (N, E)
                       self.item_emb[item],                 # (N, Dr)
                       self.genre(self.genres[item]),       # (N, E)
                       self.year_emb(self.year[item]),      # (N, E)
                       self.tag(self.tags[item])], dim=1)   # (N, E)
        return self.mlp(h).squeeze(1)                       # (N,)


class FeatureNet(nn.Module):
    """[standardised production features, frozen retriever user emb, item emb] -> MLP."""

    def __init__(self, n_features: int, n_items: int, item_dim: int, user_dim: int,
                 hidden: Sequence[int] = (256, 128), dropout: float = 0.3):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.register_buffer("item_emb", torch.zeros(n_items, item_dim))   # frozen, scaled
        self.register_buffer("user_scale", torch.ones(()))                  # user table's std
        self.mlp = mlp([n_features + item_dim + user_dim, *hidden, 1], dropout)

    def forward(self, user, item, x: torch.Tensor, u_emb: torch.Tensor | None = None) -> torch.Tensor:
        parts = [(x - self.mean) / self.std]                                 # (N, F)
        if self.item_emb.shape[1]:
            parts += [u_emb / self.user_scale, self.item_emb[item]]          # (N, Du), (N, Dr)
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)                 # (N,)


def _scaled(table: np.ndarray) -> tuple[torch.Tensor, float]:
    t = torch.as_tensor(np.asarray(table, dtype=np.float32))
    s = float(t.std()) if t.numel() else 1.0
    s = s if s > 1e-12 else 1.0
    return t / s, s


# ---------------------------------------------------------------- the kinds
class _MLPReranker(Reranker):
    """A torch network over candidate rows; the shared scoring, persistence and training loop.
    Subclasses say how the network is built (``build_net``, ``_new``) and what it reads."""

    def __init__(self, cfg: MLPConfig, feature_names: list[str] | None, net: nn.Module, init: dict,
                 info: dict | None = None):
        super().__init__(cfg, feature_names, info)
        self.net = net
        self.init = init

    @staticmethod
    def build_net(cfg: MLPConfig, init: dict) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def _x(self, inputs: StageInputs) -> np.ndarray | None:
        """The feature rows the network reads (None: it reads none)."""
        return None

    def _user_table(self, inputs: StageInputs) -> np.ndarray | None:
        """The retriever user table the network reads (None: it reads none)."""
        return None

    @torch.no_grad()
    def score(self, inputs: StageInputs) -> np.ndarray:
        X, user_emb = self._x(inputs), self._user_table(inputs)
        self.net.eval()
        u = torch.from_numpy(np.array(inputs.cands["user"], dtype=np.int64))
        it = torch.from_numpy(np.array(inputs.cands["item"], dtype=np.int64))
        ue = torch.as_tensor(np.asarray(user_emb, np.float32)) if user_emb is not None else None
        out = np.empty(len(u), np.float64)
        for s in range(0, len(u), CHUNK_ROWS):
            sl = slice(s, s + CHUNK_ROWS)
            x = torch.from_numpy(np.ascontiguousarray(X[sl])) if X is not None else None
            out[sl] = self.net(u[sl], it[sl], x, ue[u[sl]] if ue is not None else None).numpy()
        return out

    def _state(self) -> dict:
        return {"init": self.init, "state_dict": self.net.state_dict()}

    @classmethod
    def _from_state(cls, cfg: MLPConfig, blob: dict) -> "_MLPReranker":
        net = cls.build_net(cfg, blob["init"])
        net.load_state_dict(blob["state_dict"])
        net.eval()
        return cls(cfg, blob["feature_names"], net, blob["init"])

    @classmethod
    def _new(cls, cfg: MLPConfig, p: Prepared, data, item_tab: np.ndarray) -> "_MLPReranker":
        """An untrained model: network initialised, frozen tables copied in."""
        raise NotImplementedError  # pragma: no cover - interface

    @classmethod
    def fit(cls, cfg: MLPConfig, p: Prepared, data, retriever=None, progress: bool = False,
            window: WindowLists | None = None) -> "_MLPReranker":
        """Train on the train users' rows with BPR or the listwise softmax; early-stop on the
        held-out users' protocol nDCG@k_eval. ``window`` lists are not used by the MLPs."""
        item_tab = np.zeros((data.n_items, 0), np.float32)
        if retriever is not None:
            item_tab = rf._as_np(retriever.item_embeddings()).astype(np.float32)
        model = cls._new(cfg, p, data, item_tab)
        net = model.net
        n_params = sum(q.numel() for q in net.parameters() if q.requires_grad)
        print(f"reranker[{cfg.label}]: {n_params:,} parameters", flush=True)

        X, user_emb = model._x(p.inputs), model._user_table(p.inputs)
        Xt = torch.from_numpy(X) if X is not None else None
        U = torch.from_numpy(np.array(p.inputs.cands["user"], dtype=np.int64))
        I = torch.from_numpy(np.array(p.inputs.cands["item"], dtype=np.int64))
        UE = torch.as_tensor(user_emb, dtype=torch.float32) if user_emb is not None else None

        def forward(m, rows: torch.Tensor) -> torch.Tensor:         # rows: any shape of row indices
            flat = rows.reshape(-1)
            out = m(U[flat], I[flat], Xt[flat] if Xt is not None else None,
                    UE[U[flat]] if UE is not None else None)
            return out.reshape(rows.shape)

        gen = torch.Generator().manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        if cfg.loss == "bpr":                     # id_mlp: always (IdMLPConfig.loss)
            batches, n, trained = _bpr_batches(p, cfg, gen, rng)

            def loss_fn(m, batch):
                pos, neg = batch
                sp, sn = forward(m, pos), forward(m, neg)                   # (B,), (B, n_neg)
                return -torch.nn.functional.logsigmoid(sp[:, None] - sn).mean()
        elif cfg.loss == "softmax":
            batches, n, trained = _softmax_batches(p, cfg, gen)
            Y = torch.from_numpy(p.y)

            def loss_fn(m, pad):
                valid = pad >= 0                                            # (B, K)
                rows = pad.clamp(min=0)
                s = forward(m, rows).masked_fill(~valid, float("-inf"))     # (B, K)
                logp = torch.log_softmax(s, dim=1)
                y = Y[rows] * valid                                         # (B, K)
                return -((logp.masked_fill(~valid, 0.0) * y).sum(1) / y.sum(1).clamp(min=1)).mean()
        else:
            raise ValueError(f"unknown loss {cfg.loss!r}; bpr or softmax")
        if n == 0:
            raise ValueError("no training positives inside the train users' candidates")
        opt = adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        loop = LoopConfig(epochs=cfg.epochs, patience=cfg.patience, progress=progress, log_every_epoch=progress)
        # no held-out users (the leakage audit's "design as run"): every epoch runs, no early stopping
        validate = (lambda: held_out_ndcg(model, p)) if len(p.held_users) else None
        hist = fit_loop(net, batches, loss_fn, opt, loop, validate=validate, name=f"reranker[{cfg.label}]")
        model.info.update(best_epoch=hist.best_epoch, epochs_run=len(hist.records),
                          trained_users=[int(x) for x in trained],
                          loss_history=[r["loss"] for r in hist.records],
                          held_out_history=[r.get("valid_metric") for r in hist.records])
        return model


class IdMLPReranker(_MLPReranker):
    """``id_mlp``: user-id, frozen retriever item, genre / year / tag embeddings -> MLP (BPR).
    Reads no production features and no user table."""

    kind = "id_mlp"

    @staticmethod
    def build_net(cfg: IdMLPConfig, init: dict) -> nn.Module:
        return IdMLPNet(init["n_users"], init["n_items"], init["item_dim"], init["n_genres"], init["g_slots"],
                        init["n_years"], init["n_tags"], init["t_slots"], cfg.emb_dim, cfg.hidden, cfg.dropout)

    @classmethod
    def _new(cls, cfg: IdMLPConfig, p: Prepared, data, item_tab: np.ndarray) -> "IdMLPReranker":
        f = data.item_features
        if f is None:
            raise ValueError("the id_mlp re-ranker needs item features (genres, year, tags)")
        init = dict(n_users=data.n_users, n_items=data.n_items, item_dim=item_tab.shape[1],
                    n_genres=f.n_genres, g_slots=f.genres.shape[1], n_years=f.n_years, n_tags=f.n_tags,
                    t_slots=f.tags.shape[1])
        net = cls.build_net(cfg, init)
        net.item_emb.copy_(_scaled(item_tab)[0])
        net.genres.copy_(f.genres)
        net.year.copy_(f.year)
        net.tags.copy_(f.tags)
        return cls(cfg, p.inputs.names, net, init)


class FeatureMLPReranker(_MLPReranker):
    """``mlp_features``: standardised production features (+ the frozen retriever user and item
    embeddings when a retriever was given) -> MLP; BPR or listwise softmax."""

    kind = "mlp_features"

    @staticmethod
    def build_net(cfg: FeatureMLPConfig, init: dict) -> nn.Module:
        return FeatureNet(init["n_features"], init["n_items"], init["item_dim"], init["user_dim"], cfg.hidden,
                          cfg.dropout)

    def _x(self, inputs: StageInputs) -> np.ndarray:
        return self._features(inputs)

    def _user_table(self, inputs: StageInputs) -> np.ndarray | None:
        if self.init.get("user_dim", 0) == 0:
            return None
        if inputs.user_emb is None:
            raise ValueError("mlp_features needs inputs.user_emb = rerank_features.retriever_user_table("
                             "retriever, users, ctx, n_users) for the scored period's context")
        return inputs.user_emb

    @classmethod
    def _new(cls, cfg: FeatureMLPConfig, p: Prepared, data, item_tab: np.ndarray) -> "FeatureMLPReranker":
        X, user_emb = p.inputs.X, p.inputs.user_emb
        if X is None:
            raise ValueError("mlp_features needs the feature matrix X")
        user_dim = user_emb.shape[1] if (user_emb is not None and item_tab.shape[1]) else 0
        init = dict(n_features=X.shape[1], n_items=data.n_items, item_dim=item_tab.shape[1] if user_dim else 0,
                    user_dim=user_dim)
        net = cls.build_net(cfg, init)
        xt = X[p.train_rows].astype(np.float64)
        net.mean.copy_(torch.from_numpy(xt.mean(axis=0)).float())
        net.std.copy_(torch.from_numpy(np.where(xt.std(axis=0) > 1e-6, xt.std(axis=0), 1.0)).float())
        if user_dim:
            net.item_emb.copy_(_scaled(item_tab)[0])
            net.user_scale.fill_(float(np.std(user_emb[p.train_users])) or 1.0)
        return cls(cfg, p.inputs.names, net, init)


def _bpr_batches(p: Prepared, cfg: MLPConfig, gen: torch.Generator, rng: np.random.Generator):
    """Per epoch: (pos rows (B,), neg rows (B, n_neg)) with negatives from the same user's candidates."""
    rows = p.train_rows
    u = p.inputs.cands["user"].to_numpy(np.int64)[rows]
    y = p.y[rows]
    neg = rows[y == 0]                                   # sorted by user (rows are)
    nu = u[y == 0]
    uniq, start, count = np.unique(nu, return_index=True, return_counts=True)
    pos = rows[y == 1]
    pu = u[y == 1]
    at = np.searchsorted(uniq, pu).clip(0, max(len(uniq) - 1, 0))
    ok = (uniq[at] == pu) if len(uniq) else np.zeros(len(pu), bool)
    pos, at = pos[ok], at[ok]
    trained = np.unique(pu[ok])

    def batches(epoch: int):
        for b in permuted_batches(len(pos), cfg.batch_size, gen):
            b = b.numpy()
            off = (rng.random((len(b), cfg.negatives)) * count[at[b], None]).astype(np.int64)
            yield torch.from_numpy(pos[b]), torch.from_numpy(neg[start[at[b], None] + off])
    return batches, len(pos), trained


def _softmax_batches(p: Prepared, cfg: FeatureMLPConfig, gen: torch.Generator):
    """Per epoch: (B, K) padded row matrices (-1 = padding) of train users with a positive."""
    rows = p.train_rows
    u = p.inputs.cands["user"].to_numpy(np.int64)[rows]
    uniq, start, count = np.unique(u, return_index=True, return_counts=True)
    has_pos = np.add.reduceat(p.y[rows], start) > 0 if len(rows) else np.zeros(0, bool)
    start, count, trained = start[has_pos], count[has_pos], uniq[has_pos]
    k = int(count.max()) if len(count) else 1
    pad = np.full((len(start), k), -1, np.int64)
    col = np.arange(k)[None, :]
    mask = col < count[:, None]
    pad[mask] = rows[(start[:, None] + col)[mask]]

    def batches(epoch: int):
        for b in permuted_batches(len(pad), cfg.users_per_batch, gen):
            yield torch.from_numpy(pad[b.numpy()])
    return batches, len(pad), trained


