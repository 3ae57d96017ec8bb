"""What each stage adds (issue 40, item 6): the two-stage system with one stage taken out, built and
scored under the full system's rules, and chosen by nothing.

An ablation answers "how much of the two-stage system's score is owed to this stage?". It is a
reading of the system that was chosen, not a rival to it: nothing is selected or tuned on it (the
re-ranker configuration is the one 30_reranker chose for the full system, the blend's weights are
17_blend's), so its test score is reported beside the full system's and never picks anything.

- `NO_TWO_TOWER`, the system without the two-tower retriever: the candidate union made from the
  other sources alone (``two_tower.candidate_sources``, e.g. EASE and iALS) and no feature that the
  two-tower computes (`TWO_TOWER_FEATURES`), re-ranked by the variant the full system chose (same
  configuration), refit on those lists by the same cross-fitting (same folds, same label-window
  and stale-list rules) and scored on test as ``two_stage`` is.
- `NO_RERANKER`, the system without the re-ranker: the full system's candidate union (two-tower and
  the other sources), ordered by the blend's score (17_blend: the single-stage models' z-scored
  blend, the re-ranker's like-for-like rival), scored on validation and test.

How the lists without the two-tower are made, and why that is the exact thing and not a stand-in:
rebuilding them from scratch would mean a second refit of every stage-1 model before the label
window (25_label_window; on ml-latest-small SASRec alone costs ~5 minutes), for lists that already
exist. The union is a union: a source's top list does not depend on the two-tower's, so the lists
without the two-tower are the full lists' rows that another source proposed (its rank <= K), in
the validation, test, label-window and stale lists alike, with their own rows' features. A
feature is either one of a (user, item) pair, which does not change when other rows go, or one of
the row within its user's list: ``n_sources`` (recounted without the two-tower) and the per-user
z-scores ``<scorer>_score_z`` (recomputed from the kept ``<scorer>_score`` column over the smaller
list, as `features.build_features` computes them). The two-tower's own columns are dropped. So
the re-ranker sees what `build_features` would give on the smaller union with no retriever, up to
the last float bit of a z-score (the sums run in another row order; tests/unit/test_ablation.py).

What differs from the full system, on purpose or by cost:
- with one candidate source left, ``n_sources`` is constant (1): a column the trees cannot split on;
- the lists' order that ties break by (``retriever_rank`` in a candidate frame, read by
  `inputs.prepare` and `ranking.order_topk`) is, without the two-tower, each item's best rank among
  the remaining sources: a tie-break, never a feature;
- a chosen MLP variant fits in this process even where ``dist.nproc`` > 1 trained the full system's
  in torchrun workers (the same loop; float sums may land a few bits apart);
- an LGBM configuration that drops a two-tower column (``drop_features``) drops nothing more here.

Both are recorded (`Run.record`) like every model, under names that start with ``two_stage_``, so
the report never takes them for a single-stage model, the secondary comparison's pool
(`report.analysis.is_two_stage`), and with an ``ablation`` field in their metrics JSON, which
`recsys_lib.report.ablation` reads to mark them and set each against the full system in a table of
its own. Among the paired comparisons they are exploratory rows, as the protocol has every
comparison but the primary and the secondary ("the re-ranker variants and ablations": see
docs/PROTOCOL.md, "Comparisons, named in advance").
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch

from ..models.blend import Blend
from ..protocol import guard
from ..protocol.evaluate import DEFAULT_KS, EvalResult, Labels, evaluate_ranking
from ..protocol.splitdata import SplitData
from ..run.experiment import Run
from . import candidates as cand
from . import selection, system
from .inputs import StageInputs, WindowLists
from .ranking import order_topk, per_user_zscore
from .rerankers import RerankerConfig, RerankerEnsemble, load as load_reranker
from .sources import load_baselines

#: the record of the two-stage system without the two-tower retriever
NO_TWO_TOWER = "two_stage_no_two_tower"
#: the record of the two-stage system without the re-ranker (the union ordered by the blend)
NO_RERANKER = "two_stage_no_reranker"
#: what each ablation leaves out, in the words the report uses (the records' ``ablation.without``)
WITHOUT = {NO_TWO_TOWER: "the two-tower retriever", NO_RERANKER: "the re-ranker"}

#: feature columns (`features.build_features`) the two-tower computes: its score, rank and the
#: score's z within the list (from the candidate frame), the similarity of the candidate's
#: two-tower embedding to the user's last items', and the frozen user . item dot product.
#: tests/unit/test_ablation.py checks that no other column moves when the retriever changes.
TWO_TOWER_FEATURES = ("retriever_score", "retriever_log_rank", "retriever_score_z", "hist_sim_mean",
                      "hist_sim_max", "retriever_dot")


# ---------------------------------------------------------------- lists without the two-tower
def other_sources(cands: pd.DataFrame) -> list[str]:
    """The candidate sources of ``cands`` other than the two-tower retriever (``<name>_rank`` columns)."""
    return [s for s in cand.source_names(cands) if s != "retriever"]


def union_without_two_tower(cands: pd.DataFrame, k: int) -> tuple[np.ndarray, pd.DataFrame]:
    """(positions of the rows of ``cands`` another source proposed, the candidate frame they make).

    ``cands`` is a union built by `candidates.add_sources` with top-``k`` lists (a source's rank is
    ``k + 1`` where it did not propose the item). The frame keeps ``user``, ``item`` and each other
    source's ``<name>_rank``; ``n_sources`` counts those sources only; ``retriever_rank`` holds the
    order ties break by, each item's best rank among them (`inputs.prepare` and
    `ranking.order_topk` read that column; it is no feature). It has no ``retriever_score``, so
    nothing downstream can read the two-tower's score by accident. Rows are sorted by user, that
    rank, item; the positions are in the frame's order."""
    sources = other_sources(cands)
    if not sources:
        raise ValueError("the candidates come from the two-tower retriever alone (two_tower.candidate_sources "
                         "is empty): there is no union without it to re-rank")
    ranks = cands[[f"{s}_rank" for s in sources]].to_numpy(np.int64)           # (n, S)
    proposed = ranks <= int(k)
    keep = np.flatnonzero(proposed.any(axis=1))
    best = ranks[keep].min(axis=1)
    user = cands["user"].to_numpy(np.int64)[keep]
    item = cands["item"].to_numpy(np.int64)[keep]
    order = np.lexsort((item, best, user))
    rows = keep[order]
    frame = pd.DataFrame({"user": user[order], "item": item[order],
                          "retriever_rank": best[order].astype(np.int32),
                          **{f"{s}_rank": ranks[rows, j].astype(np.int32) for j, s in enumerate(sources)},
                          "n_sources": proposed[rows].sum(axis=1).astype(np.int16)})
    return rows, frame


