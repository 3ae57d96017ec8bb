"""What a notebook's kernel depends on, noted as it runs: the parameters it reads, the library
modules it imports, and the run folder's files it opens or lists.

The pipeline names the notebook in ``$RECSYS_NOTEBOOK`` for the kernel it starts; `Run.open` then
calls `track` once. From then on the kernel appends to ``<run>/state/<notebook>.reads.json``:

- ``params``: each parameter path it reads, as deep as it reads it. ``reranker.lgbm.num_leaves``
  when a notebook looks up that key alone; ``reranker`` when it iterates, copies or serialises
  the whole section (a config dataclass built from it, a job file). A notebook never depends on
  less than it looked at;
- ``modules``: every ``recsys_lib`` module loaded in the kernel (those loaded before `track`, and
  each one imported after, found by a finder placed first on ``sys.meta_path`` that finds nothing
  itself). The registry imports a model's module only when that model is used
  (`models.registry`), so 11_mf does not depend on ``models/ease.py``;
- ``inputs`` and ``listings``: the files under the run folder it opened for reading, and the
  folders it listed (a Python audit hook on ``open``, ``os.listdir`` and ``os.scandir``; pandas'
  parquet reader, numpy and torch open local files through Python, so their reads are seen).
  ``note_input`` adds a path a notebook probed without opening (an optional file that was absent).

In JupyterLab (no ``$RECSYS_NOTEBOOK``) nothing is tracked and the parameters are a plain dict.
`run.state` turns these notes into the notebook's completion record and decides, on a later run,
whether the notebook is stale.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .. import config

ENV_NOTEBOOK = "RECSYS_NOTEBOOK"              # set by the pipeline for the kernel it starts
STATE = "state"                               # records and notes, inside the run folder
UNTRACKED = (STATE, "logs", "notebooks")      # written by the pipeline itself, not by notebooks
PACKAGE = __name__.split(".")[0]


def reads_path(run_dir: Path, stem: str) -> Path:
    return Path(run_dir) / STATE / f"{stem}.reads.json"


class Notes:
    """The kernel's notes, written to ``reads.json`` whenever a new one is taken (a kernel killed
    mid-notebook leaves no record, so a torn file is never trusted)."""

    def __init__(self, log: Path, run_dir: Path):
        self.log = Path(log)
        self.run_dir = Path(run_dir).resolve()
        self.params: set[str] = set()
        self.modules: set[str] = set()
        self.inputs: set[str] = set()
        self.listings: set[str] = set()
        self._writing = False

    def add(self, kind: str, value: str) -> None:
        bucket = getattr(self, kind)
        if value in bucket:
            return
        bucket.add(value)
        self.flush()

    def flush(self) -> None:
        if self._writing:                     # our own write fires the audit hook
            return
        self._writing = True
        try:
            config.write_json(self.log, {k: sorted(getattr(self, k))
                                         for k in ("params", "modules", "inputs", "listings")})
        finally:
            self._writing = False

    def relative(self, path: Any) -> str | None:
        """``path`` relative to the run folder, or None when it lies outside it or in the folders
        the pipeline itself writes."""
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            return None                      # a file descriptor
        try:
            rel = Path(os.path.abspath(path)).relative_to(self.run_dir)
        except ValueError:
            return None
        if not rel.parts or rel.parts[0] in UNTRACKED or any(p.startswith(".") for p in rel.parts):
            return None
        return rel.as_posix()


_NOTES: Notes | None = None


def current() -> Notes | None:
    """The kernel's notes, or None outside a pipeline run."""
    return _NOTES


# ---------------------------------------------------------------- parameters
class TrackedParams(dict):
    """The run's parameters, noting each value a notebook reads (``[]``, ``get``, ``in``) by its
    dotted path. A section (a dict) is not noted when looked up: it comes back as a
    `TrackedSection` (the same object each time, so an edit to one is kept) that notes what is read
    of it.

    Copying or serialising the whole run's parameters (into a job file or ``run.json``) notes
    nothing: ``dict(params)`` takes dict's own fast path, since this class leaves iteration alone."""

    def __init__(self, data: Any = (), notes: Notes | None = None, prefix: str = ""):
        super().__init__(data)
        self._notes = notes
        self._prefix = prefix

    def _path(self, key: Any) -> str:
        return f"{self._prefix}.{key}" if self._prefix else str(key)

    def _note(self, path: str) -> None:
        if self._notes is not None:
            self._notes.add("params", path)

    def _child(self, key: Any, value: Any) -> Any:
        if isinstance(value, dict) and not isinstance(value, TrackedParams) and isinstance(key, str):
            value = TrackedSection(value, self._notes, self._path(key))
            dict.__setitem__(self, key, value)
        return value

    def _read(self, key: Any, value: Any) -> Any:
        """A value looked up: a section comes back tracked and is noted by what is read of it; any
        other value (and a missing key) is noted here."""
        if isinstance(value, dict) and isinstance(key, str):
            return self._child(key, value)
        if isinstance(key, str):
            self._note(self._path(key))
        return value

    def __getitem__(self, key):
        if not dict.__contains__(self, key) and isinstance(key, str):
            self._note(self._path(key))
        return self._read(key, dict.__getitem__(self, key))

    def get(self, key, default=None):
        if not dict.__contains__(self, key):
            if isinstance(key, str):
                self._note(self._path(key))
            return default
        return self._read(key, dict.__getitem__(self, key))

    def __contains__(self, key):
        if isinstance(key, str):
            self._note(self._path(key))
        return dict.__contains__(self, key)

    def __reduce_ex__(self, protocol):
        return (dict, (dict(dict.items(self)),))   # a pickled or deep-copied copy is a plain dict


