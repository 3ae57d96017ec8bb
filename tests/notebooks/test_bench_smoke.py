"""`scripts/bench_pipeline.py --smoke` keeps working: synthetic-tiny, quick profile, notebooks
00 01 10 90, data and reports redirected to a temporary folder; bench.json holds every stage with
positive seconds and peak RSS plus the machine, and index.html opens offline."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "RECSYS_DATA_DIR": str(tmp_path / "data"),
           "RECSYS_REPORTS_DIR": str(tmp_path / "reports")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_pipeline.py"), "--smoke",
                           "--out", str(out), "--timeout", "300"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    bench = json.loads((out / "bench.json").read_text())
    assert bench["dataset"] == "synthetic-tiny" and bench["profile"] == "quick"
    names = [s["name"] for s in bench["stages"]]
    assert names == ["00_data", "01_split", "10_popularity", "90_report", "render"], names
    for s in bench["stages"]:
        assert s["error"] is None, s
        assert s["seconds"] > 0 and s["peak_rss_gb"] > 0, s
    split = bench["stages"][1]
    assert split["rows_per_s"] > 0
    assert bench["total_seconds"] > 0 and bench["peak_rss_gb"] > 0
    assert bench["params"]["split"]["strategy"]
    m = bench["machine"]
    assert m["cores"] >= 1 and m["cores_available"] >= 1 and m["ram_gb"] > 0
    assert m["torch"] and m["torch_threads"] >= 1 and m["device"] and m["cpu_model"]
    assert isinstance(m["bf16"], bool)
    pop = bench["models"]["popularity"]
    assert pop["fit_seconds"] > 0 and pop["scoring_seconds_per_1000_users"] > 0
    assert bench["full_catalogue_eval_valid_seconds"] > 0
    assert len(bench["goals"]) == 4
    assert bench["date"] and bench["git_commit"] and "--smoke" in bench["command"]
    assert bench["comparisons"] == []                     # --smoke compares with no earlier bench
    record = json.loads((out / "stages.json").read_text())   # the record to commit under docs/bench/
    assert list(record["stages"]) == names and record["stages"]["01_split"]["seconds"] > 0

    page = (out / "index.html").read_text()
    assert "10_popularity" in page and "triplets/s" in page
    assert not re.search(r"<(script|link|img)[^>]+(src|href)\s*=\s*[\"']?https?:", page, re.I), \
        "index.html must open offline"
    # the real data/ and reports/ were not touched
    assert (tmp_path / "reports" / "synthetic-tiny" / "index.html").exists()
    assert (tmp_path / "data" / "runs" / "synthetic-tiny" / "quick" / "run.json").exists()

    # --resume (a bench cut by a session's end): the notebooks whose records hold keep their stages,
    # marked with the first bench; one whose record is gone runs again, and so does its reader (90)
    state = tmp_path / "data" / "runs" / "synthetic-tiny" / "quick" / "state"
    (state / "10_popularity.json").unlink()
    kept = {s["name"]: s for s in bench["stages"]}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_pipeline.py"), "--smoke", "--resume",
                           "--out", str(out), "--timeout", "300"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((out / "bench.json").read_text())
    assert [s["name"] for s in again["stages"]] == names
    stages = {s["name"]: s for s in again["stages"]}
    for name in ("00_data", "01_split"):
        assert stages[name]["resumed_from"]["date"] == bench["date"], stages[name]
        assert stages[name]["seconds"] == kept[name]["seconds"]
    for name in ("10_popularity", "90_report", "render"):
        assert "resumed_from" not in stages[name], stages[name]
    assert (state / "10_popularity.json").exists()


def test_bench_features_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_features.py"), "--users", "200",
                           "--items", "300", "--rows", "5000", "--candidates", "20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"4,000 candidate rows over 5,000 rows in ([0-9.]+) s, peak RSS ([0-9.]+) GB", proc.stdout)
    assert m and float(m.group(2)) > 0, proc.stdout


def test_bench_speedups_smoke():
    """scripts/bench_speedups.py at a small size: every row's old and new paths agree (it exits
    non-zero when one does not) and the table prints."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_speedups.py"), "--users", "300",
                           "--items", "250", "--rows", "6000", "--valid-users", "200", "--repeat", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sum(" yes " in line for line in proc.stdout.splitlines()) == 5, proc.stdout
