"""The report's tables, as reader-facing text: every number formatted one way (4 decimals, CIs as
``0.0957 [0.0823, 0.1100]``, seconds to 0.1, thousands separators, a dash when missing), every
table read from the run folder's files. No number is typed in."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .. import config
from ..models.tuning import held_text
from ..run.experiment import collect_metrics

if TYPE_CHECKING:                   # annotations only: pandas is imported where the tables are built
    import pandas as pd


DASH = "–"

METRIC_LABELS = {"ndcg@10": "nDCG@10", "recall@10": "Recall@10", "recall@50": "Recall@50",
                 "recall@100": "Recall@100", "recall@200": "Recall@200", "recall@500": "Recall@500",
                 "recall@1000": "Recall@1000", "hit_rate@10": "HitRate@10", "mrr@10": "MRR@10",
                 "coverage@10": "coverage@10"}

RESULT_METRICS = ("recall@10", "recall@100", "recall@500", "hit_rate@10", "mrr@10", "coverage@10")

def metric_label(key: str) -> str:
    """``ndcg@10`` -> ``nDCG@10`` (unknown keys unchanged)."""
    return METRIC_LABELS.get(key, key)

def _missing(x) -> bool:
    import math
    return x is None or (isinstance(x, float) and math.isnan(x))

def fmt_metric(x, digits: int = 4, signed: bool = False) -> str:
    """A metric with ``digits`` decimals (3-4 significant digits for values in [0.01, 1)):
    ``0.0957``; ``signed`` adds + to positive values (differences); a missing value is a dash."""
    if _missing(x):
        return DASH
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"

def fmt_ci(x, lo, hi, digits: int = 4, signed: bool = False) -> str:
    """A value with its 95% CI: ``0.0957 [0.0823, 0.1100]`` (``+0.0307 [+0.0198, +0.0434]`` signed)."""
    if _missing(x):
        return DASH
    if _missing(lo) or _missing(hi):
        return fmt_metric(x, digits, signed)
    f = lambda v: fmt_metric(v, digits, signed)        # noqa: E731
    return f"{f(x)} [{f(lo)}, {f(hi)}]"

def fmt_seconds(s) -> str:
    """Seconds to 0.1 s with thousands separators (``59.1``, ``1,234.5``); ``<0.1`` for a time
    that rounds to zero but is not zero; a dash when missing."""
    if _missing(s):
        return DASH
    if 0 < abs(s) < 0.05:
        return "<0.1"
    return f"{s:,.1f}"

def fmt_count(n) -> str:
    """An integer with thousands separators."""
    return DASH if _missing(n) else f"{int(n):,}"

def fmt_p(p, n_resamples: int | None = None) -> str:
    """A bootstrap p-value to 3 decimals; 0 from ``n_resamples`` resamples is ``<2/n`` (``<0.002``
    for 1,000), the resolution of a two-sided bootstrap p, never a bare 0."""
    if _missing(p):
        return DASH
    if p == 0:
        return f"<{2 / n_resamples:.2g}" if n_resamples else "<0.001"
    return f"{p:.3f}"

def fmt_percent(x, digits: int = 0, signed: bool = False) -> str:
    return DASH if _missing(x) else (f"{100 * x:+.{digits}f}%" if signed else f"{100 * x:.{digits}f}%")

def _fmt(value) -> str:
    """A searched value: ``0.000333`` (3 significant digits below 1), ``1000``, ``True``."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:g}"
    return str(value)

