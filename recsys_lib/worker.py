"""The torchrun entry point: ``torchrun ... -m recsys_lib.worker MODEL --run-dir DIR``.

MODEL is ``mf``, ``neumf``, ``two_tower`` or ``reranker``. The run folder is 01_split's
(``data.pt``, ``run.json``; the re-ranker also needs 20_two_tower's candidates and features and,
when its options are on, 25_label_window's lists). The run's parameters (``run.json``, plus
``--set`` overrides) decide the search, exactly as the notebook's ``run.fit_model``: the same
grid, early stopping on the same validation metric (its scoring sharded over the ranks). Rank 0
writes ``OUT/model.pt`` (the checkpoint, ``Model.load`` reads it) and then ``OUT/result.pt``
(search table, history, timings; the re-ranker's fitted variants), each atomically; the other
ranks wait at a barrier. ``--score valid,test`` also scores the fitted model on those periods
with sharded full-catalogue ranking (lists and metrics in ``result.pt``).

The launcher (`run.launch`) runs it for the notebooks when ``dist.nproc`` > 1, with a job file;
this module needs every stage it may fit, so it sits at the top of the package.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import config, dist, params as param_check
from .errors import ConfigError, PipelineError, RecsysError
from .models import two_tower
from .models.registry import REGISTRY
from .protocol import guard
from .protocol.evaluate import HEADLINE, evaluate_ranking, rank_topk
from .run.experiment import Run
from .run.launch import ref, resolve, settings
from .stage2 import selection
from .stage2.rerankers import MLP_KINDS, kind_of
from .stage2.section import RerankerSection
from .stage2 import system as two_stage
from .stage2.features import _as_np

#: the models a worker can search from a run folder alone (``MODEL`` on the command line): the
#: registry's entries marked ``worker``
TUNED = tuple(n for n, s in REGISTRY.items() if s.worker)


class FrozenItems:
    """The retriever as the re-ranker's fit sees it: its frozen item table (``item_embeddings``)."""

    def __init__(self, table: np.ndarray):
        self.table = table

    def item_embeddings(self) -> torch.Tensor:
        return torch.from_numpy(self.table)


def run_of(job: dict, run_dir: Path, device: torch.device) -> Run:
    """The notebook's `Run`, rebuilt from a job's fields (`launch.run_fields`)."""
    return Run(dataset=job["dataset"], profile=job["profile"], dir=Path(run_dir), params=job["params"],
               seed=int(job["seed"]), device=device)


def _work_tune(job: dict, run_dir: Path, device: torch.device, out: Path) -> None:
    run = run_of(job, run_dir, device)
    config.seed_everything(run.seed)
    validate = run.early_stopping_metric(job["n_early_stopping_users"], job["metric"], job["history_len"],
                                        model=job["name"])
    t0 = time.perf_counter()
    with guard.fitting(job["name"]):
        model, search = resolve(job["tune"])(run.data, run.params.get(job["section"], {}), validate,
                                              device, run.seed)
    fit_seconds = time.perf_counter() - t0
    scores = {}
    for period in job.get("score") or []:             # sharded full-catalogue ranking, every rank
        labels = run.evaluator(period, history_len=job["history_len"]).labels
        ks = run.eval.ks
        t1 = time.perf_counter()
        items, values = rank_topk(model, labels.users, labels.ctx, max(ks), labels.n_items,
                                  run.eval.batch_users, with_scores=True)
        res = evaluate_ranking(items, labels, ks, seconds=time.perf_counter() - t1)
        scores[period] = {"users": labels.users, "items": items, "scores": values, "metrics": res.means(),
                          "seconds": res.seconds}
    if dist.is_main():
        model.save(out / "model.pt")
        _save_result(out, {"class": ref(type(model)), "search": search, "curve": getattr(model, "curve", None),
                           "fit_seconds": fit_seconds, "world": dist.world(), "device": str(device),
                           "scores": scores})


def _work_reranker(job: dict, run_dir: Path, device: torch.device, out: Path) -> None:
    run = run_of(job, run_dir, device)
    section = RerankerSection.from_params(job["section"])
    if not dist.is_main():                            # LightGBM variants run on rank 0 only
        section.variants = [v for v in section.variants if kind_of(v) in MLP_KINDS]
        if not section.variants:
            return
    retriever = FrozenItems(job["item_table"]) if job["item_table"] is not None else None
    with guard.fitting("reranker", allow=("train", "valid")):
        best, table, models = selection.tune(section, job["inputs"], run.data, retriever, seed=run.seed,
                                             window=job["window"], progress=True)
    if dist.is_main():
        _save_result(out, {"chosen": best.label, "search": table, "world": dist.world(),
                           "models": {label: m.to_blob() for label, m in models.items()}})


