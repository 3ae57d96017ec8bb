"""The study over several seeds: each model's spread, and the comparisons named in advance with a
bootstrap over seeds and users (docs/PROTOCOL.md "Seeds").

A run with ``seeds: [42, 43, ...]`` keeps the first seed's run in its folder and every other seed's
in ``seeds/<seed>/`` (`pipeline._run_seed`): the same split, every hyper-parameter pinned at what
the first seed's searches chose, every stochastic fit repeated. This module reads those folders; it
is imported by 90_report only, never by the report's facade, so the model notebooks never load it.

The paired test is a two-way bootstrap of the crossed seeds x users design: for each resample, ``S``
seeds are drawn with replacement and, independently, ``U`` users with replacement from the users
every run scored, the same users for every drawn seed (every seed scores the same users); the
statistic is the mean of the drawn per-user differences. So the interval widens with the spread
between seeds as well as with the spread between users, and with one seed it is the usual paired
bootstrap over users. The ablations (35_ablations) are tested the same way, the full system minus
each, as exploratory rows (role ``ablation``): what each stage adds, over seeds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..protocol import metrics
from ..run.experiment import read_json
from .analysis import bootstrap_p, comparisons
from .tables import fmt_ci, fmt_metric

#: a seed run's folder inside the first seed's run folder
SEEDS_DIR = "seeds"
METRIC = "ndcg@10"


def seed_runs(run_dir: str | os.PathLike, first_seed: int, seeds: list[int] | None = None) -> dict[int, Path]:
    """{seed: run folder}, ``first_seed`` first: the first seed's run (``run_dir``) and each further
    seed's ``seeds/<seed>/`` that holds a ``metrics/two_stage.json`` (its 30_reranker finished).
    Each file looked for is noted as read, present or not, so the report reruns when one appears."""
    run_dir = Path(run_dir)
    out = {int(first_seed): run_dir}
    for s in dict.fromkeys(int(x) for x in (seeds or [])):
        sub = run_dir / SEEDS_DIR / str(s)
        if s != int(first_seed) and read_json(sub, "metrics", "two_stage.json") is not None:
            out[s] = sub
    return out


def _records(run: Path) -> dict[str, dict]:
    return {f.stem: json.loads(f.read_text()) for f in sorted((run / "metrics").glob("*.json"))}


def per_seed_scores(runs: dict[int, Path], period: str = "test", metric: str = METRIC) -> pd.DataFrame:
    """models x seeds: each run's ``metric`` on ``period`` (NaN where a seed lacks the model)."""
    cols = {}
    for seed, run in runs.items():
        cols[seed] = {name: (r.get(period) or {}).get(metric) for name, r in _records(run).items()
                      if (r.get(period) or {}).get(metric) is not None}
    return pd.DataFrame(cols).astype(float)


