"""The two-stage system end to end: retriever candidates -> features -> re-ranker -> top lists.

docs/PROTOCOL.md, "Who learns from what": the re-ranker learns from the validation period's candidates
(a share of validation users held out for its early stopping and choice of variant, or, with
``reranker.folds`` > 1, K-fold cross-fitting: every validation user is held out from exactly one
fold model, and `out_of_fold_ranked` scores each user with that model); the test
score re-ranks candidates proposed from histories that include validation rows, and a test
positive the retriever missed counts as a miss (lists are the re-ranked candidates, padded).
"""
from __future__ import annotations

import time

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import candidates as cand
from .. import config
from ..protocol import guard
from ..errors import ConfigError
from ..protocol.evaluate import DEFAULT_KS, EvalResult, Labels, evaluate_ranking
from ..models.registry import spec
from ..run import launch
from ..run.experiment import Run
from ..run.layout import notebook_of
from ..protocol.splitdata import SplitData
from . import rerankers as rr
from .rerankers import StageInputs
from .ranking import candidate_labels, split_users, subset_labels
from .features import _as_np, build_features, retriever_user_table

def load_retriever(run: Run):
    from ..models.two_tower import TwoTower
    return TwoTower.load(run.require("models", "two_tower.pt", stage="20_two_tower"), device=str(run.device))


def load_baselines(run: Run, names: list[str]) -> dict:
    """Fitted baselines (from their notebooks' checkpoints): candidate sources or scorers whose
    scores become re-ranker features. A missing checkpoint is an error naming the notebook to run
    first: a silently skipped source would change the candidates and the features."""
    out = {}
    for name in names:
        path = run.require("models", f"{name}.pt", stage=notebook_of(name))
        out[name] = spec(name).cls.load(path, device=str(run.device))
    return out


def write_candidates(run: Run, retriever, sources: dict) -> dict:
    """Write ``candidates/{valid,test}.parquet``: the retriever's top ``two_tower.candidate_k``
    unseen items per user, joined (union) by each of ``sources``' own top ``candidate_k`` (stage-1
    models fit on train, like the retriever). Validation candidates come from histories up to the
    validation period, test candidates from histories that include the validation rows.
    Also writes ``candidates/timing.json`` and ``candidates/recall.json`` (validation and test
    Recall@K of each source and of the union); returns the recall."""
    from ..models.two_tower import history_len_needed
    section = run.params["two_tower"]
    k, history_len = int(section["candidate_k"]), history_len_needed(section)
    timing, recall = {}, {}
    for period in ("valid", "test"):
        labels = run.evaluator(period, history_len=history_len).labels
        t0 = time.perf_counter()
        c = cand.generate_candidates(retriever, labels, k=k, progress=True)
        c = cand.add_sources(c, retriever, sources, labels.ctx, k=k) if sources else c
        timing[period] = time.perf_counter() - t0
        cand.save_candidates(c, run.path("candidates", f"{period}.parquet"))
        recall[period] = cand.source_recall(c, labels, [x for x in run.params["eval"]["ks"] if x <= k])
        print(f"{period}: {c['user'].nunique()} users, {len(c):,} candidates ({len(c) / c['user'].nunique():.0f} "
              f"a user) from {cand.source_names(c)} in {timing[period]:.1f}s")
    config.write_json(run.path("candidates", "timing.json"), timing)
    config.write_json(run.path("candidates", "recall.json"), recall)
    return recall


