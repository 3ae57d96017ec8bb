"""What a re-ranker learns from and scores: one period's candidate lists with their features.

Everything a re-ranker fits on or scores comes in one `StageInputs` (candidates, features, their
names, the period's labels and the frozen retriever user table), built before the fit. A fit
sees them `prepare`d: sorted by (user, retriever rank), labelled, and split into the users it
trains on and those it is early-stopped on. The label window's lists (`WindowLists`) are extra
training lists from outside the validation period (docs/PROTOCOL.md, "Who learns from what").
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from ..protocol import evaluate as ev
from .ranking import candidate_labels, ndcg_of, order_topk, subset_labels


@dataclass
class StageInputs:
    """The one input of the second stage: one period's candidates and what is known about them.

    Built by `system.stage_inputs` (and by tests) before any fit; every fit, score and ranking
    of stage 2 takes it whole, so no function needs to be told which array goes with which."""

    labels: ev.Labels                # the period's scored users, positives and scoring context
    cands: pd.DataFrame              # user, item, retriever_score, retriever_rank[, <source>_rank...]
    X: np.ndarray | None             # (n_rows, F) float32 production features (stage2.features)
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
class WindowLists:
    """Training lists from outside the validation period: the label window's candidates (proposed
    and scored by stage-1 models refit on the train rows before the window), their features (same
    columns as the validation features) and labels (window positives). The lgbm kind adds them
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
class Prepared:
    """The inputs sorted by (user, retriever rank), with labels and the user split of one fit."""

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


def prepare(inputs: StageInputs, train_users: np.ndarray, held_users: np.ndarray) -> Prepared:
    """``inputs`` sorted and labelled, with the rows of the users a fit trains on and of those it
    is early-stopped on (disjoint sets of the period's scored users; ``held_users`` may be empty)."""
    cands, X, labels = inputs.cands, inputs.X, inputs.labels
    if X is not None and len(X) != len(cands):
        raise ValueError(f"X has {len(X)} rows for {len(cands)} candidates")
    order = np.lexsort((cands["retriever_rank"].to_numpy(), cands["user"].to_numpy()))
    c = cands.iloc[order].reset_index(drop=True)
    sorted_inputs = replace(inputs, cands=c, X=X[order] if X is not None else None)
    y = candidate_labels(c, labels)
    tr_users, ho_users = np.sort(np.asarray(train_users)), np.sort(np.asarray(held_users))
    if np.isin(tr_users, ho_users).any():
        raise ValueError("train and held-out users overlap")
    if not np.isin(np.r_[tr_users, ho_users], labels.users).all():
        raise ValueError("train and held-out users must be validation users (labels.users)")
    u = c["user"].to_numpy(np.int64)
    return Prepared(inputs=sorted_inputs, y=y, train_rows=np.flatnonzero(np.isin(u, tr_users)),
                    held_rows=np.flatnonzero(np.isin(u, ho_users)), train_users=tr_users,
                    held_users=ho_users, held_labels=subset_labels(labels, ho_users))


def held_out_ndcg(model, p: Prepared) -> float:
    """The protocol's nDCG@k_eval of ``model``'s re-ranking of the held-out users' lists: the
    early-stopping metric of one fit."""
    held = p.held
    top = order_topk(held.cands, model.score(held), p.held_users, model.cfg.k_eval)
    return ndcg_of(top, p.held_labels, model.cfg.k_eval)
