"""Kernels started early (`run.prestart.Prestart`): while a notebook runs, the next one's kernel starts
and imports the heavy third-party modules. An exact saving: the same notebooks give the same metrics
and the same completion records with it and without it (``RECSYS_PRESTART=0``); each kernel notes
its own notebook, so a resume runs nothing; and no kernel process outlives the pipeline, after a
success, a failing notebook or Ctrl-C.

Cheap: synthetic-tiny, the quick profile, four notebooks (a copy of 00_data, 01_split,
10_popularity and 13_ease as the notebooks folder, ``RECSYS_NOTEBOOKS_DIR``), data and reports in
a temporary directory."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from recsys_lib import config, pipeline
from recsys_lib.errors import PipelineError
from recsys_lib.run import prestart as early
from recsys_lib.run import state as runstate

pytestmark = pytest.mark.slow
SUBSET = ["00_data", "01_split", "10_popularity", "13_ease"]
#: fields of metrics/*.json that time the run or name its commit, not results
VOLATILE = ("written", "git_commit")


def heed_ctrl_c() -> None:
    """In the child, before exec: SIGINT back to its default. A shell starts a background job (``cmd &``,
    as CI and nohup'd runs do) with SIGINT ignored, the child inherits that, and Python then installs
    no KeyboardInterrupt handler: the Ctrl-C under test would be silently ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

def kernels_of(proc: psutil.Process) -> list[psutil.Process]:
    """The Jupyter kernels among ``proc``'s descendants."""
    out = []
    for p in proc.children(recursive=True):
        try:
            if "ipykernel_launcher" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def subset_notebooks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in SUBSET:
        shutil.copy2(config.NOTEBOOKS_DIR / f"{stem}.ipynb", folder / f"{stem}.ipynb")
    return folder


class Spy:
    """Every `Prestart` the pipeline makes, kept for the test to look at."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.handles: list[pipeline.Prestart] = []
        start = pipeline.Prestart.start.__func__

        def recording(cls, *args, **kwargs):
            handle = start(cls, *args, **kwargs)
            if handle is not None:
                self.handles.append(handle)
            return handle

        mp.setattr(pipeline.Prestart, "start", classmethod(recording))

    def pids(self) -> list[int]:
        return [pid for h in self.handles for pid in h.pids()]


def run(root: Path, notebooks: Path, prestart: bool, **kwargs) -> Spy:
    """The pipeline in this process on synthetic-tiny (quick), its data under ``root``."""
    mp = pytest.MonkeyPatch()
    try:                                      # undone whatever fails: later tests see their own settings
        mp.setenv("RECSYS_DATA_DIR", str(root / "data"))
        mp.setenv("RECSYS_REPORTS_DIR", str(root / "reports"))
        mp.setenv("RECSYS_NOTEBOOKS_DIR", str(notebooks))
        if prestart:
            mp.delenv(early.PRESTART_ENV, raising=False)
        else:
            mp.setenv(early.PRESTART_ENV, "0")
        spy = Spy(mp)
        pipeline.run_pipeline("synthetic-tiny", "quick", timeout=600, render=False, **kwargs)
    finally:
        mp.undo()
    return spy


def run_dir(root: Path) -> Path:
    return root / "data" / "runs" / "synthetic-tiny" / "quick"


def results(obj):
    """A metrics JSON without what times the run or names its commit."""
    if isinstance(obj, dict):
        return {k: results(v) for k, v in obj.items()
                if k not in VOLATILE and "seconds" not in k and not k.endswith("_per_s")}
    if isinstance(obj, list):
        return [results(v) for v in obj]
    return obj


def counts(path: Path) -> list:
    nb = nbformat.read(path, as_version=4)
    return [c.get("execution_count") for c in nb.cells if c.cell_type == "code"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four notebooks run twice from scratch: kernels started early, and as usual."""
    base = tmp_path_factory.mktemp("prestart")
    notebooks = subset_notebooks(base / "notebooks")
    out = {}
    for mode, early in (("early", True), ("usual", False)):
        t0 = time.perf_counter()
        spy = run(base / mode, notebooks, early)
        out[mode] = {"root": base / mode, "spy": spy, "seconds": time.perf_counter() - t0,
                     "kernels_left": [p.pid for p in kernels_of(psutil.Process())]}
    out["notebooks"] = notebooks
    return out


def test_the_same_notebooks_give_the_same_metrics_and_records_with_and_without_prestart(runs):
    early, usual = run_dir(runs["early"]["root"]), run_dir(runs["usual"]["root"])
    # prestart ran every notebook on a kernel started early; RECSYS_PRESTART=0 started none
    handles = runs["early"]["spy"].handles
    assert [h.nb.stem for h in handles] == SUBSET
    assert all(h.error is None and h._taken for h in handles), [repr(h.error) for h in handles]
    assert runs["usual"]["spy"].handles == []
    names = sorted(p.name for p in (early / "metrics").glob("*.json"))
    assert names == sorted(p.name for p in (usual / "metrics").glob("*.json")) and names
    for name in names:
        a = results(json.loads((early / "metrics" / name).read_text()))
        b = results(json.loads((usual / "metrics" / name).read_text()))
        assert a == b, name
    for stem in SUBSET:
        a, b = runstate.read_record(early, stem), runstate.read_record(usual, stem)
        assert a["modules"] == b["modules"], stem            # the same library modules, same hashes
        assert sorted(a["inputs"]) == sorted(b["inputs"]), stem
        assert a["listings"] == b["listings"] and a["reads"] == b["reads"], stem
        assert sorted(a["outputs"]) == sorted(b["outputs"]), stem
        # the preload runs outside the history: execution counts start at 1 as usual
        assert counts(early / "notebooks" / f"{stem}.ipynb") == counts(usual / "notebooks" / f"{stem}.ipynb")


def test_each_kernel_noted_its_own_notebook_so_a_resume_runs_nothing(runs):
    root, folder = runs["early"]["root"], run_dir(runs["early"]["root"])
    records = {s: runstate.read_record(folder, s) for s in SUBSET}
    assert all(records.values())
    # each record holds what its own notebook loaded and read, not the notebook before it
    assert all("recsys_lib.run.experiment" in r["modules"] for r in records.values())
    assert "recsys_lib.models.ease" in records["13_ease"]["modules"]
    assert "recsys_lib.models.ease" not in records["10_popularity"]["modules"]
    assert "recsys_lib.data.synthetic" in records["00_data"]["modules"]
    assert "recsys_lib.data.synthetic" not in records["13_ease"]["modules"]
    assert records["10_popularity"]["inputs"] and records["13_ease"]["inputs"]
    assert not list((folder / "state").glob("*.reads.json"))
    logs = sorted(p.name for p in (folder / "logs").iterdir())
    assert logs == [f"{s}.log" for s in SUBSET]             # each kernel's log renamed, none left behind
    finished = {s: r["finished"] for s, r in records.items()}
    spy = run(root, runs["notebooks"], prestart=True)
    assert spy.handles == []                                  # nothing to run, no kernel started
    assert {s: runstate.read_record(folder, s)["finished"] for s in SUBSET} == finished


def test_no_kernel_outlives_a_run(runs):
    for mode in ("early", "usual"):
        assert runs[mode]["kernels_left"] == [], mode
    pids = runs["early"]["spy"].pids()
    assert len(pids) == len(SUBSET) and all(gone(pid) for pid in pids)
    assert all(h.km is None and not h._thread.is_alive() for h in runs["early"]["spy"].handles)
    assert not pipeline.Prestart.live


def test_no_kernel_outlives_a_failing_notebook(tmp_path):
    # 10_popularity fails (no split yet) while 11_mf's kernel starts early: both are shut down
    mp = pytest.MonkeyPatch()
    mp.setenv("RECSYS_DATA_DIR", str(tmp_path / "data"))
    mp.setenv("RECSYS_REPORTS_DIR", str(tmp_path / "reports"))
    mp.delenv(early.PRESTART_ENV, raising=False)
    spy = Spy(mp)
    try:
        with pytest.raises(PipelineError, match=r"10_popularity.*data.pt is missing: run 01_split"):
            pipeline.run_pipeline("synthetic-tiny", "quick", only=["10", "11"], timeout=300, render=False)
    finally:
        mp.undo()
    assert [h.nb.stem for h in spy.handles] == ["10_popularity", "11_mf"]
    assert spy.handles[1]._ready.is_set()                    # 11_mf's start was under way or done
    assert kernels_of(psutil.Process()) == []
    assert all(gone(pid) for pid in spy.pids()) and spy.pids()
    logs = tmp_path / "data" / "runs" / "synthetic-tiny" / "quick" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["10_popularity.log"]   # the unused kernel's log removed


def test_a_kernel_that_fails_to_start_early_is_started_as_usual(tmp_path, monkeypatch):
    # every early start dies during its imports: each notebook falls back to nbclient's own start,
    # with one line, and the run fails or succeeds for its own reasons (10_popularity's missing split)
    monkeypatch.setattr(early, "preload_line", lambda modules=early.PRELOAD: "import os; os._exit(3)")
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RECSYS_REPORTS_DIR", str(tmp_path / "reports"))
    monkeypatch.delenv(early.PRESTART_ENV, raising=False)
    spy = Spy(monkeypatch)
    with pytest.raises(PipelineError, match=r"10_popularity.*data.pt is missing: run 01_split"):
        pipeline.run_pipeline("synthetic-tiny", "quick", only=["10", "11"], timeout=300, render=False)
    assert "died while starting" in repr(spy.handles[0].error)
    log = (tmp_path / "data" / "runs" / "synthetic-tiny" / "quick" / "logs" / "10_popularity.log").read_text()
    assert "10_popularity: its kernel, started early, failed" in log and "starts as usual" in log
    assert kernels_of(psutil.Process()) == [] and all(gone(pid) for pid in spy.pids())


def test_no_kernel_outlives_ctrl_c(tmp_path):
    """Ctrl-C while 00_data runs and 01_split's kernel, started early, waits (or, on a slow
    machine, while 01_split runs): exit 130 and every kernel of the run gone."""
    notebooks = subset_notebooks(tmp_path / "notebooks")
    env = {**os.environ, "RECSYS_DATA_DIR": str(tmp_path / "data"), "RECSYS_REPORTS_DIR": str(tmp_path / "reports"),
           "RECSYS_NOTEBOOKS_DIR": str(notebooks), "PYTHONUNBUFFERED": "1"}
    env.pop(early.PRESTART_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "recsys_lib.pipeline", "--dataset", "synthetic-tiny",
                             "--profile", "quick", "--only", "00", "01", "--timeout", "600"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=heed_ctrl_c)
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            for k in kernels_of(psutil.Process(proc.pid)):
                try:
                    seen[k.pid] = k.environ().get(runstate.ENV_NOTEBOOK, "")
                except psutil.Error:
                    continue
            if "01_split" in seen.values():
                break
            time.sleep(0.1)
        assert "01_split" in seen.values(), seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # 130 is the pipeline's own exit on Ctrl-C. Seen once in four runs (2026-12-06, Ctrl-C during
    # 00_data): the same one line, every kernel gone, but the process then ended by SIGINT (-2), as if a
    # KeyboardInterrupt reached the interpreter's shutdown after main() had returned 130. Not yet
    # explained (docs/running.md); what this test guards, no kernel left behind, held.
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, out, err)
    assert re.fullmatch(r"interrupted in (00_data|01_split); rerun the same command to resume", err.strip()), err
    time.sleep(1.0)
    assert all(gone(pid) for pid in seen), {pid: psutil.Process(pid).cmdline() for pid in seen if not gone(pid)}
