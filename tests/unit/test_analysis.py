"""The comparison the headline makes: the strongest single-stage model is chosen on validation, and
the sentence says what the paired interval says; the tuning table flags values at an edge."""
import json

import numpy as np
import pandas as pd

from recsys_lib.report import analysis
from recsys_lib import report


def _rec(name, valid, test):
    return {"model": name, "valid": {"ndcg@10": valid}, "test": {"ndcg@10": test}, "written": name}


def test_strongest_single_stage_is_chosen_on_validation_not_test():
    records = [_rec("ease", 0.10, 0.08), _rec("ials", 0.09, 0.12), _rec("two_stage", 0.2, 0.2),
               _rec("two_stage_lgbm", 0.3, 0.3), {"model": "popularity", "valid": None}]
    best = analysis.strongest_single_stage(records)
    assert best == {"model": "ease", "valid_ndcg@10": 0.10}
    assert analysis.strongest_single_stage([_rec("two_stage", 0.2, 0.2)]) is None
    # the blend (its weights chosen on validation, so its validation score is in-sample) is never
    # the single-stage model the headline names, however high it scores there
    assert analysis.strongest_single_stage(records + [_rec("blend", 0.5, 0.1)])["model"] == "ease"


def test_paired_table_and_headline_follow_the_interval():
    rng = np.random.default_rng(0)
    base = rng.random(400) * 0.2
    per_user = {name: pd.DataFrame({"user": np.arange(400), "ndcg@10": base + shift})
                for name, shift in (("ease", 0.0), ("mf", -0.05), ("two_stage", 0.03))}
    rows = analysis.paired_table(per_user, "two_stage", n_bootstrap=200, seed=0)
    ease = rows.set_index("against").loc["ease"]
    assert ease["two_stage - other"] > 0 and ease["95% CI lo"] > 0 and ease["better"]
    assert abs(ease["target"] - ease["other"] - 0.03) < 1e-12
    paired = {"target": "two_stage", "strongest_single_stage": {"model": "ease", "valid_ndcg@10": 0.1},
              "rows": rows.to_dict("records")}
    text = report.headline(paired)
    assert "**ease**" in text and "beats it" in text and f"{ease['two_stage - other']:+.4f}" in text
    per_user["two_stage"] = per_user["ease"].assign(**{"ndcg@10": base + rng.normal(0, 0.01, 400)})
    rows = analysis.paired_table(per_user, "two_stage", n_bootstrap=200, seed=0)
    assert "does not separate" in report.headline({**paired, "rows": rows.to_dict("records")})
    assert "blend" not in text                                   # no blend recorded: no blend sentence
    per_user["blend"] = per_user["ease"].assign(**{"ndcg@10": base + 0.01})
    rows = analysis.paired_table(per_user, "two_stage", n_bootstrap=200, seed=0)
    blend = rows.set_index("against").loc["blend"]
    text = report.headline({**paired, "rows": rows.to_dict("records")})
    assert "**ease**" in text and "**blend**" in text and f"{blend['two_stage - other']:+.4f}" in text


def test_tuning_table_flags_edges(tmp_path):
    (tmp_path / "metrics").mkdir()
    recs = {
        "ease": {"tuning": {"axes": {"reg": {"tried": [10.0, 200.0, 1000.0], "chosen": 200.0, "at_edge": False}},
                            "configs": 3, "edge_steps": 0, "at_edge": []}},
        "mf": {"tuning": {"axes": {"lr": {"tried": [0.001, 0.003], "chosen": 0.003, "at_edge": True}},
                          "configs": 6, "edge_steps": 4, "at_edge": ["lr"], "epoch_cap": True, "max_epochs": 5}},
        "two_tower": {"search": [{"name": "seed", "chosen": False}, {"name": "softmax", "chosen": True}]},
    }
    for i, (name, extra) in enumerate(recs.items()):
        (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps(
            {"model": name, "valid": {"ndcg@10": 0.1}, "written": str(i), **extra}))
    t = report.tuning_table(tmp_path).set_index("model")
    assert t.loc["ease", "at edge"] == "no" and "reg ∈ {10, 200, 1000}" in t.loc["ease", "searched"]
    assert t.loc["mf", "at edge"] == "lr, epochs (best = cap 5)" and t.loc["mf", "edge steps"] == 4
    assert t.loc["two_tower", "chosen"] == "softmax"
