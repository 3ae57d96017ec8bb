"""What each stage adds: the ablations of the two-stage system (35_ablations) beside the full system.

An ablation (`recsys_lib.stage2.ablation`) is the two-stage system with one stage taken out, built
and scored under the full system's rules and chosen by nothing. It is recorded like any model
(``metrics/<name>.json``, ``per_user/<name>-<period>.parquet``) with an ``ablation`` field in its
metrics JSON; that field, not its name, is what this module goes by (the report may not import
stage 2, and a name can drift).

Where they sit among the comparisons: docs/PROTOCOL.md, "Comparisons, named in advance", names the
primary (the blend) and the secondary (the strongest single-stage model on validation) and makes
every other comparison exploratory, "the re-ranker variants and ablations" among them. So an
ablation is an exploratory row of ``analysis/paired.json`` like any other (its p-value
Holm-adjusted over that family), never the primary or the secondary: its name starts with
``two_stage_``, so `analysis.strongest_single_stage` never picks one. It is not a rival, though:
it measures a part of the system. This module sets each against the full system alone, in a table
of its own: its test nDCG@10 with its bootstrap CI, and the paired difference, full system minus
ablation (what the stage taken out adds), with the paired bootstrap over the same users
(`analysis.paired_table`, the same resamples as paired.json's rows) and, from paired.json, the
Holm-adjusted p-value of its exploratory row.

Imported directly (``from recsys_lib.report import ablation``), not through the report's facade,
so the notebooks that do not show ablations never load it.
"""
from __future__ import annotations

import math
from typing import Iterable

import pandas as pd

from ..protocol import metrics
from .analysis import comparisons, paired_table
from .tables import DASH, fmt_ci, fmt_count, fmt_metric, fmt_p

#: the columns of `ablation_summary` (numbers; ``analysis/ablations.json`` holds them as records)
COLUMNS = ("model", "without", "score", "lo", "hi", "target", "target score", "diff", "diff lo", "diff hi", "p",
           "p_holm", "holm_rows")
#: what `mark` appends to an ablation's name in a table of every model
MARK = " (ablation)"


def ablation_records(records: Iterable[dict] | dict) -> dict[str, dict]:
    """The ablations among metrics records (a list, or a dict by name): name -> record, for every
    record with an ``ablation`` field, in their order."""
    rows = records.values() if isinstance(records, dict) else records
    return {r["model"]: r for r in rows if r.get("ablation")}


def ablation_summary(per_user: dict[str, pd.DataFrame], records: Iterable[dict] | dict, target: str = "two_stage",
                     metric: str = "ndcg@10", n_bootstrap: int = 1000, seed: int = 0, period: str = "test",
                     paired: dict | None = None) -> pd.DataFrame:
    """One row per ablation with per-user scores in ``per_user`` (``period``'s), as numbers:

    - ``score``, ``lo``, ``hi``: its mean ``metric`` and the 95% bootstrap CI over users, from its
      record (the results table's numbers), else computed (`metrics.bootstrap_ci`, ``seed``);
    - ``target score``, ``diff``, ``diff lo``, ``diff hi``, ``p``: the full system (``target``) minus
      the ablation, mean over users, with the paired bootstrap's 95% CI and two-sided p-value
      (`analysis.paired_table`: ``n_bootstrap`` resamples of the same users, ``seed``). A positive
      difference is what the stage taken out adds;
    - ``p_holm``, ``holm_rows``: the Holm-adjusted p-value of the ablation's exploratory row in
      ``paired`` (``analysis/paired.json``, `analysis.paired_summary`) and the number of exploratory
      rows it was adjusted over; None without ``paired`` or where the ablation has no row there.

    Empty (with its columns) when the run has no ablation or no ``target``."""
    recs = ablation_records(records)
    ablated = [n for n in recs if n in per_user]
    if not ablated or target not in per_user:
        return pd.DataFrame(columns=list(COLUMNS))
    table = paired_table({n: per_user[n] for n in [target, *ablated]}, target, metric, n_bootstrap, seed)
    table = table.set_index("against")
    rows_of = comparisons(paired) if paired else []
    holm = {r["against"]: r.get("p_holm") for r in rows_of if r.get("role") == "exploratory"}
    n_explore = sum(1 for r in rows_of if r.get("role") == "exploratory") or None
    rows = []
    for name in ablated:
        s = recs[name].get(period) or {}
        lo, hi = (s.get(f"{metric}_ci") or [None, None])[:2]
        score = s.get(metric)
        if score is None or lo is None or hi is None:
            ci = metrics.bootstrap_ci(per_user[name][metric].to_numpy(), n_resamples=n_bootstrap, seed=seed)
            score, lo, hi = ci["mean"], ci["lo"], ci["hi"]
        r = table.loc[name]
        rows.append({"model": name, "without": recs[name]["ablation"].get("without", DASH), "score": float(score),
                     "lo": float(lo), "hi": float(hi), "target": target, "target score": float(r["target"]),
                     "diff": float(r[f"{target} - other"]), "diff lo": float(r["95% CI lo"]),
                     "diff hi": float(r["95% CI hi"]), "p": float(r["p"]), "p_holm": holm.get(name),
                     "holm_rows": n_explore if name in holm else None})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def ablation_json(summary: pd.DataFrame, target: str = "two_stage", metric: str = "ndcg@10",
                  n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """``analysis/ablations.json``: the rows of `ablation_summary` and how they were computed."""
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in summary.to_dict("records")]
    return {"target": target, "metric": metric, "period": "test", "test": "paired bootstrap over users",
            "difference": f"{target} - ablation", "n_bootstrap": int(n_bootstrap), "seed": int(seed),
            "chosen_on": "nothing: no choice or tuning reads them; exploratory comparisons (docs/PROTOCOL.md)",
            "rows": rows}


