"""The report's words and HTML around the numbers: the abstract and the headline (one verdict
phrase for both; each leads with the primary comparison named in docs/PROTOCOL.md, the two-stage
system against the blend, then the secondary, then a word on the exploratory rest), the provenance
footer, captioned tables and figures. Every sentence is computed from the run folder's files."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .. import config
from ..run.experiment import collect_metrics, read_json
from .analysis import comparison, comparisons
from .audit import audit_sentence
from .tables import DASH, fmt_ci, fmt_count, fmt_metric, fmt_percent, table_html

if TYPE_CHECKING:
    import pandas as pd

#: packages named in the provenance footer (the kernel that rendered the report)
PROVENANCE_PACKAGES = ("torch", "numpy", "pandas", "scipy", "lightgbm", "implicit", "pyarrow", "matplotlib",
                       "seaborn", "papermill", "nbconvert")

def figure_png(fig, dpi: int = 100) -> str:
    """A matplotlib figure as a base64 PNG data URI (closed afterwards, so Jupyter does not show
    it a second time)."""
    import base64
    import io

    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

class Captions:
    """Numbers the report's tables and figures and puts a caption under each. Each call returns an
    IPython HTML object: a ``<figure>`` holding the table or the embedded PNG, then its
    ``<figcaption>`` ("Table 2. ..."). Ids make them easy to find (and test)."""

    def __init__(self) -> None:
        self.tables = 0
        self.figures = 0

    def table(self, frame: "pd.DataFrame", caption: str, table_id: str, strong: tuple[str, ...] = ()):
        from html import escape

        from IPython.display import HTML
        self.tables += 1
        return HTML(f'<figure class="rs-figure rs-table-figure" id="{escape(table_id)}-figure">'
                    f'{table_html(frame, table_id, strong)}<figcaption><b>Table {self.tables}.</b> '
                    f'{escape(caption, quote=False)}</figcaption></figure>')

    def figure(self, fig, caption: str, figure_id: str, dpi: int = 100):
        from html import escape

        from IPython.display import HTML
        self.figures += 1
        uri = figure_png(fig, dpi)
        return HTML(f'<figure class="rs-figure" id="{escape(figure_id)}"><img src="{uri}" '
                    f'alt="{escape(caption, quote=True)}"><figcaption><b>Figure {self.figures}.</b> '
                    f'{escape(caption, quote=False)}</figcaption></figure>')

def _split_params(info: dict) -> dict:
    from ..protocol.split import STRATEGY_PARAMS
    split = info.get("split") or {}
    strategy = (split.get("stats") or {}).get("strategy") or (info.get("params") or {}).get("split", {}).get("strategy")
    given = (info.get("params") or {}).get("split", {})
    return {"strategy": strategy, **STRATEGY_PARAMS.get(strategy, {}),
            **{k: v for k, v in given.items() if k in STRATEGY_PARAMS.get(strategy, {})}}

def _data_sentence(ds: dict, info: dict) -> str:
    from ..protocol.splitdata import POSITIVE_RATING
    name = ds.get("dataset") or info.get("dataset", "?")
    if not ds:
        return f"The data set is {name}; its summary (dataset.json) is missing: run 00_data."
    return (f"The data: {name}, {fmt_count(ds['ratings'])} ratings by {fmt_count(ds['users'])} users of "
            f"{fmt_count(ds['movies'])} movies from {ds.get('first rating')} to {ds.get('last rating')}; a rating "
            f"of {POSITIVE_RATING:g} or more is a positive ({fmt_percent(ds.get('share rating >= 4'))} of them).")

def _split_sentence(info: dict) -> str:
    p = _split_params(info)
    stats = (info.get("split") or {}).get("stats") or {}
    test, train = stats.get("test", {}), stats.get("train", {})
    if p["strategy"] == "user_temporal":
        how = (f"each user's ratings in time order, the last {fmt_percent(p['test_frac'])} for test and the "
               f"{fmt_percent(p['valid_frac'])} before them for validation (users and movies with at least "
               f"{p['core']} ratings)")
    elif p["strategy"] == "global_temporal":
        start = f" from {p['min_date']} on" if p.get("min_date") else ""
        how = (f"all ratings{start} in time order, the first {fmt_percent(p['train_frac'])} for training, the next "
               f"{fmt_percent(p['valid_frac'])} for validation and the rest for test (at least {p['train_core']} "
               f"train ratings per user and movie, {p['eval_core']} per scored user and period)")
    else:
        how = f"strategy {p['strategy']}"
    return (f"Split ({p['strategy']}): {how}; every model is tuned on validation and scored once on the "
            f"test period's {fmt_count(test.get('users_scored'))} users with a positive, each ranking the full "
            f"catalogue of {fmt_count(train.get('items'))} movies minus what they rated.")

def _two_stage_words(info: dict, records: dict) -> str:
    params = info.get("params") or {}
    tt = params.get("two_tower") or {}
    sources = list(tt.get("candidate_sources") or [])
    chosen = ((records.get("two_stage") or {}).get("params") or {}).get("reranker")
    k = tt.get("candidate_k")
    cands = f"a two-tower retriever's top {k} candidates" if k else "a two-tower retriever's candidates"
    if sources:
        cands += f" joined with {' and '.join(sources)}'s"
    if not chosen:
        return cands
    stale = (params.get("reranker") or {}).get("stale_lists")
    trained = (f" trained on validation lists from stage-1 models refit before the last {fmt_percent(stale)} of "
               "train, as stale as the test lists" if stale else "")
    return f"{cands}, re-ranked by {chosen}{trained}"

#: the blend, as the abstract and the headline name it
BLEND_WORDS = "the blend of the single-stage models (17_blend; weights chosen on validation)"
NO_BLEND = ("This run has no blend of the single-stage models (no 17_blend test scores), so the primary comparison "
            "named in advance (the two-stage system against the blend) cannot be made; the secondary comparison "
            "stands in its place.")


def _paired_numbers(row: dict, target: str) -> tuple[float, float, float]:
    return row[f"{target} - other"], row["95% CI lo"], row["95% CI hi"]


def exploratory_sentence(paired: dict) -> str:
    """One sentence on every comparison but the primary and the secondary: how many, that they
    are exploratory, and how many Holm-adjusted p-values fall below 0.05. Empty when there are none."""
    rows = [r for r in comparisons(paired) if r["role"] == "exploratory"]
    if not rows:
        return ""
    below = sum(1 for r in rows if r.get("p_holm") is not None and r["p_holm"] < 0.05)
    n = len(rows)
    if n == 1:
        return (f"The one other comparison ({rows[0]['against']}) is exploratory, not a finding: its p-value "
                f"{'falls' if below else 'does not fall'} below 0.05.")
    count = "none falls" if below == 0 else f"{below} falls" if below == 1 else f"{below} fall"
    return (f"The other {n} comparisons (every other model and re-ranker variant) are exploratory, not findings: "
            f"their p-values are Holm-adjusted over those {n}, and {count} below 0.05.")


def abstract(run_dir: str | os.PathLike) -> str:
    """The report's opening, as HTML: data, split, then the comparisons named in advance
    (docs/PROTOCOL.md "Comparisons, named in advance"): first the primary, the two-stage system
    against the blend of the single-stage models (scores with their 95% CIs, the paired difference
    with its 95% CI and its verdict), then the secondary, the strongest single-stage model chosen on
    validation, then one sentence on the exploratory rest, and the leakage audit's lesson; every
    number read from the run folder."""
    from html import escape

    info = read_json(run_dir, "run.json") or {}
    ds = read_json(run_dir, "dataset.json") or {}
    paired = read_json(run_dir, "analysis", "paired.json")
    audit = read_json(run_dir, "analysis", "audit.json")
    records = {m["model"]: m for m in collect_metrics(run_dir)}
    sentences = [_data_sentence(ds, info), _split_sentence(info)]
    if not paired or not paired.get("rows"):
        sentences.append("The models have not been compared yet: run 40_evaluation.")
    else:
        sentences += _comparison_sentences(paired, info, records)
    sentences.append(audit_sentence(audit, records))
    return (f'<section id="abstract" class="rs-abstract"><p><b>Abstract.</b> '
            f'{escape(" ".join(s for s in sentences if s), quote=False)}</p></section>')


def _test_score(records: dict, name: str, fallback: float | None = None) -> str:
    """``name``'s test nDCG@10 with its 95% CI from its metrics record (``fallback``, the paired
    table's mean, where the record is missing)."""
    t = (records.get(name) or {}).get("test") or {}
    if t.get("ndcg@10") is None:
        return fmt_metric(fallback)
    return fmt_ci(t.get("ndcg@10"), *(t.get("ndcg@10_ci") or [None, None]))