def features_without_two_tower(X: np.ndarray, names: list[str], rows: np.ndarray,
                               frame: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """The feature rows ``rows`` of ``X`` without the two-tower's columns, with the columns that
    describe a row within its user's list computed again over the smaller lists of ``frame``:
    ``n_sources`` and every per-user z-score ``<x>_z`` of a kept column ``<x>`` (as
    `features.build_features` computes them, `ranking.per_user_zscore`)."""
    kept = [j for j, n in enumerate(names) if n not in TWO_TOWER_FEATURES]
    out_names = [names[j] for j in kept]
    out = np.ascontiguousarray(X[np.ix_(rows, kept)], dtype=np.float32)
    users = frame["user"].to_numpy(np.int64)
    if "n_sources" in out_names:
        out[:, out_names.index("n_sources")] = frame["n_sources"].to_numpy(np.float32)
    for j, name in enumerate(out_names):
        if name.endswith("_z") and name[:-2] in out_names:
            out[:, j] = per_user_zscore(users, out[:, out_names.index(name[:-2])])
    np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)       # as build_features leaves X
    return out, out_names


def without_two_tower(inputs: StageInputs, k: int) -> StageInputs:
    """``inputs`` (one period's lists) as the system without the two-tower has them: the rows another
    source proposed, their features without the two-tower's, and no retriever user table (an MLP
    re-ranker then reads features only). Labels are the same, so a positive only the two-tower
    proposed is a miss. ``seconds`` stays the full lists' feature time (an upper bound)."""
    rows, frame = union_without_two_tower(inputs.cands, k)
    X, names = features_without_two_tower(inputs.X, inputs.names, rows, frame)
    return StageInputs(inputs.labels, frame, X, names, user_emb=None, seconds=inputs.seconds)


def window_without_two_tower(window: WindowLists, names: list[str], k: int) -> WindowLists:
    """The label window's lists (25_label_window, columns ``names``) without the two-tower: the rows
    the refit other sources proposed, with their labels."""
    rows, frame = union_without_two_tower(window.cands, k)
    X, _ = features_without_two_tower(window.X, names, rows, frame)
    return WindowLists(cands=frame, X=X, y=np.asarray(window.y)[rows])


def config_without_two_tower(cfg: RerankerConfig) -> RerankerConfig:
    """``cfg`` less any two-tower column in its ``drop_features`` (those columns are gone already:
    `features.kept_columns` would refuse a name that is no column)."""
    drop = getattr(cfg, "drop_features", None)
    if not drop:
        return cfg
    return dataclasses.replace(cfg, drop_features=[d for d in drop if d not in TWO_TOWER_FEATURES])


