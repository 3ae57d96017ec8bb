"""Fit the deep models with torch.distributed: the torchrun entry point, and the launcher the
fitting helpers call when the params ask for more than one process (``dist.nproc``).

    # one node, 2 processes (CPUs: gloo; GPUs: NCCL, one GPU per process)
    torchrun --standalone --nproc-per-node=2 -m recsys_lib.dist_train mf --run-dir data/runs/ml-32m/gpu
    # two nodes, 8 GPUs each: the same command on every node (a shared run folder)
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=mf -m recsys_lib.dist_train mf --run-dir /shared/runs/ml-32m/gpu

MODEL is ``mf``, ``neumf``, ``two_tower`` or ``reranker``. The run folder is 01_split's
(``data.pt``, ``run.json``; the re-ranker also needs 20_two_tower's candidates and features). The
run's parameters (``run.json``, plus ``--set`` overrides) decide the search, exactly as the
notebook's ``run.fit_model``: the same grid, early stopping on the same validation metric (its
scoring sharded over the ranks). Rank 0 writes ``OUT/model.pt`` (the checkpoint, ``Model.load``
reads it) and then ``OUT/result.pt`` (search table, history, timings; the re-ranker's fitted
variants), each atomically; the other ranks wait at a barrier. ``--score valid,test`` also scores
the fitted model on those periods with sharded full-catalogue ranking (lists and metrics in
``result.pt``).

Why the notebooks do not change: `tune` (for `Run.fit_model`) and `fit_reranker` (for
`two_stage.fit`) run the fit in-process when ``dist.nproc`` is 1 (the code that ran before), and
otherwise write a job file, launch torchrun as a subprocess, stream its output and load rank 0's
files. A failed rank fails the fit with a message naming it.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import config, dist, guard
from .errors import ConfigError, PipelineError
from .evaluate import HEADLINE, evaluate_ranking, rank_topk

#: model -> its tune function (`tuning` contract: tune(data, section, validate, device, seed))
TUNE = {"mf": "recsys_lib.models.mf:tune", "neumf": "recsys_lib.models.neumf:tune",
        "two_tower": "recsys_lib.models.two_tower:tune"}
MLP_KINDS = ("id_mlp", "mlp_features")       # the re-ranker kinds trained with torch
DEFAULTS = {"nproc": 1, "nnodes": 1, "rdzv_endpoint": None, "timeout_minutes": 30}


class DistributedError(PipelineError):
    """A distributed fit failed (a rank died, raised, or the launch itself failed)."""


# ---------------------------------------------------------------- parameters
def settings(params: dict) -> dict:
    """The params ``dist`` section with defaults; ``nproc: auto`` is the number of visible GPUs
    (1 without one)."""
    out = {**DEFAULTS, **(params.get("dist") or {})}
    if out["nproc"] == "auto":
        out["nproc"] = max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1
    if not isinstance(out["nproc"], int) or out["nproc"] < 1:
        raise ConfigError(f"dist.nproc must be a positive integer or auto, got {out['nproc']!r}")
    if out["nnodes"] > 1 and not out["rdzv_endpoint"]:
        raise ConfigError("dist.nnodes > 1 needs dist.rdzv_endpoint (host:port of node 0)")
    return out


def distributed(params: dict) -> bool:
    """True when the params ask for more than one training process."""
    s = settings(params)
    return s["nproc"] * s["nnodes"] > 1


def _ref(fn: Callable) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def _resolve(ref: str) -> Any:
    module, name = ref.split(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------- what the fitting helpers call
def tune(run, name: str, tune_fn: Callable, validate: Callable, section: str | None = None,
         metric: str = HEADLINE, history_len: int | None = None,
         early_stopping_users: int | None = None) -> tuple[Any, Any]:
    """``tune_fn(run.data, params[section], validate, run.device, run.seed)`` -> (model, search),
    as `Run.fit_model` calls it (inside its ``guard.fitting``), in-process when ``dist.nproc`` is 1;
    otherwise the same search in ``dist.nproc`` torchrun processes, whose validation callback is
    rebuilt there from ``metric``, ``history_len`` and ``early_stopping_users`` (the arguments
    `Run.fit_model` built ``validate`` from). The model comes back from rank 0's checkpoint,
    with its learning curve."""
    section = section or name
    if not distributed(run.params):
        return tune_fn(run.data, run.params.get(section, {}), validate, run.device, run.seed)
    job = {"kind": "tune", "name": name, "tune": _ref(tune_fn), "section": section,
           "metric": metric, "history_len": history_len, "early_stopping_users": early_stopping_users,
           **_run_fields(run)}
    with _workspace(run.dir, name) as work:
        result = run_job(job, run.dir, work, settings(run.params))
        model = _resolve(result["class"]).load(work / "model.pt", device=str(run.device))
    if result.get("history") is not None:
        model.history = result["history"]
    return model, result["search"]


def fit_reranker(run, valid, retriever, section: dict, window=None):
    """`reranker.tune` on ``valid`` -> (chosen, table, models by label), as `two_stage.fit` calls
    it; the MLP variants train in ``dist.nproc`` torchrun processes (LightGBM variants on rank 0).
    The workers get the inputs in a job file (candidates, features, the retriever's frozen user
    and item tables), so they never rebuild features."""
    from dataclasses import replace

    from .models import reranker as rr
    from .rerank_features import _as_np, retriever_user_table
    if valid.user_emb is None and retriever is not None:
        labels = valid.labels
        valid = replace(valid, user_emb=retriever_user_table(retriever, labels.users, labels.ctx,
                                                             run.data.n_users))
    table = _as_np(retriever.item_embeddings()).astype(np.float32) if retriever is not None else None
    job = {"kind": "reranker", "name": "reranker", "section": dict(section), "inputs": valid,
           "extra": window, "item_table": table, **_run_fields(run), "device": "cpu"}   # its MLPs run on cpu
    with _workspace(run.dir, "reranker") as work:
        result = run_job(job, run.dir, work, settings(run.params))
    models = {label: rr.Reranker.from_blob(blob) for label, blob in result["models"].items()}
    return models[result["chosen"]], result["search"], models


def _run_fields(run) -> dict:
    return {"dataset": run.dataset, "profile": run.profile, "params": dict(run.params), "seed": run.seed,
            "device": run.device.type}


@contextmanager
def _workspace(run_dir: Path, name: str) -> Iterator[Path]:
    """A fresh folder for one launch's job and outputs, removed afterwards (also on failure: a
    failed fit leaves no checkpoint behind for a later reader)."""
    work = Path(run_dir) / "dist" / f".{name}-{os.getpid()}-{time.time_ns()}"
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_job(job: dict, run_dir: Path, work: Path, opts: dict,
            on_line: Callable[[str], None] | None = None) -> dict:
    """Write ``job`` to ``work/job.pt``, run it under torchrun and return rank 0's ``result.pt``."""
    job_path = work / "job.pt"
    with config.atomic_write(job_path) as tmp:
        torch.save(job, tmp)
    launch([job["name"], "--run-dir", str(run_dir), "--job", str(job_path), "--out-dir", str(work)],
           nproc=opts["nproc"], nnodes=opts["nnodes"], rdzv_endpoint=opts["rdzv_endpoint"],
           on_line=on_line)
    return config.load_torch(work / "result.pt")


