"""The second stage: re-rank the retriever's candidates (PROTOCOL.md, "Who learns from what").

Training data are the *validation* period's candidates (retriever fit on train, histories up
to validation), labelled 1 when (user, item) is a validation positive. Labels come from an
`evaluate.Labels` for "valid" built before the fit. Metric throughout: the protocol's nDCG@10
of the re-ranked top 10 (`evaluate.evaluate_ranking`, whose IDCG counts *all* the user's
validation positives: a positive the retriever missed is a miss). Test rows are never read
here; fit inside ``guard.fitting("reranker", allow=("train", "valid"))``.

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

Variants (``RerankerConfig.variant``):
- ``seed``: the design this project starts from: user-id embedding, the retriever's frozen
  item embedding, genre / year / tag embeddings -> MLP (256 -> 128 -> 1, dropout 0.3), BPR
  loss over (positive, sampled negative candidates of the same user). A user-id embedding only
  helps users trained on; others keep their near-zero initial vector.
- ``mlp_features``: the production features (`recsys_lib.rerank_features`, standardised with
  train-user statistics) + frozen retriever user and item embeddings -> MLP; BPR or listwise
  softmax loss over each user's candidate list.
- ``lgbm``: LightGBM LambdaRank on the production features, grouped by user, early-stopped on
  the held-out users' protocol nDCG@10; deterministic.

`tune` trains the listed variants and keeps the best on the held-out users (out-of-fold with
``folds`` > 1); `rerank` turns scores into each user's top list (padding -1, which never hits);
`out_of_fold_topk` / `in_fold_topk` rank validation users with an ensemble's members that did
not / did train on them.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import evaluate as ev
from .. import rerank_features as rf
from ..train import LoopConfig, adam, fit_loop, load_checkpoint, permuted_batches, save_checkpoint

VARIANTS = ("seed", "mlp_features", "lgbm")
RETRIEVER_ORDER = "retriever_order"


@dataclass
class RerankerConfig:
    variant: str = "lgbm"            # seed | mlp_features | lgbm
    name: str = ""                   # the variant's label in tables and file names ("" = variant)
    held_out_share: float = 0.2      # share of validation users kept out of training (early stopping, choice)
    folds: int = 1                   # > 1: K-fold cross-fitting over validation users (tune; held_out_share unused)
    seed: int = 42                   # user split, initialisation, negative sampling, LightGBM
    k_eval: int = 10                 # held-out nDCG@k_eval picks epochs / trees and the variant
    # --- MLP variants (seed, mlp_features)
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # MLP widths before the output unit
    dropout: float = 0.3             # dropout after each hidden layer
    emb_dim: int = 32                # seed: user / genre / year / tag embedding size
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


# ---------------------------------------------------------------- ranking helpers
def order_topk(cands: pd.DataFrame, scores: np.ndarray, users: np.ndarray, k_keep: int = 10) -> np.ndarray:
    """Each user's ``k_keep`` best candidates by ``scores`` (ties: better retriever rank first):
    (len(users), k_keep) item ids in the order of ``users``, padded with -1. Candidates of users
    not in ``users`` are ignored."""
    users = np.asarray(users, dtype=np.int64)
    u = cands["user"].to_numpy(np.int64)
    it = cands["item"].to_numpy(np.int64)
    tie = cands["retriever_rank"].to_numpy(np.int64) if "retriever_rank" in cands else it
    order = np.lexsort((tie, -np.asarray(scores, dtype=np.float64), u))
    u, it = u[order], it[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1] if len(u) else np.zeros(0, np.int64)
    pos = np.arange(len(u)) - np.repeat(starts, np.diff(np.r_[starts, len(u)]))
    sorter = np.argsort(users, kind="stable")
    where = np.searchsorted(users, u, sorter=sorter).clip(0, max(len(users) - 1, 0))
    row = sorter[where] if len(users) else where
    keep = (pos < k_keep) & (len(users) > 0) & (users[row] == u if len(users) else False)
    out = np.full((len(users), k_keep), -1, dtype=np.int64)
    out[row[keep], pos[keep]] = it[keep]
    return out


def retriever_order(cands: pd.DataFrame, users: np.ndarray, k_keep: int = 10) -> np.ndarray:
    """The retriever's own ordering of the candidates, in ``order_topk``'s format."""
    return order_topk(cands, -cands["retriever_rank"].to_numpy(np.float64), users, k_keep)


def subset_labels(labels: ev.Labels, users: np.ndarray) -> ev.Labels:
    """The Labels of a subset of ``labels.users`` (same period, context and positives)."""
    idx = np.searchsorted(labels.users, users)
    if not np.array_equal(labels.users[idx.clip(0, len(labels.users) - 1)], users):
        raise ValueError("users must be a subset of labels.users")
    return ev.Labels(period=labels.period, users=np.asarray(users), positives=labels.positives[idx].tocsr(),
                     ctx=labels.ctx, n_items=labels.n_items)


def ndcg_of(topk: np.ndarray, labels: ev.Labels, k: int = 10) -> float:
    """Mean protocol nDCG@k of ranked lists (rows aligned with ``labels.users``)."""
    res = ev.evaluate_ranking(topk, labels, ks=(k,), keep=k)
    return float(res.per_user[f"ndcg@{k}"].mean()) if len(labels.users) else 0.0


def split_users(users: np.ndarray, held_out_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train users, held-out users), both sorted; a fixed-seed permutation of ``users``."""
    users = np.asarray(users)
    perm = np.random.default_rng(seed).permutation(len(users))
    n_held = int(round(held_out_share * len(users)))
    if len(users) >= 2:
        n_held = min(max(n_held, 1), len(users) - 1)
    return np.sort(users[perm[n_held:]]), np.sort(users[perm[:n_held]])


