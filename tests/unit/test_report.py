"""The reader's report: numbers formatted for reading (CIs, seconds, p-values), tables without an
index column, segments lightest first, the forest plot's data (the comparisons named in advance on
top), captions under every table and figure, and an abstract (the primary comparison first) and
footer computed from the run folder's files."""
import json

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from recsys_lib.report import analysis, audit, plots, tables
from recsys_lib import report  # noqa: E402


# ---------------------------------------------------------------- formatting
def test_ci_and_metric_formatting():
    assert report.fmt_ci(0.09573, 0.08231, 0.11) == "0.0957 [0.0823, 0.1100]"
    assert report.fmt_ci(0.0307, 0.0198, 0.0434, signed=True) == "+0.0307 [+0.0198, +0.0434]"
    assert report.fmt_ci(-0.0039, -0.0128, 0.0052, signed=True) == "-0.0039 [-0.0128, +0.0052]"
    assert report.fmt_ci(0.1, None, None) == "0.1000"
    assert report.fmt_ci(None, 0.1, 0.2) == report.DASH == report.fmt_metric(float("nan"))


def test_seconds_counts_and_p_values():
    assert report.fmt_seconds(59.0905) == "59.1"
    assert report.fmt_seconds(1234.56) == "1,234.6"
    assert report.fmt_seconds(0.0006) == "<0.1" and report.fmt_seconds(0.0) == "0.0"
    assert report.fmt_seconds(None) == report.DASH
    assert report.fmt_count(100836) == "100,836"
    assert report.fmt_p(0.0, 1000) == "<0.002" and report.fmt_p(0.0, 200) == "<0.01"
    assert report.fmt_p(0.40612) == "0.406"


def test_tidy_formats_every_cell_for_reading():
    t = report.tidy(pd.DataFrame({"model": ["a"], "epochs": [12], "honest test": [0.043211],
                                  "fit_seconds": [3.16351], "positives": [3233.0], "ok": [True]}))
    assert t.iloc[0].tolist() == ["a", "12", "0.0432", "3.2", "3,233", "yes"]


def test_searched_values_keep_three_significant_digits():
    assert tables._fmt(0.000333333) == "0.000333" and tables._fmt(1000.0) == "1000" and tables._fmt(True) == "True"


# ---------------------------------------------------------------- tables
def _metrics(tmp_path, name, ndcg, ci, fit, written, **extra):
    (tmp_path / "metrics").mkdir(exist_ok=True)
    period = {"ndcg@10": ndcg, "ndcg@10_ci": ci, "recall@10": 0.1, "recall@100": 0.3, "recall@500": 0.7,
              "hit_rate@10": 0.3, "mrr@10": 0.15, "coverage@10": 0.2, "users": 561, "seconds": 0.05,
              "scoring_seconds_per_1000_users": 0.08912}
    rec = {"model": name, "fit_seconds": fit, "written": written, "seed": 42, "git_commit": "abc123",
           "device": "cpu", "valid": dict(period, users=551), "test": period, **extra}
    (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps(rec))


def test_results_frame_sorted_formatted_and_without_index(tmp_path):
    _metrics(tmp_path, "popularity", 0.0521, [0.0416, 0.0632], 0.0006, "1")
    _metrics(tmp_path, "ease", 0.09573, [0.08231, 0.11], 59.0905, "2")
    _metrics(tmp_path, "two_stage", 0.1217, [0.1061, 0.1372], 62.74, "3")
    t = report.results_frame(tmp_path, "test")
    assert t["model"].tolist() == ["two_stage", "ease", "popularity"]
    ease = t.set_index("model").loc["ease"]
    assert ease["nDCG@10 [95% CI]"] == "0.0957 [0.0823, 0.1100]"
    assert ease["fit s"] == "59.1" and ease["scoring s / 1k users"] == "0.1" and ease["Recall@500"] == "0.7000"
    assert t.set_index("model").loc["popularity", "fit s"] == "<0.1"
    assert report.scored_users(tmp_path, "test") == 561 and report.scored_users(tmp_path, "valid") == 551
    html = report.table_html(t, "results", strong=("two_stage",))
    header = html.split("<thead>")[1].split("</thead>")[0]
    assert header.count("<th") == len(t.columns) and "<th></th>" not in html      # no index column
    assert header.startswith("<tr><th>model</th>") and '<th class="rs-num">fit s</th>' in header
    assert '<tr class="rs-strong"><td>two_stage</td><td class="rs-num">0.1217 [' in html and 'id="results"' in html


