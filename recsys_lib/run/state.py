"""What a run folder remembers between pipeline invocations: which notebooks finished, on what,
and who holds the folder now. A rerun does only the work whose inputs changed.

After a notebook succeeds, the pipeline writes ``state/<notebook>.json``, its *completion record*:
- the notebook file's hash;
- the shared parameters (dataset, profile, seed, device);
- ``reads``: the value of every parameter path the notebook read (``mf``, ``reranker.lgbm``);
- ``modules``: a hash of each library module its kernel loaded (``recsys_lib.models.ease``);
- ``inputs``: the run folder's files it read, with their size and mtime then, and ``listings``:
  the names it found in each folder it listed;
- ``outputs``: the files it wrote (size and mtime), ``before``: the notebooks that come before it;
- what it cost: wall and CPU seconds, peak RSS, and the machine's speed index (`run.usage`).
``run.tracking`` takes the notes in the kernel.

A notebook is *stale* when its record is missing or torn, or any of these no longer holds: its
notebook file, the shared parameters, a parameter it read, a module it loaded, a file it read (or
the set of files in a folder it listed), a file it wrote, or the list of notebooks before it. It
is also stale when a file it read is written by a notebook that is stale itself (that one will
write it again). `stale_notebooks` returns each stale notebook with its reason; the pipeline
reruns exactly those, in order. So a change to ``reranker.lgbm`` reruns 30_reranker and the
notebooks that read its files, and an edit to ``models/ease.py`` reruns 13_ease and its readers,
not 10_popularity. A notebook that was interrupted or failed has no record, so a half-finished
notebook is never trusted.

``RunLock`` is an advisory lock (``fcntl.flock``) held by the pipeline for the whole run. A
second run on the same folder fails at once, naming the holder's PID and start time.
The kernel releases the lock when its holder dies, so a killed run never leaves a stale lock.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .. import config
from ..errors import PipelineError
from .tracking import (ABSENT, ENV_NOTEBOOK, STATE, UNTRACKED, TrackedParams, lookup, read_notes,  # noqa: F401
                       reads_path)

PACKAGE_DIR = Path(__file__).resolve().parents[1]       # recsys_lib/


class RunLocked(PipelineError):
    """Another pipeline process holds this run folder."""


# ---------------------------------------------------------------- fingerprints
def code_version() -> str:
    """A hash of the whole library's source files and templates (the report's provenance; resume
    compares each notebook's own modules, `module_hashes`)."""
    h = hashlib.sha256()
    for path in sorted(p for p in PACKAGE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(PACKAGE_DIR)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def module_files(name: str) -> list[Path]:
    """The files behind a library module: ``recsys_lib.models.ease`` -> ``models/ease.py``; a
    package is its ``__init__.py`` and its data files outside sub-packages (the report's
    templates). Empty when the module no longer exists."""
    parts = name.split(".")[1:]
    base = PACKAGE_DIR.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return [base.with_suffix(".py")]
    if not (base / "__init__.py").is_file():
        return []
    files = [base / "__init__.py"]
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if (path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in rel.parts
                and not any((base.joinpath(*rel.parts[:i]) / "__init__.py").is_file()
                            for i in range(1, len(rel.parts)))):
            files.append(path)
    return files


@functools.lru_cache(maxsize=None)
def _module_hash(name: str, stamp: tuple) -> str:
    files = module_files(name)
    if not files:
        return "missing"
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def module_hash(name: str) -> str:
    """The hash of a library module's files (``missing`` when it is gone)."""
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in module_files(name))
    return _module_hash(name, stamp)


def module_hashes(names) -> dict[str, str]:
    return {n: module_hash(n) for n in sorted(names)}