def _comparison_sentences(paired: dict, info: dict, records: dict) -> list[str]:
    """The abstract's results: the two-stage system's test score, the primary comparison (or a plain
    note that the run has no blend), the secondary and the exploratory rest."""
    target = paired["target"]
    out = [f"The two-stage system ({_two_stage_words(info, records)}) scores test nDCG@10 "
           f"{_test_score(records, target, paired['rows'][0].get('target'))}."]
    primary = comparison(paired, "primary")
    if primary is None:
        out.append(NO_BLEND)
    else:
        diff, lo, hi = _paired_numbers(primary, target)
        rel = f" ({fmt_percent(diff / primary['other'], signed=True)})" if primary.get("other") else ""
        out.append(f"The primary comparison, named in advance, is against {BLEND_WORDS}, the like-for-like "
                   f"rival of a re-ranker that takes every single-stage score as a feature; the blend scores "
                   f"{_test_score(records, primary['against'], primary['other'])}, and the paired difference is "
                   f"{fmt_ci(diff, lo, hi, signed=True)}{rel}, so the two-stage system {verdict(lo, hi)}.")
    best = paired.get("strongest_single_stage")
    secondary = comparison(paired, "secondary")
    if not best:
        out.append("No single-stage model has a validation score, so there is no secondary comparison.")
    elif secondary is None:
        out.append(f"Secondary: the strongest single-stage model on validation is {best['model']} (validation "
                   f"nDCG@10 {fmt_metric(best['valid_ndcg@10'])}); it has no test scores.")
    else:
        diff, lo, hi = _paired_numbers(secondary, target)
        rel = f" ({fmt_percent(diff / secondary['other'], signed=True)})" if secondary.get("other") else ""
        score = _test_score(records, best["model"], secondary["other"])
        out.append(f"Secondary: the strongest single-stage model on validation is {best['model']} (validation "
                   f"nDCG@10 {fmt_metric(best['valid_ndcg@10'])}), which scores {score} "
                   f"on test; the paired difference is {fmt_ci(diff, lo, hi, signed=True)}{rel}, so the two-stage "
                   f"system {verdict(lo, hi)}.")
    out.append(exploratory_sentence(paired))
    return out