def tidy(frame: "pd.DataFrame", seconds: tuple[str, ...] = ()) -> "pd.DataFrame":
    """Every cell of ``frame`` as reader-facing text: integers with thousands separators, other
    numbers with 4 decimals, columns named in ``seconds`` (or ending in ``seconds`` or `` s``) to
    0.1 s, missing values as a dash. Text columns are kept."""
    import numbers

    import pandas as pd

    def cell(v, col):
        if isinstance(v, (list, tuple)):
            return ", ".join(cell(x, col) for x in v)
        if _missing(v) or v is pd.NA:
            return DASH
        if isinstance(v, bool):
            return "yes" if v else "no"
        if col in seconds or col.endswith("seconds") or col.endswith(" s"):
            return fmt_seconds(float(v)) if isinstance(v, numbers.Number) else str(v)
        if isinstance(v, numbers.Integral):
            return fmt_count(v)
        if isinstance(v, numbers.Real):
            return fmt_count(v) if float(v).is_integer() and abs(v) >= 100 else fmt_metric(float(v))
        return str(v)

    return pd.DataFrame({c: [cell(v, str(c)) for v in frame[c]] for c in frame.columns})

def table_html(frame: "pd.DataFrame", table_id: str | None = None, strong: tuple[str, ...] = ()) -> str:
    """A plain HTML table of ``frame``'s text, without an index column; columns of numbers (and
    intervals) right aligned (class ``rs-num``), text left aligned; rows whose first cell is in
    ``strong`` are bold."""
    import re
    from html import escape
    numeric = re.compile(r"^[\s\d.,+\-−<>\[\]%–]*$")
    num = [i > 0 and all(numeric.match(str(v)) for v in frame.iloc[:, i]) for i in range(frame.shape[1])]
    cls = [' class="rs-num"' if n else "" for n in num]
    head = "".join(f"<th{cls[i]}>{escape(str(c), quote=False)}</th>" for i, c in enumerate(frame.columns))
    body = []
    for row in frame.itertuples(index=False):
        bold = ' class="rs-strong"' if str(row[0]) in strong else ""
        body.append(f"<tr{bold}>" + "".join(f"<td{cls[i]}>{escape(str(v), quote=False)}</td>" for i, v in enumerate(row))
                    + "</tr>")
    tid = f' id="{escape(table_id)}"' if table_id else ""
    return (f'<table class="rs-table"{tid}><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')

def dataset_summary(ds) -> dict:
    """Sizes and date range of a loaded MovieLens (recsys_lib.data.MovieLens): JSON-ready."""
    import pandas as pd
    inter = ds.interactions
    ts = pd.to_datetime(inter["timestamp"], unit="s")
    return {"dataset": ds.name, "ratings": int(len(inter)), "users": int(inter["user_id"].nunique()),
            "movies": int(len(ds.items)), "rated movies": int(inter["item_id"].nunique()),
            "tags": int(len(ds.tags)), "rating rows dropped (unknown movie)": int(getattr(ds, "dropped_rows", 0)),
            "first rating": str(ts.min().date()) if len(ts) else None,
            "last rating": str(ts.max().date()) if len(ts) else None,
            "share rating >= 4": float((inter["rating"] >= 4).mean()) if len(inter) else 0.0,
            "checksums": dict(ds.checksums)}

def split_table(stats: dict) -> "pd.DataFrame":
    """The per-period rows of a split's statistics as a table."""
    import pandas as pd
    keys = ["rows", "users", "items", "positives", "users_scored", "first_date", "last_date"]
    return pd.DataFrame({p: {k: stats[p].get(k) for k in keys} for p in ("train", "valid", "test")}).T

def dataset_frame(summary: dict) -> "pd.DataFrame":
    """dataset.json (written by 00_data) as one row of text, checksums left for the footer."""
    import pandas as pd
    return tidy(pd.DataFrame([{k: v for k, v in summary.items() if k not in ("checksums", "dataset")}]))

def split_frame(stats: dict) -> "pd.DataFrame":
    """The split's per-period statistics as text, the period a column (no index)."""
    t = split_table(stats).rename(columns=lambda c: str(c).replace("_", " "))
    return tidy(t.rename_axis("period").reset_index())

