"""The default report (`make report`: synthetic demo, full profile) read back from its files: every
model recorded and in bounds on the same test users, the pipeline far above a random and a
popularity ranking, and the comparisons named in advance (docs/PROTOCOL.md) reported with their
paired CIs, in the headline's words, whichever way they fall.

This runs the whole study (~17 minutes on 2 cores at speed index 1.02, ~20-22 on one thread), so it is marked `demo` and
left out of `make test`; `make test-demo` (and CI, beside `make test`) runs it.

Why it does not assert that the two-stage system beats the blend or the strongest single model:
that is the study's answer, and a check that fails when the answer falls one way would push the
protocol towards the other. Until 2026-12-06 this test did assert it (the demo's margins were wide:
+0.012 [+0.008, +0.016] over the blend at ff55aa0); the protocol changes of that day (one test-time
rule, a causal catalogue) were chosen without looking at their effect on it, and the test now
checks what a reader needs instead: that each named comparison is there, with its CI, and that the
verdict the report prints follows that CI. The sanity margins below (the two-stage system ~2.2x
popularity on the demo) are far from any float-sum or protocol change."""
import json

import pytest

from recsys_lib import pipeline
from recsys_lib.report import analysis
from recsys_lib.report.text import headline, verdict

BASELINES = ["popularity", "mf", "neumf", "ease", "ials", "transition", "sasrec", "blend", "two_tower"]


@pytest.mark.demo
@pytest.mark.slow
def test_the_demo_reports_every_model_and_the_comparisons_named_in_advance(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RECSYS_REPORTS_DIR", str(tmp_path / "reports"))
    index = pipeline.run_pipeline("synthetic", "full", timeout=3600)
    m = json.loads((index.parent / "metrics.json").read_text())["models"]
    assert set(BASELINES + ["two_stage"]) <= set(m)
    test = {name: m[name]["test"]["ndcg@10"] for name in BASELINES + ["two_stage"]}
    assert all(0.0 <= v <= 1.0 for v in test.values()), test
    assert len({m[n]["test"]["users"] for n in test}) == 1, "every model is scored on the same test users"
    # a working pipeline, not a finding: far above popularity (~2.2x on the demo, 2.7x before it shrank) and a random ranking
    assert test["two_stage"] > 1.5 * test["popularity"], test
    paired = json.loads((tmp_path / "data" / "runs" / "synthetic" / "full" / "analysis" / "paired.json").read_text())
    primary, secondary = analysis.comparison(paired, "primary"), analysis.comparison(paired, "secondary")
    assert primary is not None and primary["against"] == "blend"
    assert secondary is not None and secondary["against"] not in ("blend", "two_stage")
    assert secondary["against"] == paired["strongest_single_stage"]["model"]
    text = headline(paired)
    assert text.index("Primary comparison") < text.index("Secondary") < text.index("exploratory")
    for row in (primary, secondary):
        lo, hi = row["95% CI lo"], row["95% CI hi"]
        assert lo <= row["two_stage - other"] <= hi
        assert verdict(lo, hi) in text                        # the printed verdict follows the CI
    exploratory = [r for r in analysis.comparisons(paired) if r["role"] == "exploratory"]
    assert exploratory and all(r["p_holm"] is not None for r in exploratory)
