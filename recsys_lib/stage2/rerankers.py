"""The second stage: re-rank the retriever's candidates (docs/PROTOCOL.md, "Who learns from what").

Training data are the *validation* period's candidates (retriever fit on train, histories up
to validation), labelled 1 when (user, item) is a validation positive. Everything a re-ranker
fits on or scores comes in one `StageInputs` (candidates, features, their names, the period's
labels and the frozen retriever user table), built before the fit. Metric throughout: the
protocol's nDCG@10 of the re-ranked top 10 (`evaluate.evaluate_ranking`, whose IDCG counts *all*
the user's validation positives: a positive the retriever missed is a miss). Test rows are never
read here; fit inside ``guard.fitting("reranker", allow=("train", "valid"))``.

Two ways to use the validation users (params ``reranker.folds``):
- ``folds: 1`` (or missing): one fixed-seed split into train users (1 - held_out_share) and
  held-out users; every variant trains on the former and is early-stopped and compared on the
  latter. With ~550 validation users (ml-latest-small) that is ~110 held-out users: the choice
  between close variants is noise, and each model learns from 80% of the users.
- ``folds: K`` > 1, cross-fitting: K fixed-seed folds of the validation users; for each fold k a
  member is fit on the other folds' users and early-stopped on fold k's. A variant's score is
  the nDCG@10 of the *out-of-fold* rankings over all validation users (each ranked by the member
  that never trained on them); the best is chosen. The final model (`RerankerEnsemble`) averages
  its K members' per-user standardised scores, so every validation user's data shapes it, while
  no validation score ever comes from a model trained on the user scored.

Kinds (``RerankerConfig.variant``), one class each behind the `Reranker` interface
(``score(inputs)``, ``save``, ``to_blob`` / ``from_blob``; `load` dispatches on the file's
``kind``):
- ``id_mlp`` (`IdMLPReranker`): the design this project starts from: user-id embedding, the
  retriever's frozen item embedding, genre / year / tag embeddings -> MLP (256 -> 128 -> 1,
  dropout 0.3), BPR loss over (positive, sampled negative candidates of the same user). A user-id
  embedding only helps users trained on; others keep their near-zero initial vector.
- ``mlp_features`` (`FeatureMLPReranker`): the production features (`recsys_lib.stage2.features`,
  standardised with train-user statistics) + frozen retriever user and item embeddings -> MLP;
  BPR or listwise softmax loss over each user's candidate list.
- ``lgbm`` (`LGBMReranker`): LightGBM LambdaRank on the production features, grouped by user,
  early-stopped on the held-out users' protocol nDCG@10; deterministic.

`tune` trains the listed variants and keeps the best on the held-out users (out-of-fold with
``folds`` > 1); `topk` turns scores into each user's top list (padding -1, which never hits);
`out_of_fold_topk` / `in_fold_topk` rank validation users with an ensemble's members that did
not / did train on them (`two_stage.ranked` / `out_of_fold_ranked` / `in_fold_ranked` score
those lists under the protocol). Ranking helpers live in `recsys_lib.stage2.ranking`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..protocol import evaluate as ev
from . import features as rf
from ..config import atomic_write
from ..protocol.splitdata import CHUNK_ROWS
from .ranking import (RETRIEVER_ORDER, RepeatedTopK, candidate_labels, fold_users, ndcg_of, ndcg_per_user, order_topk, per_user_zscore, retriever_order, split_users, subset_labels)
from ..models.train import LoopConfig, adam, fit_loop, load_checkpoint, permuted_batches
from ..models.layers import mlp


@dataclass
class StageInputs:
    """The one input of the second stage: one period's candidates and what is known about them.

    Built by `two_stage.stage_inputs` (and by tests) before any fit; every fit, score and ranking
    of this module takes it whole, so no function needs to be told which array goes with which."""

    labels: ev.Labels                # the period's scored users, positives and scoring context
    cands: pd.DataFrame              # user, item, retriever_score, retriever_rank[, <source>_rank...]
    X: np.ndarray | None             # (n_rows, F) float32 production features (rerank_features)
    names: list[str]                 # X's column names
    user_emb: np.ndarray | None = None   # (n_users, D) frozen retriever user table for this context
    seconds: float = 0.0             # time to build X and user_emb (counted in scoring time)

    @property
    def period(self) -> str:
        return self.labels.period

    def take(self, rows: np.ndarray) -> "StageInputs":
        """The same inputs restricted to candidate ``rows`` (positions), e.g. one fold's users."""
        return replace(self, cands=self.cands.iloc[rows], X=self.X[rows] if self.X is not None else None)


