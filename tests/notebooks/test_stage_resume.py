"""Stage-aware resume on copies of the session's finished pipeline run (synthetic-tiny, quick):
a re-ranker parameter reruns 30_reranker and its readers only; an edit to ``models/ease.py``
reruns 13_ease and the notebooks that read its files, and nothing else; a fork leaves the run it
copied untouched. Each runs `python -m recsys_lib.pipeline` as a user does and reads which
notebooks ran from its console."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_lib import config
from recsys_lib.run import layout
from recsys_lib.run import state as runstate

pytestmark = pytest.mark.slow
CMD = [sys.executable, "-m", "recsys_lib.pipeline", "--dataset", "synthetic-tiny", "--profile", "quick",
       "--timeout", "600"]
EVERY = [p.stem for p in layout.notebooks()]


def copy_of(built_report, tmp_path: Path) -> Path:
    """A copy of the session run's data folder (mtimes kept, so its records still hold)."""
    src = built_report.parent.parent.parent / "data"
    shutil.copytree(src, tmp_path / "data", symlinks=True)
    return tmp_path


def env_for(root: Path, **extra) -> dict:
    return {**os.environ, "RECSYS_DATA_DIR": str(root / "data"), "RECSYS_REPORTS_DIR": str(root / "reports"),
            "PYTHONUNBUFFERED": "1", **extra}


def ran(stdout: str) -> list[str]:
    """The notebooks a pipeline run executed, from its console lines (``NN_name done in``)."""
    return re.findall(r"\[pipeline\] (\d\d_\w+) done in", stdout)


def readers(run_dir: Path, first: str) -> set[str]:
    """``first`` and every notebook that, by the run's records, reads a file written by one of
    them (what a change to ``first`` alone must rerun)."""
    records = {s: runstate.read_record(run_dir, s) for s in EVERY}
    out = {first}
    for stem in EVERY[EVERY.index(first) + 1:]:
        written = {p for s in out for p in records[s]["outputs"]}
        folders = {p.rsplit("/", 1)[0] for p in written}
        if set(records[stem]["inputs"]) & written or set(records[stem]["listings"]) & folders:
            out.add(stem)
    return out


def test_a_reranker_parameter_reruns_from_30_only_and_a_fork_leaves_its_source(built_report, tmp_path):
    root = copy_of(built_report, tmp_path)
    source = root / "data" / "runs" / "synthetic-tiny" / "quick"
    before = runstate.fingerprint(source)
    records_before = {s: runstate.read_record(source, s)["finished"] for s in EVERY}
    done = subprocess.run(CMD + ["--run", "leaves", "--fork", "quick", "--set", "reranker.lgbm.num_leaves=5"],
                          env=env_for(root), capture_output=True, text=True, timeout=900, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    fork = source.parent / "leaves"
    expected = readers(fork, "30_reranker")
    assert set(ran(done.stdout)) == expected and "30_reranker will run: parameters of 'reranker" in done.stdout, \
        done.stdout
    assert not expected & {"25_label_window", "20_two_tower", "17_blend", "13_ease"}   # stage 1 untouched
    assert runstate.read_record(fork, "30_reranker")["reads"]["reranker"]["lgbm"]["num_leaves"] == 5
    # the fork has its own report; the source run and its report are as they were
    assert (root / "reports" / "synthetic-tiny--leaves" / "index.html").exists()
    report = json.loads((root / "reports" / "synthetic-tiny--leaves" / "metrics.json").read_text())
    assert report["params"]["reranker"]["lgbm"]["num_leaves"] == 5      # the fork's parameters, not run.json's
    assert runstate.fingerprint(source) == before
    assert {s: runstate.read_record(source, s)["finished"] for s in EVERY} == records_before
    again = subprocess.run(CMD, env=env_for(root), capture_output=True, text=True, timeout=600, cwd=root)
    assert again.returncode == 0 and ran(again.stdout) == [], again.stdout     # the source still holds


def test_an_edit_to_ease_reruns_13_and_its_readers_and_nothing_else(built_report, tmp_path):
    root = copy_of(built_report, tmp_path)
    project = tmp_path / "project"                     # the library as a user's checkout holds it,
    shutil.copytree(config.PROJECT_ROOT / "recsys_lib", project / "recsys_lib",   # with one edit
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(config.PARAMS_DIR, project / "params")
    with open(project / "recsys_lib" / "models" / "ease.py", "a") as fh:
        fh.write("\n# an edit: any change to the file's text counts\n")
    env = env_for(root, PYTHONPATH=str(project), RECSYS_NOTEBOOKS_DIR=str(config.NOTEBOOKS_DIR))
    done = subprocess.run(CMD, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = root / "data" / "runs" / "synthetic-tiny" / "quick"
    expected = readers(run_dir, "13_ease")
    assert set(ran(done.stdout)) == expected, done.stdout
    assert "13_ease will run: library module recsys_lib.models.ease changed" in done.stdout, done.stdout
    assert {"17_blend", "20_two_tower", "30_reranker"} <= expected            # ease's readers
    untouched = {"00_data", "01_split", "10_popularity", "11_mf", "12_neumf", "14_ials", "15_transition",
                 "16_sasrec"}
    assert not untouched & set(ran(done.stdout))
    reasons = re.findall(r"\d\d_\w+ will run: (.*)", done.stdout)
    assert reasons and all("recsys_lib.models.ease changed" in r or "writes again" in r for r in reasons), reasons
