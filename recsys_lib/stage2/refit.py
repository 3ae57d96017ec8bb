"""Stage 1 refit before the last share of train (25_label_window): the label window's lists and
the stale validation lists (docs/PROTOCOL.md, "Who learns from what").

Both come from one refit of every stage-1 model (the retriever, the candidate sources, the
scorers) on the train rows before the cut, each run for the epoch count it was given on
validation, so nothing after the cut is read. The label window's lists are the window users'
candidates, labelled by the window's positives (`WindowLists`, for LightGBM). The stale
validation lists are the validation users' candidates proposed and scored by the refits: as
stale as the test lists are, for a re-ranker to learn the test-time condition from.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import candidates as cand
from .. import config
from ..errors import ConfigError
from ..protocol import guard
from ..protocol.evaluate import Labels
from ..protocol.splitdata import SplitData
from ..run.experiment import Run, read_json
from .features import build_features, retriever_user_table
from .inputs import StageInputs, WindowLists
from .ranking import candidate_labels
from .section import RerankerSection
from .sources import load_baselines, load_retriever


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


def refit_share(section: "dict | RerankerSection") -> float | None:
    """The share of train the stage-1 refits leave out (25_label_window): ``reranker.label_window``
    and ``reranker.stale_lists`` share one set of refits, so when both are set they must agree.
    Stale lists train LightGBM variants only: an MLP re-ranker reads the retriever's embeddings,
    and those of a refit retriever are not those it would read at test."""
    s = section if isinstance(section, RerankerSection) else RerankerSection.from_params(section)
    window, stale = s.label_window, s.stale_lists
    if window and stale and float(window) != float(stale):
        raise ConfigError(f"reranker.label_window ({window}) and reranker.stale_lists ({stale}) share one "
                          "refit of stage 1: set them to the same share (or one of them to null)")
    if stale and s.kinds - {"lgbm"}:
        raise ConfigError(f"reranker.stale_lists trains LightGBM variants only (an MLP re-ranker reads the "
                          f"retriever's embeddings, which a refit retriever does not share); the variants "
                          f"include {sorted(s.kinds - {'lgbm'})}")
    share = window or stale
    return float(share) if share else None


def refit_stage1(run: Run, models: Stage1, share: float) -> tuple[SplitData, Stage1, float]:
    """(the split with its last ``share`` of train as a pseudo-validation period, the stage-1
    models refit on the train rows before it, seconds). Epoch counts are those chosen on
    validation; nothing after the cut is read."""
    t0 = time.perf_counter()
    w = run.data.label_window(share)
    epochs = {n: best_epoch_of(run, n) for n in models.names}
    epochs["two_tower"] = models.retriever.curve.get("best_epoch")
    return w, models.refit(w, epochs), time.perf_counter() - t0


def refit_from_checkpoints(run: Run, sources: list[str], scorers: list[str],
                           share: float) -> tuple[SplitData, Stage1, float]:
    """`refit_stage1` for the models of the run folder's checkpoints, loaded one at a time: each
    model fit on train is read only for its configuration and epoch count, and dropped before the
    next one loads, so the train-fit models are never held beside the refits (at ML-32M size EASE
    alone is 1.6 GB, and the sources and scorers both loaded it: issue 41, 25_label_window at
    11.7 GB). The refits are those `refit_stage1` makes of the same models loaded together: they
    run in its order, and a load leaves the random generators as it found them (loading MF
    reseeds torch, building SASRec draws from it), so every refit starts from the same state."""
    t0 = time.perf_counter()
    w = run.data.label_window(share)
    with _generators_kept():
        fitted = load_retriever(run)
    retriever = refit(fitted, w, fitted.curve.get("best_epoch"))
    del fitted
    fits = {}
    for name in dict.fromkeys([*sources, *scorers]):            # the order of `Stage1.refit`
        with _generators_kept():
            fitted = load_baselines(run, [name])[name]
        fits[name] = refit(fitted, w, best_epoch_of(run, name))
        del fitted
    refits = Stage1(retriever, {n: fits[n] for n in sources}, {n: fits[n] for n in scorers})
    return w, refits, time.perf_counter() - t0


@contextlib.contextmanager
def _generators_kept():
    """Python's, numpy's and torch's (CPU) global random states restored on exit."""
    state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])