def fold_users(users: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint sorted user sets covering ``users`` (a fixed-seed permutation cut into
    near-equal parts): the cross-fitting folds of `tune`."""
    users = np.asarray(users)
    if folds < 2 or folds > len(users):
        raise ValueError(f"need 2 <= folds <= {len(users)} users, got folds={folds}")
    perm = np.random.default_rng(seed).permutation(len(users))
    return [np.sort(users[part]) for part in np.array_split(perm, folds)]


def per_user_zscore(users: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Scores standardised within each user's candidate list (mean 0, std 1; a constant list -> 0)."""
    users = np.asarray(users)
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return scores.copy()
    _, inv = np.unique(users, return_inverse=True)
    n = np.bincount(inv).astype(np.float64)
    mean = np.bincount(inv, scores) / n
    dev = scores - mean[inv]
    sd = np.sqrt(np.bincount(inv, dev * dev) / n)
    sd[sd < 1e-12] = 1.0
    return dev / sd[inv]


def candidate_labels(cands: pd.DataFrame, labels: ev.Labels) -> np.ndarray:
    """(n_rows,) 1 where the candidate is a positive of ``labels`` (users outside labels: 0)."""
    pos = labels.positives.tocoo()
    n = labels.n_items
    keys = np.unique(labels.users[pos.row].astype(np.int64) * n + pos.col)
    q = cands["user"].to_numpy(np.int64) * n + cands["item"].to_numpy(np.int64)
    if len(keys) == 0:
        return np.zeros(len(q), np.float32)
    at = np.searchsorted(keys, q).clip(0, len(keys) - 1)
    return (keys[at] == q).astype(np.float32)


# ---------------------------------------------------------------- networks
def _mlp(in_dim: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = h
    layers.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*layers)


class SeedNet(nn.Module):
    """The seed design: [user emb, frozen retriever item emb, genre, year, tag emb] -> MLP."""

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
        self.mlp = _mlp(4 * emb_dim + item_dim, hidden, dropout)

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
        self.mlp = _mlp(n_features + item_dim + user_dim, hidden, dropout)

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


# ---------------------------------------------------------------- the model
class Reranker:
    """A fitted re-ranker of one variant: ``score(cands, X, user_emb)`` -> (n_rows,) scores."""

    def __init__(self, cfg: RerankerConfig, feature_names: list[str] | None = None,
                 net: nn.Module | None = None, booster_str: str | None = None, init: dict | None = None):
        self.cfg = cfg
        self.feature_names = list(feature_names or [])
        self.net = net
        self.booster_str = booster_str
        self.init = init or {}
        self._booster = None
        self.info: dict = {}

    @property
    def variant(self) -> str:
        return self.cfg.variant

    @property
    def label(self) -> str:
        return self.cfg.label

    @property
    def needs_user_emb(self) -> bool:
        return self.variant == "mlp_features" and self.init.get("user_dim", 0) > 0

    def _check_X(self, X: np.ndarray | None, n_rows: int) -> None:
        if self.variant == "seed":
            return
        if X is None or X.shape != (n_rows, len(self.feature_names)):
            raise ValueError(f"{self.variant} re-ranker needs X of shape ({n_rows}, {len(self.feature_names)}) "
                             f"with columns {self.feature_names}; got {None if X is None else X.shape}")

    @torch.no_grad()
    def score(self, cands: pd.DataFrame, X: np.ndarray | None = None, user_emb: np.ndarray | None = None,
              feature_names: list[str] | None = None, chunk: int = 65_536) -> np.ndarray:
        """Scores of candidate rows (higher is better). ``user_emb`` is the (n_users, D) frozen
        retriever user table for the scored period's context (mlp_features only:
        `rerank_features.retriever_user_table`)."""
        if feature_names is not None and list(feature_names) != self.feature_names and self.variant != "seed":
            raise ValueError(f"feature columns differ from training: {feature_names} vs {self.feature_names}")
        self._check_X(X, len(cands))
        if self.variant == "lgbm":
            if self._booster is None:
                import lightgbm as lgb
                self._booster = lgb.Booster(model_str=self.booster_str)
            return self._booster.predict(X, num_threads=self.cfg.num_threads).astype(np.float64)
        if self.needs_user_emb and user_emb is None:
            raise ValueError("mlp_features needs user_emb=rerank_features.retriever_user_table(retriever, "
                             "users, ctx, n_users) for the scored period's context")
        self.net.eval()
        u = torch.from_numpy(np.array(cands["user"], dtype=np.int64))
        it = torch.from_numpy(np.array(cands["item"], dtype=np.int64))
        ue = torch.as_tensor(np.asarray(user_emb, np.float32)) if user_emb is not None else None
        out = np.empty(len(cands), np.float64)
        for s in range(0, len(cands), chunk):
            sl = slice(s, s + chunk)
            x = torch.from_numpy(np.ascontiguousarray(X[sl])) if X is not None and self.variant != "seed" else None
            out[sl] = self.net(u[sl], it[sl], x, ue[u[sl]] if ue is not None else None).numpy()
        return out

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """MLPs: a torch checkpoint (train.save_checkpoint); lgbm: JSON with the booster's model string."""
        path = Path(path)
        if self.variant == "lgbm":
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"kind": "reranker_lgbm", "config": asdict(self.cfg),
                                       "feature_names": self.feature_names, "info": self.info,
                                       "model_str": self.booster_str}))
            tmp.replace(path)
            return path
        return save_checkpoint(path, self.net, self.cfg, kind="reranker_mlp", init=self.init,
                               feature_names=self.feature_names, info=self.info)

    def to_blob(self) -> dict:
        """Everything needed to rebuild the model, as one picklable dict (ensemble members)."""
        blob = {"config": asdict(self.cfg), "feature_names": self.feature_names, "info": self.info}
        if self.variant == "lgbm":
            return {"kind": "reranker_lgbm", "model_str": self.booster_str, **blob}
        return {"kind": "reranker_mlp", "init": self.init, "state_dict": self.net.state_dict(), **blob}

    @classmethod
    def from_blob(cls, blob: dict) -> "Reranker":
        cfg = RerankerConfig(**blob["config"])
        if blob.get("kind") == "reranker_lgbm" or "model_str" in blob:
            model = cls(cfg, blob["feature_names"], booster_str=blob["model_str"])
        else:
            net = _build_net(cfg, blob["init"])
            net.load_state_dict(blob["state_dict"])
            net.eval()
            model = cls(cfg, blob["feature_names"], net=net, init=blob["init"])
        model.info = blob.get("info", {})
        return model

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Reranker | RerankerEnsemble":
        """A saved re-ranker; a file written by `RerankerEnsemble.save` loads as that ensemble
        (so code that globs ``reranker_*.pt`` keeps working with cross-fitting)."""
        path = Path(path)
        with open(path, "rb") as fh:
            first = fh.read(1)
        if first == b"{":
            return cls.from_blob(json.loads(path.read_text()))
        blob = load_checkpoint(path)
        if blob.get("kind") == "reranker_ensemble":
            return RerankerEnsemble.from_blob(blob)
        return cls.from_blob(blob)


