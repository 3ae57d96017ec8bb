"""Re-ranker and its production features on the toy split (tests/conftest.py).

Candidates come from a small SVD retriever fit on the train matrix (through
candidates.generate_candidates), 50 per validation user; the re-ranker learns from the
validation candidates of 80% of the users and is scored on the other 20% (held-out users).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from recsys_lib.errors import ConfigError, LeakageError
from recsys_lib.protocol import evaluate, guard
from recsys_lib.stage2 import features as rf
from recsys_lib.stage2 import inputs as I
from recsys_lib.stage2 import leakage, refit
from recsys_lib.stage2 import ranking as rk
from recsys_lib.stage2 import rerankers as R
from recsys_lib.stage2 import selection as S
from recsys_lib.stage2 import system as two_stage
from svd_retriever import SVDRetriever

K = 50


def make_candidates(retriever, labels, k=K):
    try:
        from recsys_lib.stage2.candidates import generate_candidates
        return generate_candidates(retriever, labels, k=k)
    except ImportError:  # pragma: no cover - before candidates.py landed
        top = evaluate.rank_topk(retriever, labels.users, labels.ctx, k, labels.n_items)
        sc = retriever.score_pairs(torch.from_numpy(np.repeat(labels.users, k)),
                                   torch.from_numpy(top.ravel()), labels.ctx).numpy()
        return pd.DataFrame({"user": np.repeat(labels.users, k), "item": top.ravel(),
                             "retriever_score": sc.astype(np.float32),
                             "retriever_rank": np.tile(np.arange(1, k + 1), len(labels.users))})


@pytest.fixture(scope="module")
def setup(toy_data):
    data = toy_data
    labels = evaluate.Labels.build(data, "valid")          # outside any fit, as in the pipeline
    retriever = SVDRetriever(data)
    cands = make_candidates(retriever, labels)
    extra = {"pos_mf": SVDRetriever(data, d=4, positives_only=True)}
    X, names = rf.build_features(cands, data, labels.ctx, "valid", retriever=retriever, extra_scorers=extra)
    ue = rf.retriever_user_table(retriever, labels.users, labels.ctx, data.n_users)
    inputs = I.StageInputs(labels, cands, X, names, user_emb=ue)
    train, held = rk.split_users(labels.users, 0.2, 42)      # one fixed split: 80% train, 20% held out
    return dict(data=data, labels=labels, retriever=retriever, cands=cands, X=X, names=names, inputs=inputs,
                split=dict(train_users=train, held_users=held))


SECTION = {  # small and fast; the real sizes live in params/
    "variants": ["id_mlp", "mlp_features", "lgbm"],
    "id_mlp": {"epochs": 4, "patience": 2, "negatives": 4, "batch_size": 256},
    "mlp_features": {"epochs": 6, "patience": 3, "loss": "softmax", "users_per_batch": 16},
    "lgbm": {"n_estimators": 100, "num_leaves": 7, "early_stopping_rounds": 20},
}


# ---------------------------------------------------------------- features
def test_features_shape_names_finite(setup):
    X, names, cands = setup["X"], setup["names"], setup["cands"]
    assert X.dtype == np.float32 and X.shape == (len(cands), len(names))
    assert len(set(names)) == len(names)
    assert np.isfinite(X).all()
    for col in ("retriever_score", "item_log_pop_90d", "user_genre_cos", "hist_sim_max", "retriever_dot",
                "pos_mf_score"):
        assert col in names
    # columns that should vary across candidates do
    assert X[:, names.index("user_genre_cos")].std() > 0
    assert X[:, names.index("hist_sim_mean")].std() > 0


def test_recent_popularity_uses_train_rows_only_at_validation_and_test(setup):
    data, cands, X, names = setup["data"], setup["cands"], setup["X"], setup["names"]
    train = data.train
    end = int(train.timestamp.max())
    keep = train.timestamp > end - 90 * rf.DAY
    expected = np.log1p(np.bincount(train.item[keep], minlength=data.n_items))[cands["item"].to_numpy()]
    got = X[:, names.index("item_log_pop_90d")]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # at test too (docs/PROTOCOL.md, "One test-time rule"): the same train-only counts, although
    # counting the validation rows as well would change them here
    test_ctx = data.context("test")
    X_test, names_test = rf.build_features(cands, data, test_ctx, "test")
    np.testing.assert_allclose(X_test[:, names_test.index("item_log_pop_90d")], expected, rtol=1e-6)
    known = data.rows_before("test")
    with_valid = np.log1p(rf.recent_item_counts(known, data.n_items, 90))[cands["item"].to_numpy()]
    assert not np.allclose(with_valid, expected)


def test_history_similarity_is_one_for_the_last_item(toy_data):
    data = toy_data
    ctx = data.context("valid", history_len=5)

    class Identity:
        def item_embeddings(self):
            return torch.eye(data.n_items)

        def user_embeddings(self, users, ctx):
            return torch.zeros(len(users), data.n_items)

    users = np.array([0, 1, 2], dtype=np.int64)
    last = ctx.history[users, -1].numpy() - 1                  # each user's last item
    other = (last + 1) % data.n_items
    other = np.where(np.isin(other, ctx.history[users].numpy() - 1), (last + 7) % data.n_items, other)
    cands = pd.DataFrame({"user": np.r_[users, users], "item": np.r_[last, other],
                          "retriever_score": np.zeros(6, np.float32), "retriever_rank": np.r_[[1] * 3, [2] * 3]})
    X, names = rf.build_features(cands, data, ctx, "valid", retriever=Identity())
    mx, mean = X[:, names.index("hist_sim_max")], X[:, names.index("hist_sim_mean")]
    n_hist = (ctx.history[users] > 0).sum(1).numpy()
    np.testing.assert_allclose(mx[:3], 1.0)
    np.testing.assert_allclose(mean[:3], 1.0 / n_hist, rtol=1e-6)     # distinct history items
    hist_sets = [set(ctx.history[u].numpy() - 1) for u in users]
    for j, u in enumerate(users):
        if other[j] not in hist_sets[j]:
            assert mx[3 + j] == 0.0


# ---------------------------------------------------------------- leakage guard
def test_fit_inside_guard_and_test_features_raise(setup):
    data = setup["data"]
    test_labels = evaluate.Labels.build(data, "test")          # built outside, as the pipeline does
    test_cands = make_candidates(setup["retriever"], test_labels)
    cfg = R.LGBMConfig(n_estimators=20, early_stopping_rounds=10)
    with guard.fitting("reranker", allow=("train", "valid")):
        model = S.fit_reranker(cfg, setup["inputs"], data, **setup["split"])
        with pytest.raises(LeakageError):
            rf.build_features(test_cands, data, test_labels.ctx, "test", retriever=setup["retriever"])
        with pytest.raises(LeakageError):
            _ = data.test
    # outside the fit the test features build fine and the model scores them
    Xt, names = rf.build_features(test_cands, data, test_labels.ctx, "test", retriever=setup["retriever"],
                                  extra_scorers={"pos_mf": SVDRetriever(data, d=4, positives_only=True)})
    assert names == setup["names"]
    top = S.topk(model, I.StageInputs(test_labels, test_cands, Xt, names))
    assert top.shape == (len(test_labels.users), 10)


# ---------------------------------------------------------------- variants vs baselines
def _random_order_ndcg(cands, users, labels, n=20):
    return float(np.mean([rk.ndcg_of(rk.order_topk(cands, np.random.default_rng(s).random(len(cands)), users),
                                     labels) for s in range(n)]))


@pytest.fixture(scope="module")
def tuned(setup):
    """Every variant fit on one fixed 80/20 split of the validation users, scored on the 20%."""
    inputs, split = setup["inputs"], setup["split"]
    p = I.prepare(inputs, **split)
    score = {rk.RETRIEVER_ORDER: rk.ndcg_of(rk.retriever_order(p.held.cands, p.held_users), p.held_labels)}
    with guard.fitting("reranker", allow=("train", "valid")):
        for v in SECTION["variants"]:
            m = S.fit_reranker(R.from_params(SECTION, v, 42), inputs, setup["data"], setup["retriever"], **split)
            score[v] = m.info["held_out_ndcg"]
    return p, score


def test_variants_against_retriever_and_random_order(setup, tuned):
    """Honest expectations on toy data (fixed split, seed 42), printed with -s:
    - mlp_features (production features + frozen embeddings, listwise loss) and lgbm clearly
      beat a random ordering (0.35 and 0.33 against 0.11 here), and are within noise of the
      retriever's own ordering of the same candidates (0.29) or above. About 58 held-out users
      with ~2.9 positives each: differences of a few hundredths are noise, so no assertion ranks
      two trained models against each other (another CPU's rounding could swap them);
    - id_mlp: its user-id embedding is untrained for held-out users, so on them it reduces to one
      user-independent item ordering and sits near random order. We only check that it learns
      (in-sample, on its train users, it beats random order clearly) - the seed design's limit,
      not a bug.
    """
    p, score = tuned
    print("\n" + str(score))
    rand = _random_order_ndcg(p.held.cands, p.held_users, p.held_labels)
    print(f"random order on held-out users: {rand:.4f}")
    for variant in ("mlp_features", "lgbm"):
        assert score[variant] > rand + 0.1, (variant, score, rand)
        assert score[variant] > score[rk.RETRIEVER_ORDER] - 0.05, (variant, score)


def test_id_mlp_variant_trains(setup):
    """The seed design (``id_mlp``) learns (its BPR loss falls) but on held-out users it stays near random
    order on toy data: see the test above. Only the training itself is asserted here."""
    cfg = R.from_params({**SECTION, "id_mlp": {**SECTION["id_mlp"], "patience": 0}}, "id_mlp",
                                       seed=42)
    no_features = I.StageInputs(setup["labels"], setup["cands"], None, [])
    with guard.fitting("reranker", allow=("train", "valid")):
        model = S.fit_reranker(cfg, no_features, setup["data"], retriever=setup["retriever"], **setup["split"])
    losses = model.info["loss_history"]
    print(f"\nid_mlp losses {np.round(losses, 4)}, held-out {np.round(model.info['held_out_history'], 4)}")
    assert len(losses) == cfg.epochs and losses[-1] < losses[0]
    assert 0.0 <= model.info["held_out_ndcg"] <= 1.0


# ---------------------------------------------------------------- rerank, padding, persistence
def test_rerank_order_and_padding():
    cands = pd.DataFrame({"user": np.array([5, 5, 5, 2, 2], np.int64), "item": np.array([10, 11, 12, 3, 4], np.int64),
                          "retriever_score": np.zeros(5, np.float32), "retriever_rank": np.array([1, 2, 3, 1, 2])})
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.3])
    users = np.array([2, 5, 9])                                 # 9 has no candidates
    top = rk.order_topk(cands, scores, users, k_keep=4)
    np.testing.assert_array_equal(top, [[4, 3, -1, -1], [11, 12, 10, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(rk.retriever_order(cands, users, 2), [[3, 4], [10, 11], [-1, -1]])
    # ties fall back to the retriever's order
    np.testing.assert_array_equal(rk.order_topk(cands, np.zeros(5), np.array([5]), 3), [[10, 11, 12]])
    # -1 padding never hits, even when the last catalogue item (index -1) is a positive
    n_items = 20
    pos = sp.csr_matrix((np.ones(3), ([0, 1, 2], [n_items - 1, n_items - 1, n_items - 1])), shape=(3, n_items))
    labels = evaluate.Labels(period="valid", users=users, positives=pos, ctx=None, n_items=n_items)
    res = evaluate.evaluate_ranking(np.pad(top, ((0, 0), (0, 6)), constant_values=-1), labels, ks=(10,))
    np.testing.assert_array_equal(res.per_user["ndcg@10"], 0.0)
    assert rk.ndcg_of(np.full((3, 10), -1), labels) == 0.0


@pytest.mark.parametrize("n_values", [2, 5, 1000])      # 2: mostly ties, as after LightGBM's first rounds
def test_repeated_topk_equals_order_topk(n_values):
    """The early-stopping metric's fast top-K gives `order_topk`'s lists, ties and padding included:
    shuffled rows, lists shorter than k, a user without candidates, candidates of users outside the
    set, and retriever ranks that repeat (items from other sources share one rank)."""
    rng = np.random.default_rng(n_values)
    sizes = rng.integers(1, 40, 60)
    u = np.repeat(np.arange(60) * 2, sizes)
    cands = pd.DataFrame({"user": u, "item": rng.integers(0, 500, len(u)),
                          "retriever_rank": rng.integers(1, 15, len(u))}).sample(frac=1.0, random_state=0)
    users = np.r_[np.arange(0, 100, 2), 7]                    # 100..118 left out; 7 has no candidates
    rng.shuffle(users)
    fast = rk.RepeatedTopK(cands, users, k_keep=10)
    for seed in range(3):
        scores = np.random.default_rng(seed).integers(0, n_values, len(cands)).astype(np.float64)
        expected = rk.order_topk(cands, scores, users, 10)
        np.testing.assert_array_equal(fast(scores), expected)
    assert (expected[users == 7] == -1).all() and (expected == -1).any(axis=1).sum() > 1


@pytest.mark.parametrize("variant, cls", [("id_mlp", R.IdMLPReranker), ("mlp_features", R.FeatureMLPReranker),
                                          ("lgbm", R.LGBMReranker)])
def test_save_load_round_trip_dispatches_on_the_recorded_kind(setup, tmp_path, variant, cls):
    short = {"n_estimators": 5} if variant == "lgbm" else {"epochs": 1}
    cfg = R.from_params({**SECTION, variant: {**SECTION[variant], **short}}, variant, seed=0)
    inputs = setup["inputs"]
    with guard.fitting("reranker", allow=("train", "valid")):
        model = S.fit_reranker(cfg, inputs, setup["data"], retriever=setup["retriever"], **setup["split"])
    assert type(model) is cls and model.kind == variant
    before = model.score(inputs)
    path = model.save(tmp_path / f"reranker_{variant}.pt")
    assert torch.load(path, weights_only=False)["kind"] == variant       # the kind is in the file
    assert [p.name for p in tmp_path.iterdir()] == [path.name]            # no temporary file left
    for loaded in (R.load(path), R.Reranker.load(path), cls.load(path)):
        assert type(loaded) is cls and loaded.variant == variant and loaded.feature_names == model.feature_names
        np.testing.assert_array_equal(loaded.score(inputs), before)
        np.testing.assert_array_equal(S.topk(loaded, inputs), S.topk(model, inputs))
    other = R.LGBMReranker if cls is not R.LGBMReranker else R.IdMLPReranker
    with pytest.raises(ValueError, match="not a"):
        other.load(path)


def test_load_refuses_a_file_without_a_known_kind(tmp_path):
    path = tmp_path / "reranker_old.pt"
    torch.save({"kind": "reranker_mlp", "config": {}}, path)            # a file of the old format
    with pytest.raises(ValueError, match="known kind"):
        R.load(path)


def test_variant_seed_is_now_id_mlp(setup):
    """The re-ranker kind once called ``seed`` is ``id_mlp`` (``seed`` is also the random seed of
    the same config); the params name it so, and the old name is refused with a pointer."""
    from recsys_lib import config
    for profile in ("quick", "full"):
        section = config.load_params(profile, "synthetic")["reranker"]
        names = [v if isinstance(v, str) else v["variant"] for v in section["variants"]]
        assert "id_mlp" in names and "seed" not in names and "id_mlp" in section
    assert R.VARIANTS == ("id_mlp", "mlp_features", "lgbm")
    cfg = R.from_params({"id_mlp": {"emb_dim": 4}}, "id_mlp", seed=7)
    assert (cfg.variant, cfg.emb_dim, cfg.seed) == ("id_mlp", 4, 7)
    with pytest.raises(ConfigError, match="now id_mlp"):
        R.from_params({}, "seed")


def test_each_kind_refuses_what_it_does_not_read():
    """A kind's sub-section and a variant's keys are checked against that kind's config: id_mlp is
    BPR as the design trains it, so a ``loss`` for it is an error, not silently ignored."""
    with pytest.raises(ConfigError, match="id_mlp has no parameter.*loss"):
        R.from_params({"id_mlp": {"loss": "softmax"}}, "id_mlp")
    with pytest.raises(ConfigError, match="lgbm has no parameter.*epochs"):
        R.from_params({}, {"name": "x", "variant": "lgbm", "epochs": 3})
    assert R.from_params({"mlp_features": {"loss": "softmax"}}, "mlp_features").loss == "softmax"
    assert R.from_params({}, "id_mlp").loss == "bpr"
    assert R.from_params({"k_eval": 5}, "lgbm").k_eval == 5          # the section's k_eval reaches every kind


def test_the_section_needs_cross_fitting_and_known_keys():
    from recsys_lib.stage2.section import RerankerSection
    with pytest.raises(ConfigError, match="at least 2"):
        RerankerSection.from_params({"folds": 1})
    with pytest.raises(ConfigError, match="held_out_share"):
        RerankerSection.from_params({"held_out_share": 0.2})
    with pytest.raises(ConfigError, match="unknown re-ranker variant"):
        RerankerSection.from_params({"variants": ["lgbm", "xgb"]})
    assert RerankerSection.from_params({}).extra_scorers == ["ease", "mf", "ials"]


# ---------------------------------------------------------------- cross-fitting (folds > 1)
SECTION_CV = {**SECTION, "folds": 2, "variants": ["mlp_features", "lgbm"],
              "mlp_features": {**SECTION["mlp_features"], "epochs": 3, "patience": 1}}


def _user_table(setup):
    return rf.retriever_user_table(setup["retriever"], setup["labels"].users, setup["labels"].ctx,
                                   setup["data"].n_users)


@pytest.fixture(scope="module")
def crossed(setup):
    with guard.fitting("reranker", allow=("train", "valid")):
        best, table, models = S.tune(SECTION_CV, setup["inputs"], setup["data"], setup["retriever"], seed=42)
    return best, table, models


def test_fold_users_partition_validation_users(setup, crossed):
    users = setup["labels"].users
    parts = rk.fold_users(users, 2, 42)
    assert len(parts) == 2 and abs(len(parts[0]) - len(parts[1])) <= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.sort(users))
    assert not np.isin(parts[0], parts[1]).any()
    for a, b in zip(parts, rk.fold_users(users, 2, 42)):       # fixed seed
        np.testing.assert_array_equal(a, b)
    _, _, models = crossed
    for m in models.values():
        assert isinstance(m, R.RerankerEnsemble) and m.folds == 2
        for a, b in zip(m.fold_users, parts):
            np.testing.assert_array_equal(a, b)


def test_no_member_trains_on_its_own_fold(crossed):
    _, _, models = crossed
    for m in models.values():
        for k, member in enumerate(m.members):
            trained = np.asarray(member.info["trained_users"])
            others = np.concatenate([f for j, f in enumerate(m.fold_users) if j != k])
            assert len(trained) > 0
            assert not np.isin(trained, m.fold_users[k]).any()
            assert np.isin(trained, others).all()
            assert member.info["held_out_users"] == len(m.fold_users[k])
            assert member.info["train_users"] == len(others)


def test_out_of_fold_ndcg_is_mean_over_users_of_per_fold_evaluations(setup, crossed):
    best, table, models = crossed
    print("\n" + table.to_string())
    labels, inputs = setup["labels"], setup["inputs"]
    for v, m in models.items():
        per_user, fold_means = [], []
        for k, member in enumerate(m.members):
            lab = rk.subset_labels(labels, m.fold_users[k])
            top = S.topk(member, inputs, lab.users)
            res = evaluate.evaluate_ranking(top, lab, ks=(10,))
            per_user.append(res.per_user["ndcg@10"])
            fold_means.append(res.per_user["ndcg@10"].mean())
            assert member.info["held_out_ndcg"] == pytest.approx(fold_means[-1])   # its early-stopping metric
        oof = np.concatenate(per_user).mean()
        assert m.info["out_of_fold_ndcg"] == pytest.approx(oof)
        np.testing.assert_allclose(m.info["fold_ndcg"], fold_means)
        assert m.info["fold_ndcg_std"] == pytest.approx(np.std(fold_means, ddof=1))
        row = table.set_index("variant").loc[v]
        assert row["out_of_fold_ndcg"] == pytest.approx(oof)
        assert row["fold_ndcg_mean"] == pytest.approx(np.mean(fold_means))
        assert m.info["fit_seconds"] == pytest.approx(sum(x.info["fit_seconds"] for x in m.members))
    # the retriever's own order, over all validation users, is in the table too
    ret = rk.ndcg_of(rk.retriever_order(setup["cands"], labels.users), labels)
    assert table.set_index("variant").loc[rk.RETRIEVER_ORDER, "out_of_fold_ndcg"] == pytest.approx(ret)
    scores = {v: m.info["out_of_fold_ndcg"] for v, m in models.items()}
    assert best.variant == max(scores, key=scores.get) and table["chosen"].sum() == 1


def test_two_stage_out_of_fold_and_in_fold_ranked(setup, crossed):
    from recsys_lib.stage2 import system as two_stage
    _, _, models = crossed
    valid = I.StageInputs(setup["labels"], setup["cands"], setup["X"], setup["names"], _user_table(setup))
    for m in models.values():
        oof = two_stage.out_of_fold_ranked(m, valid)
        np.testing.assert_array_equal(oof.users, setup["labels"].users)          # all validation users
        assert oof.means()["ndcg@10"] == pytest.approx(m.info["out_of_fold_ndcg"])
        ins = two_stage.in_fold_ranked(m, valid)
        print(f"\n{m.variant}: out-of-fold {oof.means()['ndcg@10']:.4f}, in-fold {ins.means()['ndcg@10']:.4f}")
        # with 2 folds, in-fold = the other member: the same lists as ranking fold k with member 1 - k
        k0 = rk.subset_labels(setup["labels"], m.fold_users[0])
        top = S.topk(m.members[1], valid, k0.users, k_keep=1000)
        in_k0 = np.isin(setup["labels"].users, k0.users)            # labels.users is sorted, as k0.users
        np.testing.assert_array_equal(ins.topk[in_k0], top[:, :10])


def test_ensemble_scores_average_per_user_zscores(setup, crossed):
    _, _, models = crossed
    m, cands, inputs = models["lgbm"], setup["cands"], setup["inputs"]
    u = cands["user"].to_numpy()
    z = [rk.per_user_zscore(u, mem.score(inputs)) for mem in m.members]
    np.testing.assert_allclose(m.score(inputs), np.mean(z, axis=0))
    for zk in z:                                     # per user: mean 0, std 1 (or a constant list)
        g = pd.DataFrame({"u": u, "z": zk}).groupby("u")["z"]
        assert np.abs(g.mean()).max() < 1e-9
        assert np.all((np.abs(g.std(ddof=0) - 1) < 1e-9) | (g.std(ddof=0) < 1e-9))
    # one member alone keeps its own order
    users = setup["labels"].users
    np.testing.assert_array_equal(rk.order_topk(cands, m.score(inputs, members=[0]), users),
                                  S.topk(m.members[0], inputs, users))


def test_ensemble_save_load_round_trip(setup, crossed, tmp_path):
    _, _, models = crossed
    inputs, users = setup["inputs"], setup["labels"].users
    for v, m in models.items():
        path = m.save(tmp_path / f"reranker_{v}.pt")
        assert path.exists() and len(list(tmp_path.glob(f"reranker_{v}*"))) == 1      # one file
        for loaded in (R.Reranker.load(path), R.load(path), R.RerankerEnsemble.load(path)):
            assert isinstance(loaded, R.RerankerEnsemble) and loaded.variant == v and loaded.folds == 2
            assert loaded.feature_names == m.feature_names
            assert loaded.cfg == m.cfg and loaded.info["out_of_fold_ndcg"] == m.info["out_of_fold_ndcg"]
            for a, b in zip(loaded.fold_users, m.fold_users):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(loaded.score(inputs), m.score(inputs))
            np.testing.assert_array_equal(S.topk(loaded, inputs, users), S.topk(m, inputs, users))
            np.testing.assert_array_equal(S.out_of_fold_topk(loaded, inputs, users, 10),
                                          S.out_of_fold_topk(m, inputs, users, 10))
        assert torch.load(path, weights_only=False)["kind"] == "ensemble"


def test_cross_fit_inside_guard_never_touches_test(setup):
    data = setup["data"]
    test_labels = evaluate.Labels.build(data, "test")          # built outside, as the pipeline does
    cfg = R.LGBMConfig(n_estimators=10, early_stopping_rounds=5)
    with guard.fitting("reranker", allow=("train", "valid")):
        ens = S.fit_cross(cfg, setup["inputs"], data, folds=2)
        with pytest.raises(LeakageError):
            _ = data.test
        with pytest.raises(ValueError):                          # never fit on test labels
            S.fit_cross(cfg, I.StageInputs(test_labels, setup["cands"], setup["X"], setup["names"]), data, folds=2)
    assert isinstance(ens, R.RerankerEnsemble) and ens.folds == 2 and ens.cfg == cfg


def test_tune_table_columns(crossed):
    _, table, _ = crossed
    assert list(table.columns) == ["variant", "out_of_fold_ndcg", "fold_ndcg_mean", "fold_ndcg_std", "folds",
                                   "fit_seconds", "window_lists", "best_epoch_or_round", "chosen"]


def test_id_mlp_variant_ensemble_round_trip(setup, tmp_path):
    cfg = R.from_params({**SECTION, "id_mlp": {**SECTION["id_mlp"], "epochs": 1}}, "id_mlp", seed=0)
    no_features = I.StageInputs(setup["labels"], setup["cands"], None, [])
    with guard.fitting("reranker", allow=("train", "valid")):
        ens = S.fit_cross(cfg, no_features, setup["data"], retriever=setup["retriever"], folds=2)
    loaded = R.load(ens.save(tmp_path / "reranker_id_mlp.pt"))
    assert all(type(m) is R.IdMLPReranker for m in loaded.members)
    np.testing.assert_array_equal(loaded.score(no_features), ens.score(no_features))
    assert len(ens.info["best_epoch_or_round"]) == 2 and 0.0 <= ens.info["out_of_fold_ndcg"] <= 1.0


def test_stage_features_are_cached_and_invalidated(tmp_path, toy_data, monkeypatch):
    """two_stage.stage_inputs writes features/<period>.npz and reuses it only while its inputs hold."""
    import os
    import numpy as np
    from recsys_lib.stage2 import candidates as cand, system as two_stage
    from recsys_lib.run.experiment import Run
    run = Run.open("synthetic-tiny", "quick", tmp_path)
    run._data = toy_data
    calls = []

    def fake_build(cands, data, ctx, period, retriever, extra, user_emb, recent_items):
        calls.append((period, recent_items))
        return np.ones((len(cands), 2), np.float32), ["a", "b"]

    monkeypatch.setattr(two_stage, "build_features", fake_build)
    monkeypatch.setattr(two_stage, "retriever_user_table", lambda r, u, c, n: np.zeros((n, 3), np.float32))
    retriever = type("R", (), {"cfg": type("C", (), {"history_len": 5})()})()
    cpath = run.path("candidates", "valid.parquet")
    cand.save_candidates(cand.pd.DataFrame({"user": [0], "item": [1], "retriever_score": np.float32([1.0]),
                                            "retriever_rank": np.int16([1])}), cpath)
    a = two_stage.stage_inputs(run, retriever, "valid", {})
    b = two_stage.stage_inputs(run, retriever, "valid", {})
    assert calls == [("valid", ())] and b.names == ["a", "b"] and np.array_equal(a.X, b.X)
    os.utime(cpath, ns=(1, 1))                       # new candidates -> rebuilt
    two_stage.stage_inputs(run, retriever, "valid", {})
    assert calls == [("valid", ())] * 2
    run.params["reranker"]["recent_items"] = [10, 50]   # other recent-taste features -> rebuilt with them
    two_stage.stage_inputs(run, retriever, "valid", {})
    two_stage.stage_inputs(run, retriever, "valid", {})
    assert calls == [("valid", ())] * 2 + [("valid", (10, 50))]


# ---------------------------------------------------------------- the label window
def test_label_window_lists_train_lgbm_less_the_held_out_users(setup, monkeypatch):
    """Window lists join the LightGBM training groups, except those of the users the fit is
    early-stopped on; the lists come from stage-1 models refit on the pre-window rows."""
    data, labels = setup["data"], setup["labels"]
    w = data.label_window(0.1)
    wlabels = evaluate.Labels.build(w, "valid")
    r = SVDRetriever(w)                                         # refit on the pre-window rows
    wc = make_candidates(r, wlabels)
    X, names = rf.build_features(wc, w, wlabels.ctx, "valid", retriever=r,
                                 extra_scorers={"pos_mf": SVDRetriever(w, d=4, positives_only=True)})
    assert names == setup["names"]
    window = I.WindowLists(cands=wc, X=X, y=rk.candidate_labels(wc, wlabels))
    held = labels.users[::5]
    rows, sizes = window.groups(held)
    assert sizes.sum() == len(rows) and not np.isin(wc["user"].to_numpy()[rows], held).any()
    assert len(sizes) > 0 and (np.add.reduceat(window.y[rows], np.r_[0, np.cumsum(sizes)[:-1]]) > 0).all()
    seen = {}
    import lightgbm as lgb
    real = lgb.Dataset

    def spy(X, label=None, group=None, **kw):
        if "reference" not in kw:
            seen["rows"], seen["groups"] = len(X), len(group)
        return real(X, label=label, group=group, **kw)
    monkeypatch.setattr(lgb, "Dataset", spy)
    cfg = R.from_params(SECTION, "lgbm", seed=0)
    train = np.setdiff1d(labels.users, held)
    with guard.fitting("reranker", allow=("train", "valid")):
        plain = S.fit_reranker(cfg, setup["inputs"], data, train_users=train, held_users=held)
        base_rows, base_groups = seen["rows"], seen["groups"]
        with_window = S.fit_reranker(cfg, setup["inputs"], data, train_users=train, held_users=held, window=window)
    assert seen["groups"] == base_groups + len(sizes) and seen["rows"] == base_rows + len(rows)
    assert with_window.info["window_lists"] == len(sizes) and plain.info["window_lists"] == 0


def test_time_features_count_only_rows_before_the_users_time():
    from recsys_lib.protocol.splitdata import Period
    day = rf.DAY
    # item 0 rated at days 1, 5, 40; item 1 at day 39; user 0 lives at day 41, user 1 at day 6
    rows = Period(user=np.array([2, 2, 0, 3, 1, 0]), item=np.array([0, 0, 1, 0, 1, 1]),
                  rating=np.array([4, 3, 5, 2, 4, 3], np.float32),
                  timestamp=np.array([1, 5, 39, 40, 6, 41]) * day)
    got = rf.item_counts_before(rows, np.array([0, 0, 1, 1]), np.array([41, 6, 41, 6]) * day, 30)
    np.testing.assert_array_equal(got, [1, 2, 2, 1])      # day 40 | days 1, 5 | days 39, 41 | day 6
    later = rf.item_counts_before(rows, np.array([0]), np.array([4]) * day, 30)
    assert later.tolist() == [1]                           # days 5 and 40 are after day 4
    years = np.array([1970.0, np.nan])
    f = rf.time_features(rows, np.array([0, 1]), np.array([0, 0]), years, n_users=4)
    assert f["item_age_at_user"][0] == pytest.approx(41 / 365.2425, rel=1e-6)
    assert f["item_age_at_user"][1] == pytest.approx(6 / 365.2425, rel=1e-6)
    np.testing.assert_allclose(f["item_log_pop_user_30d"], np.log1p([1, 2]))
    np.testing.assert_allclose(f["user_recent_mean_rating"], [4.0, 4.0])   # user 0: 5, 3; user 1: 4
    # counts on rows that end before the user's time (train rows at test): the windows end there
    early = Period(*(x[[0, 1, 4]] for x in (rows.user, rows.item, rows.rating, rows.timestamp)))  # days 1, 5, 6
    g = rf.time_features(rows, np.array([0]), np.array([0]), years, n_users=4, count_rows=early)
    assert g["item_age_at_user"][0] == f["item_age_at_user"][0]          # the user's time: a history
    np.testing.assert_allclose(g["item_log_pop_user_30d"], np.log1p([2]))  # days 1, 5 in (day -24, day 6]
    np.testing.assert_allclose(g["item_pop_share_user_30d"], [2 / 3])      # of days 1, 5, 6
    np.testing.assert_allclose(g["user_recent_mean_rating"], [4.0])       # the user's rows: a history


def test_named_variants_configure_a_kind():
    section = {"lgbm": {"num_leaves": 31, "learning_rate": 0.05}}
    cfg = R.from_params(section, {"name": "lgbm_leaves7", "variant": "lgbm", "num_leaves": 7})
    assert (cfg.variant, cfg.label, cfg.num_leaves, cfg.learning_rate) == ("lgbm", "lgbm_leaves7", 7, 0.05)
    assert R.from_params(section, "lgbm").label == "lgbm"
    with pytest.raises(ConfigError, match="num_leafs"):
        R.from_params(section, {"name": "x", "variant": "lgbm", "num_leafs": 7})


def test_tune_compares_named_lgbm_configurations(setup):
    section = {"variants": ["lgbm", {"name": "lgbm_leaves3", "variant": "lgbm", "num_leaves": 3}],
               "folds": 2, "lgbm": SECTION["lgbm"]}
    with guard.fitting("reranker", allow=("train", "valid")):
        best, table, models = S.tune(section, setup["inputs"], setup["data"])
    assert set(models) == {"lgbm", "lgbm_leaves3"} and models["lgbm_leaves3"].cfg.num_leaves == 3
    assert table["variant"].tolist() == [rk.RETRIEVER_ORDER, "lgbm", "lgbm_leaves3"]
    assert table.loc[table["chosen"], "variant"].item() == best.label


def test_label_window_lists_are_refused_when_stale(tmp_path, toy_data):
    """save/load_label_window round-trips, and a re-fit stage-1 checkpoint makes the lists stale."""
    import os
    from recsys_lib.run.experiment import Run
    run = Run.open("synthetic-tiny", "quick", tmp_path)
    for name in ("two_tower", "ease"):
        run.path("models", f"{name}.pt").write_bytes(b"x")
    cands = pd.DataFrame({"user": [0, 0], "item": [1, 2], "retriever_score": np.float32([1, 0]),
                          "retriever_rank": np.int16([1, 2])})
    lists = I.WindowLists(cands=cands, X=np.ones((2, 2), np.float32), y=np.float32([1, 0]))
    refit.save_label_window(run, lists, {"models": ["ease"], "feature_names": ["a", "b"]})
    back = refit.load_label_window(run, ["a", "b"])
    assert np.array_equal(back.X, lists.X) and np.array_equal(back.y, lists.y)
    with pytest.raises(ValueError, match="differ"):
        refit.load_label_window(run, ["a", "c"])
    os.utime(run.dir / "models" / "ease.pt", ns=(1, 1))             # ease was re-fit
    with pytest.raises(ValueError, match="rerun 25_label_window"):
        refit.load_label_window(run, ["a", "b"])


def test_stage1_lists_are_what_the_pipeline_builds_from_those_models(setup):
    """Stage1.lists: the retriever's candidates with the features of the given scorers, for the
    labels' users and context; from models fit before the window they differ from the fresh ones."""
    data, labels = setup["data"], setup["labels"]
    w = data.label_window(0.1)
    r, scorer = SVDRetriever(w), SVDRetriever(w, d=4, positives_only=True)
    stale = refit.Stage1(r, {}, {"pos_mf": scorer}).lists(data, labels, K)
    cands = make_candidates(r, labels)
    X, names = rf.build_features(cands, data, labels.ctx, "valid", retriever=r, extra_scorers={"pos_mf": scorer})
    assert stale.names == names == setup["names"] and stale.labels is labels
    pd.testing.assert_frame_equal(stale.cands.reset_index(drop=True), cands.reset_index(drop=True))
    np.testing.assert_array_equal(stale.X, X)
    fresh = setup["cands"]
    assert set(stale.cands["user"]) == set(fresh["user"])
    assert not np.array_equal(stale.cands["item"].to_numpy(), fresh["item"].to_numpy())


def test_stage1_refit_fits_each_model_once_on_the_rows_before_the_window(toy_data):
    from recsys_lib.models.ease import EASE, EASEConfig
    from recsys_lib.models.ials import IALS, IALSConfig
    w = toy_data.label_window(0.2)
    ease = EASE(EASEConfig(reg=50.0, device="cpu"))
    ease.fit(toy_data, None)
    ials = IALS(IALSConfig(factors=4, iterations=2, device="cpu"))
    ials.fit(toy_data, None)
    models = refit.Stage1(ease, {"ease": ease}, {"ease": ease, "ials": ials})
    refits = models.refit(w, {})
    assert refits.names == ["ease", "ials"] and refits.sources["ease"] is refits.scorers["ease"]
    assert refits.retriever is not ease and refits.scorers["ials"] is not ials
    direct = EASE(EASEConfig(reg=50.0, device="cpu"))
    direct.fit(w, None)
    labels = evaluate.Labels.build(toy_data, "valid")
    users = torch.from_numpy(labels.users[:5])
    got = refits.sources["ease"].score_all(users, labels.ctx)
    torch.testing.assert_close(got, direct.score_all(users, labels.ctx))
    assert not torch.allclose(got, ease.score_all(users, labels.ctx))


def test_stale_lists_options_are_checked_and_their_files_refused_when_stale(tmp_path, setup):
    import os
    from recsys_lib.errors import ConfigError
    from recsys_lib.run.experiment import Run
    lgbm_only = {"variants": ["lgbm", {"name": "lgbm_x", "variant": "lgbm"}], "label_window": 0.1}
    assert refit.refit_share({**lgbm_only, "stale_lists": 0.1}) == 0.1
    assert refit.refit_share({**lgbm_only, "label_window": None, "stale_lists": 0.2}) == 0.2
    assert refit.refit_share({**lgbm_only, "stale_lists": None}) == 0.1
    with pytest.raises(ConfigError, match="same share"):
        refit.refit_share({**lgbm_only, "stale_lists": 0.2})
    with pytest.raises(ConfigError, match="LightGBM variants only.*mlp_features"):
        refit.refit_share({"variants": ["lgbm", "mlp_features"], "stale_lists": 0.1})
    run = Run.open("synthetic-tiny", "quick", tmp_path)
    for name in ("two_tower", "ease"):
        run.path("models", f"{name}.pt").write_bytes(b"x")
    inputs = setup["inputs"]
    refit.save_stale_lists(run, inputs, {"models": ["ease"], "feature_names": inputs.names})
    back = refit.load_stale_lists(run, inputs)
    assert np.array_equal(back.X, inputs.X) and np.array_equal(back.user_emb, inputs.user_emb)
    assert back.names == inputs.names and back.labels is inputs.labels and len(back.cands) == len(inputs.cands)
    with pytest.raises(ValueError, match="differ"):
        refit.load_stale_lists(run, I.StageInputs(inputs.labels, inputs.cands, inputs.X, ["a"] * len(inputs.names)))
    os.utime(run.dir / "models" / "ease.pt", ns=(1, 1))             # ease was re-fit
    with pytest.raises(ValueError, match="stale validation lists.*rerun 25_label_window"):
        refit.load_stale_lists(run, inputs)


def test_sequence_features_count_what_others_rated_next():
    from recsys_lib.protocol.splitdata import Period
    # user 0 rates 1, 2, 3 in time order; user 1 rates 1 then 3; user 2 (scored) last rated item 1
    rows = Period(user=np.array([0, 1, 0, 1, 0]), item=np.array([1, 1, 2, 3, 3]),
                  rating=np.full(5, 4.0, np.float32), timestamp=np.array([1, 2, 3, 4, 5]))
    keys, counts = rf.transition_counts(rows, n_items=5, window=1)
    assert dict(zip(keys.tolist(), counts.tolist())) == {1 * 5 + 2: 1, 2 * 5 + 3: 1, 1 * 5 + 3: 1}
    keys2, counts2 = rf.transition_counts(rows, n_items=5, window=2)
    assert dict(zip(keys2.tolist(), counts2.tolist()))[1 * 5 + 3] == 2      # 1 -> 3 two apart, too
    history = torch.tensor([[0, 0], [0, 0], [0, 2]])                        # user 2: item 1 (+1)
    users, items = np.array([2, 2, 2, 0]), np.array([3, 2, 4, 3])
    f = rf.sequence_features(rows, users, items, history, n_items=5, window=1)
    np.testing.assert_allclose(f["seq_count_log"], np.log1p([1, 1, 0, 0]))
    np.testing.assert_allclose(f["seq_last_log"], np.log1p([1, 1, 0, 0]))
    np.testing.assert_allclose(f["seq_prob_max"], [0.5, 0.5, 0, 0])          # item 1 has 2 successors
    np.testing.assert_allclose(f["seq_lift_max"], [1 / 2, 1 / np.sqrt(2), 0, 0], rtol=1e-6)  # in-degree 3: 2, 2: 1
    assert f["seq_prob_mean"][3] == 0                                         # no history -> 0


def test_lgbm_drop_features_ablates_a_group_and_importance_says_so(setup, tmp_path):
    assert set(rf.FEATURE_GROUPS["sequence"]) <= set(setup["names"])      # the features exist
    cfg = R.LGBMConfig(name="lgbm_no_sequence", n_estimators=20, early_stopping_rounds=10,
                           num_leaves=7, drop_features=["sequence", "user_genre_cos"])
    with guard.fitting("reranker", allow=("train", "valid")):
        model = S.fit_reranker(cfg, setup["inputs"], setup["data"], **setup["split"])
    imp = model.importance()
    assert list(imp.index) == setup["names"]
    dropped = list(rf.FEATURE_GROUPS["sequence"]) + ["user_genre_cos"]
    assert (imp[dropped] == 0).all() and imp.drop(dropped).sum() > 0
    loaded = R.load(model.save(tmp_path / "r.pt"))
    np.testing.assert_array_equal(loaded.score(setup["inputs"]), model.score(setup["inputs"]))
    share = two_stage.feature_importance({"a": model})
    assert share["a"].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="neither a feature"):
        rf.kept_columns(setup["names"], ["no_such_feature"])


