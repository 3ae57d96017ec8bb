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


def segment_bars(frame: pd.DataFrame, segment: str, value: str = "ndcg@10", hue: str = "model"):
    fig, (ax,) = _fig(width=8, height=4)
    sns.barplot(data=frame, x=segment, y=value, hue=hue, ax=ax, errorbar=None)
    ax.set(title=f"{value} by {segment}")
    ax.legend(fontsize=8, ncols=2)
    return fig


def feature_importance(share: pd.Series, top: int = 20, title: str = "re-ranker"):
    """Horizontal bars of the ``top`` features by share of the trees' split gain."""
    s = share.sort_values(ascending=False).head(top)[::-1]
    fig, (ax,) = _fig(width=7, height=0.28 * len(s) + 1.2)
    ax.barh(np.arange(len(s)), s.to_numpy(), color="steelblue")
    ax.set_yticks(np.arange(len(s)), s.index)
    ax.set(xlabel="share of total split gain", title=f"What the {title} uses (top {len(s)} features)")
    return fig