def comparisons_caption(paired: dict) -> str:
    """What the forest plot's and the paired table's rows are, in order: the primary comparison on
    top (or a note that this run has no blend), the secondary next, the exploratory rest below."""
    primary, secondary = comparison(paired, "primary"), comparison(paired, "secondary")
    parts = []
    if primary is not None:
        parts.append(f"the top row is the primary comparison, named in advance: {BLEND_WORDS}")
    else:
        parts.append("this run has no blend of the single-stage models (17_blend), so the primary comparison "
                     "named in advance is missing")
    if secondary is not None:
        parts.append(f"{'the next' if primary is not None else 'the top'} row is the secondary: "
                     f"{secondary['against']}, the strongest single-stage model on validation")
    n = sum(1 for r in comparisons(paired) if r["role"] == "exploratory")
    if n:
        parts.append(f"the other {n} {'row is' if n == 1 else 'rows are'} exploratory (closest rival first; "
                     "their p-values Holm-adjusted over those rows)")
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "."


def provenance(run_dir: str | os.PathLike, seed: int | None = None) -> str:
    """The report's footer, as HTML: the commit that rendered it and the commits its models were
    fitted at, the seed, profile, split id, device, dataset md5 checksums and package versions."""
    from html import escape
    from importlib.metadata import PackageNotFoundError, version

    info = read_json(run_dir, "run.json") or {}
    records = collect_metrics(run_dir)
    fitted = sorted({m.get("git_commit") for m in records if m.get("git_commit")})
    seeds = sorted({m.get("seed") for m in records if m.get("seed") is not None} | ({seed} if seed is not None else set()))
    devices = sorted({m.get("device") for m in records if m.get("device")})
    written = sorted(m.get("written") for m in records if m.get("written"))
    versions = dict(config.package_versions())
    for name in PROVENANCE_PACKAGES:
        if name not in versions:
            try:
                versions[name] = version(name)
            except PackageNotFoundError:
                pass
    split = info.get("split") or {}
    lines = [("report rendered at commit", config.git_commit()),
             ("models fitted at commit", ", ".join(fitted) or DASH),
             ("seed", ", ".join(map(str, seeds)) or DASH),
             ("dataset, profile", f"{info.get('dataset', DASH)}, {info.get('profile', DASH)}"),
             ("split", split.get("id", DASH)),
             ("device", ", ".join(devices) or DASH),
             ("models recorded", f"{written[0]} to {written[-1]}" if written else DASH)]
    lines += [(f"md5 {f}", md5) for f, md5 in sorted((info.get("checksums") or {}).items())]
    lines.append(("packages", ", ".join(f"{k} {v}" for k, v in versions.items())))
    rows = "".join(f"<tr><th>{escape(k, quote=False)}</th><td>{escape(str(v), quote=False)}</td></tr>" for k, v in lines)
    return f'<footer id="provenance" class="rs-provenance"><table class="rs-table rs-keyvalue">{rows}</table></footer>'