def results_frame(run_dir: str | os.PathLike, period: str = "test",
                  metrics: tuple[str, ...] = RESULT_METRICS) -> "pd.DataFrame":
    """The results table as text, one row per model scored on ``period``, sorted by nDCG@10 (best
    first): nDCG@10 with its 95% CI (``0.0957 [0.0823, 0.1100]``), the other metrics to 4 decimals,
    fit and scoring seconds to 0.1. No index column; the number of users goes in the caption."""
    import pandas as pd
    recs = [m for m in collect_metrics(run_dir) if m.get(period)]
    recs.sort(key=lambda m: -(m[period].get("ndcg@10") if not _missing(m[period].get("ndcg@10")) else -1.0))
    present = [k for k in metrics if any(k in m[period] for m in recs)]
    rows = []
    for m in recs:
        s = m[period]
        lo, hi = (s.get("ndcg@10_ci") or [None, None])[:2]
        rows.append({"model": m["model"], "nDCG@10 [95% CI]": fmt_ci(s.get("ndcg@10"), lo, hi),
                     **{metric_label(k): fmt_metric(s.get(k)) for k in present},
                     "fit s": fmt_seconds(m.get("fit_seconds")),
                     "scoring s / 1k users": fmt_seconds(s.get("scoring_seconds_per_1000_users"))})
    columns = ["model", "nDCG@10 [95% CI]", *[metric_label(k) for k in present], "fit s", "scoring s / 1k users"]
    return pd.DataFrame(rows, columns=columns)