def test_no_held_out_users_means_every_epoch_runs(setup):
    """The leakage audit's design-as-run fit: all validation users, no early stopping."""
    cfg = R.IdMLPConfig(epochs=3, patience=1, batch_size=64, emb_dim=8, hidden=[16])
    users = setup["labels"].users
    with guard.fitting("reranker", allow=("train", "valid")):
        model = S.fit_reranker(cfg, setup["inputs"], setup["data"], setup["retriever"], train_users=users,
                               held_users=np.zeros(0, np.int64))
    assert model.info["epochs_run"] == 3 and model.info["held_out_users"] == 0
    assert set(model.info["trained_users"]) <= set(users.tolist())
    top = S.topk(model, setup["inputs"])
    assert top.shape == (len(users), 10)
    among = leakage.positives_among_candidates(setup["inputs"])
    assert among.positives.sum() <= setup["labels"].positives.sum()
    assert among.positives.sum() == rk.candidate_labels(setup["cands"], setup["labels"]).sum()


def test_audit_summary_says_what_each_step_adds():
    from recsys_lib.report import audit
    row = lambda e, b, steps, ins, test: {"epochs": e, "batch_size": b, "optimizer steps": steps,
                                           "training positives": 3000, "in-sample valid (protocol IDCG)": ins,
                                           "in-sample valid (positives among candidates)": ins + 0.01,
                                           "honest test": test}
    audited = {"design_as_run": [row(12, 4096, 12, 0.05, 0.04), row(200, 256, 2400, 0.52, 0.049)],
             "popularity_gain": [{"popularity nDCG@10 (valid)": "graded gain (seed protocol)", "value": 0.07},
                                 {"popularity nDCG@10 (valid)": "binary gain (our protocol)", "value": 0.06}]}
    text = audit.audit_summary(audited)
    assert "12 optimizer steps" in text and "0.520 in-sample" in text and "0.049" in text and "0.070" in text
    assert "not re-run" in audit.audit_summary({})