def _paired(blend=False):
    """A paired.json as 40_evaluation wrote it before the comparisons were named (no roles): the
    roles are given when it is read."""
    rows = [{"against": a, "target": 0.12, "other": o, "two_stage - other": 0.12 - o,
             "95% CI lo": lo, "95% CI hi": hi, "p": p, "better": lo > 0}
            for a, o, lo, hi, p in (("popularity", 0.05, 0.05, 0.09, 0.0), ("ials", 0.09, 0.02, 0.04, 0.0),
                                    ("two_stage_mlp", 0.125, -0.013, 0.005, 0.406),
                                    *((("blend", 0.11, -0.002, 0.022, 0.09),) if blend else ()))]
    return {"target": "two_stage", "strongest_single_stage": {"model": "ials", "valid_ndcg@10": 0.0982}, "rows": rows}


def test_forest_data_and_plot():
    f = analysis.forest_data(_paired())
    assert f["model"].tolist() == ["ials", "two_stage_mlp", "popularity"]       # secondary, then closest rival first
    assert f["label"].tolist() == ["ials (secondary)", "two_stage_mlp", "popularity"]
    assert np.allclose(f["diff"], [0.03, -0.005, 0.07]) and (f["lo"] <= f["diff"]).all() and (f["diff"] <= f["hi"]).all()
    fig = plots.forest(f)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == f["label"].tolist()
    assert any(np.allclose(line.get_xdata(), 0) for line in ax.get_lines())      # the zero line
    assert ax.get_ylim()[0] > ax.get_ylim()[1]                                    # first row at the top
    matplotlib.pyplot.close(fig)


def test_forest_puts_the_primary_comparison_on_top():
    f = analysis.forest_data(_paired(blend=True))
    assert f["model"].tolist() == ["blend", "ials", "two_stage_mlp", "popularity"]
    assert f["role"].tolist() == ["primary", "secondary", "exploratory", "exploratory"]
    fig = plots.forest(f)
    ticks = fig.axes[0].get_yticklabels()
    assert [t.get_text() for t in ticks][:2] == ["blend (primary)", "ials (secondary)"]
    assert [t.get_fontweight() for t in ticks][:3] == ["bold", "bold", "normal"]
    matplotlib.pyplot.close(fig)
    caption = report.text.comparisons_caption(_paired(blend=True))
    assert caption.startswith("The top row is the primary comparison, named in advance: the blend")
    assert "the next row is the secondary: ials" in caption and "the other 2 rows are exploratory" in caption
    assert "no blend" in report.text.comparisons_caption(_paired())


def test_paired_frame_has_no_constant_column():
    t = report.paired_frame(_paired(blend=True), 1000)
    assert list(t.columns) == ["model", "comparison", "model nDCG@10", "two_stage − model [95% CI]", "p", "p (Holm)",
                               "separates"]
    assert t["model"].tolist() == ["blend", "ials", "two_stage_mlp", "popularity"]    # the forest plot's order
    row = t.set_index("model").loc["ials"]
    assert row["two_stage − model [95% CI]"] == "+0.0300 [+0.0200, +0.0400]" and row["p"] == "<0.002"
    assert row["separates"] == "yes, above 0" and t.set_index("model").loc["two_stage_mlp", "separates"] == "no"
    assert row["comparison"] == "secondary" and row["p (Holm)"] == report.DASH       # named: judged on its CI
    holm = t.set_index("model")["p (Holm)"]
    assert holm["two_stage_mlp"] == "0.406" and holm["popularity"] == "<0.004"       # 2 exploratory rows