# ---------------------------------------------------------------- launching torchrun
def command(args: list[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
            rdzv_id: str = "recsys", node_rank: int | None = None) -> list[str]:
    """The torchrun command line for ``python -m recsys_lib.dist_train ARGS``: ``--standalone``
    on one node (a free local port), c10d rendezvous at ``rdzv_endpoint`` across ``nnodes``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes > 1:
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}"]
        if node_rank is not None:
            cmd += [f"--node-rank={node_rank}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "recsys_lib.dist_train", *args]


def worker_env(nproc: int) -> dict[str, str]:
    """The workers' environment: the cores shared out between the processes of this node
    (torchrun alone would give each process one thread), no progress bars (one line per epoch is
    logged instead), unbuffered output so progress streams."""
    env = dict(os.environ)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(nproc, 1))))
    env.setdefault("TQDM_DISABLE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(config.PROJECT_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def launch(args: list[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
           node_rank: int | None = None, on_line: Callable[[str], None] | None = None,
           rdzv_id: str = "recsys") -> None:
    """Run ``torchrun ... -m recsys_lib.dist_train ARGS`` and stream its output to ``on_line``
    (default: print). Raise DistributedError naming the failed ranks (from torchrun's summary)
    when it exits non-zero."""
    on_line = on_line or (lambda line: print(line, end="", flush=True))
    cmd = command(args, nproc, nnodes, rdzv_endpoint, rdzv_id, node_rank)
    if nnodes > 1:
        on_line(f"[dist] node 0 of {nnodes}; on every other node run:\n  "
                f"{' '.join(command(args, nproc, nnodes, rdzv_endpoint, rdzv_id))}\n")
    tail: collections.deque[str] = collections.deque(maxlen=400)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env=worker_env(nproc), cwd=config.PROJECT_ROOT) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                tail.append(line)
                on_line(line)
        except BaseException:
            proc.terminate()                        # Ctrl-C in the notebook: stop the workers too
            raise
        code = proc.wait()
    if code != 0:
        raise DistributedError(failure_message(args[0] if args else "job", code, list(tail)))


def failure_message(name: str, code: int, lines: list[str]) -> str:
    """One paragraph from torchrun's failure summary: which rank failed first and how (a signal
    such as SIGKILL, or an exit code), the others, and the last worker lines."""
    text = "".join(lines)
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: (\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+) "
                       r"\(pid: (\d+)\)\s*(?:\((\w+)\))?", text)
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+)", text, re.S)
    root_rank = root.group(1) if root else None

    def order(f):           # the likely cause first: killed by a signal, then torchrun's root cause
        return (f[4] in ("", "SIGTERM"), f[0] != root_rank, f[4] == "SIGTERM", int(f[0]))
    how = []
    for rank, local, exitcode, pid, sig in sorted(set(found), key=order):
        what = ("was stopped by torchrun (SIGTERM)" if sig == "SIGTERM" else f"was killed by {sig}" if sig
                else f"exited with code {exitcode}")
        how.append(f"rank {rank} (local rank {local}, pid {pid}) {what}")
    who = "; ".join(how) if how else f"torchrun exited with code {code}"
    errors = [ln.strip() for ln in lines if re.match(r"\s*[\w.]*(Error|Exception): ", ln)
              and "ChildFailedError" not in ln][-3:]
    detail = ("\n  " + "\n  ".join(errors)) if errors else ""
    return (f"distributed fit of {name} failed: {who}. No checkpoint was written (rank 0 writes "
            f"it only after every rank finished).{detail}")


# ---------------------------------------------------------------- the worker (under torchrun)
class FrozenItems:
    """The retriever as the re-ranker's fit sees it: its frozen item table (``item_embeddings``)."""

    def __init__(self, table: np.ndarray):
        self.table = table

    def item_embeddings(self) -> torch.Tensor:
        return torch.from_numpy(self.table)


def _run(job: dict, run_dir: Path, device: torch.device):
    from .experiment import Run
    return Run(dataset=job["dataset"], profile=job["profile"], dir=Path(run_dir), params=job["params"],
               seed=int(job["seed"]), device=device)


def _work_tune(job: dict, run_dir: Path, device: torch.device, out: Path) -> None:
    run = _run(job, run_dir, device)
    config.seed_everything(run.seed)
    validate = run.early_stopping_metric(job["early_stopping_users"], job["metric"], job["history_len"])
    t0 = time.perf_counter()
    with guard.fitting(job["name"]):
        model, search = _resolve(job["tune"])(run.data, run.params.get(job["section"], {}), validate,
                                              device, run.seed)
    fit_seconds = time.perf_counter() - t0
    scores = {}
    for period in job.get("score") or []:             # sharded full-catalogue ranking, every rank
        labels = run.evaluator(period, history_len=job["history_len"]).labels
        ks = run.params.get("eval", {}).get("ks", (10, 50, 100, 200, 500, 1000))
        t1 = time.perf_counter()
        items, values = rank_topk(model, labels.users, labels.ctx, max(ks), labels.n_items,
                                  run.params.get("eval", {}).get("batch_users", 1024), with_scores=True)
        res = evaluate_ranking(items, labels, ks, seconds=time.perf_counter() - t1)
        scores[period] = {"users": labels.users, "items": items, "scores": values, "metrics": res.means(),
                          "seconds": res.seconds}
    if dist.is_main():
        model.save(out / "model.pt")
        _save_result(out, {"class": _ref(type(model)), "search": search, "history": getattr(model, "history", None),
                           "fit_seconds": fit_seconds, "world": dist.world(), "device": str(device),
                           "scores": scores})


def _work_reranker(job: dict, run_dir: Path, device: torch.device, out: Path) -> None:
    from .models import reranker as rr
    run = _run(job, run_dir, device)
    section = dict(job["section"])
    if not dist.is_main():                            # LightGBM variants run on rank 0 only
        section["variants"] = [v for v in section.get("variants", rr.VARIANTS)
                               if (v if isinstance(v, str) else v.get("variant")) in MLP_KINDS]
        if not section["variants"]:
            return
    retriever = FrozenItems(job["item_table"]) if job["item_table"] is not None else None
    with guard.fitting("reranker", allow=("train", "valid")):
        best, table, models = rr.tune(section, job["inputs"], run.data, retriever, seed=run.seed,
                                      extra=job["extra"], progress=True)
    if dist.is_main():
        _save_result(out, {"chosen": best.label, "search": table, "world": dist.world(),
                           "models": {label: m.to_blob() for label, m in models.items()}})


def _save_result(out: Path, result: dict) -> None:
    with config.atomic_write(out / "result.pt") as tmp:
        torch.save(result, tmp)


def _run_params(run_dir: Path, overrides: list[str]) -> dict:
    """The run's dataset, profile, parameters (run.json, then ``--set``), seed and device."""
    from . import param_check
    path = Path(run_dir, "run.json")
    if not path.exists():
        raise PipelineError(f"{path} is missing: run 01_split for this run folder first")
    info = json.loads(path.read_text())
    param_check.check_overrides(info["params"], overrides)
    params = config.apply_overrides(info["params"], overrides)
    return {"dataset": info["dataset"], "profile": info["profile"], "params": params,
            "seed": int(params.get("seed", 42)), "device": params.get("device", "auto")}


def _job_from_run(name: str, run_dir: Path, fields: dict, score: list[str], out: Path) -> dict:
    """The job of ``python -m recsys_lib.dist_train NAME --run-dir DIR``: the run's parameters
    and the options the notebook passes to ``run.fit_model``."""
    params = fields["params"]
    if name == "reranker":
        return _reranker_job_from_run(run_dir, fields, out)
    if name not in TUNE:
        raise ConfigError(f"unknown model {name!r}; one of {sorted([*TUNE, 'reranker'])}")
    metric, history_len = HEADLINE, None
    if name == "two_tower":
        from .models import two_tower
        section = params["two_tower"]
        history_len = two_tower.history_len_needed(section)
        n_items = config.load_torch(Path(run_dir, "data.pt")).n_items
        metric = two_tower.selection_metric(int(section.get("candidate_k", 500)), n_items)
    return {"kind": "tune", "name": name, "tune": TUNE[name], "section": name, "metric": metric,
            "history_len": history_len, "early_stopping_users": None, "score": score, **fields}


def _reranker_job_from_run(run_dir: Path, fields: dict, out: Path) -> dict:
    """Rank 0 builds the re-ranker's inputs from the run (as 30_reranker does) into a job file;
    the other ranks wait and read it."""
    path = out / "job.pt"
    if dist.is_main():
        from . import two_stage
        run = _run(fields, run_dir, config.resolve_device("cpu"))
        section = run.params["reranker"]
        retriever = two_stage.load_retriever(run)
        extra = two_stage.load_baselines(run, section.get("extra_scorers", ["ease", "mf", "ials"]))
        valid = two_stage.stage_inputs(run, retriever, "valid", extra)
        window = two_stage.load_label_window(run, valid.names) if section.get("label_window") else None
        from .rerank_features import _as_np
        job = {"kind": "reranker", "name": "reranker", "section": dict(section), "inputs": valid,
               "extra": window, "item_table": _as_np(retriever.item_embeddings()).astype(np.float32), **fields}
        with config.atomic_write(path) as tmp:
            torch.save(job, tmp)
    dist.barrier()
    return config.load_torch(path)


WORK = {"tune": _work_tune, "reranker": _work_reranker}


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record
    from .errors import RecsysError
    try:
        return record(_main)(argv)
    except RecsysError as exc:                            # a bad parameter or a missing file: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recsys_lib.dist_train", description=__doc__.split("\n\n")[0])
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