def test_last_rows_matrix_keeps_each_users_newest_rows():
    from recsys_lib.protocol.splitdata import Period
    # user 0: items 1 (t=1), 2 (t=5, rating 2), 3 (t=3); user 1: item 4 (t=2)
    rows = Period(user=np.array([0, 1, 0, 0]), item=np.array([1, 4, 3, 2]),
                  rating=np.array([4.0, 5.0, 4.5, 2.0], np.float32), timestamp=np.array([1, 2, 3, 5]))
    m = rf.last_rows_matrix(rows, n_users=3, n_items=5, n=2)
    assert sorted(m[0].indices.tolist()) == [2, 3] and m[1].indices.tolist() == [4] and m[2].nnz == 0
    mp = rf.last_rows_matrix(rows, n_users=3, n_items=5, n=2, positives_only=True)
    assert sorted(mp[0].indices.tolist()) == [1, 3]                   # item 2 (rating 2) is no positive
    assert rf.last_rows_matrix(rows, 3, 5, n=10).nnz == 4


def test_recent_taste_scores_come_from_the_users_last_rows(setup):
    from recsys_lib.models.ease import EASE, EASEConfig
    data, labels, cands = setup["data"], setup["labels"], setup["cands"]
    ease = EASE(EASEConfig(reg=100.0, device="cpu"))
    ease.fit(data, None)
    recent = (10, 50)
    X, names = rf.build_features(cands, data, labels.ctx, "valid", extra_scorers={"ease": ease, "svd": SVDRetriever(data)},
                                 recent_items=recent)
    assert not any(n.startswith("svd_last") for n in names)           # the SVD does not read the user's rows
    users, items = np.array(cands["user"], np.int64), np.array(cands["item"], np.int64)
    n = recent[0]
    rctx = rf.recent_context(labels.ctx, data.rows_before("valid"), data.n_users, data.n_items, n)
    expected = ease.score_pairs(torch.from_numpy(users), torch.from_numpy(items), rctx).numpy()
    got = X[:, names.index(f"ease_last{n}_score")]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    full = X[:, names.index("ease_score")]
    n_known = np.bincount(data.train.user, minlength=data.n_users)[users]
    assert (n_known > n).any() and not np.allclose(got[n_known > n], full[n_known > n])
    np.testing.assert_allclose(X[:, names.index(f"ease_last{recent[-1]}_score")][n_known <= recent[-1]],
                               full[n_known <= recent[-1]], rtol=1e-5, atol=1e-6)