# ---------------------------------------------------------------- segments
def test_segments_are_ordered_light_medium_heavy():
    assert analysis.segment_order(["heavy", "light", "medium"]) == ["light", "medium", "heavy"]
    assert analysis.segment_order(["q10", "q2", "q1"]) == ["q1", "q2", "q10"]
    saved = pd.DataFrame([{"model": m, "activity": s, "ndcg@10": 0.1, "users": 5}
                          for m in ("mf", "ease") for s in ("heavy", "light", "medium")])
    ordered = analysis.order_segments(saved)
    assert ordered["activity"].tolist() == ["light", "medium", "heavy"] * 2
    assert ordered["model"].tolist() == ["mf"] * 3 + ["ease"] * 3
    fig = plots.segment_bars(saved, "activity")
    labels = [t.get_text().split("\n")[0] for t in fig.axes[0].get_xticklabels()]
    assert labels == ["light", "medium", "heavy"]
    matplotlib.pyplot.close(fig)


def test_by_segment_writes_segments_lightest_first():
    users = np.arange(9)
    segments = pd.Series(["heavy", "light", "medium"] * 3, index=users)
    per_user = {"mf": pd.DataFrame({"user": users, "ndcg@10": np.linspace(0, 1, 9)})}
    out = analysis.by_segment(per_user, segments)
    assert out["activity"].tolist() == ["light", "medium", "heavy"] and out["users"].tolist() == [3, 3, 3]


def test_main_models_keep_one_two_stage_system():
    names = ["popularity", "ease", "two_stage_lgbm", "two_stage", "two_tower"]
    assert analysis.main_models(names) == ["popularity", "ease", "two_stage", "two_tower"]


# ---------------------------------------------------------------- captions, curves, searches, times
def test_captions_number_tables_and_figures_and_embed_pngs():
    import matplotlib.pyplot as plt
    cap = report.Captions()
    t = cap.table(pd.DataFrame({"model": ["a"], "x": ["1"]}), "A table <b>", "tab").data
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    f = cap.figure(fig, "A figure", "fig").data
    t2 = cap.table(pd.DataFrame({"model": ["b"]}), "Another", "tab2").data
    assert "<figcaption><b>Table 1.</b> A table &lt;b&gt;</figcaption>" in t and "<b>Table 2.</b>" in t2
    assert t.index("</table>") < t.index("<figcaption>")                           # caption under the table
    assert '<img src="data:image/png;base64,' in f and "<b>Figure 1.</b> A figure" in f
    assert f.index("<img") < f.index("<figcaption>") and not plt.get_fignums()      # closed: shown once


def test_learning_curves_search_points_and_timing(tmp_path):
    _metrics(tmp_path, "mf", 0.07, [0.06, 0.08], 25.6, "1", tuning={"axes": {"lr": {}}},
             search=[{"lr": 0.001, "valid_metric": 0.05, "best": False}, {"lr": 0.003, "valid_metric": 0.08, "best": True}])
    _metrics(tmp_path, "two_tower", 0.06, [0.05, 0.07], 139.5, "2",
             search=[{"name": "seed", "selected_on": "recall@500", "valid_metric": 0.58, "best": False},
                     {"name": "softmax", "selected_on": "recall@500", "valid_metric": 0.73, "best": True}])
    (tmp_path / "curves").mkdir()
    for name, best in (("two_tower", 2), ("mf", 3)):
        recs = [{"epoch": e, "loss": 1.0 / e, "valid_metric": 0.01 * e} for e in (1, 2, 3)]
        (tmp_path / "curves" / f"{name}.json").write_text(json.dumps({"records": recs, "best_epoch": best}))
    curves = report.learning_curve_data(tmp_path)
    assert list(curves) == ["mf", "two_tower"]                                    # the order models were written
    assert curves["mf"] == {"epoch": [1, 2, 3], "valid": [0.01, 0.02, 0.03], "best_epoch": 3, "metric": "nDCG@10"}
    assert curves["two_tower"]["metric"] == "Recall@500"
    fig = plots.learning_curves(curves)
    assert len([a for a in fig.axes if a.get_visible()]) == 2
    matplotlib.pyplot.close(fig)
    points = report.search_points(tmp_path)
    assert points.to_dict("records") == [{"model": "mf", "valid": 0.05, "chosen": False},
                                         {"model": "mf", "valid": 0.08, "chosen": True}]
    timing = report.timing_frame(tmp_path)
    assert timing["fit s"].tolist() == [25.6, 139.5] and timing["scoring s"].tolist() == [0.05, 0.05]
    matplotlib.pyplot.close(plots.timings(timing, pd.DataFrame({"stage": ["11_mf"], "seconds": [30.5]})))
    matplotlib.pyplot.close(plots.search_strip(points))


