"""Comparisons for the final evaluation: paired bootstrap tables, user-activity segments and the
popularity of the hits. Everything reads the per-user files of the run folder, so all models are
compared on the same scored users (docs/PROTOCOL.md)."""
from __future__ import annotations

import numpy as np
import pandas as pd

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
    """Paired bootstrap of ``target`` minus every other model on the same users."""
    m = aligned(per_user, metric)
    rows = []
    for other in m.columns:
        if other == target:
            continue
        r = metrics.paired_bootstrap(m[target].to_numpy(), m[other].to_numpy(), n_resamples=n_bootstrap, seed=seed)
        rows.append({"against": other, "target": float(m[target].mean()), "other": float(m[other].mean()),
                     f"{target} - other": r["diff"], "95% CI lo": r["lo"],
                     "95% CI hi": r["hi"], "p": r["p_value"], "better": bool(r["lo"] > 0)})
    return pd.DataFrame(rows)


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
    difference (two-stage minus model) with its 95% CI, smallest difference (the closest rival) first."""
    target = paired["target"]
    rows = [{"model": r["against"], "diff": r[f"{target} - other"], "lo": r["95% CI lo"], "hi": r["95% CI hi"],
             "model score": r["other"], "target score": r["target"]} for r in paired.get("rows", [])]
    frame = pd.DataFrame(rows, columns=["model", "diff", "lo", "hi", "model score", "target score"])
    return frame.sort_values("diff", kind="stable").reset_index(drop=True)


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
    """Two-stage systems are recorded as ``two_stage`` and ``two_stage_<variant>``."""
    return name == "two_stage" or name.startswith("two_stage_")


def is_blend(name: str) -> bool:
    """The score blend of the single-stage models (17_blend): a baseline, not a single model."""
    return name == "blend"


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