def load(path: str | os.PathLike) -> "Reranker | RerankerEnsemble":
    """Load a re-ranker saved by `Reranker.save` or `RerankerEnsemble.save`."""
    return Reranker.load(path)


class RerankerEnsemble:
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

    def __init__(self, cfg: RerankerConfig, members: list[Reranker], fold_users: list[np.ndarray],
                 info: dict | None = None):
        if len(members) != len(fold_users) or len(members) < 2:
            raise ValueError("an ensemble needs one member per fold and at least 2 folds")
        self.cfg = cfg
        self.members = list(members)
        self.fold_users = [np.sort(np.asarray(f, dtype=np.int64)) for f in fold_users]
        self.info: dict = info or {}

    @property
    def variant(self) -> str:
        return self.cfg.variant

    @property
    def label(self) -> str:
        return self.cfg.label

    @property
    def feature_names(self) -> list[str]:
        return self.members[0].feature_names

    @property
    def needs_user_emb(self) -> bool:
        return any(m.needs_user_emb for m in self.members)

    @property
    def folds(self) -> int:
        return len(self.members)

    def score(self, cands: pd.DataFrame, X: np.ndarray | None = None, user_emb: np.ndarray | None = None,
              feature_names: list[str] | None = None, members: Sequence[int] | None = None) -> np.ndarray:
        """Mean of the members' per-user standardised scores (all members, or those listed)."""
        idx = range(len(self.members)) if members is None else members
        users = cands["user"].to_numpy(np.int64)
        out = np.zeros(len(cands), np.float64)
        for j in idx:
            out += per_user_zscore(users, self.members[j].score(cands, X, user_emb, feature_names))
        return out / max(len(idx), 1)

    def fold_of(self, users: np.ndarray) -> np.ndarray:
        """The fold index of each user (-1: in no fold, i.e. not a validation user it was fit on)."""
        users = np.asarray(users, dtype=np.int64)
        out = np.full(len(users), -1, np.int64)
        for k, f in enumerate(self.fold_users):
            out[np.isin(users, f)] = k
        return out

    # ------------------------------------------------------------ persistence
    def to_blob(self) -> dict:
        return {"kind": "reranker_ensemble", "config": asdict(self.cfg), "info": self.info,
                "fold_users": [f.tolist() for f in self.fold_users],
                "members": [m.to_blob() for m in self.members]}

    @classmethod
    def from_blob(cls, blob: dict) -> "RerankerEnsemble":
        return cls(RerankerConfig(**blob["config"]), [Reranker.from_blob(b) for b in blob["members"]],
                   [np.asarray(f, dtype=np.int64) for f in blob["fold_users"]], blob.get("info", {}))

    def save(self, path: str | os.PathLike) -> Path:
        """One torch file with the K members (lgbm: model strings; MLPs: state dicts)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.to_blob(), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RerankerEnsemble":
        model = Reranker.load(path)
        if not isinstance(model, cls):
            raise ValueError(f"{path} holds a single re-ranker, not an ensemble")
        return model


def _build_net(cfg: RerankerConfig, init: dict) -> nn.Module:
    if cfg.variant == "seed":
        return SeedNet(init["n_users"], init["n_items"], init["item_dim"], init["n_genres"], init["g_slots"],
                       init["n_years"], init["n_tags"], init["t_slots"], cfg.emb_dim, cfg.hidden, cfg.dropout)
    return FeatureNet(init["n_features"], init["n_items"], init["item_dim"], init["user_dim"], cfg.hidden,
                      cfg.dropout)


# ---------------------------------------------------------------- fitting
@dataclass
class ExtraLists:
    """Training lists from outside the validation period: the label window's candidates (proposed
    and scored by stage-1 models refit on the train rows before the window), their features (same
    columns as the validation features) and labels (window positives). The lgbm variant adds them
    to every fit's training groups, less the lists of the users that fit is early-stopped and
    scored on (PROTOCOL.md: held-out validation users are never in its training lists)."""

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
    """Candidate rows sorted by (user, retriever rank), with labels and the user split."""

    cands: pd.DataFrame
    X: np.ndarray | None
    y: np.ndarray
    train_rows: np.ndarray      # rows of train users
    held_rows: np.ndarray       # rows of held-out users
    train_users: np.ndarray
    held_users: np.ndarray
    held_labels: ev.Labels


def _prepare(cands: pd.DataFrame, X: np.ndarray | None, labels: ev.Labels, cfg: RerankerConfig,
             train_users: np.ndarray | None = None, held_users: np.ndarray | None = None) -> _Prepared:
    if X is not None and len(X) != len(cands):
        raise ValueError(f"X has {len(X)} rows for {len(cands)} candidates")
    order = np.lexsort((cands["retriever_rank"].to_numpy(), cands["user"].to_numpy()))
    c = cands.iloc[order].reset_index(drop=True)
    Xs = X[order] if X is not None else None
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
    return _Prepared(cands=c, X=Xs, y=y, train_rows=np.flatnonzero(np.isin(u, tr_users)),
                     held_rows=np.flatnonzero(np.isin(u, ho_users)), train_users=tr_users,
                     held_users=ho_users, held_labels=subset_labels(labels, ho_users))


def _held_out_metric(model: Reranker, p: _Prepared, user_emb) -> float:
    rows = p.held_rows
    sub = p.cands.iloc[rows]
    scores = model.score(sub, p.X[rows] if p.X is not None else None, user_emb)
    return ndcg_of(order_topk(sub, scores, p.held_users, model.cfg.k_eval), p.held_labels, model.cfg.k_eval)


def _bpr_batches(p: _Prepared, cfg: RerankerConfig, gen: torch.Generator, rng: np.random.Generator):
    """Per epoch: (pos rows (B,), neg rows (B, n_neg)) with negatives from the same user's candidates."""
    rows = p.train_rows
    u = p.cands["user"].to_numpy(np.int64)[rows]
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
    u = p.cands["user"].to_numpy(np.int64)[rows]
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