def missing(what: str, stage: str):
    """An HTML note for the reader that ``what`` is absent because ``stage`` has not run."""
    from html import escape

    from IPython.display import HTML
    return HTML(f'<p class="rs-missing"><i>{escape(what)}: not in this run folder (run {escape(stage)} first).</i></p>')


def verdict(lo: float, hi: float) -> str:
    """What a paired difference's 95% CI says of the two-stage system against a model, in the words
    of both the headline and the abstract (docs/PROTOCOL.md "Comparisons, named in advance"): it beats
    it, is beaten by it, or does not separate from it."""
    if lo > 0:
        return "beats it: the 95% CI of the difference lies above zero"
    if hi < 0:
        return "is beaten by it: the 95% CI of the difference lies below zero"
    return "does not separate from it: the 95% CI of the difference includes zero"


def headline(paired: dict, metric: str = "ndcg@10") -> str:
    """The study's headline, in Markdown, from ``analysis/paired.json`` (written by 40_evaluation):
    the primary comparison named in advance (the two-stage system against the blend; a plain note
    when the run has none), then the secondary (the strongest single-stage model on validation),
    then one sentence on the exploratory rest. The verdicts follow the 95% CIs, whatever their sign."""
    target = paired.get("target", "two_stage")
    best = paired.get("strongest_single_stage")
    primary, secondary = comparison(paired, "primary"), comparison(paired, "secondary")
    if primary is None and not best:
        return "No single-stage model was scored, so there is no comparison to report."
    parts = []
    if primary is None:
        parts.append(NO_BLEND)
    else:
        diff, lo, hi = _paired_numbers(primary, target)
        rel = f" ({100 * diff / primary['other']:+.1f}%)" if primary.get("other") else ""
        parts.append(f"**Primary comparison** (named in advance in docs/PROTOCOL.md): against the **blend** of the "
                     f"single-stage models (17_blend; weights chosen on validation), the two-stage system ({target}) "
                     f"scores {primary['target']:.4f} on the test period against the blend's {primary['other']:.4f}: "
                     f"a paired difference of **{diff:+.4f}**{rel} [{lo:+.4f}, {hi:+.4f}], so the two-stage system "
                     f"{verdict(lo, hi)}.")
    if not best:
        parts.append("No single-stage model has a validation score, so there is no secondary comparison.")
    elif secondary is None:
        parts.append(f"**Secondary**: the strongest single-stage model on validation is **{best['model']}**; it has "
                     "no test scores.")
    else:
        diff, lo, hi = _paired_numbers(secondary, target)
        rel = f" ({100 * diff / secondary['other']:+.1f}%)" if secondary.get("other") else ""
        parts.append(f"**Secondary**: the strongest single-stage model on validation is **{best['model']}** "
                     f"(validation {metric} {best[f'valid_{metric}']:.4f}), which scores {secondary['other']:.4f} "
                     f"on test: a paired difference of **{diff:+.4f}**{rel} [{lo:+.4f}, {hi:+.4f}], so the "
                     f"two-stage system {verdict(lo, hi)}.")
    parts.append(exploratory_sentence(paired))
    return " ".join(p for p in parts if p)