def fit_without_two_tower(cfg: RerankerConfig, train: StageInputs, data: SplitData, folds: int,
                          window: WindowLists | None = None, progress: bool = False) -> RerankerEnsemble:
    """Cross-fit ``cfg`` (the full system's chosen variant) on lists without the two-tower, as
    `selection.fit_cross` fits every variant: the same ``folds`` folds of the validation users
    (seeded by ``cfg.seed``), the label window's lists for LightGBM less each fold's held-out users,
    inside the leakage guard (train and validation rows only). No retriever is passed: no
    embedding of the two-tower reaches the re-ranker."""
    leaked = sorted(set(train.names) & set(TWO_TOWER_FEATURES))
    if leaked or "retriever_score" in train.cands:
        raise ValueError(f"these lists still hold the two-tower's columns {leaked or ['retriever_score']}: "
                         "pass them through without_two_tower first")
    with guard.fitting("reranker", allow=("train", "valid")):
        return selection.fit_cross(config_without_two_tower(cfg), train, data, None, folds=int(folds),
                                   window=window, progress=progress)


def chosen_reranker(run: Run) -> RerankerEnsemble:
    """The re-ranker variant 30_reranker chose for the full system (``metrics/two_stage.json``), as
    it saved it (``models/reranker_<label>.pt``): its configuration and folds are the ablation's."""
    label = json.loads(run.require("metrics", "two_stage.json", stage="30_reranker").read_text())["params"]["reranker"]
    return load_reranker(run.require("models", f"reranker_{label}.pt", stage="30_reranker"))


def record_no_two_tower(run: Run, inputs: system.TrainingInputs | None = None, test: StageInputs | None = None,
                        progress: bool = True) -> dict[str, EvalResult]:
    """Fit, score and record `NO_TWO_TOWER` (module docstring) on ``run``.

    ``inputs`` is `system.training_inputs(run)` and ``test`` the test lists
    (`system.stage_inputs(run, retriever, "test", scorers)`; both read from the run folder when not
    given: the features 30_reranker cached). The re-ranker trains on what the full system trained
    on (the stale validation lists with ``reranker.stale_lists``, else the validation lists, and
    the label window's lists with ``reranker.label_window``), less the two-tower. Validation is
    out-of-fold on the validation lists, test re-ranks the test lists (top 1,000 kept, padded; a
    positive no other source proposed is a miss). Its scoring seconds leave out generating the
    candidates (the sources' share of 20_two_tower's time is not measured apart)."""
    chosen = chosen_reranker(run)
    inputs = inputs if inputs is not None else system.training_inputs(run)
    k = int(run.params["two_tower"]["candidate_k"])
    valid = without_two_tower(inputs.valid, k)
    train = without_two_tower(inputs.train, k) if inputs.stale else valid
    window = window_without_two_tower(inputs.window, inputs.valid.names, k) if inputs.window is not None else None
    model = fit_without_two_tower(chosen.cfg, train, run.data, chosen.folds, window, progress)
    if test is None:
        test = system.stage_inputs(run, inputs.retriever, "test", inputs.scorers)
    test_lists = without_two_tower(test, k)
    results = {"valid": system.out_of_fold_ranked(model, valid), "test": system.ranked(model, test_lists)}
    model.save(run.path("ablations", "reranker_no_two_tower.pt"))
    sources = other_sources(inputs.valid.cands)
    trained = "the stale validation lists" if inputs.stale else "the validation lists"
    notes = (f"ablation, chosen by nothing: the two-stage system without the two-tower retriever. Candidates: the "
             f"union of {', '.join(sources)}'s top {k}; features without the two-tower's; re-ranker "
             f"{chosen.label} (the full system's choice, same configuration) cross-fitted on {trained}"
             f"{' and the label window' if window is not None else ''} less the two-tower ({model.folds} folds, "
             "the full system's); valid = out-of-fold; a test positive no other source proposed is a miss")
    run.record(NO_TWO_TOWER, results, params={**asdict(model.cfg), "reranker": chosen.label, "folds": model.folds},
               fit_seconds=model.info["fit_seconds"], notes=notes,
               ablation={"of": "two_stage", "without": WITHOUT[NO_TWO_TOWER], "candidate_sources": sources,
                         "dropped_features": [n for n in inputs.valid.names if n in TWO_TOWER_FEATURES],
                         "candidate_rows": {p: {"full system": int(len(full.cands)), "without": int(len(part.cands))}
                                            for p, full, part in (("valid", inputs.valid, valid),
                                                                  ("test", test, test_lists))},
                         "chosen_on": "nothing"})
    return results