def fit_reranker(cfg: RerankerConfig, cands: pd.DataFrame, X: np.ndarray | None, feature_names: list[str] | None,
                 labels: ev.Labels, data, retriever=None, user_emb: np.ndarray | None = None,
                 progress: bool = False, train_users: np.ndarray | None = None,
                 held_users: np.ndarray | None = None, extra: ExtraLists | None = None) -> Reranker:
    """Fit one variant on the train users' validation candidates; early-stop on the held-out users.

    The users are ``cfg``'s fixed-seed split (``held_out_share``) unless ``train_users`` and
    ``held_users`` are given (cross-fitting: the other folds, and this fold).
    ``info["trained_users"]`` lists the users whose candidates the fit actually learnt from
    (train users with a positive among their candidates). ``extra`` (the label window's lists)
    joins the lgbm variant's training groups; the MLP variants learn from validation lists only.

    ``labels``: `evaluate.Labels` of "valid", built outside the fitting context. ``data``: the
    SplitData (item side features, sizes). ``retriever``: the frozen retriever (its
    ``item_embeddings()``; ``user_embeddings`` for mlp_features unless ``user_emb`` is given).
    The returned model's ``info`` holds the held-out nDCG@k, fit seconds and best epoch/round.
    """
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown re-ranker variant {cfg.variant!r}; one of {VARIANTS}")
    if labels.period != "valid":
        raise ValueError(f"the re-ranker learns from validation candidates, got labels of {labels.period!r}")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    p = _prepare(cands, X, labels, cfg, train_users, held_users)
    if cfg.variant == "lgbm":
        model = _fit_lgbm(cfg, p, feature_names, extra)
    else:
        model = _fit_mlp(cfg, p, feature_names, data, retriever, user_emb, labels, progress)
    model.info.update(held_out_ndcg=_held_out_metric(model, p, model.info.pop("_user_emb", None)),
                      fit_seconds=time.perf_counter() - t0, train_users=int(len(p.train_users)),
                      held_out_users=int(len(p.held_users)), train_rows=int(len(p.train_rows)),
                      train_positives=int(p.y[p.train_rows].sum()))
    return model