def test_stage_seconds_come_from_the_runs_completion_records(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "state").mkdir(parents=True)
    for stem, seconds in (("11_mf", 30.5), ("00_data", 7.2), ("90_report", 6.0)):
        (run_dir / "state" / f"{stem}.json").write_text(json.dumps(
            {"notebook": stem, "seconds": seconds, "finished": "2026-11-28T14:52:05.1", "code": "c0de"}))
    s = report.stage_seconds(run_dir, exclude=("90_report",))
    assert s.to_dict("records") == [{"stage": "00_data", "seconds": 7.2}, {"stage": "11_mf", "seconds": 30.5}]


def test_stage_seconds_of_older_runs_from_executed_notebooks(tmp_path):
    run_dir = tmp_path / "runs" / "x" / "full"
    nb_dir = tmp_path / "reports" / "notebooks"
    nb_dir.mkdir(parents=True)
    for stem, rd, duration in (("00_data", run_dir, 7.2), ("11_mf", run_dir, 30.5),
                               ("12_neumf", tmp_path / "other", 99.0), ("13_ease", run_dir, None),
                               ("90_report", run_dir, 6.0)):
        meta = {"metadata": {"papermill": {"duration": duration, "parameters": {"RUN_DIR": str(rd)}}}}
        (nb_dir / f"{stem}.ipynb").write_text(json.dumps(meta))
    s = report.stage_seconds(run_dir, tmp_path / "reports", exclude=("90_report",))
    assert s.to_dict("records") == [{"stage": "00_data", "seconds": 7.2}, {"stage": "11_mf", "seconds": 30.5}]
    assert report.stage_seconds(run_dir).empty


# ---------------------------------------------------------------- abstract and footer
def _run_folder(tmp_path, audit=True, blend=True):
    _metrics(tmp_path, "ials", 0.0910, [0.0782, 0.1052], 15.0, "1")
    _metrics(tmp_path, "popularity", 0.0521, [0.0416, 0.0632], 0.1, "0")
    if blend:
        _metrics(tmp_path, "blend", 0.1103, [0.0953, 0.1260], 1.0, "1b")
    _metrics(tmp_path, "two_stage", 0.1217, [0.1061, 0.1372], 62.7, "2", params={"reranker": "lgbm_lr02"})
    info = {"dataset": "ml-latest-small", "profile": "full",
            "params": {"split": {"strategy": "user_temporal", "core": 5, "valid_frac": 0.1},
                       "two_tower": {"candidate_k": 500, "candidate_sources": ["ease", "ials"]}},
            "split": {"id": "user_temporal-x", "stats": {"strategy": "user_temporal", "train": {"items": 3648},
                                                         "test": {"users_scored": 561}}},
            "checksums": {"ratings.csv": "ac0cf1d26aed3a5b6777a295231976ad"}}
    (tmp_path / "run.json").write_text(json.dumps(info))
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"dataset": "ml-latest-small", "ratings": 100836, "users": 610, "movies": 9742, "first rating": "1996-03-29",
         "last rating": "2018-09-24", "share rating >= 4": 0.4818}))
    (tmp_path / "analysis").mkdir()
    rows = [{"against": "ials", "target": 0.1217, "other": 0.0910, "two_stage - other": 0.0307,
             "95% CI lo": 0.0198, "95% CI hi": 0.0434, "p": 0.0, "better": True},
            {"against": "popularity", "target": 0.1217, "other": 0.0521, "two_stage - other": 0.0696,
             "95% CI lo": 0.055, "95% CI hi": 0.084, "p": 0.0, "better": True}]
    if blend:
        rows.append({"against": "blend", "target": 0.1217, "other": 0.1103, "two_stage - other": 0.0114,
                     "95% CI lo": -0.0014, "95% CI hi": 0.0222, "p": 0.09, "better": False})
    paired = analysis.name_comparisons("two_stage", rows, {"model": "ials", "valid_ndcg@10": 0.0982})
    (tmp_path / "analysis" / "paired.json").write_text(json.dumps(paired))
    if audit:
        design = [{"optimizer steps": 12, "in-sample valid (protocol IDCG)": 0.054, "honest test": 0.043},
                  {"optimizer steps": 2600, "in-sample valid (protocol IDCG)": 0.5385096, "honest test": 0.0493}]
        (tmp_path / "analysis" / "audit.json").write_text(json.dumps({"design_as_run": design, "reranker": []}))


