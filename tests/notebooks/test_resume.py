"""Resume, the run lock, Ctrl-C and the quiet console, on the first four notebooks of the pipeline
(synthetic-tiny, quick profile) run as a user runs them: `python -m recsys_lib.pipeline`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys_lib import config

SUBSET = ["00_data", "01_split", "10_popularity", "11_mf"]
CMD = [sys.executable, "-m", "recsys_lib.pipeline", "--dataset", "synthetic-tiny", "--profile", "quick",
       "--timeout", "300"]
pytestmark = pytest.mark.slow


def heed_ctrl_c() -> None:
    """In the child, before exec: SIGINT back to its default. A shell starts a background job (``cmd &``,
    as CI and nohup'd runs do) with SIGINT ignored, the child inherits that, and Python then installs
    no KeyboardInterrupt handler: the Ctrl-C under test would be silently ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

@pytest.fixture(scope="module")
def notebooks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("notebooks")
    for name in SUBSET:
        shutil.copyfile(config.NOTEBOOKS_DIR / f"{name}.ipynb", folder / f"{name}.ipynb")
    return folder


def env_for(root: Path, notebooks: Path) -> dict:
    return {**os.environ, "RECSYS_DATA_DIR": str(root / "data"), "RECSYS_REPORTS_DIR": str(root / "reports"),
            "RECSYS_NOTEBOOKS_DIR": str(notebooks), "PYTHONUNBUFFERED": "1"}


def run_dir(root: Path) -> Path:
    return root / "data" / "runs" / "synthetic-tiny" / "quick"


def record(root: Path, name: str) -> dict | None:
    path = run_dir(root) / "state" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not (path.exists() and path.stat().st_size):
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.communicate()}"
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.1)


def model_metrics(root: Path, model: str) -> dict:
    m = json.loads((run_dir(root) / "metrics" / f"{model}.json").read_text())
    return {p: {k: v for k, v in m[p].items() if "seconds" not in k} for p in ("valid", "test")}


def test_killed_run_resumes_with_the_metrics_of_an_uninterrupted_run(notebooks, tmp_path):
    # the reference: one uninterrupted run; a second run on its folder meanwhile is refused at once
    ref = tmp_path / "ref"
    proc = subprocess.Popen(CMD, env=env_for(ref, notebooks), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(ref / "data" / "runs" / "synthetic-tiny" / ".quick.lock", proc)
    second = subprocess.run(CMD, env=env_for(ref, notebooks), capture_output=True, text=True, timeout=120)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert second.returncode == 2 and f"(PID {proc.pid}, started" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and not second.stdout
    lines = out.strip().splitlines()
    assert len(lines) <= 2 * len(SUBSET) + 4, out                    # a line per start and end, no kernel chatter
    assert "11_mf done in" in out and "mf " in out and "WARNING" not in out + err, out + err
    assert (run_dir(ref) / "logs" / "11_mf.log").stat().st_size > 0

    # Ctrl-C in 11_mf: one line, exit 130, no record for 11_mf
    root = tmp_path / "run"
    env = env_for(root, notebooks)
    proc = subprocess.Popen(CMD, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=heed_ctrl_c)
    wait_for(run_dir(root) / "logs" / "11_mf.log", proc)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert err.strip() == "interrupted in 11_mf; rerun the same command to resume", err
    assert record(root, "10_popularity") and not record(root, "11_mf")
    stamps = {n: record(root, n)["finished"] for n in SUBSET[:3]}

    # SIGKILL in 11_mf: no lock, no record left behind
    proc = subprocess.Popen(CMD, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=heed_ctrl_c)
    wait_for(run_dir(root) / "logs" / "11_mf.log", proc)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    assert not record(root, "11_mf")

    # the rerun skips what finished and ends with the uninterrupted run's metrics
    done = subprocess.run(CMD, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "00_data .. 10_popularity: finished earlier and unchanged, skipped" in done.stdout, done.stdout
    assert "10_popularity ..." not in done.stdout and "11_mf done in" in done.stdout
    assert {n: record(root, n)["finished"] for n in SUBSET[:3]} == stamps
    for model in ("popularity", "mf"):
        assert model_metrics(root, model) == model_metrics(ref, model), model
    report = json.loads((root / "reports" / "synthetic-tiny" / "metrics.json").read_text())
    assert report["run"]["complete"] and set(report["run"]["notebooks"]) == set(SUBSET)

    # nothing changed: nothing runs; a changed --set reruns from the first notebook that reads it
    again = subprocess.run(CMD, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and " ..." not in again.stdout.replace(".. 11_mf", ""), again.stdout
    changed = subprocess.run(CMD + ["--set", "mf.epochs=1"], env=env, capture_output=True, text=True, timeout=600)
    assert changed.returncode == 0, changed.stderr
    assert "11_mf will run: parameters of 'mf' changed" in changed.stdout, changed.stdout
    assert "done in" in changed.stdout and "CPU" in changed.stdout and "peak RSS" in changed.stdout
    assert {n: record(root, n)["finished"] for n in SUBSET[:3]} == stamps
    assert record(root, "11_mf")["reads"]["mf"]["epochs"] == 1


def test_a_failed_notebook_leaves_the_last_good_report_and_no_stale_metrics(notebooks, tmp_path):
    own = tmp_path / "notebooks"
    shutil.copytree(notebooks, own)
    root = tmp_path / "run"
    env = env_for(root, own)
    assert subprocess.run(CMD, env=env, capture_output=True, text=True, timeout=600).returncode == 0
    report_before = (root / "reports" / "synthetic-tiny" / "metrics.json").read_text()
    assert (run_dir(root) / "metrics" / "mf.json").exists()
    nb = json.loads((own / "11_mf.ipynb").read_text())                # 11_mf now fails before it fits
    nb["cells"].insert(4, {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                           "source": "raise RuntimeError('broken on purpose')"})
    (own / "11_mf.ipynb").write_text(json.dumps(nb))
    bad = subprocess.run(CMD, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert "11_mf FAILED" in bad.stdout and "RuntimeError: broken on purpose" in bad.stdout, bad.stdout
    assert "log: " in bad.stderr and "executed notebook: " in bad.stderr, bad.stderr
    assert not (run_dir(root) / "metrics" / "mf.json").exists()           # the earlier run's mf is gone
    assert (root / "reports" / "synthetic-tiny" / "metrics.json").read_text() == report_before
