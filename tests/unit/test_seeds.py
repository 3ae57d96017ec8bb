"""Seeds: the bootstrap over seeds then users, the first seed's choices pinned for the others, and
the seed list's rule (docs/PROTOCOL.md "Seeds")."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from recsys_lib import config
from recsys_lib.errors import PipelineError
from recsys_lib.pipeline import run_further_seeds, run_is_running, seed_list, seed_pins, wait_for_first_seed
from recsys_lib.run import state as runstate
from recsys_lib.protocol import metrics
from recsys_lib.report import seeds


def test_one_seed_is_the_paired_bootstrap_over_users():
    d = np.random.default_rng(0).normal(size=(1, 300))
    np.testing.assert_array_equal(seeds.seed_user_bootstrap(d, 200, 3), metrics._resampled_means(d[0], 200, 3))


def test_seeds_that_agree_give_the_users_interval_not_a_narrower_one():
    """Every seed scores the same users: five seeds that agree carry the evidence of one, so the
    interval keeps the one-seed (users') width instead of shrinking by sqrt(5) (drawing users afresh
    within each seed would do that)."""
    rng = np.random.default_rng(2)
    users = rng.normal(0.01, 0.05, size=400)
    one = np.ptp(np.quantile(seeds.seed_user_bootstrap(users[None], 2000, 0), [0.025, 0.975]))
    five = np.ptp(np.quantile(seeds.seed_user_bootstrap(np.stack([users] * 5), 2000, 0), [0.025, 0.975]))
    assert 0.85 < five / one < 1.15, (five, one)


def test_the_interval_widens_with_the_spread_between_seeds():
    rng = np.random.default_rng(1)
    users = rng.normal(0.01, 0.05, size=400)
    same = np.stack([users] * 5)                                     # five seeds that agree
    apart = same + np.array([-0.02, -0.01, 0.0, 0.01, 0.02])[:, None]   # five that do not
    w_same = np.ptp(np.quantile(seeds.seed_user_bootstrap(same, 1000, 0), [0.025, 0.975]))
    w_apart = np.ptp(np.quantile(seeds.seed_user_bootstrap(apart, 1000, 0), [0.025, 0.975]))
    assert w_apart > 1.5 * w_same
    const = np.full((3, 50), 0.25)
    assert np.all(seeds.seed_user_bootstrap(const, 100, 0) == pytest.approx(0.25))
    # chunking does not change the draws' distribution's centre
    many = seeds.seed_user_bootstrap(apart, 500, 0, max_cells=5000)
    assert abs(many.mean() - apart.mean()) < 0.005


def _write(run, name, rec):
    (run / "metrics").mkdir(parents=True, exist_ok=True)
    (run / "metrics" / f"{name}.json").write_text(json.dumps({"model": name, **rec}))


def test_pins_fix_every_searched_value_and_the_chosen_retriever(tmp_path):
    params = config.load_params("quick", "synthetic-tiny")
    _write(tmp_path, "ease", {"params": {"reg": 5000.0, "positives_only": True},
                              "tuning": {"axes": {"reg": {"chosen": 5000.0}, "positives_only": {"chosen": True}}}})
    _write(tmp_path, "popularity", {"params": {"positives_only": False, "window_days": None},
                                    "tuning": {"axes": {"window_days": {"chosen": None}}}})
    variants = params["two_tower"]["variants"]
    last = variants[-1]["name"] if isinstance(variants[-1], dict) else variants[-1]
    _write(tmp_path, "two_tower", {"params": {}, "search": [{"name": "x", "best": False}, {"name": last, "best": True}]})
    _write(tmp_path, "two_stage", {"params": {"variant": "lgbm"}})                    # not a params section
    pins = seed_pins(tmp_path, params)
    pinned = config.load_params("quick", "synthetic-tiny", pins)
    assert pinned["ease"]["reg"] == 5000.0 and pinned["ease"]["positives_only"] is True and pinned["ease"]["grid"] == {}
    assert pinned["popularity"]["window_days"] is None and pinned["popularity"]["grid"] == {}
    assert pinned["two_tower"]["variants"] == [variants[-1]]
    assert pinned["reranker"] == params["reranker"] and pinned["mf"] == params["mf"]     # not recorded: free


def test_the_seed_list_starts_with_the_searched_seed():
    assert seed_list({"seed": 42}) == [42]
    assert seed_list({"seed": 42, "seeds": [7, 42, 7, 9]}) == [42, 7, 9]
    with pytest.raises(PipelineError, match="must include"):
        seed_list({"seed": 42, "seeds": [1, 2]})


def test_summary_reads_every_seed_and_tests_the_named_comparisons(tmp_path):
    users = np.arange(40)
    rng = np.random.default_rng(2)
    for s, run in ((42, tmp_path), (7, tmp_path / "seeds" / "7")):
        for name, base in (("two_stage", 0.3), ("blend", 0.25), ("ease", 0.2), ("two_stage_no_reranker", 0.26)):
            vals = np.clip(base + rng.normal(0, 0.05, size=len(users)), 0, 1)
            extra = {"ablation": {"without": "reranker"}} if name.endswith("no_reranker") else {}
            _write(run, name, {"seed": s, "valid": {"ndcg@10": base}, "test": {"ndcg@10": float(vals.mean())}, **extra})
            (run / "per_user").mkdir(exist_ok=True)
            pd.DataFrame({"user": users, "ndcg@10": vals}).to_parquet(run / "per_user" / f"{name}-test.parquet")
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "paired.json").write_text(json.dumps({"target": "two_stage", "rows": [
        {"against": "blend", "role": "primary"}, {"against": "ease", "role": "secondary"}]}))
    out = seeds.seed_summary(tmp_path, 42, [42, 7, 43], n_resamples=200)      # 43 has not run: left out
    assert out["seeds"] == [42, 7] and out["requested"] == [42, 7, 43]
    assert set(out["test"]["ease"]["per_seed"]) == {42, 7} and out["test"]["ease"]["sd"] is not None
    primary = seeds.comparison(out, "primary")
    assert primary["against"] == "blend" and primary["n_seeds"] == 2 and primary["n_users"] == 40
    assert primary["lo"] < primary["diff"] < primary["hi"] and primary["diff"] > 0
    assert "Over 2 seeds (42, 7;" in seeds.abstract_sentences(out)
    ablated = seeds.comparison(out, "ablation")                 # what the stage adds, over seeds too
    assert ablated["against"] == "two_stage_no_reranker" and ablated["n_seeds"] == 2 and ablated["diff"] > 0
    assert [c["role"] for c in out["comparisons"]] == ["primary", "secondary", "ablation"]
    assert "ablation" not in seeds.abstract_sentences(out)
    assert len(seeds.comparison_frame(out)) == 3 and list(seeds.spread_frame(out, "test", ["two_stage"])["model"])[0] == "two_stage"


def test_a_seed_held_by_another_process_is_tried_again_once_the_others_have_run():
    """The run's own command leaves a held seed to the process holding it (``--seeds-only``), and tries it
    again after its other seeds: a seed that process has finished meanwhile no longer keeps the report waiting."""
    calls: list[int] = []
    free_after_first_try = {45}

    def run_one(seed: int) -> bool:
        calls.append(seed)
        if seed in free_after_first_try and calls.count(seed) == 1:
            return False                       # held now; the other process ends before the retry
        return seed not in (46,)                # 46 stays held

    assert run_further_seeds([43, 45, 46], run_one) == [46]
    assert calls == [43, 45, 46, 45, 46]       # every seed once in order, then each held seed once more
    assert run_further_seeds([43, 44], lambda s: True) == []


class Lines:
    def __init__(self):
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)


def test_seeds_only_waits_while_the_runs_own_command_runs_the_first_seed_and_fails_when_nothing_does():
    """``--seeds-only`` started beside the run's own command waits for its first seed (one line per notebook waited
    on) instead of failing, so both lanes of a seeds-in-two-lanes run can be started together."""
    looks = iter([("12_neumf", "not finished in an earlier run")] * 3 + [("20_two_tower", "not finished")] + [None])
    slept: list[float] = []
    console = Lines()
    wait_for_first_seed(lambda: next(looks), lambda: True, console, poll=7.0, sleep=slept.append)
    assert slept == [7.0] * 4
    assert len(console.lines) == 2 and "12_neumf" in console.lines[0] and "20_two_tower" in console.lines[1]
    wait_for_first_seed(lambda: None, lambda: False, console, sleep=slept.append)       # finished: no wait
    assert slept == [7.0] * 4
    with pytest.raises(PipelineError, match="13_ease is not .*no process runs it"):
        wait_for_first_seed(lambda: ("13_ease", "not finished"), lambda: False, console, sleep=slept.append)


def test_a_run_is_running_while_another_holder_has_its_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path / "data"))
    run_dir = tmp_path / "data" / "runs" / "synthetic-tiny" / "quick"
    from recsys_lib.pipeline import lock_path
    assert not run_is_running("synthetic-tiny", "quick", run_dir)
    with runstate.RunLock(lock_path("synthetic-tiny", "quick"), run_dir):          # another open file: flock conflicts
        assert run_is_running("synthetic-tiny", "quick", run_dir)
    assert not run_is_running("synthetic-tiny", "quick", run_dir)