def _save_result(out: Path, result: dict) -> None:
    with config.atomic_write(out / "result.pt") as tmp:
        torch.save(result, tmp)


def _run_params(run_dir: Path, overrides: list[str]) -> dict:
    """The run's dataset, profile, parameters (run.json, then ``--set``), seed and device."""
    path = Path(run_dir, "run.json")
    if not path.exists():
        raise PipelineError(f"{path} is missing: run 01_split for this run folder first")
    info = json.loads(path.read_text())
    param_check.check_overrides(info["params"], overrides)
    params = config.apply_overrides(info["params"], overrides)
    return {"dataset": info["dataset"], "profile": info["profile"], "params": params,
            "seed": int(params.get("seed", 42)), "device": params.get("device", "auto")}


def _job_from_run(name: str, run_dir: Path, fields: dict, score: list[str], out: Path) -> dict:
    """The job of ``python -m recsys_lib.worker NAME --run-dir DIR``: the run's parameters and the
    options the notebook passes to ``run.fit_model``."""
    params = fields["params"]
    if name == "reranker":
        return _reranker_job_from_run(run_dir, fields, out)
    if name not in TUNED:
        raise ConfigError(f"unknown model {name!r}; one of {sorted([*TUNED, 'reranker'])}")
    metric, history_len = HEADLINE, None
    if name == "two_tower":
        section = params["two_tower"]
        history_len = two_tower.history_len_needed(section)
        n_items = config.load_torch(Path(run_dir, "data.pt")).n_items
        metric = two_tower.selection_metric(int(section.get("candidate_k", 500)), n_items)
    return {"kind": "tune", "name": name, "tune": ref(REGISTRY[name].tune), "section": name, "metric": metric,
            "history_len": history_len, "n_early_stopping_users": None, "score": score, **fields}


def _reranker_job_from_run(run_dir: Path, fields: dict, out: Path) -> dict:
    """Rank 0 builds the re-ranker's inputs from the run (`stage2.system.training_inputs`, as
    30_reranker does) into a job file; the other ranks wait and read it."""
    path = out / "job.pt"
    if dist.is_main():
        run = run_of(fields, run_dir, config.resolve_device("cpu"))
        t = two_stage.training_inputs(run)
        job = {"kind": "reranker", "name": "reranker", "section": dict(run.params["reranker"]), "inputs": t.train,
               "window": t.window, "item_table": _as_np(t.retriever.item_embeddings()).astype(np.float32), **fields}
        with config.atomic_write(path) as tmp:
            torch.save(job, tmp)
    dist.barrier()
    return config.load_torch(path)


WORK = {"tune": _work_tune, "reranker": _work_reranker}


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record
    try:
        return record(_main)(argv)
    except RecsysError as exc:                            # a bad parameter or a missing file: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recsys_lib.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="mf | neumf | two_tower | reranker")
    p.add_argument("--run-dir", required=True, help="the run folder (01_split's data.pt and run.json)")
    p.add_argument("--out-dir", default=None, help="where rank 0 writes model.pt and result.pt "
                                                  "(default RUN_DIR/dist/MODEL)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="parameter override")
    p.add_argument("--score", default="", help="periods to score after fitting, e.g. valid,test")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)        # written by `run_job`
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    out = Path(args.out_dir).resolve() if args.out_dir else run_dir / "dist" / args.model
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # torchrun stops the others: clean up temp files
    config.torch_threads()                               # $RECSYS_TORCH_THREADS, when set, over OMP_NUM_THREADS
    job = config.load_torch(args.job) if args.job else None
    fields = None if job else _run_params(run_dir, args.set)
    if fields and args.model == "reranker":
        fields["device"] = "cpu"                         # the re-ranker's MLPs are cpu models (gloo)
    device = dist.init(str((job or fields)["device"]), float(settings((job or fields)["params"])["timeout_minutes"]))
    backend = torch.distributed.get_backend() if dist.initialized() else "no process group"
    sys.stdout.write(f"[dist] rank {dist.rank()}/{dist.world()} pid {os.getpid()} on {device} ({backend}), "
                     f"{torch.get_num_threads()} threads\n")     # one write: ranks share the pipe
    sys.stdout.flush()
    if dist.is_main():
        for stale in ("model.pt", "result.pt"):          # an earlier run's files never pass for this one's
            (out / stale).unlink(missing_ok=True)
    else:
        sys.stdout = open(os.devnull, "w")               # one copy of the log: rank 0's
    try:
        if job is None:
            job = _job_from_run(args.model, run_dir, fields, [s for s in args.score.split(",") if s], out)
        WORK[job["kind"]](job, run_dir, device, out)
        dist.barrier()                                  # the others wait for rank 0's files
        if dist.is_main():
            print(f"[dist] {job['name']}: wrote {out / 'result.pt'}", flush=True)
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
