"""The comparisons the headline makes: the primary (against the blend) and the secondary (the
strongest single-stage model, chosen on validation) are named in advance, every other one is
exploratory with a Holm-adjusted p-value, and the sentences say what the paired intervals say; the
tuning table flags values at an edge."""
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
    # no blend recorded: the headline says the primary comparison cannot be made, then leads with ease
    assert text.startswith("This run has no blend") and "**blend**" not in text
    assert text.index("cannot be made") < text.index("**ease**")
    per_user["two_stage"] = per_user["ease"].assign(**{"ndcg@10": base + rng.normal(0, 0.01, 400)})
    rows = analysis.paired_table(per_user, "two_stage", n_bootstrap=200, seed=0)
    assert "does not separate" in report.headline({**paired, "rows": rows.to_dict("records")})
    per_user["blend"] = per_user["ease"].assign(**{"ndcg@10": base + 0.01})
    rows = analysis.paired_table(per_user, "two_stage", n_bootstrap=200, seed=0)
    blend = rows.set_index("against").loc["blend"]
    text = report.headline({**paired, "rows": rows.to_dict("records")})
    assert "**ease**" in text and "**blend**" in text and f"{blend['two_stage - other']:+.4f}" in text
    # the blend leads (the primary comparison), and is never named the strongest single-stage model
    assert text.startswith("**Primary comparison**") and text.index("**blend**") < text.index("**ease**")
    assert "strongest single-stage model on validation is **ease**" in text
    assert "strongest single-stage model on validation is **blend**" not in text
    assert "is beaten by it" in text                             # the blend scores above this two-stage system


def test_paired_table_is_the_per_model_bootstrap_at_once():
    from recsys_lib.protocol import metrics
    rng = np.random.default_rng(1)
    base = rng.random(300)
    per_user = {name: pd.DataFrame({"user": np.arange(300), "ndcg@10": base + rng.normal(shift, 0.05, 300)})
                for name, shift in (("two_stage", 0.02), ("ease", 0.0), ("mf", 0.02), ("pop", -0.1))}
    rows = analysis.paired_table(per_user, "two_stage", n_bootstrap=300, seed=7).set_index("against")
    for other in ("ease", "mf", "pop"):
        one = metrics.paired_bootstrap(per_user["two_stage"]["ndcg@10"], per_user[other]["ndcg@10"], 300, seed=7)
        r = rows.loc[other]
        assert np.allclose([r["two_stage - other"], r["95% CI lo"], r["95% CI hi"]], [one["diff"], one["lo"], one["hi"]],
                           rtol=0, atol=1e-12)
        assert r["p"] == one["p_value"]


def test_bootstrap_p_is_small_for_a_clear_difference_and_large_for_none():
    rng = np.random.default_rng(2)
    clear = rng.normal(0.05, 0.01, 1000)                         # resampled means far above zero
    centred = rng.normal(0.0, 0.01, 1000)                        # resampled means around zero
    negative = -clear
    p = analysis.bootstrap_p(np.stack([clear, centred, negative, centred], axis=1),
                             np.array([0.05, 0.001, -0.05, 0.0]))
    assert p[0] == 0.0 and p[2] == 0.0                           # no resample on the other side of zero
    assert p[1] > 0.5 and p[3] == 1.0                            # zero-centred: large; a zero difference: 1
    assert np.isnan(analysis.bootstrap_p(clear[:, None], np.array([np.nan])))[0]
    # exactly the formula: twice the share on the other side of zero (zero included), capped at 1
    resampled = np.array([[-0.1], [0.0], [0.2], [0.3]])
    assert analysis.bootstrap_p(resampled, np.array([0.1]))[0] == 2 * 2 / 4
    assert analysis.bootstrap_p(resampled, np.array([-0.1]))[0] == 1.0


def test_holm_adjustment_by_hand():
    # sorted: 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert np.allclose(analysis.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(analysis.holm([0.5, 0.4]), [0.8, 0.8])  # 2 x 0.4 = 0.8; then max(0.8, 1 x 0.5)
    assert np.allclose(analysis.holm([0.3, 0.9]), [0.6, 0.9])
    assert analysis.holm([0.7, 0.6]).max() == 1.0                # capped at 1
    out = analysis.holm([0.02, np.nan, 0.01])                    # a missing p stays missing and is not counted
    assert np.isnan(out[1]) and np.allclose(out[[0, 2]], [0.02, 0.02])
    assert analysis.holm([]).shape == (0,) and analysis.holm([0.04]).tolist() == [0.04]


