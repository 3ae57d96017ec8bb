"""The project's structure holds: one model registry that the notebooks agree with, a protocol
that a clone contains, and a README whose links resolve."""
import re
from pathlib import Path

import nbformat

from recsys_lib import config
from recsys_lib.models.registry import REGISTRY
from recsys_lib.run import layout

ROOT = Path(__file__).resolve().parents[2]


#: how each role's notebook records its model (`run.experiment.Run`, `stage2`)
RECORDED_BY = {"single_stage": 'run.fit_model("{name}"', "retriever": 'run.fit_model("{name}"',
               "blend": "run.fit_blend()", "two_stage": ".record_variants(run,", "ablation": "ablation.record_"}


def test_every_registered_model_is_recorded_by_its_notebook():
    stems = {p.stem: p for p in layout.notebooks()}
    for name, spec in REGISTRY.items():
        assert spec.notebook in stems, f"{name}: notebook {spec.notebook} is not in notebooks/"
        code = "\n".join(c.source for c in nbformat.read(stems[spec.notebook], as_version=4).cells
                         if c.cell_type == "code")
        call = RECORDED_BY[spec.role].format(name=name)
        assert call in code, f"{spec.notebook} does not record {name} ({call})"
        assert layout.notebook_of(name) == spec.notebook
    assert layout.RERANKER_NOTEBOOK in stems
    assert layout.notebook_of("two_stage_lgbm") == layout.RERANKER_NOTEBOOK


def test_protocol_is_in_the_repo_and_every_cited_section_exists():
    protocol = ROOT / "docs" / "PROTOCOL.md"
    headings = {re.sub(r"[`#]", "", h).strip() for h in re.findall(r"^#+ .*$", protocol.read_text(), re.M)}
    cited = set()
    for path in [*ROOT.joinpath("recsys_lib").rglob("*.py"), *ROOT.joinpath("notebooks").glob("*.ipynb"),
                 *ROOT.joinpath("params").glob("*.yaml")]:
        text = path.read_text()
        assert "shared/PROTOCOL" not in text, f"{path}: cite docs/PROTOCOL.md, which a clone contains"
        cited |= set(re.findall(r"""PROTOCOL\.md[,:]? ["'`]+([^"'`]+)["'`]""", text))
    assert cited, "the library cites the protocol's sections"
    missing = {c for c in cited if not any(c == h or h.startswith(c) for h in headings)}
    assert not missing, f"sections cited but not in docs/PROTOCOL.md: {missing}"


def test_readme_is_a_front_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [l for l in links if not re.match(r"[a-z]+://", l)]
    assert {"docs/PROTOCOL.md", "docs/experiments.md"} <= set(local)
    for link in local:
        assert (ROOT / link).exists(), f"README links {link}, which does not exist"


