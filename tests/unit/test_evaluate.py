"""Full-catalogue evaluation: masking, batching, oracle limits and agreement with ranx."""
import numpy as np
import pytest
import torch

from recsys_lib.protocol.evaluate import Evaluator, compare, evaluate


class Popularity:
    def __init__(self, data):
        self.pop = torch.tensor(data.item_popularity, dtype=torch.float32) + torch.linspace(0, 0.5, data.n_items)

    def score_all(self, users, ctx):
        return self.pop.expand(len(users), -1).clone()


class Oracle:
    """Scores the period's positives highest: an upper bound."""

    def __init__(self, data, period):
        self.pos = torch.tensor(data.positives(period).toarray())

    def score_all(self, users, ctx):
        return self.pos[users] + 1e-3 * torch.rand(len(users), self.pos.shape[1])


def test_seen_items_are_masked_and_lists_unique(toy_data):
    ev = Evaluator(toy_data, "test", ks=(10, 50))
    res = ev(Popularity(toy_data))
    seen = toy_data.seen_before("test")
    top = ev.labels.users, res.topk
    for u, row in zip(*top):
        assert not set(row.tolist()) & set(seen[u].indices.tolist())
        assert len(set(row.tolist())) == len(row)


def test_oracle_scores_one_and_batching_does_not_matter(toy_data):
    res = evaluate(Oracle(toy_data, "valid"), toy_data, "valid", progress=False)
    assert res.per_user["ndcg@10"] == pytest.approx(1.0)
    small = Evaluator(toy_data, "valid", batch_users=7)(Popularity(toy_data))
    big = Evaluator(toy_data, "valid", batch_users=4096)(Popularity(toy_data))
    for k in small.per_user:
        np.testing.assert_allclose(small.per_user[k], big.per_user[k])
    assert res.means()["recall@1000"] == pytest.approx(1.0)


def test_summary_and_paired_comparison(toy_data):
    ev = Evaluator(toy_data, "valid")
    a, b = ev(Oracle(toy_data, "valid")), ev(Popularity(toy_data))
    s = b.summary(n_bootstrap=200)
    lo, hi = s["ndcg@10_ci"]
    assert lo <= s["ndcg@10"] <= hi and s["users"] == len(ev.labels.users)
    diff = compare(a, b, n_bootstrap=200)
    assert diff["diff"] > 0 and diff["lo"] > 0


def test_agrees_with_ranx_on_a_real_model(toy_data):
    ranx = pytest.importorskip("ranx")
    ev = Evaluator(toy_data, "valid", ks=(10, 50))
    res = ev(Popularity(toy_data))
    labels = ev.labels
    qrels = {f"{u:08d}": {str(i): 1 for i in labels.positives[r].indices} for r, u in enumerate(labels.users)}
    run = {f"{u:08d}": {str(i): float(100 - j) for j, i in enumerate(res.topk[r][:10])} for r, u in enumerate(labels.users)}
    full = ev(Popularity(toy_data), keep=50)
    run50 = {f"{u:08d}": {str(i): float(100 - j) for j, i in enumerate(full.topk[r][:50])} for r, u in enumerate(labels.users)}
    scores = ranx.evaluate(ranx.Qrels(qrels), ranx.Run(run), ["ndcg@10", "hit_rate@10", "mrr@10", "recall@10"],
                           return_mean=False)
    np.testing.assert_allclose(scores["ndcg@10"], res.per_user["ndcg@10"], atol=1e-9)
    np.testing.assert_allclose(scores["hit_rate@10"], res.per_user["hit_rate@10"], atol=1e-9)
    np.testing.assert_allclose(scores["mrr@10"], res.per_user["mrr@10"], atol=1e-9)
    np.testing.assert_allclose(scores["recall@10"], res.per_user["recall@10"], atol=1e-9)
    r50 = ranx.evaluate(ranx.Qrels(qrels), ranx.Run(run50), "recall@50", return_mean=False)
    np.testing.assert_allclose(r50, res.per_user["recall@50"], atol=1e-9)


class Learnt:
    """Continuous scores with no ties, like a trained embedding model's."""

    def __init__(self, n_items, seed=0):
        self.w = torch.randn(4096, n_items, generator=torch.Generator().manual_seed(seed))

    def score_all(self, users, ctx):
        return self.w[users].clone()


class Counts:
    """Integer scores: many exact ties, like popularity's or the transition model's."""

    def __init__(self, n_items, seed=0):
        self.w = torch.randint(0, 3, (4096, n_items), generator=torch.Generator().manual_seed(seed)).float()

    def score_all(self, users, ctx):
        return self.w[users].clone()


def test_one_metric_from_the_list_head_equals_the_full_evaluation(toy_data):
    """Early stopping ranks only the head a metric reads (Evaluator.metric); where no scores tie
    that is bit for bit the full evaluation's number, so epochs and choices are unchanged."""
    ev = Evaluator(toy_data, "valid", ks=(10, 20, 50), batch_users=5)
    scorer = Learnt(toy_data.n_items)
    full = ev(scorer).means()
    for metric in ("ndcg@10", "recall@20", "recall@50", "hit_rate@10"):
        assert ev.metric(scorer, metric) == full[metric]
    # scores with ties: the full lists, as the evaluation ranks them
    counts = Counts(toy_data.n_items)
    assert ev.metric(counts, "ndcg@10", full_lists=True) == ev(counts).means()["ndcg@10"]


def test_one_metric_ranks_only_the_head_it_reads(toy_data, monkeypatch):
    """The early-stopping pass asks rank_topk for 10 items for nDCG@10 (20 for Recall@20), and for
    the longest lists when scores tie: the speed-up is there, and its opt-out works."""
    from recsys_lib.protocol import evaluate as ev_mod
    asked = []
    real = ev_mod.rank_topk
    monkeypatch.setattr(ev_mod, "rank_topk", lambda scorer, users, ctx, k, *a, **kw: asked.append(k) or real(scorer, users, ctx, k, *a, **kw))
    ev = Evaluator(toy_data, "valid", ks=(10, 20, 50))
    scorer = Learnt(toy_data.n_items)
    ev.metric(scorer, "ndcg@10")
    ev.metric(scorer, "recall@20")
    ev.metric(scorer, "ndcg@10", full_lists=True)
    assert asked == [10, 20, 50]
