"""The ``lgbm`` kind: LightGBM LambdaRank on the production features, grouped by user,
early-stopped on the held-out users' protocol nDCG@10; deterministic."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ...config import lgbm_threads
from .. import features as rf
from ..inputs import Prepared, StageInputs, WindowLists
from ..ranking import RepeatedTopK, ndcg_of
from .base import Reranker
from .config import LGBMConfig


class LGBMReranker(Reranker):
    """``lgbm``: LightGBM LambdaRank over the production features, grouped by user."""

    kind = "lgbm"

    def __init__(self, cfg: LGBMConfig, feature_names: list[str] | None, booster_str: str,
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
        return self._booster.predict(X, num_threads=lgbm_threads(self.cfg.num_threads)).astype(np.float64)

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
    def _from_state(cls, cfg: LGBMConfig, blob: dict) -> "LGBMReranker":
        return cls(cfg, blob["feature_names"], blob["model_str"])

    @classmethod
    def fit(cls, cfg: LGBMConfig, p: Prepared, data=None, retriever=None, progress: bool = False,
            window: WindowLists | None = None) -> "LGBMReranker":
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
                      deterministic=True, force_row_wise=True, num_threads=lgbm_threads(cfg.num_threads), verbose=-1)
        X_train, y_train, n_window = X[tr], p.y[tr], 0
        if window is not None:                            # label-window lists, less the held-out users'
            rows, sizes = window.groups(p.held_users)
            X_train = np.concatenate([X_train, window.X[rows][:, used]])
            y_train = np.concatenate([y_train, window.y[rows]])
            group = np.concatenate([group, sizes])
            n_window = len(sizes)
        train_set = lgb.Dataset(X_train, label=y_train.astype(np.int32), group=group,
                                feature_name=list(names) if names else "auto", free_raw_data=False)
        valid_set = lgb.Dataset(X[ho], label=p.y[ho].astype(np.int32), group=ho_count, reference=train_set)
        booster = lgb.train(params, train_set, num_boost_round=cfg.n_estimators, valid_sets=[valid_set],
                            valid_names=["held_out"], feval=protocol_ndcg,
                            callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)])
        best = int(booster.best_iteration or booster.current_iteration())
        model = cls(cfg, all_names, booster.model_to_string(num_iteration=best))
        model.info.update(best_iteration=best, trained_users=[int(x) for x in uniq[has_pos]],
                          window_lists=int(n_window))
        return model
