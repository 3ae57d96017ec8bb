"""A run folder and what notebooks read and write there (they meet only through these files).

    data/runs/<dataset>/<profile>/
        run.json                  dataset, profile, params, split id and path, dataset checksums
        data.pt                   the encoded SplitData (ids, item features, periods)
        models/<name>.pt          checkpoints
        metrics/<name>.json       one model: params, search table, timings, valid/test summaries
        per_user/<name>-<period>.parquet   per-user metrics and top-10 lists (paired bootstrap)
        candidates/<period>.parquet        retriever candidates for the re-ranker
        curves/<name>.json        training curves
        .cache/blend/             17_blend's z-score tables while its search runs, when too large
                                  for memory (`models.blend_spill`); removed after
        .cache/tables/            tables counted on the train rows (the transition model's), named by
                                  their content and options: a cache, read by any notebook that
                                  counts the same table, never an input of a notebook's record

`Run.open` is what each notebook calls in its derived cell; it fails fast, naming the missing
file, when an earlier stage has not run.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .. import config
from ..protocol import guard
from . import tracking
from . import launch
from .layout import notebook_of
from ..models import tuning
from ..models.registry import REGISTRY, blend_members
from ..errors import PipelineError
from ..protocol.evaluate import HEADLINE, EvalConfig, EvalResult, Evaluator
from ..protocol.splitdata import SplitData


TABLE_CACHE = (".cache", "tables")   # hidden: run.tracking and run.state never record it


def default_run_dir(dataset: str, profile: str) -> Path:
    return config.runs_dir(dataset) / profile


@dataclass
class Run:
    """Paths, parameters, device and (lazily) the encoded split of one pipeline run."""

    dataset: str
    profile: str
    dir: Path
    params: dict
    seed: int
    device: torch.device
    _data: SplitData | None = field(default=None, repr=False)
    _evaluators: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, dataset: str, profile: str = "full", run_dir: str | os.PathLike | None = None,
             overrides: list[str] | dict | None = None, seed: int | None = None,
             device: str | None = None) -> "Run":
        params = config.load_params(profile, dataset, overrides)
        seed = int(params.get("seed", 42) if seed is None else seed)
        params["seed"] = seed
        device_name = device if device not in (None, "") else params.get("device", "auto")
        run_dir = Path(run_dir) if run_dir else default_run_dir(dataset, profile)
        run_dir.mkdir(parents=True, exist_ok=True)
        params = tracking.track(params, run_dir)   # under the pipeline: note what is read and loaded
        config.torch_threads()
        config.seed_everything(seed)
        return cls(dataset=dataset, profile=profile, dir=run_dir, params=params, seed=seed,
                   device=config.resolve_device(device_name))

    def path(self, *parts: str) -> Path:
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def require(self, *parts: str, stage: str = "an earlier notebook") -> Path:
        """The path of an artefact an earlier stage wrote; a clear error if it is missing."""
        p = self.dir.joinpath(*parts)
        tracking.note_input(p)
        if not p.exists():
            raise PipelineError(f"{p} is missing: run {stage} first (or the whole pipeline: "
                                f"python -m recsys_lib.pipeline --dataset {self.dataset} --profile {self.profile})")
        return p

    # ------------------------------------------------------------ data
    def save_data(self, data: SplitData, info: dict) -> None:
        with config.atomic_write(self.path("data.pt")) as tmp:
            torch.save(data, tmp)
        config.write_json(self.path("run.json"), {"dataset": self.dataset, "profile": self.profile,
                                                  "params": self.params, **info})
        self._data = data.use_table_dir(self.dir.joinpath(*TABLE_CACHE))

    @property
    def data(self) -> SplitData:
        """The encoded split (``data.pt``), whose train-row tables are kept in the run's
        ``.cache/tables/`` (`SplitData.use_table_dir`): a table one notebook counted, the next reads.
        The cache is hidden from the completion records on purpose: a table is named by the rows,
        options and code it comes from, so reading it and counting it give the same arrays, and a
        notebook that read one does not depend on the notebook that wrote it."""
        if self._data is None:
            self._data = config.load_torch(self.require("data.pt", stage="01_split")).use_table_dir(
                self.dir.joinpath(*TABLE_CACHE))
        return self._data

    @property
    def eval(self) -> EvalConfig:
        """The params ``eval:`` section, typed (`protocol.evaluate.EvalConfig`)."""
        return EvalConfig.from_params(self.params.get("eval"))

    @property
    def info(self) -> dict:
        return json.loads(self.require("run.json", stage="01_split").read_text())

    # ------------------------------------------------------------ evaluation
    def evaluator(self, period: str, max_users: int | None = None, history_len: int | None = None) -> Evaluator:
        """Cached labels for ``period`` (build before fitting: early stopping never reads rows)."""
        history_len = int(history_len or self.params.get("history_len", 5))
        key = (period, max_users, history_len)
        if key not in self._evaluators:
            ev = self.eval
            self._evaluators[key] = Evaluator(self.data, period, ks=ev.ks, batch_users=ev.batch_users,
                                              history_len=history_len, max_users=max_users, seed=self.seed,
                                              causal_catalogue=ev.causal_catalogue)
        return self._evaluators[key]

    def early_stopping_metric(self, max_users: int | None = None, metric: str = HEADLINE,
                              history_len: int | None = None, model: str | None = None):
        """A callback ``validate(scorer) -> float``: validation ``metric`` (nDCG@10 unless told;
        optionally on a user sample, with histories of ``history_len`` items). It ranks only the
        lists' head the metric reads, unless the registered ``model``'s scores tie (`tuning.validator`)."""
        spec = REGISTRY.get(model) if model else None
        ties = bool(spec and spec.class_name and getattr(spec.cls, "scores_tie", False))
        return tuning.validator(self.evaluator("valid", max_users, history_len), metric, full_lists=ties)

    def score(self, model: Any, name: str, periods=("valid", "test"),
              history_len: int | None = None) -> dict[str, EvalResult]:
        """Evaluate a fitted model on each period (full catalogue, seen items masked)."""
        return {p: self.evaluator(p, history_len=history_len)(model, progress=True) for p in periods}

    def fit_model(self, name: str, tune: Any = None, section: str | None = None,
                  n_early_stopping_users: int | None = None, metric: str = HEADLINE,
                  history_len: int | None = None, **extra: Any) -> tuple[Any, pd.DataFrame, dict[str, EvalResult]]:
        """Tune and fit a model on train (validation for selection and early stopping only), score
        it on validation and test, save its checkpoint and metrics. ``tune(data, params_section,
        validate, device, seed) -> (model, search_table)`` (default: the registry's, `models.registry`)
        runs inside the leakage guard: it may read the train period only (the validation
        callback's labels are built here, before).

        ``validate(model) -> float`` is validation ``metric`` (nDCG@10 for every baseline; the
        retriever passes its Recall@candidate_k) over histories of ``history_len`` items (the
        params' ``history_len`` unless given; the evaluations on validation and test use the same).
        ``extra`` keys are written into the metrics JSON."""
        section = section or name
        tune = tune or REGISTRY[name].tune
        validate = self.early_stopping_metric(n_early_stopping_users, metric, history_len, model=name)
        t0 = time.perf_counter()
        with guard.fitting(name):     # dist.nproc > 1: the same search in torchrun processes
            model, search = launch.tune(self, name, tune, validate, section, metric, history_len,
                                            n_early_stopping_users)
        fit_seconds = time.perf_counter() - t0
        cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
        summary = tuning.summarize(search, self.params.get(section, {}).get("grid"),
                                   epochs=getattr(cfg, "epochs", None),
                                   config=cfg)                   # and every value it held
        print(f"{name} search:\n{tuning.describe(summary, metric)}", flush=True)
        results = self.score(model, name, history_len=history_len)
        if hasattr(model, "save"):
            model.save(self.path("models", f"{name}.pt"))
        curve = getattr(model, "curve", None)
        if curve is not None:
            self.save_curve(name, curve)
        self.record(name, results, params=asdict(cfg) if is_dataclass(cfg) else self.params.get(section, {}),
                    fit_seconds=fit_seconds, search=search, tuning=summary, **extra)
        return model, search, results

    def fit_blend(self) -> tuple[Any, pd.DataFrame, dict[str, EvalResult]]:
        """The score blend of the single-stage models (`models.blend`): the members' checkpoints
        (the params' ``blend.members``, or the registry's declared members, `registry.blend_members`),
        weights chosen on validation, scored on validation and test, recorded as ``blend``. Tables too
        large for memory go to the run's hidden ``.cache/blend/`` during the search (`blend.tune`)."""
        from ..models import blend                  # here: the notebooks before 17_blend never load it
        cfg = blend.BlendConfig.from_params(self.params.get("blend"))
        names = list(cfg.members) or blend_members()
        members = {n: REGISTRY[n].cls.load(self.require("models", f"{n}.pt", stage=REGISTRY[n].notebook),
                                           device=str(self.device)) for n in names}
        labels = self.evaluator("valid", cfg.max_users).labels          # built before the search
        t0 = time.perf_counter()
        with guard.fitting("blend"):
            model, search = blend.tune(members, labels, cfg.steps, self.eval.batch_users,
                                       spill_dir=self.dir.joinpath(".cache", "blend"))
        fit_seconds = time.perf_counter() - t0
        summary = blend.summarize(search, model.weights, cfg.steps)
        summary["held"] = tuning.held(cfg)                               # steps, max_users: not searched
        print(f"blend search:\n{tuning.describe(summary)}", flush=True)
        results = self.score(model, "blend")
        self.record("blend", results, params={**asdict(cfg), "members": names, "weights": model.weights},
                    fit_seconds=fit_seconds, search=search, tuning=summary)
        return model, search, results

    # ------------------------------------------------------------ recording
    def record(self, name: str, results: dict[str, EvalResult], params: dict | None = None,
               fit_seconds: float | None = None, search: pd.DataFrame | None = None,
               notes: str = "", **extra: Any) -> dict:
        """Write metrics/<name>.json and per_user/<name>-<period>.parquet; return the JSON."""
        n_boot = self.eval.n_bootstrap
        out = {"model": name, "dataset": self.dataset, "profile": self.profile, "seed": self.seed,
               "params": params or {}, "fit_seconds": fit_seconds, "notes": notes,
               "git_commit": config.git_commit(), "device": str(self.device),
               "search": search.to_dict(orient="records") if search is not None else None,
               "written": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
        for period, res in results.items():
            summary = res.summary(n_bootstrap=n_boot, seed=self.seed)
            summary["scoring_seconds_per_1000_users"] = 1000 * res.seconds / max(len(res.users), 1)
            out[period] = summary
            frame = res.to_frame()
            for j in range(res.topk.shape[1]):
                frame[f"top_{j}"] = res.topk[:, j]
            with config.atomic_write(self.path("per_user", f"{name}-{period}.parquet")) as tmp:
                frame.to_parquet(tmp, index=False)
        config.write_json(self.path("metrics", f"{name}.json"), out)
        return out

    def clear_records(self, prefix: str) -> list[str]:
        """Remove metrics/per-user files of models named ``prefix*`` (a notebook that records a
        family of models calls this first, so a model of an earlier run never lingers)."""
        removed = []
        for folder, pattern in (("metrics", f"{prefix}*.json"), ("per_user", f"{prefix}*-*.parquet")):
            for f in (self.dir / folder).glob(pattern):
                f.unlink()
                removed.append(f.name)
        return removed

    def per_user(self, name: str, period: str) -> pd.DataFrame:
        return pd.read_parquet(self.require("per_user", f"{name}-{period}.parquet", stage=notebook_of(name)))

    def save_curve(self, name: str, history: Any) -> None:
        config.write_json(self.path("curves", f"{name}.json"),
                          history.as_dict() if hasattr(history, "as_dict") else history)


def collect_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every metrics/<name>.json of a run, sorted by the time it was written."""
    files = sorted(Path(run_dir, "metrics").glob("*.json"))
    rows = [json.loads(f.read_text()) for f in files]
    return sorted(rows, key=lambda r: r.get("written", ""))


def read_json(run_dir: str | os.PathLike, *parts: str) -> Any:
    """A JSON artefact of the run, or None when its notebook has not run."""
    p = Path(run_dir, *parts)
    tracking.note_input(p)                 # absent now: its appearing later makes the reader stale
    return json.loads(p.read_text()) if p.exists() else None
