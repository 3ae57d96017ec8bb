"""The leakage audit in words and numbers (50_leakage_audit, the report's audit section): what
the design's protocol adds to a score, from ``analysis/audit.json``; graded gains as the design
computed them. An audit, never a result: the study's numbers follow docs/PROTOCOL.md."""
from __future__ import annotations

import numpy as np

from ..protocol.splitdata import SplitData
from .tables import fmt_count, fmt_metric

# The design's own published figure (docs/PROTOCOL.md, "Why it exists"): an external number this
# study cannot recompute (its run is not ours to repeat), quoted once, in the leakage audit only.
DESIGN_REPORTED_NDCG10 = 0.5466

def audit_summary(audit: dict, reported: float = DESIGN_REPORTED_NDCG10) -> str:
    """What each step of the design's protocol adds, in words, from ``analysis/audit.json``
    (written by 50_leakage_audit): in-sample scoring of the design's re-ranker as run, at its own
    setting and at the most optimizer steps tried, against the honest test period, and graded
    against binary gain for popularity."""
    design = audit.get("design_as_run") or []
    if not design:
        return "The design's re-ranker was not re-run (params `audit.design_runs` is empty)."
    own, most = design[0], max(design, key=lambda r: r["optimizer steps"])
    text = (f"The design reported nDCG@10 = {reported} on MovieLens-32M. Trained as its code runs "
            f"({own['epochs']} epochs at batch {own['batch_size']}: {own['optimizer steps']} optimizer steps "
            f"over {own['training positives']:,} positives here), its re-ranker scores "
            f"{own['in-sample valid (protocol IDCG)']:.3f} on the validation users it trained on, and "
            f"{own['honest test']:.3f} on the test period.")
    if most is not own:
        text += (f" With {most['optimizer steps']:,} steps ({most['epochs']} epochs at batch "
                 f"{most['batch_size']}) it memorises: {most['in-sample valid (protocol IDCG)']:.3f} in-sample "
                 f"({most['in-sample valid (positives among candidates)']:.3f} counting only the positives "
                 f"among its candidates), while its test score stays at {most['honest test']:.3f}.")
    gain = {r["popularity nDCG@10 (valid)"]: r["value"] for r in audit.get("popularity_gain", [])}
    graded, binary = gain.get("graded gain (seed protocol)"), gain.get("binary gain (our protocol)")
    if graded is not None and binary is not None:
        text += (f" Mixed gains move the baselines too: popularity scores {graded:.3f} with graded gain "
                 f"against {binary:.3f} with binary gain on validation.")
    return text

def graded_ndcg_at_k(topk: np.ndarray, gains, k: int = 10) -> np.ndarray:
    """nDCG@k with graded gain (the rating of each rated item in the period), as the seed design
    used for its popularity baseline: DCG = sum gain(item at r) / log2(r + 1), IDCG from the
    user's k largest gains. Only for the leakage audit; the study's metric is binary (docs/PROTOCOL.md).
    ``gains`` is a (U, n_items) csr aligned with ``topk`` rows."""
    import scipy.sparse as sp
    g = sp.csr_matrix(gains)
    top = np.asarray(topk)[:, :k]
    rows = np.arange(top.shape[0])[:, None]
    valid = top >= 0
    got = np.asarray(g[np.broadcast_to(rows, top.shape)[valid], top[valid]]).ravel()
    gain = np.zeros(top.shape)
    gain[valid] = got
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (gain * disc[: top.shape[1]]).sum(axis=1)
    row_of = np.repeat(np.arange(g.shape[0]), np.diff(g.indptr))
    order = np.lexsort((-g.data, row_of))                  # each user's gains, largest first
    pos = np.arange(g.nnz) - g.indptr[row_of[order]]
    keep = pos < k
    idcg = np.bincount(row_of[order][keep], weights=g.data[order][keep] * disc[pos[keep]],
                       minlength=g.shape[0])
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)

def period_ratings(data: SplitData, period: str, users: np.ndarray):
    """(len(users), n_items) csr of the ratings given in ``period`` (graded gains for the audit)."""
    import scipy.sparse as sp
    p = data.period(period)
    m = sp.csr_matrix((p.rating.astype(np.float64), (p.user, p.item)), shape=(data.n_users, data.n_items))
    m.sum_duplicates()
    return m[users]


def audit_sentence(audit: dict | None, records: dict) -> str:
    """The leakage audit's lesson in one sentence, worded after what its numbers show: the seed
    design's re-ranker memorising (in-sample well above test), else the chosen re-ranker scoring
    higher on the users it trained on than on those it never saw, else that neither inflates."""
    if not audit:
        return "The leakage audit (50_leakage_audit) has not run."
    design = audit.get("design_as_run") or []
    most = max(design, key=lambda r: r["optimizer steps"]) if design else None
    inside, test = ((most["in-sample valid (protocol IDCG)"], most["honest test"]) if most else (None, None))
    if most and inside > 1.5 * test:
        return (f"Leakage audit: trained and scored as the seed design does, on the validation users it learnt "
                f"from, its re-ranker reaches nDCG@10 {fmt_metric(inside, 3)} after {fmt_count(most['optimizer steps'])} "
                f"optimizer steps but {fmt_metric(test, 3)} on the test period: a score on the users a model "
                f"trained on measures memorisation, not recommendation.")
    chosen = ((records.get("two_stage") or {}).get("params") or {}).get("reranker")
    row = next((r for r in audit.get("reranker", []) if r["re-ranker"] == chosen), None)
    stale = row is not None and "stale lists it trained on: its users" in row   # the lists it learnt from
    inside_key, out_key, lists = (("stale lists it trained on: its users", "stale lists: out-of-fold users",
                                   "the stale validation lists of ") if stale else
                                  ("seed protocol: valid users it trained on", "out-of-fold valid users", ""))
    if row is not None and row[inside_key] > 1.1 * row[out_key]:
        return (f"Leakage audit: scored on {lists}the validation users it trained on, as the seed design scores, "
                f"the chosen re-ranker ({chosen}) reaches nDCG@10 {fmt_metric(row[inside_key], 3)}, "
                f"against {fmt_metric(row[out_key], 3)} on users it never saw and "
                f"{fmt_metric(row['honest test'], 3)} on test: a score on training users rewards memorisation.")
    if most:
        return (f"Leakage audit: trained and scored as the seed design does, its re-ranker scores nDCG@10 "
                f"{fmt_metric(inside, 3)} in-sample and {fmt_metric(test, 3)} on test after "
                f"{fmt_count(most['optimizer steps'])} optimizer steps: too few to memorise, so here the in-sample "
                f"score is not inflated.")
    return "Leakage audit: no re-ranker here scores higher on the users it trained on than on unseen users."
