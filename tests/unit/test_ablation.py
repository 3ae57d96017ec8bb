"""What each stage adds (recsys_lib.stage2.ablation, recsys_lib.report.ablation) on the toy split.

The candidate union is an SVD "two-tower" retriever's top K joined by one other source's top K
(`candidates.add_sources`), as 20_two_tower builds it; features as 30_reranker builds them.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_lib.models.blend import Blend
from recsys_lib.protocol import evaluate, metrics
from recsys_lib.report import ablation as report_ablation
from recsys_lib.stage2 import ablation as A
from recsys_lib.stage2 import candidates as cand
from recsys_lib.stage2 import features as rf
from recsys_lib.stage2 import inputs as I
from recsys_lib.stage2 import ranking as rk
from recsys_lib.stage2 import rerankers as R
from recsys_lib.stage2 import selection as S
from svd_retriever import SVDRetriever

K = 30
LGBM = {"lgbm": {"n_estimators": 20, "num_leaves": 7, "min_child_samples": 5, "early_stopping_rounds": 5, "num_threads": 1}}


def keys(frame: pd.DataFrame) -> set[tuple[int, int]]:
    return set(zip(frame["user"].to_numpy().tolist(), frame["item"].to_numpy().tolist()))


def lists(data, labels, retriever, source, scorers) -> I.StageInputs:
    c = cand.generate_candidates(retriever, labels, k=K)
    c = cand.add_sources(c, retriever, {"src": source}, labels.ctx, k=K)
    ue = rf.retriever_user_table(retriever, labels.users, labels.ctx, data.n_users)
    X, names = rf.build_features(c, data, labels.ctx, labels.period, retriever, scorers, ue)
    return I.StageInputs(labels, c, X, names, user_emb=ue)


@pytest.fixture(scope="module")
def setup(toy_data):
    data = toy_data
    labels = evaluate.Labels.build(data, "valid")
    retriever, source = SVDRetriever(data), SVDRetriever(data, d=4, positives_only=True)
    scorers = {"pos_mf": SVDRetriever(data, d=3, positives_only=True)}
    return dict(data=data, labels=labels, retriever=retriever, source=source, scorers=scorers,
                inputs=lists(data, labels, retriever, source, scorers))


# ---------------------------------------------------------------- without the two-tower
def test_lists_without_the_two_tower_hold_exactly_what_the_other_sources_proposed(setup):
    inputs, labels = setup["inputs"], setup["labels"]
    full, src = keys(inputs.cands), keys(cand.generate_candidates(setup["source"], labels, k=K))
    only_two_tower = full - src
    assert only_two_tower, "the toy union must hold items only the two-tower proposed, or this test proves nothing"
    out = A.without_two_tower(inputs, K)
    assert keys(out.cands) == src and not keys(out.cands) & only_two_tower
    assert len(out.cands) == len(src) and len(out.X) == len(out.cands)
    assert not set(out.names) & set(A.TWO_TOWER_FEATURES) and "retriever_score" not in out.cands
    assert (out.cands["n_sources"] == 1).all() and out.user_emb is None and out.labels is labels
    assert (out.cands["retriever_rank"] == out.cands["src_rank"]).all()      # the order ties break by
    u, r = out.cands["user"].to_numpy(), out.cands["retriever_rank"].to_numpy()
    assert (np.diff(u) >= 0).all() and ((np.diff(r) > 0) | (np.diff(u) > 0)).all()


def test_their_features_are_those_built_on_the_smaller_union_without_a_retriever(setup):
    """Dropping rows and the two-tower's columns, then recomputing the within-list columns, gives
    what build_features gives on the smaller union with no retriever: the ablation re-ranker sees
    the features a system without the two-tower would have."""
    data, labels, inputs = setup["data"], setup["labels"], setup["inputs"]
    out = A.without_two_tower(inputs, K)
    frame = out.cands.assign(retriever_score=np.float32(0.0))          # build_features reads the column
    X, names = rf.build_features(frame, data, labels.ctx, "valid", None, setup["scorers"])
    for j, name in enumerate(out.names):
        np.testing.assert_allclose(out.X[:, j], X[:, names.index(name)], rtol=1e-5, atol=1e-5, err_msg=name)
    # the within-list z-scores had to be recomputed: over the full lists they differ
    rows, _ = A.union_without_two_tower(inputs.cands, K)
    z = inputs.names.index("pos_mf_score_z")
    assert not np.allclose(inputs.X[rows, z], out.X[:, out.names.index("pos_mf_score_z")], atol=1e-3)


def test_the_two_tower_features_are_every_column_the_retriever_moves(setup):
    """Re-build the features of the same union with another retriever (other scores, ranks and
    embeddings): the columns that change are exactly TWO_TOWER_FEATURES, so a new two-tower feature
    that is not listed fails here instead of leaking into the ablation."""
    data, labels, inputs = setup["data"], setup["labels"], setup["inputs"]
    other = SVDRetriever(data, d=5)
    c = inputs.cands.copy()
    u, i = torch.from_numpy(c["user"].to_numpy(np.int64, copy=True)), torch.from_numpy(c["item"].to_numpy(np.int64, copy=True))
    c["retriever_score"] = other.score_pairs(u, i, labels.ctx).numpy().astype(np.float32)
    c["retriever_rank"] = (K + 2 - c["retriever_rank"]).clip(lower=1).astype(np.int32)
    X, names = rf.build_features(c, data, labels.ctx, "valid", other, setup["scorers"])
    assert names == inputs.names
    moved = {n for j, n in enumerate(names) if not np.allclose(X[:, j], inputs.X[:, j], atol=1e-6)}
    assert moved == set(A.TWO_TOWER_FEATURES)
    _, without = rf.build_features(inputs.cands, data, labels.ctx, "valid", None, setup["scorers"])
    assert set(names) - set(without) <= set(A.TWO_TOWER_FEATURES)


def test_label_window_lists_lose_the_same_rows_and_keep_their_labels(setup):
    inputs, labels = setup["inputs"], setup["labels"]
    y = rk.candidate_labels(inputs.cands, labels)
    window = A.window_without_two_tower(I.WindowLists(inputs.cands, inputs.X, y), inputs.names, K)
    out = A.without_two_tower(inputs, K)
    pd.testing.assert_frame_equal(window.cands, out.cands)
    np.testing.assert_array_equal(window.X, out.X)
    np.testing.assert_array_equal(window.y, rk.candidate_labels(out.cands, labels))


def test_a_union_of_the_two_tower_alone_has_no_ablation(setup):
    plain = setup["inputs"].cands[["user", "item", "retriever_score", "retriever_rank"]]
    with pytest.raises(ValueError, match="two-tower retriever alone"):
        A.union_without_two_tower(plain, K)


def test_the_chosen_configuration_is_refit_on_the_same_folds_without_the_two_tower(setup):
    data, labels, inputs = setup["data"], setup["labels"], setup["inputs"]
    cfg = R.from_params(LGBM, {"variant": "lgbm", "drop_features": ["retriever_dot", "sequence"]}, seed=3)
    with pytest.raises(ValueError, match="two-tower's columns"):
        A.fit_without_two_tower(cfg, inputs, data, folds=2)
    out = A.without_two_tower(inputs, K)
    y = rk.candidate_labels(inputs.cands, labels)
    window = A.window_without_two_tower(I.WindowLists(inputs.cands, inputs.X, y), inputs.names, K)
    model = A.fit_without_two_tower(cfg, out, data, folds=2, window=window)
    assert model.cfg.drop_features == ["sequence"] and model.feature_names == out.names
    for f, g in zip(model.fold_users, rk.fold_users(labels.users, 2, 3)):   # the full system's folds
        np.testing.assert_array_equal(f, g)
    assert min(model.info["window_lists"]) > 0
    top = S.out_of_fold_topk(model, out, labels.users, k_keep=K)
    union = keys(out.cands)
    assert all((int(u), int(i)) in union for u, row in zip(labels.users, top) for i in row if i >= 0)
    mlp = R.from_params({"mlp_features": {"hidden": [8], "epochs": 1, "patience": 1, "users_per_batch": 32,
                                          "loss": "softmax"}}, "mlp_features", seed=0)
    net = A.fit_without_two_tower(mlp, out, data, folds=2)
    assert all(m.init["user_dim"] == 0 and m.init["item_dim"] == 0 for m in net.members)   # no embedding


# ---------------------------------------------------------------- without the re-ranker
@pytest.fixture(scope="module")
def blend(setup):
    data = setup["data"]
    return Blend({"a": SVDRetriever(data, d=8), "b": SVDRetriever(data, d=3, positives_only=True)}, {"a": 0.6, "b": 0.4})


def test_pair_scores_are_the_blends_full_catalogue_scores_in_any_batches(setup, blend):
    labels, c = setup["labels"], setup["inputs"].cands
    full = blend.score_all(torch.from_numpy(labels.users), labels.ctx).numpy()        # (U, n_items)
    expected = full[np.searchsorted(labels.users, c["user"].to_numpy()), c["item"].to_numpy()]
    np.testing.assert_allclose(A.pair_scores(blend, c, labels.ctx), expected, rtol=1e-6)
    shuffled = c.sample(frac=1.0, random_state=0)
    np.testing.assert_allclose(A.pair_scores(blend, shuffled, labels.ctx, batch_users=7),   # matmuls of other
                               full[np.searchsorted(labels.users, shuffled["user"].to_numpy()),   # shapes: last
                                    shuffled["item"].to_numpy()], atol=1e-5)                      # float bits


def test_the_ranking_without_the_re_ranker_sorts_the_union_by_the_blend(setup, blend):
    labels, c = setup["labels"], setup["inputs"].cands
    width = 2 * K + 5                                                   # longer than any union: padded
    top = A.blend_topk(blend, c, labels, k_keep=width)
    score = A.pair_scores(blend, c, labels.ctx)
    s = c.assign(score=score).sort_values(["user", "score", "retriever_rank"], ascending=[True, False, True])
    for row, u in zip(top, labels.users):
        want = s.loc[s["user"] == u, "item"].to_numpy()
        np.testing.assert_array_equal(row[:len(want)], want)
        assert (row[len(want):] == -1).all()
    res = A.blend_ranked(blend, c, labels, k_keep=width, ks=(10, width))
    # the whole ranked union recalls what the union holds: a positive outside it is a miss
    union = cand.candidate_recall(c, labels, (width,), source="union")[f"recall@{width}"]
    assert res.means()[f"recall@{width}"] == pytest.approx(union)
    assert union < 1.0


# ---------------------------------------------------------------- recording on a run folder
def _run(tmp_path, data):
    from recsys_lib.run.experiment import Run
    run = Run.open("synthetic-tiny", "quick", tmp_path)
    run._data = data
    run.params["two_tower"]["candidate_k"] = K
    return run


def test_both_ablations_are_recorded_like_models_and_marked(tmp_path, setup, blend):
    from recsys_lib.stage2 import system
    data, retriever, source, scorers = setup["data"], setup["retriever"], setup["source"], setup["scorers"]
    run = _run(tmp_path, data)
    periods = {p: lists(data, run.evaluator(p).labels, retriever, source, scorers) for p in ("valid", "test")}
    for p, inputs in periods.items():
        cand.save_candidates(inputs.cands, run.path("candidates", f"{p}.parquet"))
    (run.dir / "candidates" / "timing.json").write_text(json.dumps({"valid": 1.0, "test": 2.0}))
    cfg = R.from_params(LGBM, "lgbm", seed=run.seed)
    full = S.fit_cross(cfg, periods["valid"], data, retriever, folds=2)
    full.save(run.path("models", "reranker_lgbm.pt"))
    run.record("two_stage", {"valid": system.out_of_fold_ranked(full, periods["valid"]),
                             "test": system.ranked(full, periods["test"])}, params={"reranker": "lgbm"})
    inputs = system.TrainingInputs(retriever, scorers, periods["valid"], periods["valid"], None)

    A.record_no_two_tower(run, inputs, periods["test"], progress=False)
    A.record_no_reranker(run, blend)

    records = {json.loads(f.read_text())["model"]: json.loads(f.read_text()) for f in (run.dir / "metrics").glob("*.json")}
    assert set(report_ablation.ablation_records(records)) == {A.NO_TWO_TOWER, A.NO_RERANKER}
    for name in (A.NO_TWO_TOWER, A.NO_RERANKER):
        rec = records[name]
        assert rec["ablation"]["chosen_on"] == "nothing" and rec["fit_seconds"] is not None
        for p in ("valid", "test"):
            assert rec[p]["users"] == len(run.evaluator(p).labels.users)
            assert rec[p]["ndcg@10_ci"][0] <= rec[p]["ndcg@10"] <= rec[p]["ndcg@10_ci"][1]
    assert records[A.NO_TWO_TOWER]["params"]["reranker"] == "lgbm"
    assert set(records[A.NO_TWO_TOWER]["ablation"]["dropped_features"]) == set(A.TWO_TOWER_FEATURES)
    # the recorded test lists hold no item only the two-tower proposed
    test_src = keys(cand.generate_candidates(source, run.evaluator("test").labels, k=K))
    top = run.per_user(A.NO_TWO_TOWER, "test")
    listed = {(int(u), int(i)) for u, row in zip(top["user"], top[[f"top_{j}" for j in range(10)]].to_numpy())
              for i in row if i >= 0}
    assert listed and listed <= test_src
    assert (run.dir / "ablations" / "reranker_no_two_tower.pt").exists()
    assert not list((run.dir / "models").glob("*no_two_tower*"))     # 50_leakage_audit lists models/


# ---------------------------------------------------------------- the report's table
def _per_user(users, values):
    return pd.DataFrame({"user": users, "ndcg@10": values})


def test_the_ablation_table_is_a_paired_bootstrap_against_the_full_system():
    from recsys_lib.report import analysis
    rng = np.random.default_rng(0)
    users = np.arange(300)
    full = rng.random(300)
    without = np.clip(full - 0.1 + 0.05 * rng.standard_normal(300), 0, 1)
    per_user = {"two_stage": _per_user(users, full), A.NO_RERANKER: _per_user(users, without),
                "blend": _per_user(users, rng.random(300)), "ease": _per_user(users, rng.random(300))}
    records = [{"model": "two_stage", "test": {"ndcg@10": full.mean()}},
               {"model": "blend", "test": {"ndcg@10": 0.5}},
               {"model": "ease", "valid": {"ndcg@10": 0.3}, "test": {"ndcg@10": 0.5}},
               {"model": A.NO_RERANKER, "valid": {"ndcg@10": 0.9}, "ablation": {"without": "the re-ranker"}, "test": {}}]
    paired = analysis.paired_summary(per_user, "two_stage", records, n_bootstrap=200, seed=7)
    roles = {r["against"]: r["role"] for r in paired["rows"]}
    # the protocol's exploratory family holds the ablation; never the secondary, whatever its valid score
    assert roles == {"blend": "primary", "ease": "secondary", A.NO_RERANKER: "exploratory"}
    table = report_ablation.ablation_summary(per_user, records, n_bootstrap=200, seed=7, paired=paired)
    assert list(table["model"]) == [A.NO_RERANKER]
    row = table.iloc[0]
    ref = metrics.paired_bootstrap(full, without, n_resamples=200, seed=7)
    assert row["diff"] == pytest.approx(ref["diff"]) and row["diff"] == pytest.approx(full.mean() - without.mean())
    assert (row["diff lo"], row["diff hi"], row["p"]) == pytest.approx((ref["lo"], ref["hi"], ref["p_value"]))
    same = next(r for r in paired["rows"] if r["against"] == A.NO_RERANKER)     # the paired table's row
    assert (row["diff lo"], row["diff hi"], row["p_holm"]) == pytest.approx((same["95% CI lo"], same["95% CI hi"],
                                                                             same["p_holm"]))
    ci = metrics.bootstrap_ci(without, n_resamples=200, seed=7)       # the record has none: computed
    assert (row["score"], row["lo"], row["hi"]) == pytest.approx((ci["mean"], ci["lo"], ci["hi"]))
    saved = json.loads(json.dumps(report_ablation.ablation_json(table, n_bootstrap=200, seed=7)))
    text = report_ablation.ablation_frame(saved, 200)
    assert text.equals(report_ablation.ablation_frame(table, 200))
    first = text.iloc[0]
    assert first["separates"] == "yes, the stage helps" and first["without"] == "the re-ranker"
    assert first["what it adds: two_stage − ablation [95% CI]"].startswith("+0.") and first["p (Holm)"] != "–"
    assert "chosen by nothing" in report_ablation.ablation_caption(saved, 200, 300)
    marked = report_ablation.mark(pd.DataFrame({"model": ["two_stage", A.NO_RERANKER]}), [A.NO_RERANKER])
    assert list(marked["model"]) == ["two_stage", f"{A.NO_RERANKER} (ablation)"]
    plain = report_ablation.ablation_frame(report_ablation.ablation_summary(per_user, records, n_bootstrap=200))
    assert plain.iloc[0]["p (Holm)"] == "–"                      # without paired.json: no Holm p


def test_a_run_without_ablations_has_an_empty_table():
    per_user = {"two_stage": _per_user([1, 2], [0.1, 0.2])}
    table = report_ablation.ablation_summary(per_user, [{"model": "two_stage"}])
    assert table.empty and list(table.columns) == list(report_ablation.COLUMNS)
    assert report_ablation.ablation_frame(report_ablation.ablation_json(table)).empty
    assert "no ablation" in report_ablation.ablation_caption(table, 1000)