def test_readme_results_are_written_from_metrics_json(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    scores = {"ndcg@10": 0.1234, "ndcg@10_ci": [0.1, 0.15], "recall@10": 0.2, "recall@100": 0.3,
              "recall@500": 0.4, "hit_rate@10": 0.5, "mrr@10": 0.25, "coverage@10": 0.1, "users": 561}
    metrics = {"dataset": "ml-latest-small", "profile": "full", "git_commit": "abcdef0123",
               "models": {"ease": {"model": "ease", "test": scores, "fit_seconds": 11.4},
                          "only_valid": {"model": "only_valid", "valid": scores},
                          "two_stage": {"model": "two_stage", "test": scores, "fit_seconds": 64.0},
                          "two_stage_lgbm": {"model": "two_stage_lgbm", "test": scores, "fit_seconds": 30.0}}}
    (tmp_path / "ml-latest-small").mkdir()
    (tmp_path / "ml-latest-small" / "metrics.json").write_text(__import__("json").dumps(metrics))
    readme = ("intro\n<!-- results: ml-latest-small -->\nstale\n<!-- /results -->\n"
              "<!-- results: synthetic -->\nkept\n<!-- /results -->\n")
    new, done = mod.update(readme, tmp_path)
    assert done == ["ml-latest-small"]
    assert "stale" not in new and "kept" in new          # a block without a report stays as it was
    assert "| ease | 0.1234 [0.1000, 0.1500] | 0.2000 |" in new and "only_valid" not in new
    assert "| two_stage |" in new and "two_stage_lgbm" not in new     # the chosen system, not every variant
    assert "561 test users" in new and "`abcdef0`" in new
    assert mod.update(new, tmp_path)[0] == new            # idempotent: --check passes after a write
    assert "Made by `make report DATASET=ml-latest-small`" in new          # no run parameters: the plain command
    fewer = mod.results_block({**metrics, "params": {"seeds": [42, 43]}})  # params/ plan five seeds here
    assert '`python -m recsys_lib.pipeline --dataset ml-latest-small --profile full --set "seeds=[42,43]"`' in fewer
    planned = config.load_params("full", "ml-latest-small")["seeds"]
    assert "make report DATASET=ml-latest-small`" in mod.results_block({**metrics, "params": {"seeds": planned}})
    one = {"threads": {"RECSYS_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}}     # the records' thread settings
    threaded = mod.results_block({**metrics, "run": {"notebooks": {"00_data": one, "90_report": one}}})
    assert "Made by `RECSYS_TORCH_THREADS=1 OMP_NUM_THREADS=1 make report DATASET=ml-latest-small` at" in threaded
    mixed = mod.results_block({**metrics, "run": {"notebooks": {"00_data": one, "90_report": {"threads": {}}}}})
    assert "different thread settings" in mixed and "RECSYS_TORCH_THREADS=1 make" not in mixed


def test_readme_answer_is_generated_from_every_report_and_follows_the_cis(tmp_path):
    """The README's answer names the primary comparison on each real data set, then the demo, with
    the verdict its CI gives (whichever way it falls), the secondary, and each ablation."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def summary(primary, ablation=None):
        comps = [{"role": "primary", "against": "blend", "n_users": 500, **primary},
                 {"role": "secondary", "against": "ease", "diff": -0.03, "lo": -0.05, "hi": -0.01, "n_users": 500}]
        if ablation:
            comps.append({"role": "ablation", "against": "two_stage_no_reranker", **ablation})
        return {"seeds": [42, 43, 44, 45, 46], "first_seed": 42, "comparisons": comps}

    reports = {"ml-100k": {"dataset": "ml-100k", "git_commit": "1234567abc", "params": {"seeds": [42, 43, 44, 45, 46]},
                           "seeds": summary({"diff": 0.002, "lo": -0.004, "hi": 0.008},
                                            {"diff": 0.011, "lo": 0.004, "hi": 0.019})},
               "ml-latest-small": {"dataset": "ml-latest-small", "git_commit": "1234567abc",
                                   "seeds": summary({"diff": 0.013, "lo": 0.005, "hi": 0.021})},
               "synthetic": {"dataset": "synthetic", "git_commit": "1234567abc",
                             "seeds": summary({"diff": -0.02, "lo": -0.03, "hi": -0.01})}}
    for name, metrics in reports.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({**metrics, "models": {}}))
    readme = ("<!-- answer -->\nold words\n<!-- /answer -->\n<!-- results: ml-latest-small -->\nx\n<!-- /results -->\n"
              "<!-- results: ml-100k -->\ny\n<!-- /results -->\n")
    new, _ = mod.update(readme, tmp_path)
    answer = new.split("<!-- /answer -->")[0]
    assert "old words" not in answer
    assert answer.index("on ml-latest-small it beats the blend, +0.0130 [+0.0050, +0.0210]") \
        < answer.index("on ml-100k it does not separate from the blend, +0.0020 [-0.0040, +0.0080]") \
        < answer.index("on the synthetic demo it is beaten by the blend, -0.0200")    # README order, the demo last
    assert "not evidence about real users" in answer and "5 seeds, 500 test users" in answer
    assert "on ml-100k it is beaten by ease, -0.0300" in answer
    assert "without the re-ranker (the candidates ordered by the blend), the full system minus it: +0.0110 " \
           "[+0.0040, +0.0190] on ml-100k" in answer
    assert "`1234567`" in answer and mod.update(new, tmp_path)[0] == new


def test_the_answer_keeps_a_data_set_whose_report_is_absent_from_its_kept_record(tmp_path):
    """reports/ is never committed and a five-seed run takes hours, so a machine usually holds one data set's
    report: the answer's inputs of each report are kept in docs/results/ and stand in for an absent report,
    giving the same words as the report itself; a block whose report is absent stays as it was."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    comps = [{"role": "primary", "against": "blend", "diff": 0.017, "lo": 0.0086, "hi": 0.0262, "n_users": 561},
             {"role": "secondary", "against": "transition", "diff": 0.04, "lo": 0.03, "hi": 0.05, "n_users": 561},
             {"role": "ablation", "against": "two_stage_no_two_tower", "diff": -0.001, "lo": -0.005, "hi": 0.004}]
    report = {"dataset": "ml-latest-small", "profile": "full", "git_commit": "0ddf9a8abc", "models": {"x": {}},
              "params": {"seeds": [42, 43, 44, 45, 46], "mf": {"dim": 64}},
              "seeds": {"seeds": [42, 43, 44, 45, 46], "first_seed": 42, "comparisons": comps, "test": {"big": 1}}}
    reports, records = tmp_path / "reports", tmp_path / "records"
    for name, metrics in (("ml-latest-small", report), ("ml-latest-small--probe", report),
                          ("ml-32m", {**report, "dataset": "ml-32m", "profile": "quick"})):
        (reports / name).mkdir(parents=True)
        (reports / name / "metrics.json").write_text(json.dumps(metrics))
    readme = ("<!-- answer -->\nold\n<!-- /answer -->\n<!-- results: ml-latest-small -->\nthe block\n<!-- /results -->\n"
              "<!-- results: ml-100k -->\nnot yet\n<!-- /results -->\n")
    from_report, _ = mod.update(readme, reports)
    assert mod.write_records(reports, records) == ["ml-latest-small"]           # a named or quick run is not the study's
    (reports / "synthetic-32m").mkdir()                                          # a full run the answer does not read
    (reports / "synthetic-32m" / "metrics.json").write_text(json.dumps({**report, "dataset": "synthetic-32m"}))
    assert mod.write_records(reports, records, {"ml-latest-small", "ml-100k", "synthetic"}) == ["ml-latest-small"]
    assert not (records / "synthetic-32m.json").exists()
    kept = json.loads((records / "ml-latest-small.json").read_text())
    assert "models" not in kept and "test" not in kept["seeds"] and kept["params"] == {"seeds": [42, 43, 44, 45, 46]}
    (reports / "ml-latest-small" / "metrics.json").unlink()
    from_record, done = mod.update(readme, reports, records)
    assert done == [] and "the block" in from_record and "not yet" in from_record
    assert from_record == from_report.replace(from_report.split("<!-- results: ml-latest-small -->\n")[1].split(
        "<!-- /results -->")[0], "the block\n")                                 # the same answer, the block untouched
    assert "on ml-latest-small it beats the blend, +0.0170 [+0.0086, +0.0262] (5 seeds, 561 test users)" in from_record
    assert "old" not in from_record.split("<!-- /answer -->")[0]
    assert "ml-latest-small" not in mod.update(readme, reports)[0].split("<!-- /answer -->")[0]   # no record: no place