def test_lgbm_threads_variable_sets_the_count_and_keeps_the_booster(setup, monkeypatch):
    """``RECSYS_LGBM_THREADS`` overrides ``num_threads`` (CI gives each of two side-by-side jobs one
    core); with ``deterministic`` and ``force_row_wise`` the trees are the same under 1 and 2 threads."""
    from recsys_lib import config
    monkeypatch.delenv(config.LGBM_THREADS_ENV, raising=False)
    assert config.lgbm_threads(2) == 2
    boosters = {}
    for threads in ("1", "2"):
        monkeypatch.setenv(config.LGBM_THREADS_ENV, threads)
        assert config.lgbm_threads(2) == int(threads)
        cfg = R.from_params(SECTION, "lgbm", seed=0)
        with guard.fitting("reranker", allow=("train", "valid")):
            model = S.fit_reranker(cfg, setup["inputs"], setup["data"], retriever=setup["retriever"], **setup["split"])
        boosters[threads] = (model.booster_str.split("parameters:")[0], model.score(setup["inputs"]))
    assert boosters["1"][0] == boosters["2"][0]                          # the trees, not the thread line
    np.testing.assert_array_equal(boosters["1"][1], boosters["2"][1])
    monkeypatch.setenv(config.LGBM_THREADS_ENV, "two")
    with pytest.raises(ConfigError, match="RECSYS_LGBM_THREADS"):
        config.lgbm_threads(2)
