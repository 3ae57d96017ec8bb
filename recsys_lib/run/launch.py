"""Launching torchrun: the fitting helpers call `tune` (for `Run.fit_model`) and `run_job`; with
``dist.nproc`` 1 the fit runs in-process (the code that always ran), otherwise a job file is
written, ``torchrun ... -m recsys_lib.worker`` runs it (`command`, `worker_env`, `launch`), its
output streams back, and rank 0's files are loaded. A failed rank fails the fit with a message
naming it (`failure_message`). The worker itself (`recsys_lib.worker`) sits above every stage it
may fit; this module knows only processes, job files and the run's ``dist`` parameters.

    # one node, 2 processes (CPUs: gloo; GPUs: NCCL, one GPU per process)
    torchrun --standalone --nproc-per-node=2 -m recsys_lib.worker mf --run-dir data/runs/ml-32m/gpu
    # two nodes, 8 GPUs each: the same command on every node (a shared run folder)
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=mf -m recsys_lib.worker mf --run-dir /shared/runs/ml-32m/gpu
"""
from __future__ import annotations

import collections
import importlib
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import config
from ..errors import ConfigError, PipelineError
from . import tracking
from ..protocol.evaluate import HEADLINE

WORKER = "recsys_lib.worker"                 # the torchrun entry point (python -m)
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


def ref(fn: Callable) -> str:
    """``module:qualname`` of a function, for a job file."""
    return f"{fn.__module__}:{fn.__qualname__}"


def resolve(ref: str) -> Any:
    """The object a `ref` names."""
    module, name = ref.split(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------- what the fitting helpers call
def tune(run, name: str, tune_fn: Callable, validate: Callable, section: str | None = None,
         metric: str = HEADLINE, history_len: int | None = None,
         n_early_stopping_users: int | None = None) -> tuple[Any, Any]:
    """``tune_fn(run.data, params[section], validate, run.device, run.seed)`` -> (model, search),
    as `Run.fit_model` calls it (inside its ``guard.fitting``), in-process when ``dist.nproc`` is 1;
    otherwise the same search in ``dist.nproc`` torchrun processes, whose validation callback is
    rebuilt there from ``metric``, ``history_len`` and ``n_early_stopping_users`` (the arguments
    `Run.fit_model` built ``validate`` from). The model comes back from rank 0's checkpoint,
    with its learning curve."""
    section = section or name
    if not distributed(run.params):
        return tune_fn(run.data, run.params.get(section, {}), validate, run.device, run.seed)
    job = {"kind": "tune", "name": name, "tune": ref(tune_fn), "section": section,
           "metric": metric, "history_len": history_len, "n_early_stopping_users": n_early_stopping_users,
           **run_fields(run)}
    with workspace(run.dir, name) as work:
        result = run_job(job, run.dir, work, settings(run.params))
        model = resolve(result["class"]).load(work / "model.pt", device=str(run.device))
    if result.get("curve") is not None:
        model.curve = result["curve"]
    return model, result["search"]



def run_fields(run) -> dict:
    """What a worker needs to rebuild ``run`` (`worker.run_of`)."""
    return {"dataset": run.dataset, "profile": run.profile, "params": dict(run.params), "seed": run.seed,
            "device": run.device.type}


@contextmanager
def workspace(run_dir: Path, name: str) -> Iterator[Path]:
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
    """The torchrun command line for ``python -m recsys_lib.worker ARGS``: ``--standalone``
    on one node (a free local port), c10d rendezvous at ``rdzv_endpoint`` across ``nnodes``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes > 1:
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}"]
        if node_rank is not None:
            cmd += [f"--node-rank={node_rank}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", WORKER, *args]


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
    """Run ``torchrun ... -m recsys_lib.worker ARGS`` and stream its output to ``on_line``
    (default: print). Raise DistributedError naming the failed ranks (from torchrun's summary)
    when it exits non-zero."""
    on_line = on_line or (lambda line: print(line, end="", flush=True))
    tracking.note_module(WORKER)                # the work runs there: the notebook depends on it
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