@dataclass
class RerankerConfig:
    variant: str = "lgbm"            # id_mlp | mlp_features | lgbm
    name: str = ""                   # the variant's label in tables and file names ("" = variant)
    held_out_share: float = 0.2      # share of validation users kept out of training (early stopping, choice)
    folds: int = 1                   # > 1: K-fold cross-fitting over validation users (tune; held_out_share unused)
    seed: int = 42                   # user split, initialisation, negative sampling, LightGBM
    k_eval: int = 10                 # held-out nDCG@k_eval picks epochs / trees and the variant
    # --- MLP variants (id_mlp, mlp_features)
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # MLP widths before the output unit
    dropout: float = 0.3             # dropout after each hidden layer
    emb_dim: int = 32                # id_mlp: user / genre / year / tag embedding size
    loss: str = "bpr"                # bpr (pairwise) | softmax (listwise over the user's candidates)
    negatives: int = 4               # bpr: sampled negative candidates per positive
    epochs: int = 20                 # maximum epochs
    patience: int = 3                # epochs without held-out improvement before stopping
    batch_size: int = 512            # bpr: positives per step
    users_per_batch: int = 32        # softmax: candidate lists per step
    lr: float = 1e-3                 # Adam learning rate
    weight_decay: float = 0.0        # Adam weight decay
    # --- lgbm
    n_estimators: int = 300          # maximum boosting rounds
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 20
    early_stopping_rounds: int = 30  # rounds without held-out improvement
    num_threads: int = 2             # LightGBM threads (deterministic=True)
    drop_features: list[str] = field(default_factory=list)  # lgbm: columns or groups left out (ablations)

    @property
    def label(self) -> str:
        return self.name or self.variant

    @classmethod
    def from_params(cls, section: dict, variant: "str | dict", seed: int | None = None) -> "RerankerConfig":
        """Config of ``variant`` from the params ``reranker:`` section (common keys, then the
        variant's own sub-section). ``variant`` is a kind (``lgbm``) or a dict naming a
        configuration of a kind: ``{name: lgbm_leaves15, variant: lgbm, num_leaves: 15}`` (the
        kind's sub-section, then these overrides)."""
        spec = {"variant": variant} if isinstance(variant, str) else dict(variant)
        variant = spec.pop("variant")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - names)
        if unknown:
            raise ValueError(f"re-ranker variant {spec.get('name', variant)!r}: unknown parameter(s) {unknown}")
        kw = {k: v for k, v in (section or {}).items() if k in names}
        kw.update({k: v for k, v in ((section or {}).get(variant) or {}).items() if k in names})
        kw.update(spec)
        kw["variant"] = variant
        if seed is not None:
            kw["seed"] = seed
        return cls(**kw)


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


