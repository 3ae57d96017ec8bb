"""Choosing the re-ranker on validation users it never trained on: cross-fitting.

``reranker.folds`` = K >= 2 fixed-seed folds of the validation users; for each fold k a member is
fit on the other folds' users and early-stopped on fold k's. A variant's score is the nDCG@10 of
the *out-of-fold* rankings over all validation users (each ranked by the member that never
trained on them); the best is chosen. The final model (`RerankerEnsemble`) averages its K
members' per-user standardised scores, so every validation user's data shapes it, while no
validation score ever comes from a model trained on the user scored. Test rows are never read
here; fit inside ``guard.fitting("reranker", allow=("train", "valid"))``.

`topk` turns scores into each user's top list (padding -1, which never hits); `out_of_fold_topk`
/ `in_fold_topk` rank validation users with an ensemble's members that did not / did train on
them (`system.out_of_fold_ranked` / `in_fold_ranked` score those lists under the protocol).
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from . import features as rf
from .inputs import StageInputs, WindowLists, held_out_ndcg, prepare
from .ranking import RETRIEVER_ORDER, fold_users, ndcg_per_user, order_topk, retriever_order
from .rerankers import RERANKERS, Reranker, RerankerConfig, RerankerEnsemble, from_params
from .section import RerankerSection


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
                 train_users: np.ndarray, held_users: np.ndarray,
                 window: WindowLists | None = None, progress: bool = False) -> Reranker:
    """Fit one variant on ``train_users``' validation candidates; early-stop on ``held_users``'
    (none: every epoch runs, as the leakage audit's design-as-run does).

    ``info["trained_users"]`` lists the users whose candidates the fit actually learnt from
    (train users with a positive among their candidates). ``window`` (the label window's lists)
    joins the lgbm kind's training groups; the MLP kinds learn from validation lists only.

    ``inputs``: the validation period's `StageInputs`, built outside the fitting context.
    ``data``: the SplitData (item side features, sizes). ``retriever``: the frozen retriever (its
    ``item_embeddings()``; ``user_embeddings`` for mlp_features when ``inputs.user_emb`` is None).
    The returned model's ``info`` holds the held-out nDCG@k, fit seconds and best epoch/round.
    """
    if inputs.labels.period != "valid":
        raise ValueError(f"the re-ranker learns from validation candidates, got labels of {inputs.labels.period!r}")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    inputs = _with_user_table(cfg, inputs, data, retriever)
    p = prepare(inputs, train_users, held_users)
    model = RERANKERS[cfg.variant].fit(cfg, p, data, retriever, progress, window)
    model.info.update(held_out_ndcg=held_out_ndcg(model, p),
                      fit_seconds=time.perf_counter() - t0, train_users=int(len(p.train_users)),
                      held_out_users=int(len(p.held_users)), train_rows=int(len(p.train_rows)),
                      train_positives=int(p.y[p.train_rows].sum()))
    return model


def _fold_stats(per_user: np.ndarray, users: np.ndarray, parts: list[np.ndarray]) -> tuple[list[float], float, float]:
    fold = [float(per_user[np.isin(users, f)].mean()) if len(f) else 0.0 for f in parts]
    return fold, float(np.mean(fold)), float(np.std(fold, ddof=1)) if len(fold) > 1 else 0.0


def fit_cross(cfg: RerankerConfig, inputs: StageInputs, data, retriever=None, *, folds: int,
              window: WindowLists | None = None, progress: bool = False) -> RerankerEnsemble:
    """Cross-fit one variant: ``folds`` fixed-seed folds of the validation users (seeded by
    ``cfg.seed``); member k trains on the other folds' users and early-stops on fold k's.
    ``info["out_of_fold_ndcg"]`` is the protocol nDCG@k_eval of the out-of-fold rankings over
    *all* validation users (full labels: a positive the retriever missed is a miss); ``fold_ndcg``
    its per-fold means. Each member's ``info["held_out_ndcg"]`` is its own fold's."""
    K = int(folds)
    labels = inputs.labels
    parts = fold_users(labels.users, K, cfg.seed)
    inputs = _with_user_table(cfg, inputs, data, retriever)
    members = []
    for k, held in enumerate(parts):
        train = np.sort(np.concatenate([f for j, f in enumerate(parts) if j != k]))
        if progress:
            print(f"reranker[{cfg.label}]: fold {k + 1}/{K} ({len(train)} train users, {len(held)} held out)",
                  flush=True)
        m = fit_reranker(cfg, inputs, data, retriever, train_users=train, held_users=held, window=window,
                         progress=progress)
        m.info["fold"] = k
        members.append(m)
    ens = RerankerEnsemble(cfg, members, parts)
    kk = cfg.k_eval
    per_user = ndcg_per_user(out_of_fold_topk(ens, inputs, labels.users, kk), labels, kk)
    fold, mean, std = _fold_stats(per_user, labels.users, parts)
    ens.info.update(out_of_fold_ndcg=float(per_user.mean()) if len(per_user) else 0.0, fold_ndcg=fold,
                    fold_ndcg_mean=mean, fold_ndcg_std=std, folds=K,
                    fit_seconds=float(sum(m.info["fit_seconds"] for m in members)),
                    best_epoch_or_round=[m.info.get("best_epoch", m.info.get("best_iteration")) for m in members],
                    held_out_users=int(len(labels.users)),
                    train_users=[m.info["train_users"] for m in members],
                    window_lists=[m.info.get("window_lists", 0) for m in members])
    return ens


def tune(section: "dict | RerankerSection", inputs: StageInputs, data, retriever=None, *, seed: int = 42,
         window: WindowLists | None = None, progress: bool = False
         ) -> tuple[RerankerEnsemble, pd.DataFrame, dict[str, RerankerEnsemble]]:
    """Cross-fit every variant of the params ``reranker:`` section on the same folds (`fit_cross`)
    and keep the best by out-of-fold nDCG@k_eval over all validation users. Returns (best model,
    table with one row per variant plus the retriever's own ordering of the same candidates, every
    fitted model by label): the report shows every variant on test while the choice stays the
    validation users'."""
    section = section if isinstance(section, RerankerSection) else RerankerSection.from_params(section)
    configs = [from_params(section.as_dict(), v, seed) for v in section.variants]
    k, labels, folds = section.k_eval, inputs.labels, section.folds
    parts = fold_users(labels.users, folds, configs[0].seed)
    per_user = ndcg_per_user(retriever_order(inputs.cands, labels.users, k), labels, k)
    fold, mean, std = _fold_stats(per_user, labels.users, parts)
    rows = [{"variant": RETRIEVER_ORDER, "out_of_fold_ndcg": float(per_user.mean()) if len(per_user) else 0.0,
             "fold_ndcg_mean": mean, "fold_ndcg_std": std, "folds": folds, "fit_seconds": 0.0}]
    models = {}
    for cfg in configs:
        model = fit_cross(cfg, inputs, data, retriever, folds=folds, window=window, progress=progress)
        models[cfg.label] = model
        rows.append({"variant": cfg.label, "out_of_fold_ndcg": model.info["out_of_fold_ndcg"],
                     "fold_ndcg_mean": model.info["fold_ndcg_mean"], "fold_ndcg_std": model.info["fold_ndcg_std"],
                     "folds": model.folds, "fit_seconds": model.info["fit_seconds"],
                     "window_lists": model.info.get("window_lists", 0),
                     "best_epoch_or_round": model.info.get("best_epoch_or_round")})
    best = max(models.values(), key=lambda m: m.info["out_of_fold_ndcg"])   # the first on ties
    table = pd.DataFrame(rows)
    table["chosen"] = table["variant"] == best.label
    return best, table, models
