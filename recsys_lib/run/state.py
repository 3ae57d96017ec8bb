"""What a run folder remembers between pipeline invocations: which notebooks finished, on what,
and who holds the folder now. It lets an interrupted run resume where it stopped.

After a notebook succeeds, the pipeline writes ``state/<notebook>.json``, its *completion record*:
- the notebook file's hash and the library's code version (a hash of ``recsys_lib``'s files);
- the shared parameters (dataset, profile, seed, device);
- the value of every params section the notebook read. ``experiment.Run`` notes the reads through
  ``TrackedParams`` in ``state/<notebook>.reads.json``;
- the files it wrote (size and mtime), and a digest of the records before it.

A rerun trusts a record only when all of these still hold. It reruns from the first notebook
whose record does not hold, and every notebook after it. A notebook that was interrupted or
failed has no record, so a half-finished notebook is never trusted.

``RunLock`` is an advisory lock (``fcntl.flock``) held by the pipeline for the whole run. A
second run on the same folder fails at once, naming the holder's PID and start time.
The kernel releases the lock when its holder dies, so a killed run never leaves a stale lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .. import config
from ..errors import PipelineError

STATE = "state"                               # records and reads, inside the run folder
UNTRACKED = (STATE, "logs", "notebooks")      # written by the pipeline itself, not by notebooks
ENV_NOTEBOOK = "RECSYS_NOTEBOOK"              # set by the pipeline for the kernel it starts


class RunLocked(PipelineError):
    """Another pipeline process holds this run folder."""


# ---------------------------------------------------------------- reads of the parameters
class TrackedParams(dict):
    """The run's parameters, noting each top-level section a notebook reads (``[]`` or ``get``)
    in ``log`` (JSON list). The pipeline compares only those sections on a rerun. A change to
    ``mf`` therefore reruns from ``11_mf``, not from ``00_data``."""

    def __init__(self, data: Any = (), log: Path | None = None):
        super().__init__(data)
        self._log = log
        self._seen: set[str] = set()

    def _note(self, key: Any) -> None:
        if self._log is not None and isinstance(key, str) and key not in self._seen:
            self._seen.add(key)
            config.write_json(self._log, sorted(self._seen))

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)


def tracked_params(params: dict, run_dir: Path) -> dict:
    """``params`` wrapped in ``TrackedParams`` when the pipeline runs this kernel (it names the
    notebook in ``$RECSYS_NOTEBOOK``); as they are in JupyterLab."""
    stem = os.environ.get(ENV_NOTEBOOK)
    if not stem:
        return params
    log = Path(run_dir) / STATE / f"{stem}.reads.json"
    log.unlink(missing_ok=True)
    return TrackedParams(params, log)


# ---------------------------------------------------------------- fingerprints
def code_version() -> str:
    """A hash of the library's source files and templates: a code change reruns every notebook."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def fingerprint(run_dir: Path) -> dict[str, list[int]]:
    """``{relative path: [size, mtime_ns]}`` of the files notebooks wrote in ``run_dir``."""
    out = {}
    if not run_dir.exists():
        return out
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir)
        if rel.parts[0] in UNTRACKED or rel.name.startswith(".") or not path.is_file():
            continue
        st = path.stat()
        out[rel.as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def _canonical(value: Any) -> str:
    return json.dumps(config.finite_json(value), sort_keys=True, default=str)


# ---------------------------------------------------------------- records
def record_path(run_dir: Path, stem: str) -> Path:
    return Path(run_dir) / STATE / f"{stem}.json"


def read_record(run_dir: Path, stem: str) -> dict | None:
    try:
        return json.loads(record_path(run_dir, stem).read_text())
    except (OSError, ValueError):
        return None                               # missing or torn: not trusted


def upstream_digest(records: list[dict]) -> str:
    """What a notebook ran after: the names and finish stamps of the records before it."""
    h = hashlib.sha256()
    for rec in records:
        h.update(f"{rec['notebook']}@{rec['finished']};".encode())
    return h.hexdigest()[:16]


def write_record(run_dir: Path, notebook: Path, before: dict, shared: dict, params: dict,
                 code: str, upstream: str, seconds: float) -> dict:
    """The completion record of ``notebook`` (call after it succeeded): its reads, its outputs."""
    reads_log = Path(run_dir) / STATE / f"{notebook.stem}.reads.json"
    try:
        reads = json.loads(reads_log.read_text())
    except (OSError, ValueError):
        reads = []
    after = fingerprint(Path(run_dir))
    rec = {"notebook": notebook.stem, "notebook_sha": file_hash(notebook), "code": code,
           "shared": shared, "reads": {k: config.finite_json(params.get(k)) for k in reads},
           "outputs": {p: fp for p, fp in after.items() if before.get(p) != fp},
           "upstream": upstream, "seconds": round(seconds, 3),
           "finished": f"{time.strftime('%Y-%m-%dT%H:%M:%S')}.{time.time_ns() % 10**9:09d}"}
    config.write_json(record_path(run_dir, notebook.stem), rec)
    reads_log.unlink(missing_ok=True)
    return rec


def first_stale(notebooks: list[Path], run_dir: Path, shared: dict, params: dict,
                code: str) -> tuple[int, str]:
    """The index of the first notebook whose record does not hold, and why; ``len(notebooks)``
    when every record holds (nothing to run)."""
    run_dir = Path(run_dir)
    records = [read_record(run_dir, nb.stem) for nb in notebooks]
    current = fingerprint(run_dir)
    last_writer: dict[str, tuple[int, list[int]]] = {}
    for i, rec in enumerate(records):
        if rec is None:
            break
        for path, fp in rec.get("outputs", {}).items():
            last_writer[path] = (i, fp)
    moved = {i for path, (i, fp) in last_writer.items() if current.get(path) != fp}
    if not any(records):
        return 0, "a new run"
    for i, (nb, rec) in enumerate(zip(notebooks, records)):
        if rec is None:
            return i, "not finished in an earlier run"
        if rec.get("notebook_sha") != file_hash(nb):
            return i, "the notebook changed"
        if rec.get("code") != code:
            return i, "the library code changed"
        if rec.get("shared") != shared:
            return i, "dataset, profile, seed or device changed"
        for key, value in rec.get("reads", {}).items():
            if _canonical(params.get(key)) != _canonical(value):
                return i, f"parameters of '{key}' changed"
        if rec.get("upstream") != upstream_digest(records[:i]):
            return i, "an earlier notebook ran again"
        if i in moved:
            return i, "a file it wrote was changed or removed"
    return len(notebooks), "every notebook is up to date"


def forget_from(notebooks: list[Path], run_dir: Path, start: int) -> None:
    """Before notebooks ``start..`` run again: drop their records and the files they alone wrote
    last, so nothing of theirs from an earlier run (a model's metrics) outlives a failure."""
    run_dir = Path(run_dir)
    records = [read_record(run_dir, nb.stem) for nb in notebooks]
    last_writer: dict[str, int] = {}
    for i, rec in enumerate(records):
        for path in (rec or {}).get("outputs", {}):
            last_writer[path] = i
    for path, i in last_writer.items():
        if i >= start:
            (run_dir / path).unlink(missing_ok=True)
    for nb in notebooks[start:]:
        record_path(run_dir, nb.stem).unlink(missing_ok=True)


def run_summary(notebooks: list[Path], run_dir: Path) -> dict:
    """A complete run's identity for the report and metrics.json: one id from its records, and
    each notebook's seconds and finish time."""
    records = [read_record(Path(run_dir), nb.stem) for nb in notebooks]
    done = [r for r in records if r is not None]
    return {"id": upstream_digest(done) if done else None,
            "complete": len(done) == len(notebooks),
            "code_version": done[-1]["code"] if done else None,
            "notebooks": {r["notebook"]: {"seconds": r["seconds"], "finished": r["finished"]} for r in done}}


# ---------------------------------------------------------------- the lock
class RunLock:
    """An exclusive lock on one run folder; a second holder fails at once (``RunLocked``), with
    the first holder's PID, start time and command."""

    def __init__(self, path: Path, folder: Path | None = None):
        self.path = Path(path)
        self.folder = Path(folder) if folder is not None else self.path.parent
        self._fh = None

    def __enter__(self) -> "RunLock":
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                holder = json.loads(fh.read() or "{}")
            except ValueError:
                holder = {}
            fh.close()
            raise RunLocked(f"{self.folder} is in use by another pipeline run (PID "
                            f"{holder.get('pid', '?')}, started {holder.get('started', '?')}: "
                            f"{holder.get('command', '?')}); wait for it to finish or stop it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])}))
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        import fcntl
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
