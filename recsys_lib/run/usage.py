"""What a piece of work cost, and how fast the machine was: figures that compare across machines.

- `Usage` measures a block that runs child processes (a notebook's kernel, a torchrun job): wall
  seconds; CPU seconds of the children it waited for (``RUSAGE_CHILDREN``, user + system, so the
  kernel's threads all count); peak RSS, the larger of the process tree's summed RSS polled every
  0.2 s and any one process's own high-water mark (``VmHWM``, which catches a peak between polls).
  ``exclude`` names processes (with their descendants) that run beside the block but are not its
  work: the pipeline's next kernel, started early and idle (`run.prestart.Prestart`), is left out of a
  notebook's peak RSS. CPU cannot be split that way: ``RUSAGE_CHILDREN`` credits a process's CPU
  when it is reaped, so a kernel's CPU counts in the block that reaps it (the pipeline reaps each
  kernel inside its own notebook's block, early imports included).
- `speed_index` is a fixed ~10 s micro-benchmark: an fp32 matrix product on the threads torch
  uses, a memory copy, and a one-thread sort. Each figure is divided by this project's reference
  machine's (2 cores, measured 2026-12-06), and the index is their geometric mean: 1.0 is the
  reference, 2.0 a machine twice as fast. Machines of our kind differ 2-3x, so a time is only
  reported with the index of the machine that measured it. The result is cached per boot (in
  ``~/.cache/recsys_lib``, or ``$RECSYS_CACHE_DIR``), since the hardware does not change in between.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

GB = 1024 ** 3
#: the reference machine's figures: a 2-core AMD EPYC development machine of this project, idle, 2026-12-06
REFERENCE = {"matmul_gflops": 70.0, "copy_gb_per_s": 22.0, "sort_mkeys_per_s": 44.0}
#: the variables that set a run's thread counts (torch, LightGBM, OpenMP, BLAS): float sums, and so a
#: run's last digits, move with them (docs/running.md, Determinism)
THREAD_VARS = ("RECSYS_TORCH_THREADS", "RECSYS_LGBM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "MKL_NUM_THREADS")


# ---------------------------------------------------------------- one block's cost
def _hwm_bytes(pid: int) -> int:
    """A process's peak resident set (VmHWM) on Linux; 0 elsewhere or when it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Usage:
    """``with Usage() as u: ...`` then ``u.figures()``: wall and children's CPU seconds, and the
    children's peak RSS (see the module docstring). ``exclude``: pids whose processes (and their
    descendants) the RSS leaves out, or a function returning them, asked at every poll (a process
    started during the block)."""

    def __init__(self, interval: float = 0.2,
                 exclude: Iterable[int] | Callable[[], Iterable[int]] = ()):
        self.interval = interval
        self.exclude = exclude
        self.peak_tree = 0
        self.peak_one = 0
        self.wall = 0.0
        self.cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _excluded(self) -> set[int]:
        """The pids left out now: those named and their descendants."""
        import psutil
        named = self.exclude() if callable(self.exclude) else self.exclude
        out = {int(p) for p in named or ()}
        for pid in list(out):
            try:
                out.update(p.pid for p in psutil.Process(pid).children(recursive=True))
            except psutil.Error:             # gone, or not started yet
                continue
        return out

    def _sample(self) -> None:
        import psutil
        try:
            kids = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        skip = self._excluded()
        total = 0
        for child in kids:
            if child.pid in skip:
                continue
            try:
                total += child.memory_info().rss
            except psutil.Error:             # exited between listing and reading
                continue
            self.peak_one = max(self.peak_one, _hwm_bytes(child.pid))
        self.peak_tree = max(self.peak_tree, total)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "Usage":
        self._t0 = time.perf_counter()
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._cpu0 = r.ru_utime + r.ru_stime
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.wall = time.perf_counter() - self._t0
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu = r.ru_utime + r.ru_stime - self._cpu0

    def figures(self) -> dict:
        return {"seconds": round(self.wall, 3), "cpu_seconds": round(self.cpu, 3),
                "peak_rss_gb": round(max(self.peak_tree, self.peak_one) / GB, 3)}


def thread_settings() -> dict[str, str]:
    """The thread variables set in this process's environment (those a notebook's kernel inherits)."""
    return {k: os.environ[k] for k in THREAD_VARS if os.environ.get(k, "").strip()}


def describe(figures: dict) -> str:
    """'12.3 s (CPU 20.1 s, peak RSS 1.21 GB)'."""
    text = f"{figures['seconds']:.1f} s"
    extra = []
    if figures.get("cpu_seconds") is not None:
        extra.append(f"CPU {figures['cpu_seconds']:.1f} s")
    if figures.get("peak_rss_gb"):
        extra.append(f"peak RSS {figures['peak_rss_gb']:.2f} GB")
    return text + (f" ({', '.join(extra)})" if extra else "")


# ---------------------------------------------------------------- the machine's speed
def _timed(fn, min_seconds: float) -> float:
    """Best seconds of one call of ``fn`` over repeats that last ``min_seconds`` in all."""
    fn()                                          # warm up (allocations, thread pools)
    best, spent = math.inf, 0.0
    while spent < min_seconds:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best


def measure_speed(seconds_each: float = 3.0) -> dict:
    """The three micro-benchmarks' figures and the index (see the module docstring)."""
    import numpy as np
    import torch
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul = 2 * n ** 3 / _timed(lambda: torch.mm(a, b), seconds_each) / 1e9
    src = np.ones(32 * 1024 * 1024, dtype=np.float64)      # 256 MiB
    dst = np.empty_like(src)
    copy = 2 * src.nbytes / _timed(lambda: np.copyto(dst, src), seconds_each) / 1e9   # read + write
    keys = np.random.default_rng(0).random(2_000_000)
    sort = len(keys) / _timed(lambda: np.sort(keys, kind="quicksort"), seconds_each) / 1e6
    figures = {"matmul_gflops": matmul, "copy_gb_per_s": copy, "sort_mkeys_per_s": sort}
    index = math.exp(sum(math.log(figures[k] / REFERENCE[k]) for k in REFERENCE) / len(REFERENCE))
    return {"speed_index": round(index, 3), **{k: round(v, 2) for k, v in figures.items()},
            "torch_threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "cpu": _cpu_model(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def cache_dir() -> Path:
    return Path(os.environ.get("RECSYS_CACHE_DIR") or Path.home() / ".cache" / "recsys_lib")


def speed_index(refresh: bool = False) -> dict:
    """This machine's speed figures, measured once per boot and thread count (see the module
    docstring); ``refresh`` measures again."""
    import torch
    key = f"{_boot_id()}-{torch.get_num_threads()}t"
    path = cache_dir() / f"speed-{key}.json"
    if not refresh:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    figures = measure_speed()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(figures, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass                                      # a read-only home: measured, not cached
    return figures
