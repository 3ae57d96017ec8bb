"""The two-stage system on a run folder: candidates, the re-ranker's inputs, fitting, recording,
and the protocol's scores of re-ranked lists.

docs/PROTOCOL.md, "Who learns from what": the re-ranker learns from the validation period's
candidates, cross-fitted over validation users (`selection`): every validation user is held out
from exactly one fold model, and `out_of_fold_ranked` scores each user with that model. The test
score re-ranks candidates proposed from histories that include validation rows, and a test
positive the retriever missed counts as a miss (lists are the re-ranked candidates, padded).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from . import candidates as cand
from . import selection
from .. import config
from ..protocol import guard
from ..protocol.evaluate import DEFAULT_KS, EvalResult, evaluate_ranking
from ..models import tuning
from ..models.two_tower import TwoTower
from ..run import launch
from ..run import state as runstate
from ..run.experiment import Run
from .features import _as_np, build_features, retriever_user_table
from .inputs import StageInputs, WindowLists
from .ranking import subset_labels
from .refit import load_label_window, load_stale_lists, recent_items, refit_share
from .rerankers import MLP_KINDS, Reranker, RerankerEnsemble
from .section import RerankerSection
from .sources import load_baselines, load_retriever, write_candidates  # noqa: F401 (re-exported)


def stage_inputs(run: Run, retriever, period: str, scorers: dict, cache: bool = True) -> StageInputs:
    """Candidates of ``period`` (from 20_two_tower) with their features.

    Features are written to ``features/<period>.npz`` and reused by later notebooks (the leakage
    audit) as long as the candidates file, the retriever checkpoint and the scorers are the
    ones they were built from."""
    labels = run.evaluator(period, history_len=retriever.cfg.history_len).labels
    cand_path = run.require("candidates", f"{period}.parquet", stage="20_two_tower")
    cands = cand.load_candidates(cand_path)
    recent = recent_items(run.params)
    key = _feature_key(run, cand_path, scorers, retriever) + (f";recent{list(recent)}" if recent else "")
    cached = run.dir / "features" / f"{period}.npz"
    if cache and cached.exists():
        z = np.load(cached, allow_pickle=False)
        if str(z["key"]) == key:
            return StageInputs(labels, cands, z["X"], z["names"].tolist(), z["user_emb"], float(z["seconds"]))
    t0 = time.perf_counter()
    user_emb = retriever_user_table(retriever, labels.users, labels.ctx, run.data.n_users)
    X, names = build_features(cands, run.data, labels.ctx, period, retriever, scorers, user_emb, recent)
    seconds = time.perf_counter() - t0
    if cache:
        with config.atomic_write(cached) as tmp:
            np.savez(tmp, X=X, names=np.array(names), user_emb=user_emb, seconds=seconds, key=key)
    return StageInputs(labels, cands, X, names, user_emb, seconds)


def scorer_names(section: dict) -> list[str]:
    """``reranker.extra_scorers``: the stage-1 models whose scores are re-ranker features."""
    return list(RerankerSection.options(section, "extra_scorers").extra_scorers)


@dataclass
class TrainingInputs:
    """Everything a re-ranker fit reads, as 30_reranker, the torchrun worker and
    scripts/stage2_experiment.py assemble it (`training_inputs`)."""

    retriever: object                 # the frozen two-tower retriever (its embeddings are features)
    scorers: dict                     # name -> stage-1 model whose scores are features
    valid: StageInputs                # validation lists of the models fit on train: the record's score
    train: StageInputs                # the lists the re-ranker learns from: ``valid``, or the stale lists
    window: WindowLists | None        # the label window's lists (LightGBM), or None

    @property
    def stale(self) -> bool:
        return self.train is not self.valid


def training_inputs(run: Run) -> TrainingInputs:
    """The re-ranker's inputs from the run folder: the retriever (20_two_tower), the scorers'
    checkpoints, the validation lists with their features (`stage_inputs`), and, where the params
    turn them on, 25_label_window's lists: the label window's (``reranker.label_window``) and the
    stale validation lists the re-ranker then learns from instead (``reranker.stale_lists``)."""
    section = RerankerSection.from_params(run.params["reranker"])
    retriever = load_retriever(run)
    scorers = load_baselines(run, section.extra_scorers)
    valid = stage_inputs(run, retriever, "valid", scorers)
    window = load_label_window(run, valid.names) if section.label_window else None
    train = load_stale_lists(run, valid) if section.stale_lists else valid
    return TrainingInputs(retriever, scorers, valid, train, window)


def _feature_key(run: Run, cand_path, scorers: dict, retriever=None) -> str:
    """What the features depend on: the code that makes them (`build_features`' module, the
    scorers' and the retriever's modules, and every library module those import: an edit to any
    of them makes the cache miss, with no version number to bump by hand), and the candidates',
    retriever's and scorers' files (mtime, size)."""
    code = runstate.code_digest([build_features.__module__, TwoTower.__module__,
                                 *(type(m).__module__ for m in [*scorers.values(), retriever] if m is not None)])
    files = [cand_path, run.dir / "models" / "two_tower.pt"] + [run.dir / "models" / f"{n}.pt" for n in sorted(scorers)]
    return f"code {code};" + ";".join(f"{f.name}:{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in files if f.exists())


def fit(run: Run, valid: StageInputs, retriever, section: dict, window: WindowLists | None = None):
    """Train every re-ranker variant on validation candidates (and the label window's lists, when
    given) inside the guard: train and validation rows only; returns (chosen model, table, all
    models). With ``dist.nproc`` > 1 in the params the MLP variants train in that many torchrun
    processes (`fit_distributed`); with 1, here, as always."""
    refit_share(section)                      # stale lists: LightGBM variants only
    with guard.fitting("reranker", allow=("train", "valid")):
        if launch.distributed(run.params) and _has_mlp_variant(section):
            return fit_distributed(run, valid, retriever, section, window)
        return selection.tune(section, valid, run.data, retriever, seed=run.seed, window=window, progress=True)


def fit_distributed(run: Run, valid: StageInputs, retriever, section: dict, window: WindowLists | None = None):
    """`selection.tune` on ``valid`` -> (chosen, table, models by label), with the MLP variants in
    ``dist.nproc`` torchrun processes (`recsys_lib.worker`; LightGBM variants on rank 0). The
    workers get the inputs in a job file (candidates, features, the retriever's frozen user and
    item tables), so they never rebuild features."""
    if valid.user_emb is None and retriever is not None:
        labels = valid.labels
        valid = replace(valid, user_emb=retriever_user_table(retriever, labels.users, labels.ctx, run.data.n_users))
    table = _as_np(retriever.item_embeddings()).astype(np.float32) if retriever is not None else None
    job = {"kind": "reranker", "name": "reranker", "section": dict(section), "inputs": valid,
           "window": window, "item_table": table, **launch.run_fields(run), "device": "cpu"}   # its MLPs run on cpu
    with launch.workspace(run.dir, "reranker") as work:
        result = launch.run_job(job, run.dir, work, launch.settings(run.params))
    models = {label: Reranker.from_blob(blob) for label, blob in result["models"].items()}
    return models[result["chosen"]], result["search"], models


def _has_mlp_variant(section: dict) -> bool:
    return bool(RerankerSection.from_params(section).kinds & set(MLP_KINDS))


def record_variants(run: Run, chosen: RerankerEnsemble, search, models: dict[str, RerankerEnsemble],
                    valid: StageInputs, test: StageInputs) -> None:
    """Save every fitted variant (``models/reranker_<label>.pt``) and record it: the chosen one as
    ``two_stage`` (with the search table), the others as ``two_stage_<label>``. Validation is the
    out-of-fold score (`out_of_fold_ranked`); test re-ranks the test candidates, and its scoring
    time includes generating them (20_two_tower's ``candidates/timing.json``). Earlier runs'
    records and re-ranker files are removed first, so no stale variant lingers."""
    cand_timing = json.loads(run.require("candidates", "timing.json", stage="20_two_tower").read_text())
    folds = chosen.folds
    note = f"valid = all validation users, each ranked by the fold model ({folds} folds) that never trained on them"
    if RerankerSection.from_params(run.params["reranker"]).stale_lists:
        note += ("; trained and chosen on the stale validation lists (25_label_window), valid re-ranks "
                 "the lists of the stage-1 models fit on train")
    kind = [m.cfg for m in models.values() if type(m.cfg) is type(chosen.cfg)]   # the chosen kind's variants
    held = tuning.held(chosen.cfg, tuning.varied_fields(kind), exclude=("variant",))  # not searched
    run.clear_records("two_stage")
    for old in (run.dir / "models").glob("reranker_*.pt"):
        old.unlink()
    for name, m in models.items():
        m.save(run.path("models", f"reranker_{name}.pt"))
        res = {"valid": out_of_fold_ranked(m, valid), "test": ranked(m, test)}
        res["test"].seconds += cand_timing["test"]
        label = "two_stage" if m is chosen else f"two_stage_{name}"
        run.record(label, res, params={**asdict(m.cfg), "reranker": name, "folds": folds},
                   fit_seconds=m.info["fit_seconds"], search=search if m is chosen else None, notes=note,
                   **({"tuning": {"held": held}} if m is chosen else {}))
    imp = feature_importance(models)
    config.write_json(run.path("analysis", "feature_importance.json"),
                      {"chosen": chosen.label, "share_of_gain": {c: imp[c].to_dict() for c in imp}})


def feature_importance(models: dict[str, Reranker]) -> pd.DataFrame:
    """Each tree variant's share of the total split gain per feature column (columns: variants;
    ensembles average their fold models). MLP variants have no such measure and are left out."""
    shares = {}
    for name, m in models.items():
        gain = m.importance() if hasattr(m, "importance") else None
        if gain is not None and gain.sum() > 0:
            shares[name] = gain / gain.sum()
    return pd.DataFrame(shares)


# ---------------------------------------------------------------- scored rankings
# Each `*_ranked` is the protocol's EvalResult of the matching `reranker.*_topk` lists.
def ranked(model: Reranker, inputs: StageInputs, users: np.ndarray | None = None, k_keep: int = 1000,
           ks=DEFAULT_KS) -> EvalResult:
    """`reranker.topk` of ``inputs``' candidates, scored under the protocol (for ``users``, a
    subset of the period's scored users, or all of them)."""
    labels = inputs.labels if users is None else subset_labels(inputs.labels, users)
    t0 = time.perf_counter()
    top = selection.topk(model, inputs, labels.users, k_keep)
    seconds = time.perf_counter() - t0 + inputs.seconds * len(labels.users) / max(len(inputs.labels.users), 1)
    return evaluate_ranking(top, labels, ks, seconds=seconds)