# ---------------------------------------------------------------- what a fit learns from
@dataclass
class ExtraLists:
    """Training lists from outside the validation period: the label window's candidates (proposed
    and scored by stage-1 models refit on the train rows before the window), their features (same
    columns as the validation features) and labels (window positives). The lgbm variant adds them
    to every fit's training groups, less the lists of the users that fit is early-stopped and
    scored on (docs/PROTOCOL.md: held-out validation users are never in its training lists)."""

    cands: pd.DataFrame          # user, item, ... sorted by user
    X: np.ndarray                # (n_rows, F) float32
    y: np.ndarray                # (n_rows,) 1 = a window positive

    def groups(self, exclude_users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, group sizes) of the lists with a positive whose user is not in ``exclude_users``."""
        u = self.cands["user"].to_numpy(np.int64)
        keep = np.flatnonzero(~np.isin(u, exclude_users))
        if not len(keep):
            return keep, np.zeros(0, np.int64)
        uniq, start, count = np.unique(u[keep], return_index=True, return_counts=True)
        has_pos = np.add.reduceat(self.y[keep], start) > 0
        return keep[np.repeat(has_pos, count)], count[has_pos]


@dataclass
class _Prepared:
    """The inputs sorted by (user, retriever rank), with labels and the user split."""

    inputs: StageInputs
    y: np.ndarray
    train_rows: np.ndarray      # rows of train users
    held_rows: np.ndarray       # rows of held-out users
    train_users: np.ndarray
    held_users: np.ndarray
    held_labels: ev.Labels

    @property
    def held(self) -> StageInputs:
        return self.inputs.take(self.held_rows)


def _prepare(inputs: StageInputs, cfg: RerankerConfig, train_users: np.ndarray | None = None,
             held_users: np.ndarray | None = None) -> _Prepared:
    cands, X, labels = inputs.cands, inputs.X, inputs.labels
    if X is not None and len(X) != len(cands):
        raise ValueError(f"X has {len(X)} rows for {len(cands)} candidates")
    order = np.lexsort((cands["retriever_rank"].to_numpy(), cands["user"].to_numpy()))
    c = cands.iloc[order].reset_index(drop=True)
    sorted_inputs = replace(inputs, cands=c, X=X[order] if X is not None else None)
    y = candidate_labels(c, labels)
    if (train_users is None) != (held_users is None):
        raise ValueError("give both train_users and held_users, or neither")
    if train_users is None:
        tr_users, ho_users = split_users(labels.users, cfg.held_out_share, cfg.seed)
    else:
        tr_users, ho_users = np.sort(np.asarray(train_users)), np.sort(np.asarray(held_users))
        if np.isin(tr_users, ho_users).any():
            raise ValueError("train and held-out users overlap")
        if not np.isin(np.r_[tr_users, ho_users], labels.users).all():
            raise ValueError("train and held-out users must be validation users (labels.users)")
    u = c["user"].to_numpy(np.int64)
    return _Prepared(inputs=sorted_inputs, y=y, train_rows=np.flatnonzero(np.isin(u, tr_users)),
                     held_rows=np.flatnonzero(np.isin(u, ho_users)), train_users=tr_users,
                     held_users=ho_users, held_labels=subset_labels(labels, ho_users))


def _held_out_metric(model: "Reranker", p: _Prepared) -> float:
    held = p.held
    top = order_topk(held.cands, model.score(held), p.held_users, model.cfg.k_eval)
    return ndcg_of(top, p.held_labels, model.cfg.k_eval)


# ---------------------------------------------------------------- the interface
class Reranker:
    """A fitted re-ranker: ``score(inputs)`` -> (n_rows,) scores of ``inputs.cands`` (higher is
    better). Subclasses set ``kind`` (recorded in the saved file) and implement ``score``,
    ``_state`` / ``_from_state`` (their part of the blob) and, for single models, ``fit``."""

    kind: ClassVar[str] = ""

    def __init__(self, cfg: RerankerConfig, feature_names: list[str] | None = None, info: dict | None = None):
        self.cfg = cfg
        self.feature_names = list(feature_names or [])
        self.info: dict = info or {}

    @property
    def variant(self) -> str:
        return self.cfg.variant

    @property
    def label(self) -> str:
        return self.cfg.label

    def score(self, inputs: StageInputs) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def _features(self, inputs: StageInputs) -> np.ndarray:
        """``inputs.X``, checked against the columns this model was trained on."""
        X = inputs.X
        if X is None or X.shape != (len(inputs.cands), len(self.feature_names)) \
                or list(inputs.names) != self.feature_names:
            raise ValueError(f"{self.variant} re-ranker needs X of shape ({len(inputs.cands)}, "
                             f"{len(self.feature_names)}) with columns {self.feature_names}; got "
                             f"{None if X is None else X.shape} with columns {inputs.names}")
        return X

    # ------------------------------------------------------------ persistence
    def _state(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def _from_state(cls, cfg: RerankerConfig, blob: dict) -> "Reranker":  # pragma: no cover - interface
        raise NotImplementedError

    def to_blob(self) -> dict:
        """Everything needed to rebuild the model, as one picklable dict with its ``kind``."""
        return {"kind": self.kind, "config": asdict(self.cfg), "feature_names": self.feature_names,
                "info": self.info, **self._state()}

    @classmethod
    def from_blob(cls, blob: dict) -> "Reranker":
        """The model of ``blob["kind"]`` (any kind when called on `Reranker`)."""
        kind = blob.get("kind")
        if kind not in KINDS:
            raise ValueError(f"not a re-ranker of a known kind: {kind!r}; one of {sorted(KINDS)} "
                             "(files from before the kinds were recorded: rerun 30_reranker)")
        model = KINDS[kind]._from_state(RerankerConfig(**blob["config"]), blob)
        model.info = blob.get("info", {})
        if not isinstance(model, cls):
            raise ValueError(f"the blob holds a {kind} re-ranker, not a {cls.__name__}")
        return model

    def save(self, path: str | Path) -> Path:
        """One torch file (the blob), written atomically; every kind saves the same way."""
        with atomic_write(path) as tmp:
            torch.save(self.to_blob(), tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Reranker":
        """A saved re-ranker of the kind recorded in the file (an ensemble loads as one)."""
        return cls.from_blob(load_checkpoint(path))


def load(path: str | Path) -> Reranker:
    """Load a re-ranker saved by any kind's ``save``: the file's ``kind`` picks the class."""
    return Reranker.load(path)


# ---------------------------------------------------------------- MLP kinds
class _MLPReranker(Reranker):
    """A torch network over candidate rows; the shared scoring, persistence and training loop.
    Subclasses say how the network is built (``build_net``, ``_new``) and what it reads."""

    def __init__(self, cfg: RerankerConfig, feature_names: list[str] | None, net: nn.Module, init: dict,
                 info: dict | None = None):
        super().__init__(cfg, feature_names, info)
        self.net = net
        self.init = init

    @staticmethod
    def build_net(cfg: RerankerConfig, init: dict) -> nn.Module:  # pragma: no cover - interface
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
    def _from_state(cls, cfg: RerankerConfig, blob: dict) -> "_MLPReranker":
        net = cls.build_net(cfg, blob["init"])
        net.load_state_dict(blob["state_dict"])
        net.eval()
        return cls(cfg, blob["feature_names"], net, blob["init"])

    @classmethod
    def _new(cls, cfg: RerankerConfig, p: _Prepared, data, item_tab: np.ndarray) -> "_MLPReranker":
        """An untrained model: network initialised, frozen tables copied in."""
        raise NotImplementedError  # pragma: no cover - interface

    @classmethod
    def fit(cls, cfg: RerankerConfig, p: _Prepared, data, retriever=None, progress: bool = False,
            extra: ExtraLists | None = None) -> "_MLPReranker":
        """Train on the train users' rows with BPR or the listwise softmax; early-stop on the
        held-out users' protocol nDCG@k_eval. ``extra`` lists are not used by the MLPs."""
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
        if cfg.loss == "bpr" or cfg.variant == "id_mlp":
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
        validate = (lambda: _held_out_metric(model, p)) if len(p.held_users) else None
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
    def build_net(cfg: RerankerConfig, init: dict) -> nn.Module:
        return IdMLPNet(init["n_users"], init["n_items"], init["item_dim"], init["n_genres"], init["g_slots"],
                        init["n_years"], init["n_tags"], init["t_slots"], cfg.emb_dim, cfg.hidden, cfg.dropout)

    @classmethod
    def _new(cls, cfg: RerankerConfig, p: _Prepared, data, item_tab: np.ndarray) -> "IdMLPReranker":
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
    def build_net(cfg: RerankerConfig, init: dict) -> nn.Module:
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
    def _new(cls, cfg: RerankerConfig, p: _Prepared, data, item_tab: np.ndarray) -> "FeatureMLPReranker":
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