def import_closure(name: str) -> list[str]:
    """``name`` and every library module it imports, directly or through others (read from the
    source with ``ast``, lazy imports inside functions included)."""
    import ast
    seen, todo = set(), [name]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        files = [f for f in module_files(mod) if f.suffix == ".py"]
        if not files:
            continue
        package = mod if files[0].name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(files[0].read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if (t == PACKAGE_DIR.name or t.startswith(PACKAGE_DIR.name + ".")) and module_files(t):
                    todo.append(t)
    return sorted(seen)


def code_digest(modules) -> str:
    """One hash of the given library modules and everything they import: a cache key that follows
    the code that made the cached thing."""
    names = sorted({m for name in modules for m in import_closure(name)})
    h = hashlib.sha256()
    for n, digest in module_hashes(names).items():
        h.update(f"{n}={digest};".encode())
    return h.hexdigest()[:16]


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _tracked(rel: Path) -> bool:
    return not (rel.parts[0] in UNTRACKED or any(p.startswith(".") for p in rel.parts))


def fingerprint(run_dir: Path) -> dict[str, list[int]]:
    """``{relative path: [size, mtime_ns]}`` of the files notebooks wrote in ``run_dir``."""
    out = {}
    if not run_dir.exists():
        return out
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir)
        if not _tracked(rel) or not path.is_file():
            continue
        st = path.stat()
        out[rel.as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def _file_fp(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if path.is_file() else None


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
    """A digest of records' names and finish stamps (a complete run's id)."""
    h = hashlib.sha256()
    for rec in records:
        h.update(f"{rec['notebook']}@{rec['finished']};".encode())
    return h.hexdigest()[:16]


def last_writers(records: list[dict | None]) -> dict[str, int]:
    """Each file's last writer: the index of the last notebook whose record lists it as output."""
    out: dict[str, int] = {}
    for i, rec in enumerate(records):
        for path in (rec or {}).get("outputs", {}):
            out[path] = i
    return out


def listing(run_dir: Path, folder: str, index: int, writers: dict[str, int]) -> list[str]:
    """The names in ``folder`` a notebook at ``index`` can depend on: those not written last by
    itself or a notebook after it (their files come and go with those notebooks' own runs)."""
    d = Path(run_dir) / folder
    if not d.is_dir():
        return []
    names = []
    for path in d.iterdir():
        rel = path.relative_to(run_dir)
        if _tracked(rel) and writers.get(rel.as_posix(), -1) < index:
            names.append(path.name)
    return sorted(names)


def _outermost(paths: list[str]) -> list[str]:
    """The paths not inside another one of them (``reranker`` covers ``reranker.lgbm``)."""
    kept = set(paths)
    return sorted(p for p in kept if not any(p.startswith(q + ".") for q in kept))


def write_record(run_dir: Path, notebook: Path, before: dict, shared: dict, params: dict,
                 notebooks: list[Path], usage: dict | None = None, seconds: float | None = None) -> dict:
    """The completion record of ``notebook`` (call after it succeeded): what it read and loaded,
    what it wrote, what it cost."""
    run_dir = Path(run_dir)
    notes = read_notes(run_dir, notebook.stem)
    after = fingerprint(run_dir)
    outputs = {p: fp for p, fp in after.items() if before.get(p) != fp}
    index = notebooks.index(notebook)
    records = [read_record(run_dir, nb.stem) for nb in notebooks]
    records[index] = {"outputs": outputs}
    writers = last_writers(records)
    usage = dict(usage or {})
    if seconds is not None:
        usage.setdefault("seconds", seconds)
    rec = {"notebook": notebook.stem, "notebook_sha": file_hash(notebook), "shared": shared,
           "reads": {k: config.finite_json(lookup(params, k)) for k in _outermost(notes["params"])},
           "modules": module_hashes(notes["modules"]),
           "inputs": {p: _file_fp(run_dir / p) for p in notes["inputs"] if p not in outputs},
           "listings": {d: listing(run_dir, d, index, writers) for d in notes["listings"]},
           "outputs": outputs, "before": [nb.stem for nb in notebooks[:index]],
           "code": code_version(), **usage,
           "seconds": round(float(usage.get("seconds", 0.0)), 3),
           "finished": f"{time.strftime('%Y-%m-%dT%H:%M:%S')}.{time.time_ns() % 10**9:09d}"}
    config.write_json(record_path(run_dir, notebook.stem), rec)
    reads_path(run_dir, notebook.stem).unlink(missing_ok=True)
    return rec


def _own_reason(nb: Path, rec: dict | None, index: int, notebooks: list[Path], shared: dict,
                params: dict, current: dict, writers: dict, run_dir: Path) -> str | None:
    """Why ``nb``'s record no longer holds by itself (None when it does)."""
    if rec is None:
        return "not finished in an earlier run"
    if "modules" not in rec:
        return "recorded before stage-aware resume"
    if rec.get("notebook_sha") != file_hash(nb):
        return "the notebook changed"
    if rec.get("shared") != shared:
        return "dataset, profile, seed or device changed"
    if rec.get("before") != [p.stem for p in notebooks[:index]]:
        return "the notebooks before it changed"
    for key, value in rec.get("reads", {}).items():
        if _canonical(lookup(params, key)) != _canonical(value):
            return f"parameters of '{key}' changed"
    for name, digest in rec.get("modules", {}).items():
        if module_hash(name) != digest:
            return f"library module {name} changed"
    for path, fp in rec.get("inputs", {}).items():
        if current.get(path) != fp and _file_fp(run_dir / path) != fp:
            return f"a file it read changed: {path}"
    for folder, names in rec.get("listings", {}).items():
        if listing(run_dir, folder, index, writers) != names:
            return f"the files in {folder}/ changed"
    for path, fp in rec.get("outputs", {}).items():
        if writers.get(path) == index and current.get(path) != fp:
            return f"a file it wrote was changed or removed: {path}"
    return None


def _upstream_reason(rec: dict, index: int, notebooks: list[Path], writers: dict[str, int],
                     stale: dict[int, str]) -> str | None:
    """Why ``rec`` is stale because a notebook before it is (None when none it reads from is)."""
    for path in rec.get("inputs", {}):
        j = writers.get(path)
        if j is not None and j < index and j in stale:
            return f"it reads {path}, which {notebooks[j].stem} writes again"
    for folder in rec.get("listings", {}):
        for path, j in writers.items():
            if j < index and j in stale and (path.rsplit("/", 1)[0] if "/" in path else ".") == folder:
                return f"it lists {folder}/, where {notebooks[j].stem} writes again"
    return None


def stale_notebooks(notebooks: list[Path], run_dir: Path, shared: dict, params: dict) -> dict[int, str]:
    """``{index: why}`` of every notebook that must run again, in order (empty: all up to date).
    A notebook whose inputs a stale notebook writes is stale too."""
    run_dir = Path(run_dir)
    records = [read_record(run_dir, nb.stem) for nb in notebooks]
    current = fingerprint(run_dir)
    writers = last_writers(records)
    stale: dict[int, str] = {}
    for i, (nb, rec) in enumerate(zip(notebooks, records)):
        why = _own_reason(nb, rec, i, notebooks, shared, params, current, writers, run_dir)
        if why is None:
            why = _upstream_reason(rec, i, notebooks, writers, stale)
        if why is not None:
            stale[i] = why
    return stale


def first_stale(notebooks: list[Path], run_dir: Path, shared: dict, params: dict) -> tuple[int, str]:
    """The index of the first stale notebook and why; ``len(notebooks)`` when none is."""
    stale = stale_notebooks(notebooks, run_dir, shared, params)
    if not stale:
        return len(notebooks), "every notebook is up to date"
    i = min(stale)
    return i, stale[i]


def forget(notebooks: list[Path], run_dir: Path, indices) -> None:
    """Before notebooks ``indices`` run again: drop their records and the files they wrote last,
    so nothing of theirs from an earlier run (a model's metrics) outlives a failure."""
    run_dir = Path(run_dir)
    indices = set(indices)
    records = [read_record(run_dir, nb.stem) for nb in notebooks]
    for path, i in last_writers(records).items():
        if i in indices:
            (run_dir / path).unlink(missing_ok=True)
    for i in sorted(indices):
        record_path(run_dir, notebooks[i].stem).unlink(missing_ok=True)


def forget_from(notebooks: list[Path], run_dir: Path, start: int) -> None:
    """`forget` notebooks ``start`` onwards."""
    forget(notebooks, run_dir, range(start, len(notebooks)))


USAGE_KEYS = ("seconds", "cpu_seconds", "peak_rss_gb", "speed_index", "threads")


def run_summary(notebooks: list[Path], run_dir: Path) -> dict:
    """A complete run's identity for the report and metrics.json: one id from its records, and
    each notebook's cost (wall and CPU seconds, peak RSS, the speed index of the machine that ran
    it) and finish time."""
    records = [read_record(Path(run_dir), nb.stem) for nb in notebooks]
    done = [r for r in records if r is not None]
    indices = sorted({r["speed_index"] for r in done if r.get("speed_index") is not None})
    return {"id": upstream_digest(done) if done else None,
            "complete": len(done) == len(notebooks),
            "code_version": done[-1].get("code") if done else None,
            "speed_index": indices,
            "notebooks": {r["notebook"]: {**{k: r.get(k) for k in USAGE_KEYS}, "finished": r["finished"]}
                          for r in done}}


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