def ci_frame(run_dir: str | os.PathLike, period: str = "test", metric: str = "ndcg@10") -> "pd.DataFrame":
    """model, metric, lo, hi (95% bootstrap CI) of every model scored on ``period`` (numbers, for a plot)."""
    import pandas as pd
    rows = []
    for m in collect_metrics(run_dir):
        s = m.get(period)
        if s and metric in s:
            lo, hi = s.get(f"{metric}_ci", [float("nan"), float("nan")])
            rows.append({"model": m["model"], metric: s[metric], "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=["model", metric, "lo", "hi"])


def readme_table(metrics_json: str | os.PathLike | dict, period: str = "test") -> str:
    """A Markdown table of every model's ``period`` metrics from a report's metrics.json (a path or
    the loaded dict), in pipeline order. ``scripts/readme_results.py`` writes it into the README."""
    import json
    m = metrics_json if isinstance(metrics_json, dict) else json.loads(Path(metrics_json).read_text())
    lines = ["| model | nDCG@10 [95% CI] | Recall@10 | Recall@100 | Recall@500 | HitRate@10 | MRR@10 | coverage@10 | fit s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rec in m["models"].items():
        s = rec.get(period)
        if not s:
            continue
        lo, hi = s["ndcg@10_ci"]
        fit = rec.get("fit_seconds")
        lines.append(f"| {name} | {s['ndcg@10']:.4f} [{lo:.4f}, {hi:.4f}] | {s['recall@10']:.4f} | "
                     f"{s['recall@100']:.4f} | {s['recall@500']:.4f} | {s['hit_rate@10']:.4f} | "
                     f"{s['mrr@10']:.4f} | {s['coverage@10']:.4f} | {'' if fit is None else f'{fit:.0f}'} |")
    return "\n".join(lines)

def scored_users(run_dir: str | os.PathLike, period: str = "test") -> int | None:
    """The number of users every model was scored on in ``period`` (None if they differ)."""
    users = {m[period].get("users") for m in collect_metrics(run_dir) if m.get(period)}
    return users.pop() if len(users) == 1 else None

def paired_frame(paired: dict, n_resamples: int | None = None) -> "pd.DataFrame":
    """``analysis/paired.json`` as a table for the reader, in the forest plot's order (the primary
    comparison, the secondary, then the exploratory rows, closest rival first): each model, the
    comparison's role, its test nDCG@10, the two-stage system's paired difference against it with
    its 95% CI, the bootstrap p-value, the Holm-adjusted p-value (exploratory rows only: the named
    comparisons are judged on their own CIs) and whether the interval separates them. The two-stage
    system's own score, the same on every row, belongs in the caption, not in a column."""
    import pandas as pd

    from .analysis import forest_data
    target = paired["target"]
    frame = forest_data(paired)
    m = int((frame["role"] == "exploratory").sum())
    rows = []
    for _, r in frame.iterrows():
        holm = r["p_holm"]
        # a Holm-adjusted 0 is bounded by m times the raw p's resolution (2 / resamples)
        holm_text = (DASH if r["role"] != "exploratory" else
                     fmt_p(holm, n_resamples / m if n_resamples and m else None))
        rows.append({"model": r["model"], "comparison": r["role"], "model nDCG@10": fmt_metric(r["model score"]),
                     f"{target} − model [95% CI]": fmt_ci(r["diff"], r["lo"], r["hi"], signed=True),
                     "p": fmt_p(r["p"], n_resamples), "p (Holm)": holm_text,
                     "separates": "yes, above 0" if r["lo"] > 0 else "yes, below 0" if r["hi"] < 0 else "no"})
    return pd.DataFrame(rows, columns=["model", "comparison", "model nDCG@10", f"{target} − model [95% CI]", "p",
                                       "p (Holm)", "separates"])

def tuning_table(run_dir: str | os.PathLike) -> "pd.DataFrame":
    """How each model was tuned: what was searched, what was chosen, its validation nDCG@10,
    whether a chosen value still sits at the edge of what was searched (or at the epoch cap), and
    ``not searched``: every hyper-parameter held at one value (``blocks=2, heads=1``: a one-value
    grid axis or a config value outside the search; ``recsys_lib.models.tuning.held``).
    Grid-searched models carry a ``tuning`` summary (recsys_lib.models.tuning.summarize); the retriever
    and the re-ranker compare named variants, listed as such."""
    import pandas as pd
    rows = []
    for m in collect_metrics(run_dir):
        t, search = m.get("tuning") or {}, m.get("search") or []
        valid = (m.get("valid") or {}).get("ndcg@10")
        if t.get("axes"):
            searched = "; ".join(f"{k} ∈ {{{', '.join(_fmt(v) for v in a['tried'])}}}" for k, a in t["axes"].items())
            chosen = ", ".join(f"{k}={_fmt(a['chosen'])}" for k, a in t["axes"].items())
            edges = list(t.get("at_edge", []))
            if t.get("epoch_cap"):
                edges.append(f"epochs (best = cap {t['max_epochs']})")
            rows.append({"model": m["model"], "searched": searched, "configs": t["configs"],
                         "edge steps": t.get("edge_steps", 0), "chosen": chosen,
                         "valid nDCG@10": valid, "at edge": ", ".join(edges) or "no",
                         "not searched": _not_searched(t)})
        elif search and any("variant" in r or "name" in r for r in search):
            key = "name" if "name" in search[0] else "variant"
            chosen = [r[key] for r in search if r.get("chosen") or r.get("best")]
            rows.append({"model": m["model"], "searched": "variants: " + ", ".join(str(r[key]) for r in search),
                         "configs": len(search), "edge steps": 0, "chosen": ", ".join(map(str, chosen)),
                         "valid nDCG@10": valid, "at edge": "n/a (named variants)",
                         "not searched": _not_searched(t)})
    return pd.DataFrame(rows)

def _not_searched(t: dict) -> str:
    """A tuning summary's held values, compact (``blocks=2, heads=1``); ``none`` when every
    hyper-parameter was searched; for a record written before ``held`` existed, its one-value
    axes (``fixed``), else a dash (not recorded)."""
    if "held" in t:
        return held_text(t["held"]) or "none"
    fixed = {a: t["axes"][a]["chosen"] for a in t.get("fixed", []) if a in t.get("axes", {})}
    return held_text(fixed) if fixed else DASH

def learning_curve_data(run_dir: str | os.PathLike) -> dict[str, dict]:
    """Each trained model's validation metric by epoch (``curves/<name>.json``) with the epoch
    it kept and the metric's name (from its search table: ``selected_on``, else nDCG@10)."""
    import json
    out = {}
    records = {m["model"]: m for m in collect_metrics(run_dir)}
    order = {name: i for i, name in enumerate(records)}
    files = sorted(Path(run_dir, "curves").glob("*.json"), key=lambda f: (order.get(f.stem, len(order)), f.stem))
    for f in files:
        c = json.loads(f.read_text())
        recs = [r for r in c.get("records", []) if not _missing(r.get("valid_metric"))]
        if not recs:
            continue
        search = (records.get(f.stem) or {}).get("search") or []
        chosen = next((r for r in search if r.get("best") or r.get("chosen")), {})
        out[f.stem] = {"epoch": [int(r["epoch"]) for r in recs], "valid": [float(r["valid_metric"]) for r in recs],
                       "best_epoch": c.get("best_epoch"), "metric": metric_label(chosen.get("selected_on") or "ndcg@10")}
    return out

def search_points(run_dir: str | os.PathLike) -> "pd.DataFrame":
    """Every configuration each nDCG@10 search tried: model, validation nDCG@10, kept or not. The
    grid-searched baselines' configurations and the re-ranker's variants (out-of-fold); the
    retriever, chosen on Recall@K, is left out (another metric)."""
    import pandas as pd
    rows = []
    for m in collect_metrics(run_dir):
        search = m.get("search") or []
        if (m.get("tuning") or {}).get("axes"):
            rows += [{"model": m["model"], "valid": r["valid_metric"], "chosen": bool(r.get("best"))}
                     for r in search if not _missing(r.get("valid_metric"))]
        elif m["model"] == "two_stage" and search and "out_of_fold_ndcg" in search[0]:
            rows += [{"model": "re-ranker variants", "valid": r["out_of_fold_ndcg"], "chosen": bool(r.get("chosen"))}
                     for r in search if not _missing(r.get("out_of_fold_ndcg"))]
    return pd.DataFrame(rows, columns=["model", "valid", "chosen"])

def timing_frame(run_dir: str | os.PathLike, period: str = "test") -> "pd.DataFrame":
    """Per model: seconds to fit (its whole search included) and to score ``period``."""
    import pandas as pd
    rows = [{"model": m["model"], "fit s": m.get("fit_seconds"), "scoring s": (m.get(period) or {}).get("seconds")}
            for m in collect_metrics(run_dir)]
    return pd.DataFrame(rows, columns=["model", "fit s", "scoring s"])

def stage_seconds(run_dir: str | os.PathLike, report_dir: str | os.PathLike | None = None,
                  exclude: tuple[str, ...] = ()) -> "pd.DataFrame":
    """Wall seconds of each notebook of this run, in pipeline order, ``exclude`` left out: from the
    run's completion records (``state/<notebook>.json``, written by the pipeline); for a run made
    before those records, papermill's ``duration`` in the executed copies (``<run>/notebooks``,
    else ``report_dir/notebooks``) made for this run folder. Empty when the notebooks were not
    run by the pipeline."""
    import json

    import pandas as pd

    from ..run import state as runstate
    from ..run.layout import notebooks
    run_dir = Path(run_dir).resolve()
    done = runstate.run_summary(notebooks(), run_dir)["notebooks"]
    rows = [{"stage": k, "seconds": float(v["seconds"])} for k, v in done.items() if k not in exclude]
    folders = [run_dir / "notebooks"] + ([Path(report_dir) / "notebooks"] if report_dir else [])
    for folder in folders if not rows else []:
        for ipynb in sorted(folder.glob("*.ipynb")):
            if ipynb.stem in exclude:
                continue
            try:
                meta = json.loads(ipynb.read_text(encoding="utf-8")).get("metadata", {}).get("papermill", {})
            except (OSError, ValueError):
                continue
            params, duration = meta.get("parameters") or {}, meta.get("duration")
            if duration is None or meta.get("exception"):
                continue
            ran_in = params.get("RUN_DIR") or (config.runs_dir(params.get("DATASET", "")) / params.get("PROFILE", ""))
            if Path(ran_in).resolve() == run_dir:
                rows.append({"stage": ipynb.stem, "seconds": float(duration)})
        if rows:
            break
    return pd.DataFrame(rows, columns=["stage", "seconds"])