def stage_inputs(run: Run, retriever, period: str, extra: dict, cache: bool = True) -> StageInputs:
    """Candidates of ``period`` (from 20_two_tower) with their features.

    Features are written to ``features/<period>.npz`` and reused by later notebooks (the leakage
    audit) as long as the candidates file, the retriever checkpoint and the extra scorers are the
    ones they were built from."""
    labels = run.evaluator(period, history_len=retriever.cfg.history_len).labels
    cand_path = run.require("candidates", f"{period}.parquet", stage="20_two_tower")
    cands = cand.load_candidates(cand_path)
    recent = recent_items(run)
    key = _feature_key(run, cand_path, extra) + (f";recent{list(recent)}" if recent else "")
    cached = run.dir / "features" / f"{period}.npz"
    if cache and cached.exists():
        z = np.load(cached, allow_pickle=False)
        if str(z["key"]) == key:
            return StageInputs(labels, cands, z["X"], z["names"].tolist(), z["user_emb"], float(z["seconds"]))
    t0 = time.perf_counter()
    user_emb = retriever_user_table(retriever, labels.users, labels.ctx, run.data.n_users)
    X, names = build_features(cands, run.data, labels.ctx, period, retriever, extra, user_emb, recent)
    seconds = time.perf_counter() - t0
    if cache:
        with config.atomic_write(cached) as tmp:
            np.savez(tmp, X=X, names=np.array(names), user_emb=user_emb, seconds=seconds, key=key)
    return StageInputs(labels, cands, X, names, user_emb, seconds)


#: the stage-1 models whose scores of a candidate are re-ranker features, when the params name none
SCORERS = ("ease", "mf", "ials")


def scorer_names(section: dict) -> list[str]:
    """``reranker.extra_scorers``: the stage-1 models whose scores are re-ranker features."""
    return list(section.get("extra_scorers", SCORERS))


@dataclass
class TrainingInputs:
    """Everything a re-ranker fit reads, as 30_reranker, the torchrun worker and
    scripts/stage2_experiment.py assemble it (`training_inputs`)."""

    retriever: object                 # the frozen two-tower retriever (its embeddings are features)
    scorers: dict                     # name -> stage-1 model whose scores are features
    valid: StageInputs                # validation lists of the models fit on train: the record's score
    train: StageInputs                # the lists the re-ranker learns from: ``valid``, or the stale lists
    window: rr.ExtraLists | None      # the label window's lists (LightGBM), or None

    @property
    def stale(self) -> bool:
        return self.train is not self.valid


def training_inputs(run: Run) -> TrainingInputs:
    """The re-ranker's inputs from the run folder: the retriever (20_two_tower), the scorers'
    checkpoints, the validation lists with their features (`stage_inputs`), and, where the params
    turn them on, 25_label_window's lists: the label window's (``reranker.label_window``) and the
    stale validation lists the re-ranker then learns from instead (``reranker.stale_lists``)."""
    section = run.params["reranker"]
    retriever = load_retriever(run)
    scorers = load_baselines(run, scorer_names(section))
    valid = stage_inputs(run, retriever, "valid", scorers)
    window = load_label_window(run, valid.names) if section.get("label_window") else None
    train = load_stale_lists(run, valid) if section.get("stale_lists") else valid
    return TrainingInputs(retriever, scorers, valid, train, window)


def recent_items(run: Run) -> tuple[int, ...]:
    """``reranker.recent_items``: the N of the recent-taste features (scores from a user's last N
    rows, `rerank_features.recent_context`); empty: none."""
    return tuple(int(n) for n in run.params["reranker"].get("recent_items") or ())


