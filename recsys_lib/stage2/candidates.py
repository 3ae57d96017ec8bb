"""Candidate generation: the retriever's top-``k`` unseen items per user, with scores and ranks.

docs/PROTOCOL.md, "Who learns from what": the re-ranker learns from the validation period's
candidates (histories and seen items up to validation: ``Labels.build(data, "valid")``) and is
scored on the test period's candidates (histories and seen items include validation rows:
``Labels.build(data, "test")``). A positive the retriever did not propose is a miss, so
``candidate_recall`` at ``k`` is the second stage's ceiling.

Every source (the retriever and each of `add_sources`) ranks through `protocol.evaluate.rank_topk`
with the period's context, so its lists obey the same masks as every model's evaluation: seen
items and, under ``user_temporal``, items outside the causal catalogue (docs/PROTOCOL.md,
"A causal catalogue"); the re-ranker never sees a candidate first rated after the user's scoring cut.
"""
from __future__ import annotations

import os
from pathlib import Path
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..config import atomic_write
from ..protocol.evaluate import DEFAULT_KS, Labels, rank_topk
from ..protocol.splitdata import ScoringContext

COLUMNS = ("user", "item", "retriever_score", "retriever_rank")


def generate_candidates(retriever, labels_or_users: Labels | np.ndarray, ctx: ScoringContext | None = None,
                        k: int = 500, batch_users: int = 1024, progress: bool = False) -> pd.DataFrame:
    """The retriever's top ``k`` unseen items (inside the causal catalogue) for each user, one row
    per (user, candidate): ``user`` (int64 contiguous id), ``item`` (int64), ``retriever_score`` (float32),
    ``retriever_rank`` (1-based; int16 when k < 32768, else int32). Rows are sorted by user, then
    rank. Pass a ``Labels`` (its scored users and context) or an array of users and a ``ctx``.
    Masked slots (users with fewer than ``k`` items they may be recommended) are dropped."""
    if isinstance(labels_or_users, Labels):
        users, ctx = labels_or_users.users, labels_or_users.ctx if ctx is None else ctx
    else:
        users = np.asarray(labels_or_users, dtype=np.int64)
        if ctx is None:
            raise ValueError("generate_candidates: pass a ScoringContext with an array of users")
    items, scores = rank_topk(retriever, users, ctx, k, batch_users=batch_users, progress=progress,
                              desc="candidates", with_scores=True)
    kk = items.shape[1]
    rank_dtype = np.int16 if kk < np.iinfo(np.int16).max else np.int32
    df = pd.DataFrame({
        "user": np.repeat(np.asarray(users, dtype=np.int64), kk),
        "item": items.reshape(-1),
        "retriever_score": scores.reshape(-1),
        "retriever_rank": np.tile(np.arange(1, kk + 1, dtype=rank_dtype), len(users)),
    })
    finite = np.isfinite(df["retriever_score"].to_numpy())
    if not finite.all():
        df = df[finite].reset_index(drop=True)
    return df


def add_sources(cands: pd.DataFrame, retriever, sources: dict, ctx: ScoringContext, k: int,
                batch_users: int = 1024, progress: bool = False) -> pd.DataFrame:
    """The union of the retriever's candidates and each source's top ``k`` unseen items per user.

    ``sources`` maps a name to a stage-1 model (``score_all``), e.g. {"ease": ..., "ials": ...}.
    Every row keeps ``retriever_score`` (the retriever's score of the pair, also for items only
    another source proposed) and ``retriever_rank`` (its rank, ``k + 1`` when it did not propose
    the item); each source adds ``<name>_rank`` (1-based, ``k + 1`` when absent), and
    ``n_sources`` counts the lists an item came from. Rows sorted by user, retriever rank, item."""
    users = np.unique(cands["user"].to_numpy(np.int64))
    out = cands.copy()
    out["retriever_rank"] = out["retriever_rank"].astype(np.int32)
    for name, model in sources.items():
        top = generate_candidates(model, users, ctx, k=k, batch_users=batch_users, progress=progress)
        top = top.rename(columns={"retriever_rank": f"{name}_rank"})[["user", "item", f"{name}_rank"]]
        out = out.merge(top, on=["user", "item"], how="outer")
    rank_cols = ["retriever_rank"] + [f"{n}_rank" for n in sources]
    present = out[rank_cols].notna().to_numpy()
    out["n_sources"] = present.sum(axis=1).astype(np.int16)
    for col in rank_cols:
        out[col] = out[col].fillna(k + 1).astype(np.int32)
    missing = out["retriever_score"].isna().to_numpy()
    if missing.any():                                              # the retriever scores every pair
        u = torch.from_numpy(out["user"].to_numpy(np.int64)[missing])
        i = torch.from_numpy(out["item"].to_numpy(np.int64)[missing])
        out.loc[missing, "retriever_score"] = retriever.score_pairs(u, i, ctx).float().cpu().numpy()
    out["retriever_score"] = out["retriever_score"].astype(np.float32)
    return out.sort_values(["user", "retriever_rank", "item"], kind="stable").reset_index(drop=True)