def _fit_mlp(cfg, p: _Prepared, feature_names, data, retriever, user_emb, labels, progress) -> Reranker:
    item_tab = np.zeros((data.n_items, 0), np.float32)
    if retriever is not None:
        item_tab = rf._as_np(retriever.item_embeddings()).astype(np.float32)
    item_t, _ = _scaled(item_tab)
    if cfg.variant == "seed":
        f = data.item_features
        if f is None:
            raise ValueError("the seed re-ranker needs item features (genres, year, tags)")
        init = dict(n_users=data.n_users, n_items=data.n_items, item_dim=item_tab.shape[1],
                    n_genres=f.n_genres, g_slots=f.genres.shape[1], n_years=f.n_years, n_tags=f.n_tags,
                    t_slots=f.tags.shape[1])
        net = _build_net(cfg, init)
        net.item_emb.copy_(item_t)
        net.genres.copy_(f.genres)
        net.year.copy_(f.year)
        net.tags.copy_(f.tags)
        user_emb = None
    else:
        if p.X is None:
            raise ValueError("mlp_features needs the feature matrix X")
        if retriever is not None and user_emb is None:
            user_emb = rf.retriever_user_table(retriever, labels.users, labels.ctx, data.n_users)
        user_dim = user_emb.shape[1] if (user_emb is not None and item_tab.shape[1]) else 0
        if user_dim == 0:
            user_emb = None
        init = dict(n_features=p.X.shape[1], n_items=data.n_items, item_dim=item_tab.shape[1] if user_dim else 0,
                    user_dim=user_dim)
        net = _build_net(cfg, init)
        xt = p.X[p.train_rows].astype(np.float64)
        net.mean.copy_(torch.from_numpy(xt.mean(axis=0)).float())
        net.std.copy_(torch.from_numpy(np.where(xt.std(axis=0) > 1e-6, xt.std(axis=0), 1.0)).float())
        if user_dim:
            net.item_emb.copy_(item_t)
            net.user_scale.fill_(float(np.std(user_emb[p.train_users])) or 1.0)
    model = Reranker(cfg, feature_names, net=net, init=init)
    n_params = sum(q.numel() for q in net.parameters() if q.requires_grad)
    print(f"reranker[{cfg.label}]: {n_params:,} parameters", flush=True)

    Xt = torch.from_numpy(p.X) if p.X is not None else None
    U = torch.from_numpy(np.array(p.cands["user"], dtype=np.int64))
    I = torch.from_numpy(np.array(p.cands["item"], dtype=np.int64))
    UE = torch.as_tensor(user_emb, dtype=torch.float32) if user_emb is not None else None

    def forward(m, rows: torch.Tensor) -> torch.Tensor:         # rows: any shape of row indices
        flat = rows.reshape(-1)
        out = m(U[flat], I[flat], Xt[flat] if Xt is not None else None,
                UE[U[flat]] if UE is not None else None)
        return out.reshape(rows.shape)

    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.loss == "bpr" or cfg.variant == "seed":
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
    hist = fit_loop(net, batches, loss_fn, opt, loop, validate=lambda: _held_out_metric(model, p, user_emb),
                    name=f"reranker[{cfg.label}]")
    model.info.update(best_epoch=hist.best_epoch, epochs_run=len(hist.records), _user_emb=user_emb,
                      trained_users=[int(x) for x in trained],
                      loss_history=[r["loss"] for r in hist.records],
                      held_out_history=[r.get("valid_metric") for r in hist.records])
    return model


