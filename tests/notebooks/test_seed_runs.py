"""Seeds on a fork of the session's finished run (synthetic-tiny, quick): ``--set seeds=[42,7]``
leaves the first seed's models alone, runs seed 7 in ``seeds/7/`` with every searched value pinned
at seed 42's choice, and the report gives every model's spread and the comparisons named in
advance over seeds and users."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from recsys_lib.run import state as runstate

from test_stage_resume import CMD, copy_of, env_for, ran   # tests/notebooks is on sys.path

pytestmark = pytest.mark.slow


def test_a_second_seed_refits_with_the_first_seeds_choices_and_the_report_tests_over_seeds(built_report, tmp_path):
    root = copy_of(built_report, tmp_path)
    done = subprocess.run(CMD + ["--run", "seeds", "--fork", "quick", "--set", "seeds=[42,7]"],
                          env=env_for(root), capture_output=True, text=True, timeout=1200, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = root / "data" / "runs" / "synthetic-tiny" / "seeds"
    sub = run_dir / "seeds" / "7"
    # the first seed's notebooks hold (seeds is read by the report alone); the report runs after seed 7's run
    first_seed = ran(done.stdout[:done.stdout.index("seed 7 (2 of 2)")])
    assert first_seed == [], done.stdout
    assert ran(done.stdout)[-1] == "90_report"
    assert runstate.read_record(sub, "30_reranker") is not None
    assert runstate.read_record(sub, "90_report") is None and runstate.read_record(sub, "50_leakage_audit") is None
    first = {f.stem: json.loads(f.read_text()) for f in (run_dir / "metrics").glob("*.json")}
    second = {f.stem: json.loads(f.read_text()) for f in (sub / "metrics").glob("*.json")}
    assert set(first) == set(second)
    for name in ("mf", "neumf", "ease", "ials", "sasrec"):
        assert second[name]["seed"] == 7 and len(second[name]["search"]) == 1, name    # one fit, no search
        for axis in first[name]["tuning"]["axes"]:
            assert second[name]["params"][axis] == first[name]["params"][axis], (name, axis)
    tt = next(r["name"] for r in first["two_tower"]["search"] if r["best"])
    assert [r["name"] for r in second["two_tower"]["search"]] == [tt]
    assert first["mf"]["test"]["ndcg@10"] != second["mf"]["test"]["ndcg@10"]      # another seed, another fit
    report = json.loads((root / "reports" / "synthetic-tiny--seeds" / "metrics.json").read_text())
    seeds = report["seeds"]
    assert seeds["seeds"] == [42, 7] and set(seeds["test"]["mf"]["per_seed"]) == {"42", "7"}
    primary = next(c for c in seeds["comparisons"] if c["role"] == "primary")
    assert primary["against"] == "blend" and primary["n_seeds"] == 2 and primary["lo"] <= primary["diff"] <= primary["hi"]
    html = (root / "reports" / "synthetic-tiny--seeds" / "index.html").read_text()
    assert 'id="seed-spread"' in html and 'id="seed-paired"' in html
    assert re.search(r"Over 2 seeds \(42, 7;", html)
    again = subprocess.run(CMD + ["--run", "seeds", "--set", "seeds=[42,7]"], env=env_for(root),
                           capture_output=True, text=True, timeout=600, cwd=root)
    assert again.returncode == 0 and ran(again.stdout) == [], again.stdout                # both seeds hold

    # a second process can take a seed off the run (--seeds-only): while it holds seed 7, the run's own
    # command leaves seed 7 to it and renders no report; --seeds-only runs only what seed 7 lacks
    from recsys_lib import pipeline
    lock = root / "data" / "runs" / "synthetic-tiny" / ".seeds.seed7.lock"     # pipeline.seed_lock_path, in root
    assert pipeline.seed_lock_path("synthetic-tiny", "seeds", 7).name == lock.name
    with runstate.RunLock(lock):
        held = subprocess.run(CMD + ["--run", "seeds", "--set", "seeds=[42,7]"], env=env_for(root),
                              capture_output=True, text=True, timeout=600, cwd=root)
    assert held.returncode == 0 and ran(held.stdout) == [], held.stdout + held.stderr
    assert "seed 7: left to the process that holds it" in held.stdout, held.stdout
    assert "the report waits for seed(s) 7" in held.stdout and "report not rendered" in held.stdout, held.stdout
    (sub / "state" / "35_ablations.json").unlink()
    only = subprocess.run(CMD + ["--run", "seeds", "--set", "seeds=[42,7]", "--seeds-only", "7"], env=env_for(root),
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert only.returncode == 0, only.stdout + only.stderr
    # 35 and what its removal touches in seed 7's folder (its forgotten files are read by 30's listing), nothing else
    assert "35_ablations" in ran(only.stdout) and set(ran(only.stdout)) <= {"30_reranker", "35_ablations",
                                                                            "40_evaluation"}, only.stdout
    assert runstate.read_record(sub, "35_ablations") is not None
    bad = subprocess.run(CMD + ["--run", "seeds", "--set", "seeds=[42,7]", "--seeds-only", "42"], env=env_for(root),
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert bad.returncode == 2 and "not further seeds of this run" in bad.stderr, bad.stderr
    last = subprocess.run(CMD + ["--run", "seeds", "--set", "seeds=[42,7]"], env=env_for(root),
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert last.returncode == 0 and "35_ablations" not in ran(last.stdout), last.stdout    # seed 7 holds again
    assert (root / "reports" / "synthetic-tiny--seeds" / "index.html").exists()