def _bpr_batches(p: _Prepared, cfg: RerankerConfig, gen: torch.Generator, rng: np.random.Generator):
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


def _softmax_batches(p: _Prepared, cfg: RerankerConfig, gen: torch.Generator):
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


# ---------------------------------------------------------------- LightGBM kind
class LGBMReranker(Reranker):
    """``lgbm``: LightGBM LambdaRank over the production features, grouped by user."""

    kind = "lgbm"

    def __init__(self, cfg: RerankerConfig, feature_names: list[str] | None, booster_str: str,
                 info: dict | None = None):
        super().__init__(cfg, feature_names, info)
        self.booster_str = booster_str
        self._booster = None

    @property
    def used(self) -> list[int]:
        """Positions of the feature columns the booster reads (all but ``cfg.drop_features``)."""
        return rf.kept_columns(self.feature_names, self.cfg.drop_features)

    def score(self, inputs: StageInputs) -> np.ndarray:
        X = self._features(inputs)[:, self.used]
        if self._booster is None:
            import lightgbm as lgb
            self._booster = lgb.Booster(model_str=self.booster_str)
        return self._booster.predict(X, num_threads=self.cfg.num_threads).astype(np.float64)

    def importance(self) -> pd.Series:
        """Total gain of each feature column over the booster's splits (0 for dropped columns)."""
        import lightgbm as lgb
        gain = lgb.Booster(model_str=self.booster_str).feature_importance(importance_type="gain")
        out = pd.Series(0.0, index=self.feature_names)
        out.iloc[self.used] = gain
        return out

    def _state(self) -> dict:
        return {"model_str": self.booster_str}

    @classmethod
    def _from_state(cls, cfg: RerankerConfig, blob: dict) -> "LGBMReranker":
        return cls(cfg, blob["feature_names"], blob["model_str"])

    @classmethod
    def fit(cls, cfg: RerankerConfig, p: _Prepared, data=None, retriever=None, progress: bool = False,
            extra: ExtraLists | None = None) -> "LGBMReranker":
        """Train groups: the train users with a positive among their candidates (plus the label
        window's lists, less the held-out users'); early-stopped on the held-out users' protocol
        nDCG@k_eval."""
        import lightgbm as lgb
        X, all_names = p.inputs.X, p.inputs.names
        if X is None:
            raise ValueError("lgbm needs the feature matrix X")
        used = rf.kept_columns(all_names, cfg.drop_features)
        X, names = X[:, used], [all_names[j] for j in used]
        u = p.inputs.cands["user"].to_numpy(np.int64)
        tr = p.train_rows
        uniq, start, count = np.unique(u[tr], return_index=True, return_counts=True)
        has_pos = np.add.reduceat(p.y[tr], start) > 0 if len(tr) else np.zeros(0, bool)
        tr = tr[np.repeat(has_pos, count)]
        group = count[has_pos]
        if len(tr) == 0:
            raise ValueError("no training positives inside the train users' candidates")
        ho = p.held_rows
        _, ho_count = np.unique(u[ho], return_counts=True)
        held_topk = RepeatedTopK(p.inputs.cands.iloc[ho], p.held_users, cfg.k_eval)   # sorted once

        def protocol_ndcg(preds, eval_data):                # eval rows are the held-out rows, in order
            return f"protocol_ndcg@{cfg.k_eval}", ndcg_of(held_topk(preds), p.held_labels, cfg.k_eval), True

        params = dict(objective="lambdarank", metric="None", learning_rate=cfg.learning_rate,
                      num_leaves=cfg.num_leaves, min_data_in_leaf=cfg.min_child_samples, seed=cfg.seed,
                      deterministic=True, force_row_wise=True, num_threads=cfg.num_threads, verbose=-1)
        X_train, y_train, n_extra = X[tr], p.y[tr], 0
        if extra is not None:                             # label-window lists, less the held-out users'
            rows, sizes = extra.groups(p.held_users)
            X_train = np.concatenate([X_train, extra.X[rows][:, used]])
            y_train = np.concatenate([y_train, extra.y[rows]])
            group = np.concatenate([group, sizes])
            n_extra = len(sizes)
        train_set = lgb.Dataset(X_train, label=y_train.astype(np.int32), group=group,
                                feature_name=list(names) if names else "auto", free_raw_data=False)
        valid_set = lgb.Dataset(X[ho], label=p.y[ho].astype(np.int32), group=ho_count, reference=train_set)
        booster = lgb.train(params, train_set, num_boost_round=cfg.n_estimators, valid_sets=[valid_set],
                            valid_names=["held_out"], feval=protocol_ndcg,
                            callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)])
        best = int(booster.best_iteration or booster.current_iteration())
        model = cls(cfg, all_names, booster.model_to_string(num_iteration=best))
        model.info.update(best_iteration=best, trained_users=[int(x) for x in uniq[has_pos]],
                          extra_lists=int(n_extra))
        return model