def _fit_lgbm(cfg: RerankerConfig, p: _Prepared, feature_names, extra: ExtraLists | None = None) -> Reranker:
    import lightgbm as lgb
    if p.X is None:
        raise ValueError("lgbm needs the feature matrix X")
    u = p.cands["user"].to_numpy(np.int64)
    # train groups: train users with at least one positive among their candidates
    tr = p.train_rows
    uniq, start, count = np.unique(u[tr], return_index=True, return_counts=True)
    has_pos = np.add.reduceat(p.y[tr], start) > 0 if len(tr) else np.zeros(0, bool)
    tr = tr[np.repeat(has_pos, count)]
    group = count[has_pos]
    if len(tr) == 0:
        raise ValueError("no training positives inside the train users' candidates")
    ho = p.held_rows
    _, ho_count = np.unique(u[ho], return_counts=True)
    held = p.cands.iloc[ho]

    def protocol_ndcg(preds, eval_data):                # eval rows are the held-out rows, in order
        top = order_topk(held, preds, p.held_users, cfg.k_eval)
        return f"protocol_ndcg@{cfg.k_eval}", ndcg_of(top, p.held_labels, cfg.k_eval), True

    params = dict(objective="lambdarank", metric="None", learning_rate=cfg.learning_rate,
                  num_leaves=cfg.num_leaves, min_data_in_leaf=cfg.min_child_samples, seed=cfg.seed,
                  deterministic=True, force_row_wise=True, num_threads=cfg.num_threads, verbose=-1)
    X_train, y_train, n_extra = p.X[tr], p.y[tr], 0
    if extra is not None:                             # label-window lists, less the held-out users'
        rows, sizes = extra.groups(p.held_users)
        X_train = np.concatenate([X_train, extra.X[rows]])
        y_train = np.concatenate([y_train, extra.y[rows]])
        group = np.concatenate([group, sizes])
        n_extra = len(sizes)
    train_set = lgb.Dataset(X_train, label=y_train.astype(np.int32), group=group,
                            feature_name=list(feature_names) if feature_names else "auto", free_raw_data=False)
    valid_set = lgb.Dataset(p.X[ho], label=p.y[ho].astype(np.int32), group=ho_count, reference=train_set)
    booster = lgb.train(params, train_set, num_boost_round=cfg.n_estimators, valid_sets=[valid_set],
                        valid_names=["held_out"], feval=protocol_ndcg,
                        callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)])
    best = int(booster.best_iteration or booster.current_iteration())
    model = Reranker(cfg, feature_names, booster_str=booster.model_to_string(num_iteration=best))
    model.info.update(best_iteration=best, trained_users=[int(x) for x in uniq[has_pos]],
                      extra_lists=int(n_extra))
    return model