def test_paired_summary_names_the_comparisons_in_advance():
    rng = np.random.default_rng(3)
    base = rng.random(400) * 0.2
    shifts = {"two_stage": 0.03, "blend": 0.025, "ease": 0.0, "mf": -0.05, "pop": 0.03, "two_stage_mlp": 0.031}
    per_user = {n: pd.DataFrame({"user": np.arange(400), "ndcg@10": base + s + rng.normal(0, 0.01, 400)})
                for n, s in shifts.items()}
    records = [_rec("ease", 0.10, 0.0), _rec("mf", 0.05, 0.0), _rec("pop", 0.02, 0.0), _rec("blend", 0.5, 0.0),
               _rec("two_stage", 0.2, 0.0), _rec("two_stage_mlp", 0.3, 0.0)]
    s = analysis.paired_summary(per_user, "two_stage", records, n_bootstrap=200, seed=0)
    assert s["strongest_single_stage"] == {"model": "ease", "valid_ndcg@10": 0.10}
    assert s["primary"] == {"against": "blend", "present": True}
    assert s["secondary"]["against"] == "ease" and s["secondary"]["present"]
    rows = {r["against"]: r for r in s["rows"]}
    assert {n: r["role"] for n, r in rows.items()} == {"blend": "primary", "ease": "secondary", "mf": "exploratory",
                                                       "pop": "exploratory", "two_stage_mlp": "exploratory"}
    assert rows["blend"]["p_holm"] is None and rows["ease"]["p_holm"] is None
    explore = ["mf", "pop", "two_stage_mlp"]
    assert np.allclose([rows[n]["p_holm"] for n in explore], analysis.holm([rows[n]["p"] for n in explore]))
    assert s["exploratory"] == {"rows": 3, "adjustment": "holm"} and s["n_bootstrap"] == 200
    json.dumps(s)                                                # plain JSON for analysis/paired.json
    # a paired.json written before the comparisons were named gets the same roles when read
    legacy = {"target": "two_stage", "strongest_single_stage": s["strongest_single_stage"],
              "rows": [{k: v for k, v in r.items() if k not in ("role", "p_holm")} for r in s["rows"]]}
    assert analysis.comparisons(legacy) == s["rows"]
    assert analysis.comparison(legacy, "primary")["against"] == "blend"
    # no blend in the run: no primary row, the secondary still named
    del per_user["blend"]
    s = analysis.paired_summary(per_user, "two_stage", records, n_bootstrap=200, seed=0)
    assert not s["primary"]["present"] and analysis.comparison(s, "primary") is None
    assert analysis.comparison(s, "secondary")["against"] == "ease"
    text = report.headline(s)
    assert text.startswith("This run has no blend") and "exploratory" in text and "Holm-adjusted over those 3" in text