def test_abstract_is_computed_from_the_run_folder(tmp_path):
    _run_folder(tmp_path)
    text = report.abstract(tmp_path)
    assert text.startswith('<section id="abstract"')
    for part in ("ml-latest-small, 100,836 ratings by 610 users of 9,742 movies", "a rating of 4 or more",
                 "the last 10% for test", "test period's 561 users with a positive", "3,648 movies",
                 "strongest single-stage model on validation is ials (validation nDCG@10 0.0982)",
                 "0.0910 [0.0782, 0.1052]", "0.1217 [0.1061, 0.1372]", "+0.0307 [+0.0198, +0.0434] (+34%)",
                 "top 500 candidates joined with ease and ials", "lgbm_lr02", "lies above zero",
                 "0.539 after 2,600 optimizer steps but 0.049 on the test period"):
        assert part in text, part
    # the primary comparison first: the blend, its score and the paired difference with its CI, in words
    # that follow the interval; then the secondary; then the exploratory rest
    for part in ("The primary comparison, named in advance, is against the blend of the single-stage models",
                 "the blend scores 0.1103 [0.0953, 0.1260]", "+0.0114 [-0.0014, +0.0222] (+10%)",
                 "does not separate from it: the 95% CI of the difference includes zero",
                 "The one other comparison (popularity) is exploratory"):
        assert part in text, part
    assert text.index("primary comparison") < text.index("strongest single-stage") < text.index("exploratory")
    assert text.index("+0.0114") < text.index("+0.0307")
    sentences = text.split("</b> ")[1].count(". ") + 1
    assert sentences == 7                     # data, split, two-stage, primary, secondary, exploratory, audit
    assert "as stale as the test lists" not in text
    info = json.loads((tmp_path / "run.json").read_text())
    info["params"]["reranker"] = {"stale_lists": 0.1}
    (tmp_path / "run.json").write_text(json.dumps(info))
    assert "re-ranked by lgbm_lr02 trained on validation lists from stage-1 models refit before the last 10% of " \
           "train, as stale as the test lists" in report.abstract(tmp_path)


def test_abstract_without_a_blend_says_so_and_leads_with_the_secondary(tmp_path):
    _run_folder(tmp_path, blend=False)
    text = report.abstract(tmp_path)
    assert "This run has no blend of the single-stage models" in text and "cannot be made" in text
    assert text.index("no blend") < text.index("strongest single-stage model on validation is ials")
    assert "+0.0307 [+0.0198, +0.0434] (+34%)" in text and "exploratory" in text


def test_headline_leads_with_the_blend_and_its_interval(tmp_path):
    _run_folder(tmp_path)
    paired = json.loads((tmp_path / "analysis" / "paired.json").read_text())
    text = report.headline(paired)
    assert text.startswith("**Primary comparison**") and text.index("**blend**") < text.index("**ials**")
    assert "**+0.0114** (+10.3%) [-0.0014, +0.0222], so the two-stage system does not separate from it" in text
    assert "**Secondary**: the strongest single-stage model on validation is **ials**" in text
    assert "**+0.0307** (+33.7%) [+0.0198, +0.0434], so the two-stage system beats it" in text
    assert text.endswith("The one other comparison (popularity) is exploratory, not a finding: its p-value falls "
                         "below 0.05.")