def _feature_key(run: Run, cand_path, extra: dict) -> str:
    """What the features depend on: candidates, retriever and extra scorers' files (mtime, size)."""
    from .features import FEATURES_VERSION
    files = [cand_path, run.dir / "models" / "two_tower.pt"] + [run.dir / "models" / f"{n}.pt" for n in sorted(extra)]
    return f"v{FEATURES_VERSION};" + ";".join(f"{f.name}:{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in files if f.exists())


def fit(run: Run, valid: StageInputs, retriever, section: dict, window: rr.ExtraLists | None = None):
    """Train every re-ranker variant on validation candidates (and the label window's lists, when
    given) inside the guard: train and validation rows only; returns (chosen model, table, all
    models). With ``dist.nproc`` > 1 in the params the MLP variants train in that many torchrun
    processes (`fit_distributed`); with 1, here, as always."""
    refit_share(section)                      # stale lists: LightGBM variants only
    with guard.fitting("reranker", allow=("train", "valid")):
        if launch.distributed(run.params) and _has_mlp_variant(section):
            return fit_distributed(run, valid, retriever, section, window)
        return rr.tune(section, valid, run.data, retriever, seed=run.seed, extra=window, progress=True)


def fit_distributed(run: Run, valid: StageInputs, retriever, section: dict, window: rr.ExtraLists | None = None):
    """`rerankers.tune` on ``valid`` -> (chosen, table, models by label), with the MLP variants in
    ``dist.nproc`` torchrun processes (`recsys_lib.worker`; LightGBM variants on rank 0). The
    workers get the inputs in a job file (candidates, features, the retriever's frozen user and
    item tables), so they never rebuild features."""
    if valid.user_emb is None and retriever is not None:
        labels = valid.labels
        valid = replace(valid, user_emb=retriever_user_table(retriever, labels.users, labels.ctx, run.data.n_users))
    table = _as_np(retriever.item_embeddings()).astype(np.float32) if retriever is not None else None
    job = {"kind": "reranker", "name": "reranker", "section": dict(section), "inputs": valid,
           "extra": window, "item_table": table, **launch.run_fields(run), "device": "cpu"}   # its MLPs run on cpu
    with launch.workspace(run.dir, "reranker") as work:
        result = launch.run_job(job, run.dir, work, launch.settings(run.params))
    models = {label: rr.Reranker.from_blob(blob) for label, blob in result["models"].items()}
    return models[result["chosen"]], result["search"], models


def _has_mlp_variant(section: dict) -> bool:
    variants = section.get("variants", rr.VARIANTS)
    return any((v if isinstance(v, str) else v.get("variant")) in rr.MLP_KINDS for v in variants)


def record_variants(run: Run, chosen: rr.Reranker, search, models: dict[str, rr.Reranker],
                    valid: StageInputs, test: StageInputs) -> None:
    """Save every fitted variant (``models/reranker_<label>.pt``) and record it: the chosen one as
    ``two_stage`` (with the search table), the others as ``two_stage_<label>``. Validation is the
    out-of-fold score (`out_of_fold_ranked`); test re-ranks the test candidates, and its scoring
    time includes generating them (20_two_tower's ``candidates/timing.json``). Earlier runs'
    records and re-ranker files are removed first, so no stale variant lingers."""
    import json
    from dataclasses import asdict
    cand_timing = json.loads(run.require("candidates", "timing.json", stage="20_two_tower").read_text())
    folds = getattr(chosen, "folds", 1)
    note = (f"valid = all validation users, each ranked by the fold model ({folds} folds) that never trained on them"
            if folds > 1 else "valid = held-out validation users only")
    if run.params["reranker"].get("stale_lists"):
        note += ("; trained and chosen on the stale validation lists (25_label_window), valid re-ranks "
                 "the lists of the stage-1 models fit on train")
    run.clear_records("two_stage")
    for old in (run.dir / "models").glob("reranker_*.pt"):
        old.unlink()
    for name, m in models.items():
        m.save(run.path("models", f"reranker_{name}.pt"))
        res = {"valid": out_of_fold_ranked(m, valid), "test": ranked(m, test)}
        res["test"].seconds += cand_timing["test"]
        label = "two_stage" if m is chosen else f"two_stage_{name}"
        run.record(label, res, params={**asdict(m.cfg), "reranker": name, "folds": folds},
                   fit_seconds=m.info["fit_seconds"], search=search if m is chosen else None, notes=note)
    imp = feature_importance(models)
    config.write_json(run.path("analysis", "feature_importance.json"),
                      {"chosen": chosen.label, "share_of_gain": {c: imp[c].to_dict() for c in imp}})


def feature_importance(models: dict[str, rr.Reranker]) -> pd.DataFrame:
    """Each tree variant's share of the total split gain per feature column (columns: variants;
    ensembles average their fold models). MLP variants have no such measure and are left out."""
    shares = {}
    for name, m in models.items():
        gain = m.importance() if hasattr(m, "importance") else None
        if gain is not None and gain.sum() > 0:
            shares[name] = gain / gain.sum()
    return pd.DataFrame(shares)


# ---------------------------------------------------------------- the leakage audit
def design_as_run(run: Run, valid: StageInputs, test: StageInputs, retriever, epochs: int,
                  batch_size: int) -> dict:
    """The leakage audit's re-ranker trained the way the design we start from trains it: the
    ``id_mlp`` network on *every* validation user, a fixed number of epochs at ``batch_size``, no
    held-out users and no early stopping; then scored on those same users' validation positives
    (in-sample), and on the test period. Returns its nDCG@10 in-sample under our protocol (IDCG
    over all of a user's positives), in-sample counting only the positives among the candidates
    (a positive the retriever missed is not counted, as a candidate-level evaluation does), and
    on test."""
    cfg = rr.RerankerConfig.from_params(run.params["reranker"], "id_mlp", run.seed)
    cfg = replace(cfg, name=f"id_mlp_design_{epochs}x{batch_size}", epochs=int(epochs),
                     batch_size=int(batch_size))
    users = valid.labels.users
    with guard.fitting("reranker_design_as_run", allow=("train", "valid")):
        model = rr.fit_reranker(cfg, valid, run.data, retriever, train_users=users,
                                held_users=np.zeros(0, np.int64))
    top = rr.topk(model, valid, users, k_keep=10)
    in_sample = evaluate_ranking(top, valid.labels, (10,), keep=10).means()["ndcg@10"]
    in_candidates = evaluate_ranking(top, positives_among_candidates(valid), (10,), keep=10).means()["ndcg@10"]
    n_pos = int(model.info["train_positives"])
    return {"re-ranker": cfg.name, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "training positives": n_pos, "optimizer steps": cfg.epochs * -(-n_pos // cfg.batch_size),
            "in-sample valid (protocol IDCG)": float(in_sample),
            "in-sample valid (positives among candidates)": float(in_candidates),
            "honest test": float(ranked(model, test, k_keep=10, ks=(10,)).means()["ndcg@10"]),
            "fit_seconds": float(model.info["fit_seconds"])}


def in_fold_audit(run: Run, valid: StageInputs, stale: StageInputs | None = None) -> list[dict]:
    """Each saved re-ranker (``models/reranker_*.pt``) scored on the validation users it trained on
    (in-fold, the seed protocol), on those it did not (out-of-fold), and its recorded test score.
    With ``stale`` (the stale validation lists it trained on, ``reranker.stale_lists``) the chosen
    one is also scored on those lists: the fresh lists alone understate what it memorised. Only
    nDCG@10 is kept, so lists stop at 10 (each ensemble scoring costs ~10 s at ml-32m sizes)."""
    import json

    from ..run.experiment import read_json
    chosen = json.loads(run.require("metrics", "two_stage.json", stage="30_reranker").read_text())["params"]["reranker"]
    rows = []
    for path in sorted((run.dir / "models").glob("reranker_*.pt")):
        m = rr.load(path)
        label = "two_stage" if chosen == m.label else f"two_stage_{m.label}"
        rows.append({"re-ranker": m.label, "folds": getattr(m, "folds", 1),
                     "seed protocol: valid users it trained on": _ndcg10(in_fold_ranked, m, valid),
                     "out-of-fold valid users": _ndcg10(out_of_fold_ranked, m, valid),
                     "honest test": read_json(run.dir, "metrics", f"{label}.json")["test"]["ndcg@10"]})
        if stale is not None and label == "two_stage":
            rows[-1]["stale lists it trained on: its users"] = _ndcg10(in_fold_ranked, m, stale)
            rows[-1]["stale lists: out-of-fold users"] = _ndcg10(out_of_fold_ranked, m, stale)
    return rows


def _ndcg10(fold_ranked, model: rr.Reranker, lists: StageInputs) -> float:
    return fold_ranked(model, lists, k_keep=10, ks=(10,)).means()["ndcg@10"]


def positives_among_candidates(inputs: StageInputs) -> Labels:
    """The period's labels less the positives its candidates missed (a candidate-level evaluation)."""
    labels = inputs.labels
    c = inputs.cands[candidate_labels(inputs.cands, labels) > 0]
    row = np.searchsorted(labels.users, c["user"].to_numpy(np.int64))
    pos = sp.csr_matrix((np.ones(len(c), np.float32), (row, c["item"].to_numpy(np.int64))),
                        shape=(len(labels.users), labels.n_items))
    return Labels(period=labels.period, users=labels.users, positives=pos, ctx=labels.ctx, n_items=labels.n_items)


# ---------------------------------------------------------------- stage 1 refit before the window
@dataclass
class Stage1:
    """The stage-1 models behind the re-ranker's lists: the retriever, the candidate sources whose
    top lists join its candidates, and the scorers whose scores become features (a model may be
    both a source and a scorer)."""
    retriever: object
    sources: dict = field(default_factory=dict)
    scorers: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted(set(self.sources) | set(self.scorers))

    def refit(self, data, epochs: dict[str, int | None]) -> "Stage1":
        """Every model fit again from scratch on ``data.train`` (`refit`); ``epochs`` maps a model
        name (``two_tower`` for the retriever) to the epoch count it was given on validation."""
        retriever = refit(self.retriever, data, epochs.get("two_tower"))
        fits = {n: refit(m, data, epochs.get(n)) for n, m in {**self.sources, **self.scorers}.items()}
        return Stage1(retriever, {n: fits[n] for n in self.sources}, {n: fits[n] for n in self.scorers})

    def lists(self, data, labels: Labels, k: int, recent_items=()) -> StageInputs:
        """The candidate lists these models propose for ``labels``' users (the retriever's top
        ``k`` joined by each source's), with their features, as 20_two_tower and 30_reranker
        build them from the models fit on train."""
        t0 = time.perf_counter()
        c = cand.generate_candidates(self.retriever, labels, k=k, progress=True)
        if self.sources:
            c = cand.add_sources(c, self.retriever, self.sources, labels.ctx, k=k)
        user_emb = retriever_user_table(self.retriever, labels.users, labels.ctx, data.n_users)
        X, names = build_features(c, data, labels.ctx, labels.period, self.retriever, self.scorers, user_emb,
                                  recent_items)
        return StageInputs(labels, c, X, names, user_emb, time.perf_counter() - t0)


def refit_share(section: dict) -> float | None:
    """The share of train the stage-1 refits leave out (25_label_window): ``reranker.label_window``
    and ``reranker.stale_lists`` share one set of refits, so when both are set they must agree.
    Stale lists train LightGBM variants only: an MLP re-ranker reads the retriever's embeddings,
    and those of a refit retriever are not those it would read at test."""
    window, stale = section.get("label_window"), section.get("stale_lists")
    if window and stale and float(window) != float(stale):
        raise ConfigError(f"reranker.label_window ({window}) and reranker.stale_lists ({stale}) share one "
                          "refit of stage 1: set them to the same share (or one of them to null)")
    if stale:
        kinds = {v if isinstance(v, str) else v.get("variant") for v in section.get("variants", rr.VARIANTS)}
        if kinds - {"lgbm"}:
            raise ConfigError(f"reranker.stale_lists trains LightGBM variants only (an MLP re-ranker reads the "
                              f"retriever's embeddings, which a refit retriever does not share); the variants "
                              f"include {sorted(kinds - {'lgbm'})}")
    share = window or stale
    return float(share) if share else None


def refit_stage1(run: Run, models: Stage1, share: float) -> tuple[SplitData, Stage1, float]:
    """(the split with its last ``share`` of train as a pseudo-validation period, the stage-1
    models refit on the train rows before it, seconds). Epoch counts are those chosen on
    validation; nothing after the cut is read."""
    t0 = time.perf_counter()
    w = run.data.label_window(share)
    epochs = {n: best_epoch_of(run, n) for n in models.names}
    epochs["two_tower"] = models.retriever.history.get("best_epoch")
    return w, models.refit(w, epochs), time.perf_counter() - t0


def refit(model, data, best_epoch: int | None = None):
    """A copy of a fitted stage-1 model, fit again from scratch with the same configuration on
    ``data.train`` (the rows before the label window). Models trained for epochs run the epoch count
    chosen on validation (``best_epoch``) with no early stopping: nothing of the window is read."""
    import dataclasses
    cfg = model.cfg
    if best_epoch and hasattr(cfg, "epochs"):
        cfg = dataclasses.replace(cfg, epochs=int(best_epoch))
    new = type(model)(cfg)
    with guard.fitting(f"{model.name}@window"):
        new.fit(data, None)
    return new


# ---------------------------------------------------------------- the label window
def build_label_window(run: Run, w: SplitData, refits: Stage1, k: int) -> tuple[rr.ExtraLists, dict]:
    """The label window's training lists for the re-ranker (docs/PROTOCOL.md, "Who learns from what", label window).

    ``w`` is ``run.data.label_window(share)`` and ``refits`` the stage-1 models refit on its train
    rows (`refit_stage1`); they propose the window users' candidates (the same union as for
    validation) and score their features from the pre-window rows only. Labels are the window's
    positives. Returns the lists and a summary (users, rows, recall of the candidates within the
    window)."""
    t0 = time.perf_counter()
    labels = Labels.build(w, "valid", history_len=refits.retriever.cfg.history_len)
    inputs = refits.lists(w, labels, k, recent_items(run))
    lists = rr.ExtraLists(cands=inputs.cands, X=inputs.X, y=candidate_labels(inputs.cands, labels))
    summary = {"models": refits.names, "users": int(len(labels.users)), "rows": int(len(inputs.cands)),
               "window_rows": int(len(w.valid)), "pre_window_rows": int(len(w.train)),
               "lists_with_a_positive": int(len(lists.groups(np.zeros(0, np.int64))[1])),
               "feature_names": inputs.names, "seconds": time.perf_counter() - t0,
               "recall": cand.source_recall(inputs.cands, labels, (10, 100, k))}
    return lists, summary


def best_epoch_of(run: Run, name: str) -> int | None:
    """The epoch a trained baseline kept (its curve's best epoch), or None (closed-form models)."""
    from ..run.experiment import read_json
    curve = read_json(run.dir, "curves", f"{name}.json")
    return int(curve["best_epoch"]) if curve and curve.get("best_epoch", -1) > 0 else None


def _lists_key(run: Run, models: list[str]) -> str:
    """What lists built from refits depend on: the retriever's and the listed models' checkpoints."""
    files = [run.dir / "models" / "two_tower.pt"] + [run.dir / "models" / f"{n}.pt" for n in sorted(models)]
    return ";".join(f"{f.name}:{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in files if f.exists())


def _save_lists(run: Run, folder: str, cands: pd.DataFrame, arrays: dict, summary: dict) -> None:
    """Write lists built by 25_label_window into ``<run>/<folder>/``; the summary records the
    models they came from (``models``) and their checkpoints' key, so a later re-fit of any of
    them makes the lists stale."""
    summary = {**summary, "key": _lists_key(run, summary.get("models", []))}
    cand.save_candidates(cands, run.path(folder, "candidates.parquet"))
    with config.atomic_write(run.path(folder, "features.npz")) as tmp:
        np.savez(tmp, **arrays)
    config.write_json(run.path(folder, "summary.json"), summary)


def _load_lists(run: Run, folder: str, what: str, names: list[str]) -> tuple[pd.DataFrame, dict]:
    """(candidates, arrays) written by `_save_lists`: an error naming 25_label_window when it has
    not run, when a stage-1 checkpoint changed since, or when the feature columns are not the
    validation features' ``names``."""
    import json
    summary = json.loads(run.require(folder, "summary.json", stage="25_label_window").read_text())
    if summary.get("key") != _lists_key(run, summary.get("models", [])):
        raise ValueError(f"the {what} were built from other stage-1 checkpoints than the current ones: "
                         "rerun 25_label_window")
    if summary["feature_names"] != list(names):
        raise ValueError(f"{what} features {summary['feature_names']} differ from the validation "
                         f"features {names}: rerun 25_label_window")
    with np.load(run.dir / folder / "features.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return cand.load_candidates(run.dir / folder / "candidates.parquet"), arrays


def save_label_window(run: Run, lists: rr.ExtraLists, summary: dict) -> None:
    """Write the window's lists (``window/``)."""
    _save_lists(run, "window", lists.cands, {"X": lists.X, "y": lists.y}, summary)


def load_label_window(run: Run, names: list[str]) -> rr.ExtraLists:
    """The label window's lists written by 25_label_window; their feature columns must be the
    validation features' ``names``."""
    cands, z = _load_lists(run, "window", "label window's lists", names)
    return rr.ExtraLists(cands=cands, X=z["X"], y=z["y"])


# ---------------------------------------------------------------- stale validation lists
def build_stale_lists(run: Run, refits: Stage1, k: int) -> tuple[StageInputs, dict]:
    """Validation lists as stale as the test lists are (``reranker.stale_lists``).

    At test, every stage-1 model was fit on train and scores histories one period longer (they
    include the validation rows). On validation the same models see no such gap, so a re-ranker
    trained on their lists learns from candidates and scores fresher than those it will re-rank.
    Here the stage-1 models refit before the last share of train (`refit_stage1`) propose and
    score the validation users' candidates from their whole train history: the same gap, with no
    validation or test row in any fit. Labels are the validation positives. The summary holds the
    lists' recall and each refit candidate source's own validation nDCG@10."""
    t0 = time.perf_counter()
    ev = run.evaluator("valid", history_len=refits.retriever.cfg.history_len)
    inputs = refits.lists(run.data, ev.labels, k, recent_items(run))
    summary = {"models": refits.names, "users": int(len(ev.labels.users)), "rows": int(len(inputs.cands)),
               "feature_names": inputs.names, "recall": cand.source_recall(inputs.cands, ev.labels, (10, 100, k)),
               "refit_sources_valid_ndcg@10": {n: float(ev(m).means()["ndcg@10"]) for n, m in refits.sources.items()},
               "seconds": time.perf_counter() - t0}
    return inputs, summary


def save_stale_lists(run: Run, inputs: StageInputs, summary: dict) -> None:
    """Write the stale validation lists (``stale/``)."""
    _save_lists(run, "stale", inputs.cands, {"X": inputs.X, "user_emb": inputs.user_emb}, summary)


def load_stale_lists(run: Run, valid: StageInputs) -> StageInputs:
    """The stale validation lists written by 25_label_window, as the re-ranker's training inputs:
    the same users and labels as the (fresh) validation lists ``valid``, and the same feature
    columns."""
    cands, z = _load_lists(run, "stale", "stale validation lists", valid.names)
    return StageInputs(valid.labels, cands, z["X"], list(valid.names), z["user_emb"], 0.0)


def build_refit_lists(run: Run, retriever, sources: dict, extra: dict) -> dict:
    """25_label_window: refit stage 1 before the last share of train once, then build (and save)
    what the params ask for: the label window's lists (``window/``) and the stale validation
    lists (``stale/``). A folder whose option is off is removed. Returns each built one's summary."""
    import shutil
    section = run.params["reranker"]
    share, k = refit_share(section), int(run.params["two_tower"]["candidate_k"])
    out = {}
    if share:
        w, refits, seconds = refit_stage1(run, Stage1(retriever, sources, extra), share)
        print(f"stage 1 refit on the {len(w.train):,} train rows before the last {share:g} of train: {seconds:.0f}s")
        out["refit"] = {"share": share, "seconds": seconds, "models": ["two_tower", *refits.names]}
    for folder, key in (("window", "label_window"), ("stale", "stale_lists")):
        if not section.get(key):
            shutil.rmtree(run.dir / folder, ignore_errors=True)
            continue
        if folder == "window":
            lists, summary = build_label_window(run, w, refits, k)
            out[folder] = {"share": share, **summary}
            save_label_window(run, lists, out[folder])
        else:
            inputs, summary = build_stale_lists(run, refits, k)
            out[folder] = {"share": share, **summary}
            save_stale_lists(run, inputs, out[folder])
    return out


def held_out_users(valid: StageInputs, model: rr.Reranker) -> tuple[np.ndarray, np.ndarray]:
    """(train users, held-out users) of the re-ranker's validation split (the same fixed seed).
    Single-split models only (``folds: 1``); a cross-fitted ensemble has no single held-out set:
    use `out_of_fold_ranked` / `in_fold_ranked`."""
    if isinstance(model, rr.RerankerEnsemble):
        raise ValueError("a cross-fitted re-ranker has no single held-out split; use "
                         "two_stage.out_of_fold_ranked / in_fold_ranked")
    return split_users(valid.labels.users, model.cfg.held_out_share, model.cfg.seed)


# ---------------------------------------------------------------- scored rankings
# Each `*_ranked` is the protocol's EvalResult of the matching `reranker.*_topk` lists.
def ranked(model: rr.Reranker, inputs: StageInputs, users: np.ndarray | None = None, k_keep: int = 1000,
           ks=DEFAULT_KS) -> EvalResult:
    """`reranker.topk` of ``inputs``' candidates, scored under the protocol (for ``users``, a
    subset of the period's scored users, or all of them)."""
    labels = inputs.labels if users is None else subset_labels(inputs.labels, users)
    t0 = time.perf_counter()
    top = rr.topk(model, inputs, labels.users, k_keep)
    seconds = time.perf_counter() - t0 + inputs.seconds * len(labels.users) / max(len(inputs.labels.users), 1)
    return evaluate_ranking(top, labels, ks, seconds=seconds)


def _fold_ranked(model: rr.Reranker, valid: StageInputs, out_of_fold: bool, k_keep: int, ks) -> EvalResult:
    if not isinstance(model, rr.RerankerEnsemble):          # folds: 1 -> the single split
        trained_on, held = held_out_users(valid, model)
        return ranked(model, valid, held if out_of_fold else trained_on, k_keep, ks)
    if valid.period != "valid":
        raise ValueError(f"out-of-fold / in-fold rankings exist for the validation users only, not {valid.period!r}")
    fn = rr.out_of_fold_topk if out_of_fold else rr.in_fold_topk
    t0 = time.perf_counter()
    top = fn(model, valid, valid.labels.users, k_keep)
    return evaluate_ranking(top, valid.labels, ks, seconds=time.perf_counter() - t0 + valid.seconds)


def out_of_fold_ranked(model: rr.Reranker, valid: StageInputs, k_keep: int = 1000, ks=DEFAULT_KS) -> EvalResult:
    """`reranker.out_of_fold_topk` scored: the two-stage system's honest validation score, every
    validation user ranked by the fold model that never trained on them. For a single-split
    model (``folds: 1``): its held-out users only."""
    return _fold_ranked(model, valid, True, k_keep, ks)


def in_fold_ranked(model: rr.Reranker, valid: StageInputs, k_keep: int = 1000, ks=DEFAULT_KS) -> EvalResult:
    """`reranker.in_fold_topk` scored: the leaky "seed protocol" number, every validation user
    ranked by the fold models that trained on them (single split: the train users by the model)."""
    return _fold_ranked(model, valid, False, k_keep, ks)
