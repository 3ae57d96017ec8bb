"""Comparisons for the final evaluation: paired bootstrap tables, the comparisons named in advance
(primary, secondary, exploratory with Holm-adjusted p-values), user-activity segments and the
popularity of the hits. Everything reads the per-user files of the run folder, so all models are
compared on the same scored users (docs/PROTOCOL.md "Comparisons, named in advance")."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..models.registry import role_of
from ..protocol import metrics
from ..protocol.splitdata import SplitData


def aligned(per_user: dict[str, pd.DataFrame], metric: str = "ndcg@10") -> pd.DataFrame:
    """users x models matrix of ``metric``; raises if the models were scored on different users."""
    frames = {name: df.set_index("user")[metric] for name, df in per_user.items()}
    users = {name: tuple(s.index) for name, s in frames.items()}
    if len(set(users.values())) > 1:
        raise ValueError(f"models were scored on different users: {[k for k in users]}")
    return pd.DataFrame(frames)


def paired_table(per_user: dict[str, pd.DataFrame], target: str, metric: str = "ndcg@10",
                 n_bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired bootstrap of ``target`` minus every other model on the same users, all models at once.

    One draw of ``n_bootstrap`` resamples of the users (fixed ``seed``) serves every comparison, so
    each row equals ``metrics.paired_bootstrap(target, other, n_bootstrap, seed)``: ``target - other``
    is mean(target - other) over users, ``95% CI lo``/``hi`` the percentile interval of the resampled
    mean differences, ``p`` their two-sided p-value (``bootstrap_p``)."""
    m = aligned(per_user, metric)
    others = [c for c in m.columns if c != target]
    cols = ["against", "target", "other", f"{target} - other", "95% CI lo", "95% CI hi", "p", "better"]
    if not others:
        return pd.DataFrame(columns=cols)
    t = m[target].to_numpy(dtype=np.float64)
    o = m[others].to_numpy(dtype=np.float64)                       # (U, M)
    d = t[:, None] - o                                             # (U, M) per-user differences
    if len(d):
        # the same index draws as metrics.paired_bootstrap; chunks hold ~4M gathered cells
        resampled = metrics._resampled_means(d, n_bootstrap, seed, max_cells=max(1, 4_000_000 // d.shape[1]))
        lo, hi = np.quantile(resampled, [0.025, 0.975], axis=0)   # (M,), (M,)
        diff = d.mean(axis=0)
        p = bootstrap_p(resampled, diff)
        t_mean, o_mean = float(t.mean()), o.mean(axis=0)
    else:                                                          # no scored users: nothing to say
        lo = hi = diff = p = o_mean = np.full(len(others), np.nan)
        t_mean = float("nan")
    return pd.DataFrame({"against": others, "target": t_mean, "other": o_mean, f"{target} - other": diff,
                         "95% CI lo": lo, "95% CI hi": hi, "p": p, "better": lo > 0}, columns=cols)


def bootstrap_p(resampled: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Two-sided paired-bootstrap p-values, one per column: twice the share of the resampled mean
    differences (``resampled``, (R, M)) on the other side of zero from the observed difference
    (``observed``, (M,)), zero included, capped at 1; 1 where the observed difference is 0, NaN
    where it is NaN. The formula of ``metrics.paired_bootstrap``, for every model at once. With R
    resamples a p of 0 means p < 2/R."""
    resampled = np.asarray(resampled, dtype=np.float64).reshape(len(resampled), -1)
    observed = np.asarray(observed, dtype=np.float64).reshape(-1)
    not_above = (resampled <= 0).mean(axis=0)                      # (M,)
    not_below = (resampled >= 0).mean(axis=0)                      # (M,)
    p = np.where(observed > 0, 2 * not_above, np.where(observed < 0, 2 * not_below, 1.0))
    return np.where(np.isnan(observed), np.nan, np.minimum(p, 1.0))


def holm(p) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate).

    With the m non-missing p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value of
    p_(i) is max over j <= i of min(1, (m - j + 1) p_(j)); each is returned in its input position.
    Missing (NaN) p-values stay NaN and do not count in m."""
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    q = p[ok]
    order = np.argsort(q, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
    sorted_back = np.empty(m)
    sorted_back[order] = adjusted
    out[ok] = sorted_back
    return out


#: the primary comparator, named in advance (docs/PROTOCOL.md "Comparisons, named in advance"): the
#: re-ranker takes every single-stage model's score as a feature, so the blend of those models
#: (17_blend) is its like-for-like rival
PRIMARY = "blend"
#: a comparison's role: primary and secondary are named in advance, every other one is exploratory
ROLES = ("primary", "secondary", "exploratory")


def name_comparisons(target: str, rows: list[dict], strongest: dict | None) -> dict:
    """``analysis/paired.json``: the paired rows (``paired_table``) with each one's ``role``
    (primary: against the blend; secondary: against ``strongest``, the strongest single-stage model
    on validation; exploratory: every other row) and ``p_holm``, the exploratory rows' p-values
    Holm-adjusted over the exploratory rows (None for the primary and the secondary, each judged
    on its own 95% CI). ``primary`` and ``secondary`` say whom each is against and whether this
    run has that row; ``strongest_single_stage`` is kept as before."""
    present = {r["against"] for r in rows}
    secondary = (strongest or {}).get("model")
    roles = {PRIMARY: "primary", **({secondary: "secondary"} if secondary and secondary != PRIMARY else {})}
    rows = [{**r, "role": roles.get(r["against"], "exploratory"), "p_holm": None} for r in rows]
    explore = [i for i, r in enumerate(rows) if r["role"] == "exploratory"]
    adjusted = holm([np.nan if rows[i].get("p") is None else rows[i]["p"] for i in explore])
    for i, a in zip(explore, adjusted):
        rows[i]["p_holm"] = None if np.isnan(a) else float(a)
    return {"target": target, "strongest_single_stage": strongest,
            "primary": {"against": PRIMARY, "present": PRIMARY in present},
            "secondary": {"against": secondary, "present": bool(secondary) and secondary in present,
                          "chosen_on": "validation"},
            "exploratory": {"rows": len(explore), "adjustment": "holm"},
            "rows": rows}


def paired_summary(per_user: dict[str, pd.DataFrame], target: str, records: list[dict], metric: str = "ndcg@10",
                   n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Everything ``analysis/paired.json`` holds (``name_comparisons``): ``target`` against every
    other model on the same users (``paired_table``), the comparisons named in advance among them,
    and the test (paired bootstrap over users, its resamples and seed)."""
    rows = paired_table(per_user, target, metric, n_bootstrap, seed).to_dict("records")
    summary = name_comparisons(target, rows, strongest_single_stage(records, metric))
    return {**summary, "metric": metric, "test": "paired bootstrap over users", "n_bootstrap": n_bootstrap,
            "seed": seed}


def comparisons(paired: dict) -> list[dict]:
    """The rows of ``paired`` (``analysis/paired.json``) each with its ``role`` and ``p_holm``. A
    file written before the comparisons were named (no ``role`` on its rows) gets them here by the
    same rule as ``name_comparisons``: the blend is primary, ``strongest_single_stage`` secondary."""
    rows = list(paired.get("rows") or [])
    if all("role" in r for r in rows):
        return [{**r, "p_holm": r.get("p_holm")} for r in rows]
    return name_comparisons(paired.get("target", "two_stage"), rows, paired.get("strongest_single_stage"))["rows"]


def comparison(paired: dict, role: str) -> dict | None:
    """The row of ``paired`` with ``role`` (primary or secondary), or None where the run has none."""
    return next((r for r in comparisons(paired) if r["role"] == role), None)


#: user-activity segments, lightest first: the order of every table and plot of them
ACTIVITY_ORDER = ("light", "medium", "heavy")


def activity_segments(data: SplitData, users: np.ndarray, n_segments: int = 3) -> pd.Series:
    """Light / medium / heavy users by their number of train rows (equal-size terciles)."""
    counts = np.bincount(data.train.user, minlength=data.n_users)[users]
    labels = list(ACTIVITY_ORDER) if n_segments == 3 else [f"q{i + 1}" for i in range(n_segments)]
    return pd.Series(pd.qcut(pd.Series(counts).rank(method="first"), n_segments, labels=labels).to_numpy(),
                     index=users, name="activity")


def segment_order(values) -> list[str]:
    """Segment labels lightest first: light, medium, heavy (then q1, q2, ... in number order, then
    any other label alphabetically), never the alphabetical heavy, light, medium."""
    known = [s for s in ACTIVITY_ORDER if s in set(values)]
    rest = sorted({str(v) for v in values} - set(ACTIVITY_ORDER),
                  key=lambda v: (0, int(v[1:])) if v[:1] == "q" and v[1:].isdigit() else (1, v))
    return known + rest


def by_segment(per_user: dict[str, pd.DataFrame], segments: pd.Series, metric: str = "ndcg@10") -> pd.DataFrame:
    """Long frame: model, segment, mean metric, users; each model's segments lightest first."""
    rows = []
    order = segment_order(segments.astype(str).unique())
    for name, df in per_user.items():
        seg = segments.reindex(df["user"].to_numpy()).astype(str).to_numpy()
        t = pd.DataFrame({"segment": seg, metric: df[metric].to_numpy()})
        for s in order:
            g = t[t["segment"] == s]
            if len(g):
                rows.append({"model": name, "activity": s, metric: g[metric].mean(), "users": len(g)})
    return pd.DataFrame(rows)


def order_segments(frame: pd.DataFrame, segment: str = "activity") -> pd.DataFrame:
    """``frame`` (e.g. analysis/segments.json) with its rows in segment order, lightest first,
    models in their first-seen order."""
    if frame.empty:
        return frame
    models = list(dict.fromkeys(frame["model"]))
    key = {s: i for i, s in enumerate(segment_order(frame[segment].astype(str).unique()))}
    return (frame.assign(_m=frame["model"].map(models.index), _s=frame[segment].astype(str).map(key))
            .sort_values(["_m", "_s"], kind="stable").drop(columns=["_m", "_s"]).reset_index(drop=True))


def main_models(names, target: str = "two_stage") -> list[str]:
    """Every single-stage model and the chosen two-stage system (``target``), without the other
    re-ranker variants: the models a segment or popularity plot can show legibly."""
    return [n for n in names if not is_two_stage(n) or n == target]


def forest_data(paired: dict) -> pd.DataFrame:
    """One row per model compared with the two-stage system in ``analysis/paired.json``: the paired
    difference (two-stage minus model) with its 95% CI, the comparison's role and a label for the
    plot ("blend (primary)"). The primary comparison first, then the secondary, then the exploratory
    rows, smallest difference (the closest rival) first."""
    target = paired["target"]
    rows = [{"model": r["against"], "role": r["role"],
             "label": r["against"] if r["role"] == "exploratory" else f"{r['against']} ({r['role']})",
             "diff": r[f"{target} - other"], "lo": r["95% CI lo"], "hi": r["95% CI hi"],
             "model score": r["other"], "target score": r["target"], "p": r.get("p"), "p_holm": r.get("p_holm")}
            for r in comparisons(paired)]
    cols = ["model", "role", "label", "diff", "lo", "hi", "model score", "target score", "p", "p_holm"]
    frame = pd.DataFrame(rows, columns=cols)
    rank = frame["role"].map({r: i for i, r in enumerate(ROLES)})
    return (frame.assign(_role=rank).sort_values(["_role", "diff"], kind="stable").drop(columns="_role")
            .reset_index(drop=True))


def hit_popularity(per_user: dict[str, pd.DataFrame], data: SplitData, positives, k: int = 10,
                   bins=(0.0, 0.2, 0.8, 1.0)) -> pd.DataFrame:
    """Where each model's hits in the top ``k`` fall in the train popularity ranking:
    share of hits on head (top 20% most-rated items), torso and tail items, and hits per user.
    ``positives`` is the (U, n_items) csr aligned with the per-user frames' users."""
    pop = data.item_popularity
    rank_share = pd.Series(pop).rank(ascending=False, method="first").to_numpy() / len(pop)
    names = ["head", "torso", "tail"]
    rows = []
    for name, df in per_user.items():
        top = df[[f"top_{j}" for j in range(k)]].to_numpy()
        hits = metrics.ranked_hits(top, positives)
        items = top[hits]
        bucket = pd.cut(rank_share[items], bins=list(bins), labels=names, include_lowest=True)
        share = pd.Series(bucket).value_counts(normalize=True).reindex(names, fill_value=0.0)
        rows.append({"model": name, **{f"{b} share": share[b] for b in names},
                     "hits per user": hits.sum() / max(len(df), 1)})
    return pd.DataFrame(rows)


def is_two_stage(name: str) -> bool:
    """A two-stage system (``two_stage``, ``two_stage_<variant>``) or one of its ablations, by the
    model registry's role (`models.registry.role_of`)."""
    return role_of(name) in ("two_stage", "ablation")


def is_blend(name: str) -> bool:
    """The score blend of the single-stage models (17_blend): a baseline, not a single model."""
    return role_of(name) == "blend"


def strongest_single_stage(records: list[dict], metric: str = "ndcg@10") -> dict | None:
    """The single-stage model (every recorded model but the two-stage ones and the blend of them)
    with the best *validation* ``metric``: the one the two-stage system must beat. Chosen on
    validation, so the test period never decides which baseline the headline names."""
    rows = [(r["valid"][metric], r["model"]) for r in records
            if not is_two_stage(r["model"]) and not is_blend(r["model"]) and r.get("valid")
            and metric in r["valid"]]
    if not rows:
        return None
    score, name = max(rows)
    return {"model": name, f"valid_{metric}": float(score)}