# ---------------------------------------------------------------- cross-fitted ensemble
class RerankerEnsemble(Reranker):
    """The K fold models of one variant under cross-fitting (`tune` with ``folds`` > 1).

    Member k was fit on the validation users outside ``fold_users[k]`` and early-stopped on
    ``fold_users[k]``. ``score`` (used for test and any user no member trained on) averages the
    members' scores after standardising each within every user's candidate list: only the
    order inside a user's list matters, and members' raw scales differ (LambdaRank raw scores vs
    BPR / softmax logits, and even one variant's members drift in offset and spread with their
    number of epochs / trees), so a plain mean would let the member with the widest spread
    dictate the order; per-user z-scores give every member an equal say and leave a single
    member's order unchanged. `out_of_fold_topk` ranks each validation user with the member
    that never trained on them (the honest validation score); `in_fold_topk` with the members
    that did (the leakage audit's "seed protocol" number).
    """

    kind = "ensemble"

    def __init__(self, cfg: RerankerConfig, members: list[Reranker], fold_users: list[np.ndarray],
                 info: dict | None = None):
        if len(members) != len(fold_users) or len(members) < 2:
            raise ValueError("an ensemble needs one member per fold and at least 2 folds")
        super().__init__(cfg, members[0].feature_names, info)
        self.members = list(members)
        self.fold_users = [np.sort(np.asarray(f, dtype=np.int64)) for f in fold_users]

    @property
    def folds(self) -> int:
        return len(self.members)

    def score(self, inputs: StageInputs, members: Sequence[int] | None = None) -> np.ndarray:
        """Mean of the members' per-user standardised scores (all members, or those listed)."""
        idx = range(len(self.members)) if members is None else members
        users = inputs.cands["user"].to_numpy(np.int64)
        out = np.zeros(len(users), np.float64)
        for j in idx:
            out += per_user_zscore(users, self.members[j].score(inputs))
        return out / max(len(idx), 1)

    def importance(self) -> pd.Series | None:
        """The members' mean feature importance (gain), or None when the members have none (MLPs)."""
        if not all(hasattr(m, "importance") for m in self.members):
            return None
        return pd.concat([m.importance() for m in self.members], axis=1).mean(axis=1)

    def fold_of(self, users: np.ndarray) -> np.ndarray:
        """The fold index of each user (-1: in no fold, i.e. not a validation user it was fit on)."""
        users = np.asarray(users, dtype=np.int64)
        out = np.full(len(users), -1, np.int64)
        for k, f in enumerate(self.fold_users):
            out[np.isin(users, f)] = k
        return out

    def _state(self) -> dict:
        return {"fold_users": [f.tolist() for f in self.fold_users],
                "members": [m.to_blob() for m in self.members]}

    @classmethod
    def _from_state(cls, cfg: RerankerConfig, blob: dict) -> "RerankerEnsemble":
        return cls(cfg, [Reranker.from_blob(b) for b in blob["members"]],
                   [np.asarray(f, dtype=np.int64) for f in blob["fold_users"]])


