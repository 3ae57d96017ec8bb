"""``reranker.stale_lists`` end to end: 25_label_window, 30_reranker and 50_leakage_audit rerun on
a copy of the session's pipeline run (synthetic-tiny, quick) with the option on and LightGBM
variants only."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from recsys_lib import pipeline

pytestmark = pytest.mark.slow


def test_stale_lists_train_the_reranker_and_validation_scores_the_fresh_lists(built_report, tmp_path, monkeypatch):
    data = built_report.parent.parent.parent / "data"
    shutil.copytree(data, tmp_path / "data", symlinks=True)
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RECSYS_REPORTS_DIR", str(tmp_path / "reports"))
    pipeline.run_pipeline("synthetic-tiny", "quick", only=["25", "30", "50"], render=False, timeout=600,
                          overrides=["reranker.stale_lists=0.1", "reranker.variants=[lgbm]", "audit.design_runs=[]"])
    run = tmp_path / "data" / "runs" / "synthetic-tiny" / "quick"
    stale = json.loads((run / "stale" / "summary.json").read_text())
    window = json.loads((run / "window" / "summary.json").read_text())   # both from one refit
    assert stale["models"] == window["models"] == ["ease", "ials", "mf", "sasrec", "transition"]
    assert set(stale["refit_sources_valid_ndcg@10"]) == {"ease", "ials"}
    fresh = pd.read_parquet(run / "candidates" / "valid.parquet")
    lists = pd.read_parquet(run / "stale" / "candidates.parquet")
    assert stale["users"] == fresh["user"].nunique() and set(lists["user"]) == set(fresh["user"])
    pairs = lambda c: set(zip(c["user"], c["item"]))
    assert pairs(lists) != pairs(fresh), "the refits propose other candidates than the models fit on train"
    m = json.loads((run / "metrics" / "two_stage.json").read_text())
    assert m["params"]["reranker"] == "lgbm" and "stale validation lists" in m["notes"]
    chosen = next(r for r in m["search"] if r["variant"] == "lgbm")
    # the choice scored the stale lists; the record re-ranks the fresh ones
    assert chosen["out_of_fold_ndcg"] != pytest.approx(m["valid"]["ndcg@10"], abs=1e-9)
    # the leakage audit scores the re-ranker on the stale lists it trained on, too
    (row,) = json.loads((run / "analysis" / "audit.json").read_text())["reranker"]
    assert row["stale lists it trained on: its users"] > row["stale lists: out-of-fold users"]
    assert row["stale lists: out-of-fold users"] == pytest.approx(chosen["out_of_fold_ndcg"], abs=1e-9)
    with pytest.raises(Exception, match="LightGBM variants only"):
        pipeline.run_pipeline("synthetic-tiny", "quick", only=["25"], render=False, timeout=600,
                              overrides=["reranker.stale_lists=0.1"])


def test_refits_from_checkpoints_equal_the_refits_of_the_loaded_models(built_report, monkeypatch):
    """25_label_window loads each train-fit model only for its refit (`refit_from_checkpoints`, to
    keep the peak memory down); the refits it gets are exactly those of the models loaded together."""
    import torch

    from recsys_lib.protocol.evaluate import Labels
    from recsys_lib.run.experiment import Run
    from recsys_lib.stage2 import refit, system as two_stage

    monkeypatch.setenv("RECSYS_DATA_DIR", str(built_report.parent.parent.parent / "data"))
    run = Run.open("synthetic-tiny", "quick", "", [], None, "cpu")
    sources = list(run.params["two_tower"].get("candidate_sources", []))
    scorers = two_stage.scorer_names(run.params["reranker"])
    assert sources and len(scorers) > 1
    loaded = refit.Stage1(two_stage.load_retriever(run), two_stage.load_baselines(run, sources),
                          two_stage.load_baselines(run, scorers))
    w, before, _ = refit.refit_stage1(run, loaded, 0.1)
    w2, after, _ = refit.refit_from_checkpoints(run, sources, scorers, 0.1)
    assert len(w2.train) == len(w.train) and after.names == before.names
    assert after.sources[sources[0]] is after.scorers[sources[0]] or sources[0] not in scorers
    labels = Labels.build(w, "valid", history_len=before.retriever.cfg.history_len)
    users = torch.from_numpy(labels.users[:50])
    pairs = [(before.retriever, after.retriever)] + [(before.scorers[n], after.scorers[n]) for n in scorers]
    for old, new in pairs:
        assert new is not loaded.retriever and not any(new is m for m in loaded.scorers.values())
        torch.testing.assert_close(new.score_all(users, labels.ctx), old.score_all(users, labels.ctx),
                                   rtol=0, atol=0)
