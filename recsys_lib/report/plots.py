"""Figures a reader would rather look at than read: data exploration, splits, training curves,
retrieval recall curves, results with confidence intervals, segment analyses. Each function
returns a matplotlib Figure and never mutates its inputs."""
from __future__ import annotations


import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

sns.set_theme(style="whitegrid", context="notebook")


def _fig(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def rating_distribution(interactions: pd.DataFrame):
    fig, (ax,) = _fig()
    counts = interactions["rating"].value_counts().sort_index()
    sns.barplot(x=counts.index.astype(str), y=counts.to_numpy(), ax=ax, color="steelblue")
    ax.set(xlabel="rating", ylabel="rows", title="Rating distribution")
    return fig


def long_tails(interactions: pd.DataFrame):
    """Rows per user and per item, ranked, on log-log axes."""
    fig, axes = _fig(2)
    for ax, col, label in zip(axes, ["user_id", "item_id"], ["user activity", "item popularity"]):
        counts = np.sort(interactions[col].value_counts().to_numpy())[::-1]
        ax.loglog(np.arange(1, len(counts) + 1), counts)
        ax.set(xlabel="rank", ylabel="rows", title=f"{label} (long tail)")
    fig.tight_layout()
    return fig


def ratings_per_month(interactions: pd.DataFrame, min_date: str | None = None):
    fig, (ax,) = _fig(width=10)
    month = pd.to_datetime(interactions["timestamp"], unit="s").dt.to_period("M").dt.to_timestamp()
    counts = month.value_counts().sort_index()
    ax.plot(counts.index, counts.to_numpy())
    if min_date:
        ax.axvline(pd.Timestamp(min_date), color="crimson", ls="--", label=f"min_date {min_date}")
        ax.legend()
    ax.set(xlabel="month", ylabel="ratings", title="Ratings per month")
    return fig


def genre_frequencies(items: pd.DataFrame):
    fig, (ax,) = _fig(width=7, height=4.5)
    counts = items["genres"].explode().dropna().value_counts()
    sns.barplot(x=counts.to_numpy(), y=counts.index, ax=ax, color="seagreen", orient="h")
    ax.set(xlabel="movies", ylabel="", title="Genres")
    return fig


def tag_coverage(items: pd.DataFrame, tags: pd.DataFrame, interactions: pd.DataFrame):
    """Share of items (and of rated rows) whose item has at least one tag, and tags per item."""
    fig, axes = _fig(2)
    tagged = set(tags["item_id"].unique()) if len(tags) else set()
    item_share = items["item_id"].isin(tagged).mean()
    row_share = interactions["item_id"].isin(tagged).mean()
    axes[0].bar(["items", "rated rows"], [item_share, row_share], color=["steelblue", "darkorange"])
    axes[0].set(ylim=(0, 1), ylabel="share with >= 1 tag", title="Tag coverage")
    per_item = tags.groupby("item_id").size() if len(tags) else pd.Series([0])
    axes[1].hist(per_item.to_numpy(), bins=np.logspace(0, np.log10(max(per_item.max(), 2)), 30))
    axes[1].set(xscale="log", yscale="log", xlabel="tags per tagged item", ylabel="items", title="Tags per item")
    fig.tight_layout()
    return fig


def split_timeline(split):
    """Rows and active users per month in each period of a split."""
    fig, axes = _fig(2, width=6)
    for name, df in split.frames().items():
        if not len(df):
            continue
        month = pd.to_datetime(df["timestamp"], unit="s").dt.to_period("M").dt.to_timestamp()
        axes[0].plot(*_series(month.value_counts().sort_index()), label=name)
        users = df.assign(month=month).groupby("month")["user_id"].nunique()
        axes[1].plot(*_series(users), label=name)
    axes[0].set(title="Rows per month", ylabel="rows")
    axes[1].set(title="Active users per month", ylabel="users")
    for ax in axes:
        ax.legend()
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def _series(s: pd.Series):
    return s.index, s.to_numpy()


def training_curves(histories: dict[str, dict]):
    """Loss and validation metric per epoch for each named FitHistory (or its ``as_dict()``)."""
    fig, axes = _fig(2)
    for name, h in histories.items():
        h = h.as_dict() if hasattr(h, "as_dict") else h
        rec = pd.DataFrame(h.get("records", []))
        if rec.empty:
            continue
        axes[0].plot(rec["epoch"], rec["loss"], marker="o", label=name)
        if "valid_metric" in rec:
            axes[1].plot(rec["epoch"], rec["valid_metric"], marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="training loss", title="Training loss")
    axes[1].set(xlabel="epoch", ylabel="validation metric", title="Early-stopping metric (validation)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return fig


def recall_curve(curves: dict[str, dict[int, float]], ceiling_k: int | None = None):
    """Recall@K against K (log axis) for each named curve, e.g. retriever on valid and test."""
    fig, (ax,) = _fig(width=6)
    for name, curve in curves.items():
        ks = sorted(int(k) for k in curve)
        ax.plot(ks, [curve[k] if k in curve else curve[str(k)] for k in ks], marker="o", label=name)
    if ceiling_k:
        ax.axvline(ceiling_k, color="grey", ls="--", label=f"candidates = {ceiling_k}")
    ax.set(xscale="log", xlabel="K", ylabel="Recall@K", title="Retrieval recall (the re-ranker's ceiling)")
    ax.legend()
    return fig


def source_recall(recall: dict[str, dict[str, float]], ceiling_k: int | None = None):
    """Recall@K of each candidate source (curves, up to ``ceiling_k``) and of their union (a
    horizontal line: the whole candidate set, the re-ranker's ceiling)."""
    fig, (ax,) = _fig(width=6)
    for name, curve in recall.items():
        ks = sorted(int(k.split("@")[1]) for k in curve)
        if ceiling_k:
            ks = [k for k in ks if k <= ceiling_k]
        values = [curve[f"recall@{k}"] for k in ks]
        if name == "union":
            ax.axhline(values[-1], color="black", ls=":", label=f"union of sources ({values[-1]:.3f})")
        else:
            ax.plot(ks, values, marker="o", label=name)
    ax.set(xscale="log", xlabel="K (each source's top K)", ylabel="Recall@K",
           title="Candidate recall by source (validation)")
    ax.legend()
    return fig


def metric_with_ci(table: pd.DataFrame, metric: str = "ndcg@10", ci_col: str = "ci"):
    """Horizontal bars of a metric per model with 95% CI whiskers; ``table`` has model, metric, lo, hi."""
    fig, (ax,) = _fig(width=7, height=0.5 * len(table) + 1.5)
    t = table.sort_values(metric)
    y = np.arange(len(t))
    ax.barh(y, t[metric], color="steelblue")
    ax.errorbar(t[metric], y, xerr=[t[metric] - t["lo"], t["hi"] - t[metric]], fmt="none", ecolor="black", capsize=3)
    ax.set_yticks(y, t["model"])
    ax.set(xlabel=f"{metric} (test, 95% bootstrap CI)", title=f"Test {metric} by model")
    return fig


def segment_bars(frame: pd.DataFrame, segment: str, value: str = "ndcg@10", hue: str = "model",
                 label: str | None = None):
    """Mean ``value`` (shown as ``label``) per segment and model; segments lightest first (light,
    medium, heavy)."""
    label = label or value.replace("ndcg", "nDCG")
    from .analysis import segment_order
    fig, (ax,) = _fig(width=9, height=4)
    order = segment_order(frame[segment].astype(str).unique()) if len(frame) else None
    data = frame.assign(**{segment: frame[segment].astype(str)})
    sns.barplot(data=data, x=segment, y=value, hue=hue, order=order, ax=ax, errorbar=None)
    if "users" in frame and len(frame):
        users = frame.drop_duplicates(segment).set_index(segment)["users"]
        ax.set_xticks(range(len(order)), [f"{s}\n({int(users.get(s, 0)):,} users)" for s in order])
    ax.set(title=f"{label} by user {segment} (train rows)", xlabel="", ylabel=f"test {label}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def forest(frame: pd.DataFrame, target: str = "two_stage", metric: str = "nDCG@10"):
    """Paired differences (``target`` minus each model) with 95% CIs, one row per model, and a
    line at zero: a whisker that does not cross it separates the two systems.
    ``frame`` has model, diff, lo, hi and, from recsys_lib.report.analysis.forest_data, role and
    label: the comparisons named in advance (primary, then secondary) come first, labelled and in
    bold, and a dotted line sets them apart from the exploratory rows below."""
    fig, (ax,) = _fig(width=8, height=0.32 * len(frame) + 1.4)
    y = np.arange(len(frame))
    above = (frame["lo"] > 0).to_numpy()
    below = (frame["hi"] < 0).to_numpy()
    colors = np.where(above, "tab:blue", np.where(below, "tab:red", "grey"))
    for yi, (_, r), c in zip(y, frame.iterrows(), colors):
        ax.plot([r["lo"], r["hi"]], [yi, yi], color=c, lw=2)
        ax.plot(r["diff"], yi, "o", color=c, ms=6)
    ax.axvline(0.0, color="black", lw=1)
    labels = frame["label"] if "label" in frame else frame["model"]
    roles = frame["role"].to_numpy() if "role" in frame else np.full(len(frame), "exploratory")
    ax.set_yticks(y, labels)
    named = roles != "exploratory"
    for tick, bold in zip(ax.get_yticklabels(), named):
        if bold:
            tick.set_fontweight("bold")
    if named.any() and not named.all():
        ax.axhline(int(named.sum()) - 0.5, color="grey", ls=":", lw=1)   # named in advance | exploratory
    ax.set_ylim(len(frame) - 0.3, -0.7)                     # first row at the top, as in the table
    ax.set(xlabel=f"{target} minus model, test {metric} (paired 95% CI)",
           title=f"Paired differences: {target} against each model (named comparisons first)")
    return fig


def learning_curves(curves: dict[str, dict]):
    """Validation metric by epoch, one panel per model, the kept epoch marked. ``curves`` maps a
    model to ``{"epoch": [...], "valid": [...], "best_epoch": int, "metric": label}``."""
    n = max(len(curves), 1)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.8 * nrows), squeeze=False)
    for ax, (name, c) in zip(axes.ravel(), curves.items()):
        ax.plot(c["epoch"], c["valid"], marker="o", ms=3, color="steelblue")
        best = c.get("best_epoch")
        if best in c["epoch"]:
            v = c["valid"][c["epoch"].index(best)]
            ax.axvline(best, color="crimson", ls="--", lw=1)
            ax.plot([best], [v], "*", color="crimson", ms=12, label=f"kept: epoch {best}")
            ax.legend(fontsize=8, loc="lower right")
        ax.set(title=name, xlabel="epoch", ylabel=f"validation {c.get('metric', '')}")
    for ax in axes.ravel()[len(curves):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def hit_popularity(frame: pd.DataFrame, k: int = 10):
    """Where each model's top-``k`` hits fall in the train popularity ranking (stacked shares of
    head, torso and tail items) and its hits per user; rows as in analysis/hit_popularity.json."""
    t = frame.sort_values("hits per user", kind="stable")
    fig, axes = _fig(2, width=4.6, height=0.3 * len(t) + 1.6)
    y = np.arange(len(t))
    left = np.zeros(len(t))
    for part, color in (("head", "#4c72b0"), ("torso", "#dd8452"), ("tail", "#55a868")):
        vals = t[f"{part} share"].to_numpy(dtype=float)
        axes[0].barh(y, vals, left=left, color=color, label=part)
        left += vals
    axes[0].set_yticks(y, t["model"])
    axes[0].set(xlim=(0, 1), xlabel=f"share of the top-{k} hits", title="Popularity of the hits")
    axes[0].legend(fontsize=8, loc="lower left", ncols=3, bbox_to_anchor=(0.0, 1.08), frameon=False)
    axes[1].barh(y, t["hits per user"].to_numpy(dtype=float), color="grey")
    axes[1].set_yticks(y, [""] * len(t))
    axes[1].set(xlabel=f"hits in the top {k} per test user", title="Hits per user")
    fig.tight_layout()
    return fig


def timings(models: pd.DataFrame, stages: pd.DataFrame | None = None):
    """Seconds per model (fitting with its search, and scoring the test period) on a log axis and,
    when given, seconds per notebook. ``models``: model, fit s, scoring s; ``stages``: stage, seconds."""
    has_stages = stages is not None and len(stages) > 0
    fig, axes = _fig(2 if has_stages else 1, width=4.8, height=0.3 * max(len(models), len(stages) if has_stages else 0) + 1.6)
    ax = axes[0]
    y = np.arange(len(models))
    for offset, col, color in ((-0.2, "fit s", "steelblue"), (0.2, "scoring s", "darkorange")):
        vals = pd.to_numeric(models[col], errors="coerce").fillna(0.0).clip(lower=1e-3).to_numpy()
        ax.barh(y + offset, vals, height=0.4, color=color, label=col)
    ax.set_yticks(y, models["model"])
    ax.set_ylim(len(models) - 0.4, -0.6)                   # first model at the top
    ax.set(xscale="log", xlabel="seconds (log scale)", title="Time per model")
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.06), ncols=2, frameon=False)
    if has_stages:
        ys = np.arange(len(stages))[::-1]
        axes[1].barh(ys, stages["seconds"].to_numpy(dtype=float), color="seagreen")
        axes[1].set_yticks(ys, stages["stage"])
        axes[1].set(xlabel="seconds", title="Time per notebook")
    fig.tight_layout()
    return fig