def _fold_ranked(model: RerankerEnsemble, valid: StageInputs, out_of_fold: bool, k_keep: int, ks) -> EvalResult:
    if valid.period != "valid":
        raise ValueError(f"out-of-fold / in-fold rankings exist for the validation users only, not {valid.period!r}")
    fn = selection.out_of_fold_topk if out_of_fold else selection.in_fold_topk
    t0 = time.perf_counter()
    top = fn(model, valid, valid.labels.users, k_keep)
    return evaluate_ranking(top, valid.labels, ks, seconds=time.perf_counter() - t0 + valid.seconds)


def out_of_fold_ranked(model: RerankerEnsemble, valid: StageInputs, k_keep: int = 1000, ks=DEFAULT_KS) -> EvalResult:
    """`selection.out_of_fold_topk` scored: the two-stage system's honest validation score, every
    validation user ranked by the fold model that never trained on them."""
    return _fold_ranked(model, valid, True, k_keep, ks)


def in_fold_ranked(model: RerankerEnsemble, valid: StageInputs, k_keep: int = 1000, ks=DEFAULT_KS) -> EvalResult:
    """`selection.in_fold_topk` scored: the leaky "seed protocol" number, every validation user
    ranked by the fold models that trained on them."""
    return _fold_ranked(model, valid, False, k_keep, ks)