def test_tuning_table_flags_edges(tmp_path):
    (tmp_path / "metrics").mkdir()
    recs = {
        "ease": {"tuning": {"axes": {"reg": {"tried": [10.0, 200.0, 1000.0], "chosen": 200.0, "at_edge": False}},
                            "configs": 3, "edge_steps": 0, "at_edge": []}},
        "mf": {"tuning": {"axes": {"lr": {"tried": [0.001, 0.003], "chosen": 0.003, "at_edge": True}},
                          "configs": 6, "edge_steps": 4, "at_edge": ["lr"], "epoch_cap": True, "max_epochs": 5}},
        "two_tower": {"search": [{"name": "seed", "chosen": False}, {"name": "softmax", "chosen": True}],
                      "tuning": {"axes": {}, "held": {"dim": 128, "user_hidden": [256, 128]}}},
        "sasrec": {"tuning": {"axes": {"lr": {"tried": [0.001, 0.002], "chosen": 0.002, "at_edge": False},
                                       "dim": {"tried": [64], "chosen": 64, "at_edge": False, "fixed": True}},
                              "configs": 2, "edge_steps": 0, "at_edge": [], "fixed": ["dim"],
                              "held": {"dim": 64, "blocks": 2, "heads": 1, "batch_size": 16}}},
        "neumf": {"tuning": {"axes": {"lr": {"tried": [0.003], "chosen": 0.003, "at_edge": False, "fixed": True}},
                             "configs": 1, "edge_steps": 0, "at_edge": [], "fixed": ["lr"]}},   # before `held`
    }
    for i, (name, extra) in enumerate(recs.items()):
        (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps(
            {"model": name, "valid": {"ndcg@10": 0.1}, "written": str(i), **extra}))
    t = report.tuning_table(tmp_path).set_index("model")
    assert t.loc["ease", "at edge"] == "no" and "reg ∈ {10, 200, 1000}" in t.loc["ease", "searched"]
    assert t.loc["mf", "at edge"] == "lr, epochs (best = cap 5)" and t.loc["mf", "edge steps"] == 4
    assert t.loc["two_tower", "chosen"] == "softmax"
    # every held value, flagged "not searched" in its own column (issue 40, item 5)
    assert t.loc["sasrec", "not searched"] == "dim=64, blocks=2, heads=1, batch_size=16"
    assert t.loc["sasrec", "at edge"] == "no" and "dim ∈ {64}" in t.loc["sasrec", "searched"]
    assert t.loc["two_tower", "not searched"] == "dim=128, user_hidden=[256,128]"
    assert t.loc["neumf", "not searched"] == "lr=0.003"          # a record written before `held`
    assert t.loc["ease", "not searched"] == "–"                 # not recorded


def test_named_variant_caps_are_flagged(tmp_path):
    """The retriever and the re-ranker are tuned as named variants; a chosen variant that kept its
    last allowed epoch (or, in some fold, its last boosting round) is flagged, the cap read from
    the run's parameters with the variant's own override."""
    from recsys_lib.report.variant_caps import NAMED_VARIANTS, flag_variant_caps
    (tmp_path / "metrics").mkdir()
    params = {"two_tower": {"epochs": 15, "variants": [{"name": "bpr", "variant": "bpr"},
                                                       {"name": "softmax", "variant": "softmax", "epochs": 10}]},
              "reranker": {"variants": ["mlp_features", "lgbm", {"name": "lgbm_lr02", "variant": "lgbm",
                                                                 "n_estimators": 600}],
                           "mlp_features": {"epochs": 20}, "lgbm": {"n_estimators": 300}}}

    def write(tt_best, rr_chosen, rr_best, params=params):
        recs = {"two_tower": [{"name": "bpr", "epochs": 15, "best_epoch": 15, "best": False},
                              {"name": "softmax", "epochs": 10, "best_epoch": tt_best, "best": True}],
                "two_stage": [{"variant": "retriever_order", "chosen": False}] + [
                              {"variant": v, "chosen": v == rr_chosen, "best_epoch_or_round": rr_best}
                              for v in ("mlp_features", "lgbm", "lgbm_lr02")]}
        for i, (name, search) in enumerate(recs.items()):
            (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps(
                {"model": name, "valid": {"ndcg@10": 0.1}, "written": str(i), "search": search}))
        return flag_variant_caps(report.tuning_table(tmp_path), tmp_path, params).set_index("model")["at edge"]

    edge = write(10, "lgbm", [300, 120, 300, 80, 90])
    assert edge["two_tower"] == "epochs (best = cap 10)"          # the variant's own cap, not 15
    assert edge["two_stage"] == "rounds (best = cap 300 in 2 of 5 folds)"
    edge = write(7, "lgbm_lr02", [300, 120, 300, 80, 90])           # 300 of 600 rounds: inside
    assert edge["two_tower"] == "no" and edge["two_stage"] == "no"
    edge = write(9, "mlp_features", [20, 5, 6, 7, 8])
    assert edge["two_stage"] == "epochs (best = cap 20 in 1 of 5 folds)"
    assert set(write(10, "lgbm", [300] * 5, params={})) == {NAMED_VARIANTS}   # no parameters: as it was