def source_names(cands: pd.DataFrame) -> list[str]:
    """The candidate sources recorded in ``cands``: "retriever", then each ``<name>_rank`` column."""
    return ["retriever"] + [c[:-5] for c in cands.columns if c.endswith("_rank") and c != "retriever_rank"]


def _positive_keys(positives, n_items_hint: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(scored users, sorted keys user*n_items+item of positives, n_pos per scored user, n_items)."""
    if isinstance(positives, Labels):
        users, mat = positives.users, positives.positives
    elif isinstance(positives, tuple) and len(positives) == 2:
        users, mat = np.asarray(positives[0], dtype=np.int64), positives[1]
    else:
        raise TypeError("candidate_recall: pass Labels or (users, positives_csr) with rows aligned to users")
    mat = sp.csr_matrix(mat)
    mat.eliminate_zeros()
    mat.sum_duplicates()
    n_items = mat.shape[1]
    rows = np.repeat(np.asarray(users, dtype=np.int64), np.diff(mat.indptr))
    keys = np.sort(rows * n_items + mat.indices.astype(np.int64))
    return np.asarray(users, dtype=np.int64), keys, np.diff(mat.indptr), n_items


def candidate_recall(cands: pd.DataFrame, positives, ks=DEFAULT_KS, source: str = "retriever") -> dict[str, float]:
    """Recall@K over the scored users of ``positives`` counting only candidates of rank <= K in
    ``source``'s list: mean over users of |positives among their top-K candidates| / n_pos (users
    without candidates count 0). On a retriever's candidates it equals that retriever's Recall@K
    for K <= the candidate depth; for K beyond it, it is the recall of the whole candidate set
    (``source="union"``: every candidate counts, whatever its rank).

    ``positives``: ``Labels`` or ``(users, csr)`` with csr rows aligned to ``users``."""
    users, keys, n_pos, n_items = _positive_keys(positives)
    u = cands["user"].to_numpy(np.int64)
    it = cands["item"].to_numpy(np.int64)
    if source == "union":
        rank = np.ones(len(cands), np.int64)
    else:
        rank = cands[f"{source}_rank"].to_numpy(np.int64)
    q = u * n_items + it
    if len(keys):
        at = np.searchsorted(keys, q).clip(max=len(keys) - 1)
        hit = keys[at] == q
    else:
        hit = np.zeros(len(q), bool)
    row = np.searchsorted(users, u).clip(max=max(len(users) - 1, 0))
    in_scored = (users[row] == u) if len(users) else np.zeros(len(u), bool)
    hit &= in_scored
    out = {}
    for k in ks:
        sel = hit & (rank <= k)
        per_user = np.bincount(row[sel], minlength=len(users)).astype(np.float64)
        recall = np.divide(per_user, n_pos, out=np.zeros(len(users)), where=n_pos > 0)
        out[f"recall@{k}"] = float(recall.mean()) if len(users) else 0.0
    return out


def save_candidates(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write candidates to parquet atomically (`config.atomic_write`)."""
    with atomic_write(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def load_candidates(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no candidates at {path}; run the retrieval notebook (20_two_tower) first")
    return pd.read_parquet(path)


def source_recall(cands: pd.DataFrame, labels: Labels, ks=DEFAULT_KS) -> dict[str, dict[str, float]]:
    """Recall@K of each candidate source (its own top K) and of the union (every candidate counts):
    {source: {"recall@K": ...}}; the union's value is the same for every K (the whole set). Give
    ``ks`` up to the candidate depth: beyond it, a source's "rank k + 1" (not proposed) would count."""
    out = {name: candidate_recall(cands, labels, ks, source=name) for name in source_names(cands)}
    if len(out) > 1:
        out["union"] = candidate_recall(cands, labels, ks, source="union")
    return out