def refit(model, data, best_epoch: int | None = None):
    """A copy of a fitted stage-1 model, fit again from scratch with the same configuration on
    ``data.train`` (the rows before the label window). Models trained for epochs run the epoch count
    chosen on validation (``best_epoch``) with no early stopping: nothing of the window is read."""
    cfg = model.cfg
    if best_epoch and hasattr(cfg, "epochs"):
        cfg = dataclasses.replace(cfg, epochs=int(best_epoch))
    new = type(model)(cfg)
    with guard.fitting(f"{model.name}@window"):
        new.fit(data, None)
    return new


# ---------------------------------------------------------------- the label window
def build_label_window(run: Run, w: SplitData, refits: Stage1, k: int) -> tuple[WindowLists, dict]:
    """The label window's training lists for the re-ranker (docs/PROTOCOL.md, "Who learns from what", label window).

    ``w`` is ``run.data.label_window(share)`` and ``refits`` the stage-1 models refit on its train
    rows (`refit_stage1`); they propose the window users' candidates (the same union as for
    validation) and score their features from the pre-window rows only. Labels are the window's
    positives. Returns the lists and a summary (users, rows, recall of the candidates within the
    window)."""
    t0 = time.perf_counter()
    labels = Labels.build(w, "valid", history_len=refits.retriever.cfg.history_len,
                          causal_catalogue=run.eval.causal_catalogue)
    inputs = refits.lists(w, labels, k, recent_items(run.params))
    lists = WindowLists(cands=inputs.cands, X=inputs.X, y=candidate_labels(inputs.cands, labels))
    summary = {"models": refits.names, "users": int(len(labels.users)), "rows": int(len(inputs.cands)),
               "window_rows": int(len(w.valid)), "pre_window_rows": int(len(w.train)),
               "lists_with_a_positive": int(len(lists.groups(np.zeros(0, np.int64))[1])),
               "feature_names": inputs.names, "seconds": time.perf_counter() - t0,
               "recall": cand.source_recall(inputs.cands, labels, (10, 100, k))}
    return lists, summary


def best_epoch_of(run: Run, name: str) -> int | None:
    """The epoch a trained baseline kept (its curve's best epoch), or None (closed-form models)."""
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


def save_label_window(run: Run, lists: WindowLists, summary: dict) -> None:
    """Write the window's lists (``window/``)."""
    _save_lists(run, "window", lists.cands, {"X": lists.X, "y": lists.y}, summary)


def load_label_window(run: Run, names: list[str]) -> WindowLists:
    """The label window's lists written by 25_label_window; their feature columns must be the
    validation features' ``names``."""
    cands, z = _load_lists(run, "window", "label window's lists", names)
    return WindowLists(cands=cands, X=z["X"], y=z["y"])


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
    inputs = refits.lists(run.data, ev.labels, k, recent_items(run.params))
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


def build_refit_lists(run: Run) -> dict:
    """25_label_window: refit stage 1 before the last share of train once, then build (and save)
    what the params ask for: the label window's lists (``window/``) and the stale validation
    lists (``stale/``). A folder whose option is off is removed. Returns each built one's summary.
    The stage-1 models are the run folder's checkpoints (20_two_tower's retriever, the candidate
    sources ``two_tower.candidate_sources``, the scorers ``reranker.extra_scorers``), read one at a
    time by `refit_from_checkpoints`."""
    raw = run.params["reranker"]
    # only the options the refits read (stale lists check the variants: LightGBM only)
    section = RerankerSection.options(raw, "label_window", "stale_lists", "extra_scorers", "recent_items",
                                      *(("variants",) if raw.get("stale_lists") else ()))
    share, k = refit_share(section), int(run.params["two_tower"]["candidate_k"])
    out = {}
    if share:
        sources = list(run.params["two_tower"].get("candidate_sources", []))
        w, refits, seconds = refit_from_checkpoints(run, sources, list(section.extra_scorers), share)
        print(f"stage 1 refit on the {len(w.train):,} train rows before the last {share:g} of train: {seconds:.0f}s")
        out["refit"] = {"share": share, "seconds": seconds, "models": ["two_tower", *refits.names]}
    for folder, key in (("window", "label_window"), ("stale", "stale_lists")):
        if not getattr(section, key):
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


def recent_items(params: dict) -> tuple[int, ...]:
    """``reranker.recent_items``: the N of the recent-taste features (scores from a user's last N
    rows, `features.recent_context`); empty: none."""
    return tuple(int(n) for n in RerankerSection.options(params["reranker"], "recent_items").recent_items or ())