def _summary(summary: pd.DataFrame | dict) -> pd.DataFrame:
    if isinstance(summary, dict):
        return pd.DataFrame(summary.get("rows") or [], columns=list(COLUMNS))
    return summary


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def ablation_frame(summary: pd.DataFrame | dict, n_resamples: int | None = None) -> pd.DataFrame:
    """The table for the reader (from `ablation_summary` or ``analysis/ablations.json``): each
    ablation, what it leaves out, its test nDCG@10 [95% CI], what that stage adds (the full system
    minus the ablation, paired 95% CI), its bootstrap p-value and the Holm-adjusted one of its
    exploratory row (a Holm-adjusted 0 is bounded by the family's size times the raw p's resolution,
    as in `tables.paired_frame`), and whether the interval separates them. The full system's own
    score, the same on every row, belongs in the caption (`ablation_caption`)."""
    frame = _summary(summary)
    target = frame["target"].iloc[0] if len(frame) else "two_stage"
    adds = f"what it adds: {target} − ablation [95% CI]"
    rows = []
    for _, r in frame.iterrows():
        m = None if _missing(r.get("holm_rows")) else int(r["holm_rows"])
        holm = DASH if _missing(r.get("p_holm")) else fmt_p(r["p_holm"], n_resamples / m if n_resamples and m else None)
        rows.append({"ablation": r["model"], "without": r["without"],
                     "test nDCG@10 [95% CI]": fmt_ci(r["score"], r["lo"], r["hi"]),
                     adds: fmt_ci(r["diff"], r["diff lo"], r["diff hi"], signed=True),
                     "p": fmt_p(r["p"], n_resamples), "p (Holm)": holm,
                     "separates": ("yes, the stage helps" if r["diff lo"] > 0 else "yes, the stage hurts"
                                   if r["diff hi"] < 0 else "no")})
    return pd.DataFrame(rows, columns=["ablation", "without", "test nDCG@10 [95% CI]", adds, "p", "p (Holm)",
                                       "separates"])


def ablation_caption(summary: pd.DataFrame | dict, n_bootstrap: int, users: int | None = None) -> str:
    """The caption of `ablation_frame`: what an ablation is, the full system's score, how the CIs and
    p-values were computed, and that nothing was chosen on them."""
    frame = _summary(summary)
    if not len(frame):
        return "This run has no ablation of the two-stage system (35_ablations)."
    target, score = frame["target"].iloc[0], frame["target score"].iloc[0]
    on = f" of the same {fmt_count(users)} test users" if users else " of the same test users"
    return (f"What each stage adds: the two-stage system ({target}, test nDCG@10 {fmt_metric(score)}) with one stage "
            "taken out, built and scored under the same rules (35_ablations) and chosen by nothing. Without the "
            "two-tower: the other sources' candidates and no two-tower feature, re-ranked by the same re-ranker "
            "configuration cross-fitted again; without the re-ranker: the same candidates ordered by the blend's "
            f"score. The difference is {target} minus the ablation, with a 95% CI from {n_bootstrap:,} paired "
            f"resamples{on}; above zero, the stage taken out adds to the system. p: two-sided paired bootstrap "
            "p-value; p (Holm): adjusted over the exploratory comparisons of the paired table, where the protocol "
            "puts ablations (never the primary or the secondary comparison).")


def mark(frame: pd.DataFrame, names: Iterable[str], column: str = "model") -> pd.DataFrame:
    """``frame`` (a table with a model per row, e.g. `tables.results_frame`) with each ablation's name
    in ``column`` followed by `MARK`, so a reader of the table of every model tells them apart."""
    names = set(names)
    out = frame.copy()
    if column in out and names:
        out[column] = [f"{v}{MARK}" if v in names else v for v in out[column]]
    return out