#: every kind a file may hold; `Reranker.from_blob` dispatches on it
KINDS: dict[str, type[Reranker]] = {c.kind: c for c in (IdMLPReranker, FeatureMLPReranker, LGBMReranker,
                                                       RerankerEnsemble)}
#: the variants a config may name, and the class that fits each
RERANKERS: dict[str, type[Reranker]] = {c.kind: c for c in (IdMLPReranker, FeatureMLPReranker, LGBMReranker)}
VARIANTS = tuple(RERANKERS)
MLP_KINDS = ("id_mlp", "mlp_features")       # the kinds trained with torch (torchrun can share them out)


# ---------------------------------------------------------------- ranking with a model
def topk(model: Reranker, inputs: StageInputs, users: np.ndarray | None = None, k_keep: int = 10) -> np.ndarray:
    """(len(users), k_keep) each user's top items after re-ranking, in the order of ``users``
    (default: ``inputs.labels.users``), padded with -1 for users with fewer candidates."""
    users = inputs.labels.users if users is None else users
    return order_topk(inputs.cands, model.score(inputs), users, k_keep)


def _fold_topk(model: RerankerEnsemble, inputs: StageInputs, users: np.ndarray | None, k_keep: int,
               out_of_fold: bool) -> np.ndarray:
    users = np.asarray(inputs.labels.users if users is None else users, dtype=np.int64)
    fold = model.fold_of(users)
    if (fold < 0).any():
        raise ValueError(f"{int((fold < 0).sum())} users are in no fold of this ensemble (only the "
                         "validation users it was cross-fitted on have an out-of-fold / in-fold model)")
    out = np.full((len(users), k_keep), -1, dtype=np.int64)
    cu = inputs.cands["user"].to_numpy(np.int64)
    for k in range(model.folds):
        sel = fold == k
        if not sel.any():
            continue
        uk = users[sel]
        sub = inputs.take(np.flatnonzero(np.isin(cu, uk)))
        if out_of_fold:
            scores = model.members[k].score(sub)
        else:
            scores = model.score(sub, members=[j for j in range(model.folds) if j != k])
        out[sel] = order_topk(sub.cands, scores, uk, k_keep)
    return out