def search_strip(frame: pd.DataFrame, metric: str = "nDCG@10"):
    """Every configuration each search tried (a dot per configuration, the kept one a star):
    validation ``metric`` per model. ``frame``: model, valid, chosen (report.search_points)."""
    models = list(dict.fromkeys(frame["model"]))
    fig, (ax,) = _fig(width=8, height=0.34 * len(models) + 1.4)
    rng = np.random.default_rng(0)
    for i, name in enumerate(models):
        g = frame[frame["model"] == name]
        tried = g[~g["chosen"]]
        ax.plot(tried["valid"], i + rng.uniform(-0.15, 0.15, len(tried)), "o", ms=4, alpha=0.6, color="grey")
        kept = g[g["chosen"]]
        ax.plot(kept["valid"], [i] * len(kept), "*", ms=13, color="crimson")
    ax.plot([], [], "o", color="grey", label="configuration tried")
    ax.plot([], [], "*", color="crimson", ms=10, label="kept")
    ax.set_yticks(range(len(models)), models)
    ax.set_ylim(len(models) - 0.3, -0.7)
    ax.set(xlabel=f"validation {metric}", title="What each search tried")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def feature_importance(share: pd.Series, top: int = 20, title: str = "re-ranker"):
    """Horizontal bars of the ``top`` features by share of the trees' split gain."""
    s = share.sort_values(ascending=False).head(top)[::-1]
    fig, (ax,) = _fig(width=7, height=0.28 * len(s) + 1.2)
    ax.barh(np.arange(len(s)), s.to_numpy(), color="steelblue")
    ax.set_yticks(np.arange(len(s)), s.index)
    ax.set(xlabel="share of total split gain", title=f"What the {title} uses (top {len(s)} features)")
    return fig
