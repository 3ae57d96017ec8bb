"""scripts/bench_pipeline.py puts an earlier bench's stages beside this run's: grouped stages are
summed, failed stages get no ratio, new stages are listed, and the committed records parse."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "scripts" / "bench_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def stage(name, seconds, peak=1.0, error=None):
    return {"name": name, "seconds": seconds, "peak_rss_gb": peak, "error": error}


def test_grouped_stages_are_summed_and_ratios_are_before_over_after(bench):
    baseline = {"stages": {"00_data+01_split": {"seconds": 30.0, "peak_rss_gb": 2.0},
                           "11_mf": {"seconds": 100.0},
                           "17_blend": {"seconds": 50.0, "error": "killed"}}}
    now = [stage("00_data", 5.0, 1.5), stage("01_split", 10.0, 2.5), stage("11_mf", 200.0),
           stage("17_blend", 40.0), stage("20_two_tower", 7.0)]
    rows = {r["stage"]: r for r in bench.compare_stages(now, baseline)}
    assert rows["00_data+01_split"]["after_s"] == 15.0
    assert rows["00_data+01_split"]["ratio"] == pytest.approx(2.0)
    assert rows["00_data+01_split"]["after_peak_gb"] == 2.5
    assert rows["11_mf"]["ratio"] == pytest.approx(0.5)
    assert rows["17_blend"]["ratio"] is None and "killed" in rows["17_blend"]["note"]
    assert rows["20_two_tower"]["before_s"] is None and rows["20_two_tower"]["note"].startswith("new")
    assert list(rows) == ["00_data+01_split", "11_mf", "17_blend", "20_two_tower"]


def test_a_group_with_a_missing_part_or_a_failed_stage_has_no_ratio(bench):
    baseline = {"stages": {"00_data+01_split": {"seconds": 30.0}, "11_mf": {"seconds": 100.0}}}
    rows = {r["stage"]: r for r in bench.compare_stages([stage("00_data", 5.0), stage("11_mf", 9.0, error="boom")],
                                                        baseline)}
    assert rows["00_data+01_split"]["after_s"] is None and rows["00_data+01_split"]["ratio"] is None
    assert rows["11_mf"]["ratio"] is None and "boom" in rows["11_mf"]["note"]


def test_committed_records_load_and_the_newest_is_the_default(bench, tmp_path):
    records = sorted((ROOT / "docs" / "bench").glob("*.json"))
    assert records, "docs/bench holds the earlier benches' records"
    for path in records:
        (loaded,) = bench.load_baselines([str(path)])
        assert loaded["record"]["stages"] and loaded["git_commit"]
    old = {"date": "2026-01-01", "stages": {"a": {"seconds": 1}}}
    new = {"date": "2026-02-01", "stages": {"a": {"seconds": 2}}}
    (tmp_path / "z_old.json").write_text(json.dumps(old))
    (tmp_path / "a_new.json").write_text(json.dumps(new))
    assert bench.newest_baseline(tmp_path).name == "a_new.json"
    assert bench.load_baselines(["none"]) == [] and bench.load_baselines([], smoke=True) == []


def test_a_bench_json_is_a_baseline_too(bench, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"date": "d", "git_commit": "c", "stages": [stage("11_mf", 10.0)]}))
    (loaded,) = bench.load_baselines([str(path)])
    assert loaded["record"]["stages"]["11_mf"]["seconds"] == 10.0
    (tmp_path / "bad.json").write_text(json.dumps({"date": "d"}))
    with pytest.raises(SystemExit):
        bench.load_baselines([str(tmp_path / "bad.json")])
