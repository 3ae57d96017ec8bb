"""A cross-fitted variant: its K fold models, scored as one."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..inputs import StageInputs
from ..ranking import per_user_zscore
from .base import Reranker
from .config import RerankerConfig


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