def out_of_fold_topk(model: RerankerEnsemble, inputs: StageInputs, users: np.ndarray | None = None,
                     k_keep: int = 10) -> np.ndarray:
    """(len(users), k_keep) top lists of validation users, each user ranked by the one member
    that never trained on them (its fold's model): the honest validation ranking."""
    return _fold_topk(model, inputs, users, k_keep, out_of_fold=True)


def in_fold_topk(model: RerankerEnsemble, inputs: StageInputs, users: np.ndarray | None = None,
                 k_keep: int = 10) -> np.ndarray:
    """Like `out_of_fold_topk`, but each user ranked by the members that DID train on them
    (mean of their per-user standardised scores): the optimistic, leaky number."""
    return _fold_topk(model, inputs, users, k_keep, out_of_fold=False)


# ---------------------------------------------------------------- fitting
def _with_user_table(cfg: RerankerConfig, inputs: StageInputs, data, retriever) -> StageInputs:
    """``inputs`` with the retriever user table filled in where mlp_features needs it."""
    if cfg.variant == "mlp_features" and inputs.user_emb is None and retriever is not None:
        labels = inputs.labels
        return replace(inputs, user_emb=rf.retriever_user_table(retriever, labels.users, labels.ctx, data.n_users))
    return inputs


def fit_reranker(cfg: RerankerConfig, inputs: StageInputs, data, retriever=None, *,
                 train_users: np.ndarray | None = None, held_users: np.ndarray | None = None,
                 extra: ExtraLists | None = None, progress: bool = False) -> Reranker:
    """Fit one variant on the train users' validation candidates; early-stop on the held-out users.

    The users are ``cfg``'s fixed-seed split (``held_out_share``) unless ``train_users`` and
    ``held_users`` are given (cross-fitting: the other folds, and this fold).
    ``info["trained_users"]`` lists the users whose candidates the fit actually learnt from
    (train users with a positive among their candidates). ``extra`` (the label window's lists)
    joins the lgbm variant's training groups; the MLP variants learn from validation lists only.

    ``inputs``: the validation period's `StageInputs`, built outside the fitting context.
    ``data``: the SplitData (item side features, sizes). ``retriever``: the frozen retriever (its
    ``item_embeddings()``; ``user_embeddings`` for mlp_features when ``inputs.user_emb`` is None).
    The returned model's ``info`` holds the held-out nDCG@k, fit seconds and best epoch/round.
    """
    if cfg.variant not in RERANKERS:
        renamed = " (the variant called seed is now id_mlp)" if cfg.variant == "seed" else ""
        raise ValueError(f"unknown re-ranker variant {cfg.variant!r}; one of {VARIANTS}{renamed}")
    if inputs.labels.period != "valid":
        raise ValueError(f"the re-ranker learns from validation candidates, got labels of {inputs.labels.period!r}")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    inputs = _with_user_table(cfg, inputs, data, retriever)
    p = _prepare(inputs, cfg, train_users, held_users)
    model = RERANKERS[cfg.variant].fit(cfg, p, data, retriever, progress, extra)
    model.info.update(held_out_ndcg=_held_out_metric(model, p),
                      fit_seconds=time.perf_counter() - t0, train_users=int(len(p.train_users)),
                      held_out_users=int(len(p.held_users)), train_rows=int(len(p.train_rows)),
                      train_positives=int(p.y[p.train_rows].sum()))
    return model


def _fold_stats(per_user: np.ndarray, users: np.ndarray, parts: list[np.ndarray]) -> tuple[list[float], float, float]:
    fold = [float(per_user[np.isin(users, f)].mean()) if len(f) else 0.0 for f in parts]
    return fold, float(np.mean(fold)), float(np.std(fold, ddof=1)) if len(fold) > 1 else 0.0