# ---------------------------------------------------------------- the union without the re-ranker
@torch.no_grad()
def pair_scores(scorer, cands: pd.DataFrame, ctx, batch_users: int = 1024) -> np.ndarray:
    """(n_rows,) ``scorer.score_all``'s score of each (user, item) row of ``cands``, float64.

    For a model that scores a user against the whole catalogue only: the blend z-scores each
    member over the user's unseen catalogue (`models.blend.unseen_zscore`), so a candidate's blend
    score needs the user's full row. ``batch_users`` users at a time, so at most (batch, n_items)
    scores are held; the rows are gathered with one fancy index per batch."""
    user = cands["user"].to_numpy(np.int64)
    item = cands["item"].to_numpy(np.int64)
    order = np.argsort(user, kind="stable")
    sorted_users = user[order]
    users = np.unique(sorted_users)
    out = np.empty(len(user), np.float64)
    for s in range(0, len(users), int(batch_users)):
        b = users[s:s + int(batch_users)]
        rows = order[np.searchsorted(sorted_users, b[0], "left"):np.searchsorted(sorted_users, b[-1], "right")]
        scores = scorer.score_all(torch.from_numpy(b), ctx).float().cpu().numpy()     # (B, n_items)
        out[rows] = scores[np.searchsorted(b, user[rows]), item[rows]]
    return out


def blend_topk(blend, cands: pd.DataFrame, labels: Labels, k_keep: int = 1000,
               batch_users: int = 1024) -> np.ndarray:
    """(len(labels.users), k_keep) each user's candidates ordered by the blend's score (ties: the
    better retriever rank first, as `ranking.order_topk` breaks every tie), padded with -1."""
    return order_topk(cands, pair_scores(blend, cands, labels.ctx, batch_users), labels.users, k_keep)


def blend_ranked(blend, cands: pd.DataFrame, labels: Labels, k_keep: int = 1000, ks=DEFAULT_KS,
                 batch_users: int = 1024) -> EvalResult:
    """`blend_topk` scored under the protocol: the positives outside a user's candidates are misses."""
    t0 = time.perf_counter()
    top = blend_topk(blend, cands, labels, k_keep, batch_users)
    return evaluate_ranking(top, labels, ks, seconds=time.perf_counter() - t0)


def load_blend(run: Run) -> Blend:
    """17_blend's blend, rebuilt from its record (``metrics/blend.json``: the members with a weight
    and the weights chosen on validation) and the members' checkpoints (17_blend saves no file of
    its own: the blend is its weights)."""
    rec = json.loads(run.require("metrics", "blend.json", stage="17_blend").read_text())
    weights = {n: float(w) for n, w in rec["params"]["weights"].items() if float(w) > 0}
    return Blend(load_baselines(run, list(weights)), weights)


def record_no_reranker(run: Run, blend: Blend | None = None) -> dict[str, EvalResult]:
    """Score and record `NO_RERANKER` (module docstring) on ``run``: 20_two_tower's candidate union
    of each period (``candidates/{valid,test}.parquet``) ordered by the blend (`load_blend`, unless
    given), top 1,000 kept. The blend scores in the context it was scored in by 17_blend
    (`Run.evaluator` with the params' ``history_len``); the users and labels are the period's,
    like every model's. Test seconds include generating the candidates, as the two-stage rows'."""
    blend = blend if blend is not None else load_blend(run)
    timing = json.loads(run.require("candidates", "timing.json", stage="20_two_tower").read_text())
    results = {}
    for period in ("valid", "test"):
        labels = run.evaluator(period).labels
        cands = cand.load_candidates(run.require("candidates", f"{period}.parquet", stage="20_two_tower"))
        results[period] = blend_ranked(blend, cands, labels, batch_users=run.eval.batch_users)
    results["test"].seconds += float(timing["test"])
    sources = cand.source_names(cands)
    notes = ("ablation, chosen by nothing: the two-stage system without the re-ranker: the candidate union of "
             f"{', '.join(sources)} (20_two_tower) ordered by the blend's score (17_blend's weights, chosen on "
             "validation, so valid is in-sample for the weights as the blend's own is); ties by retriever rank; "
             "a positive outside the union is a miss")
    run.record(NO_RERANKER, results, params={"members": sorted(blend.weights), "weights": blend.weights,
                                             "order": "blend score, ties by retriever rank"},
               fit_seconds=0.0, notes=notes,
               ablation={"of": "two_stage", "without": WITHOUT[NO_RERANKER], "candidate_sources": sources,
                         "order": "blend", "chosen_on": "nothing"})
    return results