def spread_table(scores: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Mean, sd (ddof 1) and min/max over seeds of each model, then each seed's value; the models of
    ``order`` first, in that order, the rest by mean."""
    out = pd.DataFrame({"seeds": scores.notna().sum(axis=1), "mean": scores.mean(axis=1),
                        "sd": scores.std(axis=1, ddof=1), "min": scores.min(axis=1), "max": scores.max(axis=1)})
    out = pd.concat([out, scores.rename(columns=lambda s: f"seed {s}")], axis=1)
    first = [m for m in (order or []) if m in out.index]
    rest = out.drop(index=first).sort_values("mean", ascending=False).index.tolist()
    return out.loc[first + rest]


def user_differences(runs: dict[int, Path], target: str, against: str, period: str = "test",
                     metric: str = METRIC) -> tuple[np.ndarray, np.ndarray]:
    """(seeds, D): D[s, u] is ``target`` minus ``against`` for user u in seed s's run, on the users
    every seed's run scored for both (the split is the same, so that is every scored user); seeds
    lacking either model are left out."""
    frames, seeds = [], []
    for seed, run in runs.items():
        a, b = run / "per_user" / f"{target}-{period}.parquet", run / "per_user" / f"{against}-{period}.parquet"
        if not (a.exists() and b.exists()):
            continue
        ta = pd.read_parquet(a, columns=["user", metric]).set_index("user")[metric]
        tb = pd.read_parquet(b, columns=["user", metric]).set_index("user")[metric]
        frames.append(ta - tb)
        seeds.append(seed)
    if not frames:
        return np.array([], dtype=np.int64), np.zeros((0, 0))
    users = sorted(set.intersection(*(set(f.dropna().index) for f in frames)))
    return np.array(seeds), np.stack([f.reindex(users).to_numpy(np.float64) for f in frames])


def seed_user_bootstrap(diffs: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                        max_cells: int = 4_000_000) -> np.ndarray:
    """Resampled means of ``diffs`` (S seeds x U users), a two-way bootstrap over the crossed design:
    each resample draws S seeds with replacement and, independently, U users with replacement, and
    takes the mean over the drawn seeds of the drawn users. The users are drawn once per resample,
    not once per drawn seed, because every seed scores the same users: drawing them afresh for each
    seed would treat one user's luck as S independent draws and shrink the users' share of the
    interval by about sqrt(S). With S = 1 it is the paired bootstrap over users (the same draws as
    `protocol.metrics._resampled_means`)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    n_seeds, n_users = diffs.shape
    if n_seeds == 1:
        return metrics._resampled_means(diffs[0], n_resamples, seed, max_cells)
    rng = np.random.default_rng(seed)
    chunk = max(1, max_cells // max(n_seeds * n_users, 1))
    out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        r = min(n_resamples, start + chunk) - start
        s = rng.integers(0, n_seeds, size=(r, n_seeds, 1))          # seeds drawn per resample
        u = rng.integers(0, n_users, size=(r, 1, n_users))          # users drawn once, for every drawn seed
        out[start:start + r] = diffs[s, u].mean(axis=(1, 2))
    return out


def paired_over_seeds(runs: dict[int, Path], target: str, against: str, n_resamples: int = 1000,
                      seed: int = 0, period: str = "test", metric: str = METRIC) -> dict | None:
    """``target`` minus ``against`` over every seed and user: the mean, its 95% CI and two-sided p
    from `seed_user_bootstrap`, each seed's own mean difference, and the counts."""
    seeds, d = user_differences(runs, target, against, period, metric)
    if d.size == 0:
        return None
    resampled = seed_user_bootstrap(d, n_resamples, seed)
    lo, hi = np.quantile(resampled, [0.025, 0.975])
    diff = float(d.mean())
    return {"against": against, "diff": diff, "lo": float(lo), "hi": float(hi),
            "p": float(bootstrap_p(resampled[:, None], np.array([diff]))[0]),
            "per_seed": {int(s): float(v) for s, v in zip(seeds, d.mean(axis=1))},
            "n_seeds": int(len(seeds)), "n_users": int(d.shape[1])}


def seed_summary(run_dir: str | os.PathLike, first_seed: int, seeds: list[int] | None = None,
                 n_resamples: int = 1000, seed: int = 0, metric: str = METRIC) -> dict:
    """``analysis/seeds.json``: the seeds, each model's test and validation scores per seed with
    mean and sd, and the comparisons named in advance (from the first seed's ``analysis/paired.json``:
    primary against the blend, secondary against the model chosen on the first seed's validation)
    tested over seeds and users. One seed gives the same structure, its CIs over users only."""
    runs = seed_runs(run_dir, first_seed, seeds)
    paired = read_json(run_dir, "analysis", "paired.json") or {}
    target = paired.get("target", "two_stage")
    out = {"seeds": list(runs), "first_seed": int(first_seed), "requested": [int(x) for x in seeds or [first_seed]], "metric": metric,
           "test": "two-way bootstrap: seeds, and the same users for every drawn seed", "n_bootstrap": n_resamples,
           "bootstrap_seed": seed, "target": target, "comparisons": []}
    for period in ("valid", "test"):
        scores = per_seed_scores(runs, period, metric)
        out[period] = {m: {"mean": float(row.mean()), "sd": float(row.std(ddof=1)) if row.notna().sum() > 1 else None,
                           "per_seed": {int(s): float(v) for s, v in row.dropna().items()}}
                       for m, row in scores.iterrows()}
    for row in comparisons(paired) if paired else []:
        if row["role"] not in ("primary", "secondary"):
            continue
        res = paired_over_seeds(runs, target, row["against"], n_resamples, seed, "test", metric)
        if res is not None:
            out["comparisons"].append({"role": row["role"], **res})
    for name in ablation_names(runs[int(first_seed)]):          # exploratory: what each stage adds
        res = paired_over_seeds(runs, target, name, n_resamples, seed, "test", metric)
        if res is not None:
            out["comparisons"].append({"role": "ablation", **res})
    return out


def ablation_names(run: Path) -> list[str]:
    """The ablations a run recorded (35_ablations: metrics records with an ``ablation`` field), in
    name order. Tested over seeds like the comparisons named in advance, but exploratory: they are
    parts of the system, not rivals (report/ablation.py)."""
    return [name for name, r in _records(run).items() if r.get("ablation")]


def comparison(summary: dict, role: str) -> dict | None:
    return next((c for c in summary.get("comparisons", []) if c["role"] == role), None)


def verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "the two-stage system beats it"
    if hi < 0:
        return "the two-stage system is beaten by it"
    return "the two do not separate"


def abstract_sentences(summary: dict) -> str:
    """The abstract's words on seeds: how many, what was repeated, and the primary (and secondary)
    comparison with its CI over seeds and users; the per-user CIs above it are the first seed's."""
    seeds = summary.get("seeds") or []
    primary = comparison(summary, "primary")
    if len(seeds) < 2:
        return (f"One seed ({seeds[0] if seeds else '?'}): every CI above covers the sampling of users, not "
                "the randomness of training.")
    words = [f"Over {len(seeds)} seeds ({', '.join(map(str, seeds))}; hyper-parameters searched on seed "
             f"{summary['first_seed']} only, every stochastic fit repeated per seed)"]
    target = summary.get("target", "two_stage")
    t = (summary.get("test") or {}).get(target)
    if t:
        words.append(f", the two-stage system scores test nDCG@10 {fmt_metric(t['mean'])} "
                     f"(sd {fmt_metric(t['sd'])})")
    if primary:
        b = (summary.get("test") or {}).get(primary["against"]) or {}
        words.append(f", the blend {fmt_metric(b.get('mean'))} (sd {fmt_metric(b.get('sd'))}); the primary "
                     f"difference is {fmt_ci(primary['diff'], primary['lo'], primary['hi'], signed=True)} "
                     f"(95% CI over seeds and users), so {verdict(primary['lo'], primary['hi'])}")
    secondary = comparison(summary, "secondary")
    if secondary:
        words.append(f"; against {secondary['against']} (secondary) it is "
                     f"{fmt_ci(secondary['diff'], secondary['lo'], secondary['hi'], signed=True)}")
    return "".join(words) + "."


def abstract_html(abstract: str, summary: dict) -> str:
    """``abstract`` (`report.abstract`'s HTML) with the seeds' sentence as its second paragraph."""
    from html import escape
    extra = f'<p>{escape(abstract_sentences(summary), quote=False)}</p>'
    return abstract.replace("</section>", extra + "</section>", 1) if "</section>" in abstract else abstract + extra


def spread_frame(summary: dict, period: str = "test", order: list[str] | None = None) -> pd.DataFrame:
    """The seeds table as the report shows it: model, mean ± sd, min-max, then each seed's value."""
    scores = pd.DataFrame({m: v["per_seed"] for m, v in (summary.get(period) or {}).items()}).T
    if scores.empty:
        return pd.DataFrame()
    scores.columns = [int(c) for c in scores.columns]
    t = spread_table(scores[sorted(scores.columns)], order)
    out = pd.DataFrame({"model": t.index, "seeds": t["seeds"].astype(int),
                        f"mean {METRIC}": t["mean"].map(fmt_metric),
                        "sd": t["sd"].map(fmt_metric), "min": t["min"].map(fmt_metric),
                        "max": t["max"].map(fmt_metric)})
    for c in t.columns:
        if str(c).startswith("seed "):
            out[c] = t[c].map(fmt_metric)
    return out.reset_index(drop=True)


def spread_plot(summary: dict, order: list[str] | None = None, period: str = "test"):
    """Each model's score per seed (dots) and its mean (bar), models top to bottom by ``order``."""
    import matplotlib.pyplot as plt
    data = summary.get(period) or {}
    names = [m for m in (order or []) if m in data] + sorted(
        (m for m in data if m not in (order or [])), key=lambda m: -data[m]["mean"])
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(names) + 1.2))
    for i, m in enumerate(names):
        vals = list(data[m]["per_seed"].values())
        ax.scatter(vals, [i] * len(vals), s=18, color="#1f77b4", alpha=0.8, zorder=3)
        ax.plot([data[m]["mean"]] * 2, [i - 0.3, i + 0.3], color="black", lw=2, zorder=4)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"{period} {METRIC} (dots: seeds; bar: mean)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def comparison_frame(summary: dict) -> pd.DataFrame:
    """The comparisons named in advance over seeds and users: role, rival, the difference with its
    95% CI and p, and each seed's own mean difference."""
    rows = []
    for c in summary.get("comparisons", []):
        row = {"role": c["role"], "against": c["against"],
               f"{summary.get('target', 'two_stage')} - other": fmt_ci(c["diff"], c["lo"], c["hi"], signed=True),
               "p": f"{c['p']:.3f}", "seeds": c["n_seeds"], "users": c["n_users"]}
        row.update({f"seed {s}": fmt_metric(v, signed=True) for s, v in c["per_seed"].items()})
        rows.append(row)
    return pd.DataFrame(rows)
