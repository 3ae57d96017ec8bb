"""Rendering: executed notebooks -> HTML that opens offline, and the run's metrics.json.

`render_notebook` uses nbconvert's HTMLExporter with our `offline` template (the lab template
without require.js, MathJax or mermaid from a CDN). The reader's report (`index.html`) is the
executed 90_report notebook rendered without code; each notebook also gets its own page with code.
"""
from __future__ import annotations

import os
from pathlib import Path

import nbformat

from . import config
from .experiment import collect_metrics

TEMPLATES = Path(__file__).with_name("templates")


def render_notebook(ipynb: str | os.PathLike, html: str | os.PathLike, include_code: bool = True) -> Path:
    """Render one executed notebook to a standalone HTML page (atomic write)."""
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    exporter = HTMLExporter(template_name="offline", extra_template_basedirs=[str(TEMPLATES)])
    if not include_code:      # the reader's report: no set-up output (versions, paths)
        exporter.register_preprocessor(TagRemovePreprocessor(remove_cell_tags={"setup", "parameters",
                                                                               "injected-parameters"}), enabled=True)
    exporter.exclude_input = not include_code
    exporter.exclude_input_prompt = not include_code
    exporter.exclude_output_prompt = True
    nb = nbformat.read(str(ipynb), as_version=4)
    nb.metadata.pop("widgets", None)
    body, _ = exporter.from_notebook_node(nb)
    html = Path(html)
    html.parent.mkdir(parents=True, exist_ok=True)
    with config.atomic_write(html) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return html


def notebook_links(report_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """(title, relative href) of each rendered notebook page, in pipeline order."""
    pages = sorted(Path(report_dir, "notebooks").glob("*.html"))
    return [(p.stem, f"notebooks/{p.name}") for p in pages]


def write_metrics_json(run_dir: str | os.PathLike, out: str | os.PathLike, extra: dict | None = None) -> Path:
    """reports/<dataset>/metrics.json: every model's validation and test metrics, with the run's
    parameters, dataset checksums, package versions and git commit."""
    import json
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    payload = {
        "dataset": info.get("dataset"),
        "profile": info.get("profile"),
        "params": info.get("params"),
        "split": info.get("split"),
        "dataset_checksums": info.get("checksums"),
        "git_commit": config.git_commit(),
        "packages": config.package_versions(),
        "models": {m["model"]: m for m in collect_metrics(run_dir)},
        **(extra or {}),
    }
    return config.write_json(out, payload)


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


def readme_table(metrics_json: str | os.PathLike, period: str = "test") -> str:
    """A Markdown table of every model's ``period`` metrics from a report's metrics.json
    (``python -c "from recsys_lib.report import readme_table; print(readme_table('reports/X/metrics.json'))"``)."""
    import json
    m = json.loads(Path(metrics_json).read_text())
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
                     f"{s['mrr@10']:.4f} | {s['coverage@10']:.4f} | {fit:.0f} |" if fit is not None else "")
    return "\n".join(lines)


def tuning_table(run_dir: str | os.PathLike) -> "pd.DataFrame":
    """How each model was tuned: what was searched, what was chosen, its validation nDCG@10 and
    whether a chosen value still sits at the edge of what was searched (or at the epoch cap).
    Grid-searched models carry a ``tuning`` summary (recsys_lib.tuning.summarize); the retriever
    and the re-ranker compare named variants, listed as such."""
    import pandas as pd
    rows = []
    for m in collect_metrics(run_dir):
        t, search = m.get("tuning"), m.get("search") or []
        valid = (m.get("valid") or {}).get("ndcg@10")
        if t and t.get("axes"):
            searched = "; ".join(f"{k} ∈ {{{', '.join(_fmt(v) for v in a['tried'])}}}" for k, a in t["axes"].items())
            chosen = ", ".join(f"{k}={_fmt(a['chosen'])}" for k, a in t["axes"].items())
            edges = list(t.get("at_edge", []))
            if t.get("epoch_cap"):
                edges.append(f"epochs (best = cap {t['max_epochs']})")
            edges += [f"{a} not searched" for a in t.get("fixed", [])]
            rows.append({"model": m["model"], "searched": searched, "configs": t["configs"],
                         "edge steps": t.get("edge_steps", 0), "chosen": chosen,
                         "valid nDCG@10": valid, "at edge": ", ".join(edges) or "no"})
        elif search and any("variant" in r or "name" in r for r in search):
            key = "name" if "name" in search[0] else "variant"
            chosen = [r[key] for r in search if r.get("chosen") or r.get("best")]
            rows.append({"model": m["model"], "searched": "variants: " + ", ".join(str(r[key]) for r in search),
                         "configs": len(search), "edge steps": 0, "chosen": ", ".join(map(str, chosen)),
                         "valid nDCG@10": valid, "at edge": "n/a (named variants)"})
    return pd.DataFrame(rows)


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