class TrackedSection(TrackedParams):
    """A section (``mf``, ``reranker.lgbm``): its keys are noted as dotted paths when looked up, and
    the section as a whole when it is iterated, measured, compared, copied or serialised (a config
    dataclass built from it, ``json.dumps``, a job file): then every key of it counts."""

    def _whole(self) -> None:
        self._note(self._prefix)

    def __iter__(self):
        self._whole()
        return dict.__iter__(self)

    def keys(self):
        self._whole()
        return dict.keys(self)

    def items(self):
        self._whole()
        return dict.items(self)

    def values(self):
        self._whole()
        return dict.values(self)

    def __len__(self):
        self._whole()
        return dict.__len__(self)

    def __eq__(self, other):
        self._whole()
        return dict.__eq__(self, other)

    __hash__ = None

    def copy(self):
        self._whole()
        return dict(dict.items(self))

    def __reduce_ex__(self, protocol):
        self._whole()
        return super().__reduce_ex__(protocol)


def lookup(params: dict, path: str) -> Any:
    """The value at a dotted ``path`` of ``params`` (``ABSENT`` where a part is missing)."""
    node: Any = params
    for part in path.split("."):
        if not isinstance(node, dict) or part not in dict.keys(node):
            return ABSENT
        node = dict.__getitem__(node, part)
    return node


ABSENT = "<absent>"


# ---------------------------------------------------------------- modules and files
class _ImportNoter:
    """First on ``sys.meta_path``: notes each ``recsys_lib`` module imported, finds nothing."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if _NOTES is not None and (name == PACKAGE or name.startswith(PACKAGE + ".")):
            _NOTES.add("modules", name)
        return None


def _audit(event: str, args: tuple) -> None:
    notes = _NOTES
    if notes is None or notes._writing:
        return
    if event == "open":
        path, mode, flags = args
        if mode is not None:
            reading = "r" in mode and "+" not in mode
        else:
            reading = (flags or 0) & os.O_ACCMODE == os.O_RDONLY
        if reading:
            rel = notes.relative(path)
            if rel is not None:
                notes.add("inputs", rel)
    elif event in ("os.listdir", "os.scandir"):
        path = args[0] if args else None
        rel = notes.relative(path if path not in (None, "") else ".")
        if rel is not None:
            notes.add("listings", rel)


_HOOKED = False


def track(params: dict, run_dir: Path) -> dict:
    """Under the pipeline: start noting this kernel's reads into ``state/<notebook>.reads.json``
    and return ``params`` tracked; in JupyterLab: ``params`` as they are."""
    global _NOTES, _HOOKED
    stem = os.environ.get(ENV_NOTEBOOK)
    if not stem:
        return params
    log = reads_path(run_dir, stem)
    if _NOTES is None or _NOTES.log != log:
        log.unlink(missing_ok=True)
        _NOTES = Notes(log, run_dir)
        _NOTES.modules.update(m for m in list(sys.modules) if m == PACKAGE or m.startswith(PACKAGE + "."))
        _NOTES.flush()
    if not _HOOKED:
        sys.meta_path.insert(0, _ImportNoter())
        sys.addaudithook(_audit)
        _HOOKED = True
    return TrackedParams(params, _NOTES)


def note_input(path: Path) -> None:
    """Note a run-folder file a notebook depends on without opening it (it probed an optional
    file and found it absent: the file appearing later makes the notebook stale)."""
    if _NOTES is not None:
        rel = _NOTES.relative(path)
        if rel is not None:
            _NOTES.add("inputs", rel)


def note_module(name: str) -> None:
    """Note a library module the notebook's work runs in another process (a torchrun worker)."""
    if _NOTES is not None:
        _NOTES.add("modules", name)


def read_notes(run_dir: Path, stem: str) -> dict:
    """The notes a finished kernel left (empty lists when it left none)."""
    try:
        raw = json.loads(reads_path(run_dir, stem).read_text())
    except (OSError, ValueError):
        raw = {}
    if isinstance(raw, list):                 # the format before modules and files were noted
        raw = {"params": raw}
    return {k: list(raw.get(k, [])) for k in ("params", "modules", "inputs", "listings")}