def fit_cross(cfg: RerankerConfig, inputs: StageInputs, data, retriever=None, *,
              extra: ExtraLists | None = None, progress: bool = False) -> RerankerEnsemble:
    """Cross-fit one variant: ``cfg.folds`` fixed-seed folds of the validation users; member k
    trains on the other folds' users and early-stops on fold k's. ``info["held_out_ndcg"]`` is
    the protocol nDCG@k_eval of the out-of-fold rankings over *all* validation users (full
    labels: a positive the retriever missed is a miss); ``fold_ndcg`` its per-fold means."""
    K = int(cfg.folds)
    labels = inputs.labels
    parts = fold_users(labels.users, K, cfg.seed)
    inputs = _with_user_table(cfg, inputs, data, retriever)
    members = []
    for k, held in enumerate(parts):
        train = np.sort(np.concatenate([f for j, f in enumerate(parts) if j != k]))
        if progress:
            print(f"reranker[{cfg.label}]: fold {k + 1}/{K} ({len(train)} train users, {len(held)} held out)",
                  flush=True)
        m = fit_reranker(cfg, inputs, data, retriever, train_users=train, held_users=held, extra=extra,
                         progress=progress)
        m.info["fold"] = k
        members.append(m)
    ens = RerankerEnsemble(replace(cfg, held_out_share=1.0 / K), members, parts)
    kk = cfg.k_eval
    per_user = ndcg_per_user(out_of_fold_topk(ens, inputs, labels.users, kk), labels, kk)
    fold, mean, std = _fold_stats(per_user, labels.users, parts)
    ens.info.update(held_out_ndcg=float(per_user.mean()) if len(per_user) else 0.0, fold_ndcg=fold,
                    fold_ndcg_mean=mean, fold_ndcg_std=std, folds=K,
                    fit_seconds=float(sum(m.info["fit_seconds"] for m in members)),
                    best_epoch_or_round=[m.info.get("best_epoch", m.info.get("best_iteration")) for m in members],
                    held_out_users=int(len(labels.users)),
                    train_users=[m.info["train_users"] for m in members],
                    extra_lists=[m.info.get("extra_lists", 0) for m in members])
    return ens


def tune(section: dict, inputs: StageInputs, data, retriever=None, *, seed: int = 42,
         extra: ExtraLists | None = None, progress: bool = False
         ) -> tuple[Reranker, pd.DataFrame, dict[str, Reranker]]:
    """Fit every variant of ``section["variants"]`` (the params ``reranker:`` section) on the same
    user split; keep the best by held-out nDCG@k. With ``folds`` > 1 every variant is cross-fitted
    on the same folds (`fit_cross`), models are `RerankerEnsemble`, ``held_out_ndcg`` is the
    out-of-fold nDCG@k over all validation users, and the table adds the per-fold mean and std.
    Returns (best model, table with one row per variant plus the retriever's own ordering of the
    same candidates, every fitted model by label): the report shows every variant on test while
    the choice stays the held-out users'."""
    variants = list(section.get("variants", VARIANTS))
    base = RerankerConfig.from_params(section, variants[0], seed)
    k, labels = base.k_eval, inputs.labels
    if base.folds > 1:
        parts = fold_users(labels.users, base.folds, base.seed)
        per_user = ndcg_per_user(retriever_order(inputs.cands, labels.users, k), labels, k)
        fold, mean, std = _fold_stats(per_user, labels.users, parts)
        first = {"variant": RETRIEVER_ORDER, "held_out_ndcg": float(per_user.mean()) if len(per_user) else 0.0,
                 "fold_ndcg_mean": mean, "fold_ndcg_std": std, "folds": base.folds}
        fit = fit_cross

        def stats(m) -> dict:
            return {"fold_ndcg_mean": m.info["fold_ndcg_mean"], "fold_ndcg_std": m.info["fold_ndcg_std"],
                    "folds": m.folds}
    else:
        p = _prepare(inputs, base)
        first = {"variant": RETRIEVER_ORDER, "held_out_ndcg": ndcg_of(
            retriever_order(p.held.cands, p.held_users, k), p.held_labels, k)}
        fit = fit_reranker

        def stats(m) -> dict:
            return {}
    rows = [{**first, "fit_seconds": 0.0}]
    models = {}
    for v in variants:
        cfg = RerankerConfig.from_params(section, v, seed)
        model = fit(cfg, inputs, data, retriever, extra=extra, progress=progress)
        models[cfg.label] = model
        rows.append({"variant": cfg.label, "held_out_ndcg": model.info["held_out_ndcg"], **stats(model),
                     "fit_seconds": model.info["fit_seconds"],
                     "window_lists": model.info.get("extra_lists", 0),
                     "best_epoch_or_round": model.info.get("best_epoch_or_round", model.info.get(
                         "best_epoch", model.info.get("best_iteration")))})
    best = max(models.values(), key=lambda m: m.info["held_out_ndcg"])   # the first on ties
    table = pd.DataFrame(rows)
    table["chosen"] = table["variant"] == best.label
    return best, table, models