def test_the_audit_sentence_follows_its_numbers(tmp_path):
    _run_folder(tmp_path)
    few = {"design_as_run": [{"optimizer steps": 2, "in-sample valid (protocol IDCG)": 0.033, "honest test": 0.036}],
           "reranker": [{"re-ranker": "lgbm_lr02", "seed protocol: valid users it trained on": 0.29954,
                         "out-of-fold valid users": 0.2310, "honest test": 0.2573}]}
    text = audit.audit_sentence(few, {"two_stage": {"params": {"reranker": "lgbm_lr02"}}})
    assert "chosen re-ranker (lgbm_lr02) reaches nDCG@10 0.300, against 0.231" in text
    few["reranker"][0]["seed protocol: valid users it trained on"] = 0.232
    text = audit.audit_sentence(few, {"two_stage": {"params": {"reranker": "lgbm_lr02"}}})
    assert "0.033 in-sample and 0.036 on test after 2 optimizer steps: too few to memorise" in text
    # trained on stale lists: judged on the lists it learnt from
    few["reranker"][0].update({"stale lists it trained on: its users": 0.2812, "stale lists: out-of-fold users": 0.2205})
    text = audit.audit_sentence(few, {"two_stage": {"params": {"reranker": "lgbm_lr02"}}})
    assert "scored on the stale validation lists of the validation users it trained on" in text
    assert "reaches nDCG@10 0.281, against 0.221 on users it never saw" in text


def test_abstract_says_which_notebook_is_missing(tmp_path):
    _run_folder(tmp_path, audit=False)
    (tmp_path / "analysis" / "paired.json").unlink()
    text = report.abstract(tmp_path)
    assert "run 40_evaluation" in text and "50_leakage_audit) has not run" in text


def test_provenance_footer(tmp_path):
    _run_folder(tmp_path)
    html = report.provenance(tmp_path, 42)
    for part in ('id="provenance"', "ac0cf1d26aed3a5b6777a295231976ad", "abc123", "<td>42</td>", "torch ",
                 "user_temporal-x", "lightgbm "):
        assert part in html, part


# ---------------------------------------------------------------- which notebook to run first
def test_missing_stage_one_artefacts_name_their_notebook(tmp_path):
    from recsys_lib.stage2 import leakage, refit, system as two_stage
    from recsys_lib.errors import PipelineError
    from recsys_lib.run.experiment import Run
    run = Run.open("synthetic-tiny", "quick", tmp_path)
    with pytest.raises(PipelineError, match=r"ease\.pt is missing: run 13_ease first"):
        two_stage.load_baselines(run, ["ease"])
    with pytest.raises(PipelineError, match=r"summary\.json is missing: run 25_label_window first"):
        refit.load_label_window(run, ["a"])
    with pytest.raises(PipelineError, match=r"two_stage\.json is missing: run 30_reranker first"):
        leakage.in_fold_audit(run, None)


def test_readme_block_leads_with_the_primary_comparison(tmp_path):
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("readme_results", root / "scripts" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    scores = {"ndcg@10": 0.12, "ndcg@10_ci": [0.1, 0.14], "recall@10": 0.1, "recall@100": 0.3, "recall@500": 0.7,
              "hit_rate@10": 0.3, "mrr@10": 0.15, "coverage@10": 0.2, "users": 561}
    metrics = {"dataset": "ml-latest-small", "profile": "full", "git_commit": "abcdef0123", "paired": _paired(blend=True),
               "models": {n: {"model": n, "test": scores} for n in ("popularity", "ials", "blend", "two_stage")}}
    block = mod.results_block(metrics)
    words = block.split("\n\n")[-1]
    assert words.startswith("**Primary comparison**") and words.index("**blend**") < words.index("**Secondary**")
    assert "[-0.0020, +0.0220]" in words and "exploratory" in words and words.endswith(".\n")
    no_blend = mod.results_block({**metrics, "paired": _paired()})
    assert "This run has no blend" in no_blend and "**ials**" in no_blend