# ---------------------------------------------------------------- public helpers
def rerank(model: "Reranker | RerankerEnsemble", cands: pd.DataFrame, X: np.ndarray | None, users: np.ndarray, k_keep: int = 10,
           user_emb: np.ndarray | None = None) -> np.ndarray:
    """(len(users), k_keep) each user's top items after re-ranking, in the order of ``users``
    (e.g. ``labels.users``), padded with -1 for users with fewer candidates."""
    return order_topk(cands, model.score(cands, X, user_emb), users, k_keep)


def _rank_by_fold(model: "RerankerEnsemble", cands: pd.DataFrame, X: np.ndarray | None, users: np.ndarray,
                  k_keep: int, user_emb: np.ndarray | None, out_of_fold: bool) -> np.ndarray:
    users = np.asarray(users, dtype=np.int64)
    fold = model.fold_of(users)
    if (fold < 0).any():
        raise ValueError(f"{int((fold < 0).sum())} users are in no fold of this ensemble (only the "
                         "validation users it was cross-fitted on have an out-of-fold / in-fold model)")
    out = np.full((len(users), k_keep), -1, dtype=np.int64)
    cu = cands["user"].to_numpy(np.int64)
    for k in range(model.folds):
        sel = fold == k
        if not sel.any():
            continue
        uk = users[sel]
        rows = np.flatnonzero(np.isin(cu, uk))
        sub = cands.iloc[rows]
        Xs = X[rows] if X is not None else None
        if out_of_fold:
            scores = model.members[k].score(sub, Xs, user_emb)
        else:
            scores = model.score(sub, Xs, user_emb, members=[j for j in range(model.folds) if j != k])
        out[sel] = order_topk(sub, scores, uk, k_keep)
    return out


def out_of_fold_topk(model: "RerankerEnsemble", cands: pd.DataFrame, X: np.ndarray | None, users: np.ndarray,
                     k_keep: int = 10, user_emb: np.ndarray | None = None) -> np.ndarray:
    """(len(users), k_keep) top lists of validation users, each user ranked by the one member
    that never trained on them (its fold's model): the honest validation ranking."""
    return _rank_by_fold(model, cands, X, users, k_keep, user_emb, out_of_fold=True)


def in_fold_topk(model: "RerankerEnsemble", cands: pd.DataFrame, X: np.ndarray | None, users: np.ndarray,
                 k_keep: int = 10, user_emb: np.ndarray | None = None) -> np.ndarray:
    """Like `out_of_fold_topk`, but each user ranked by the members that DID train on them
    (mean of their per-user standardised scores): the optimistic, leaky number."""
    return _rank_by_fold(model, cands, X, users, k_keep, user_emb, out_of_fold=False)


def _fold_stats(per_user: np.ndarray, users: np.ndarray, parts: list[np.ndarray]) -> tuple[list[float], float, float]:
    fold = [float(per_user[np.isin(users, f)].mean()) if len(f) else 0.0 for f in parts]
    return fold, float(np.mean(fold)), float(np.std(fold, ddof=1)) if len(fold) > 1 else 0.0


def fit_cross(cfg: RerankerConfig, cands: pd.DataFrame, X: np.ndarray | None, feature_names: list[str] | None,
              labels: ev.Labels, data, retriever=None, user_emb: np.ndarray | None = None,
              progress: bool = False, extra: ExtraLists | None = None) -> RerankerEnsemble:
    """Cross-fit one variant: ``cfg.folds`` fixed-seed folds of the validation users; member k
    trains on the other folds' users and early-stops on fold k's. ``info["held_out_ndcg"]`` is
    the protocol nDCG@k_eval of the out-of-fold rankings over *all* validation users (full
    ``labels``: a positive the retriever missed is a miss); ``fold_ndcg`` its per-fold means."""
    K = int(cfg.folds)
    parts = fold_users(labels.users, K, cfg.seed)
    if cfg.variant == "mlp_features" and user_emb is None and retriever is not None:
        user_emb = rf.retriever_user_table(retriever, labels.users, labels.ctx, data.n_users)
    members = []
    for k, held in enumerate(parts):
        train = np.sort(np.concatenate([f for j, f in enumerate(parts) if j != k]))
        if progress:
            print(f"reranker[{cfg.label}]: fold {k + 1}/{K} ({len(train)} train users, {len(held)} held out)",
                  flush=True)
        m = fit_reranker(cfg, cands, X, feature_names, labels, data, retriever, user_emb, progress,
                         train_users=train, held_users=held, extra=extra)
        m.info["fold"] = k
        members.append(m)
    ens = RerankerEnsemble(replace(cfg, held_out_share=1.0 / K), members, parts)
    kk = cfg.k_eval
    top = out_of_fold_topk(ens, cands, X, labels.users, kk, user_emb)
    per_user = ev.evaluate_ranking(top, labels, ks=(kk,), keep=kk).per_user[f"ndcg@{kk}"]
    fold, mean, std = _fold_stats(per_user, labels.users, parts)
    ens.info.update(held_out_ndcg=float(per_user.mean()) if len(per_user) else 0.0, fold_ndcg=fold,
                    fold_ndcg_mean=mean, fold_ndcg_std=std, folds=K,
                    fit_seconds=float(sum(m.info["fit_seconds"] for m in members)),
                    best_epoch_or_round=[m.info.get("best_epoch", m.info.get("best_iteration")) for m in members],
                    held_out_users=int(len(labels.users)),
                    train_users=[m.info["train_users"] for m in members],
                    extra_lists=[m.info.get("extra_lists", 0) for m in members])
    return ens


def tune(section: dict, cands: pd.DataFrame, X: np.ndarray | None, feature_names: list[str] | None,
         labels: ev.Labels, data, retriever=None, user_emb: np.ndarray | None = None, seed: int = 42,
         progress: bool = False, return_all: bool = False, extra: ExtraLists | None = None):
    """Fit every variant of ``section["variants"]`` (the params ``reranker:`` section) on the same
    user split; keep the best by held-out nDCG@k. With ``folds`` > 1 every variant is cross-fitted
    on the same folds (`fit_cross`), models are `RerankerEnsemble`, ``held_out_ndcg`` is the
    out-of-fold nDCG@k over all validation users, and the table adds the per-fold mean and std.
    Returns (best model, table with one row per
    variant plus the retriever's own ordering of the same candidates), and with ``return_all``
    also a dict variant -> fitted model (so the report can show every variant on test while the
    choice stays the held-out users')."""
    variants = list(section.get("variants", VARIANTS))
    base = RerankerConfig.from_params(section, variants[0], seed)
    k = base.k_eval
    if base.folds > 1:
        parts = fold_users(labels.users, base.folds, base.seed)
        per_user = ev.evaluate_ranking(retriever_order(cands, labels.users, k), labels, ks=(k,),
                                       keep=k).per_user[f"ndcg@{k}"]
        fold, mean, std = _fold_stats(per_user, labels.users, parts)
        first = {"variant": RETRIEVER_ORDER, "held_out_ndcg": float(per_user.mean()) if len(per_user) else 0.0,
                 "fold_ndcg_mean": mean, "fold_ndcg_std": std, "folds": base.folds}
        fit = fit_cross

        def stats(m) -> dict:
            return {"fold_ndcg_mean": m.info["fold_ndcg_mean"], "fold_ndcg_std": m.info["fold_ndcg_std"],
                    "folds": m.folds}
    else:
        p = _prepare(cands, X, labels, base)
        first = {"variant": RETRIEVER_ORDER, "held_out_ndcg": ndcg_of(
            retriever_order(p.cands.iloc[p.held_rows], p.held_users, k), p.held_labels, k)}
        fit = fit_reranker

        def stats(m) -> dict:
            return {}
    rows = [{**first, "fit_seconds": 0.0}]
    models = {}
    for v in variants:
        cfg = RerankerConfig.from_params(section, v, seed)
        model = fit(cfg, cands, X, feature_names, labels, data, retriever, user_emb, progress, extra=extra)
        models[cfg.label] = model
        rows.append({"variant": cfg.label, "held_out_ndcg": model.info["held_out_ndcg"], **stats(model),
                     "fit_seconds": model.info["fit_seconds"],
                     "window_lists": model.info.get("extra_lists", 0),
                     "best_epoch_or_round": model.info.get("best_epoch_or_round", model.info.get(
                         "best_epoch", model.info.get("best_iteration")))})
    best = max(models.values(), key=lambda m: m.info["held_out_ndcg"])   # the first on ties
    table = pd.DataFrame(rows)
    table["chosen"] = table["variant"] == best.label
    return (best, table, models) if return_all else (best, table)
