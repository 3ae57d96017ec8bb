"""The protocol's timeline: the split's periods on a time axis, drawn from the run's own split
(``data.pt``), for the report's "Data and split" section.

- ``global_temporal``: one time axis for everybody: the ratings per month of each period, the
  train / validation / test periods as bands and their cut dates; the label window (the last share
  of the train rows by time, docs/PROTOCOL.md "Who learns from what") hatched inside train.
- ``user_temporal``: every user has their own cuts, so a sample of users is drawn, one line each:
  their train span, validation span and test span (first to last rating of the period), and their
  label window (each user's last max(1, floor(share n)) train rows, `SplitData.label_window`).
  The sample is fixed (`sample_users`): the users with rows in all three periods, ordered by their
  validation cut, taken at evenly spaced positions.

`timeline` returns the Figure; `timeline_caption` the words under it.
"""
from __future__ import annotations

from fractions import Fraction

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from ..protocol.splitdata import NEVER, PERIODS, SplitData

COLOURS = {"train": "#4C72B0", "valid": "#DD8452", "test": "#55A868", "window": "#8172B3"}
LABELS = {"train": "train", "valid": "validation", "test": "test", "window": "label window"}
N_USERS = 30          # users drawn under user_temporal


def _date(ts) -> str:
    return pd.Timestamp(int(ts), unit="s").strftime("%Y-%m-%d")


def _num(ts) -> np.ndarray:
    """UTC seconds -> matplotlib date numbers."""
    return mdates.date2num(np.asarray(ts, dtype=np.int64).astype("datetime64[s]"))


def strategy(data: SplitData) -> str:
    return str(data.split_params.get("strategy", "user_temporal"))


def label_window_share(params: dict | None) -> float | None:
    """``reranker.label_window`` of the run's parameters (None when the run has no label window)."""
    share = ((params or {}).get("reranker") or {}).get("label_window")
    return float(share) if share else None


def period_bounds(data: SplitData, label_window: float | None = None) -> pd.DataFrame:
    """One row per period in time order (train, valid, test; then ``window`` when ``label_window``
    is set and the split is ``global_temporal``): rows, first and last timestamp and their dates.
    Under ``global_temporal`` the window is the last ``label_window`` share of the train rows by
    time (`SplitData.label_window`), ending with train."""
    rows = []
    for p in PERIODS:
        ts = data.period(p).timestamp
        rows.append({"period": p, "rows": len(ts), "start": int(ts.min()) if len(ts) else None,
                     "end": int(ts.max()) if len(ts) else None})
    if label_window and strategy(data) != "user_temporal":
        ts = data.train.timestamp                       # in time order: the split's own order
        keep = 1 - Fraction(str(label_window))          # SplitData.label_window's global cut
        cut = (len(ts) * keep.numerator) // keep.denominator
        if cut < len(ts):
            rows.append({"period": "window", "rows": len(ts) - cut, "start": int(ts[cut:].min()),
                         "end": int(ts.max())})
    frame = pd.DataFrame(rows, columns=["period", "rows", "start", "end"])
    for col in ("start", "end"):
        frame[f"{col}_date"] = [None if pd.isna(v) else _date(v) for v in frame[col]]
    return frame


def user_spans(data: SplitData, label_window: float | None = None) -> pd.DataFrame:
    """One row per user (encoded index): raw ``user`` id and, for each period, its ``<p>_rows``,
    ``<p>_start`` and ``<p>_end`` (first and last timestamp; -1 where the user has no row there);
    with ``label_window``, ``window_rows``/``window_start``/``window_end``: each user's label window
    as `SplitData.label_window` defines it (under ``user_temporal`` their last max(1, floor(share n))
    train rows). Vectorised over rows."""
    n = data.n_users
    out = {"user": data.users.raw}
    periods = {p: data.period(p) for p in PERIODS}
    if label_window:
        periods["window"] = data.label_window(label_window).valid
    for p, rows in periods.items():
        start = np.full(n, NEVER, dtype=np.int64)
        end = np.full(n, -1, dtype=np.int64)
        np.minimum.at(start, rows.user, rows.timestamp.astype(np.int64))
        np.maximum.at(end, rows.user, rows.timestamp.astype(np.int64))
        count = np.bincount(rows.user, minlength=n)
        out[f"{p}_rows"] = count
        out[f"{p}_start"] = np.where(count > 0, start, -1)
        out[f"{p}_end"] = end
    return pd.DataFrame(out)


def sample_users(spans: pd.DataFrame, n_users: int = N_USERS) -> pd.DataFrame:
    """The users drawn (`timeline`'s rule): those with rows in train, validation and test, sorted by
    their validation cut (first validation rating), ties by user id, taken at the ``n_users``
    evenly spaced positions round(linspace(0, N - 1, n_users)) (all of them when N <= n_users).
    Deterministic: no seed is needed. Earliest cut first."""
    ok = spans[(spans["train_rows"] > 0) & (spans["valid_rows"] > 0) & (spans["test_rows"] > 0)]
    ok = ok.sort_values(["valid_start", "user"], kind="stable")
    if len(ok) <= n_users:
        return ok
    pos = np.unique(np.round(np.linspace(0, len(ok) - 1, n_users)).astype(np.int64))
    return ok.iloc[pos]


def _user_timeline(data: SplitData, label_window: float | None, n_users: int):
    spans = sample_users(user_spans(data, label_window), n_users)
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.22 * len(spans) + 1.6)))
    y = np.arange(len(spans))[::-1]                           # earliest validation cut at the top
    kinds = [p for p in ("train", "window", "valid", "test") if f"{p}_start" in spans]
    for p in kinds:
        start, end = _num(spans[f"{p}_start"]), _num(spans[f"{p}_end"])
        if p == "window":                                     # over the train line's tail
            lines = ax.hlines(y, start, end, colors=COLOURS[p], linewidth=4.5, zorder=3)
        else:
            lines = ax.hlines(y, start, end, colors=COLOURS[p], linewidth=3, zorder=2)
            ax.scatter(np.r_[start, end], np.r_[y, y], s=9, color=COLOURS[p], zorder=4, linewidths=0)
        lines.set_gid(p)
        lines.set_label(LABELS[p])
    ax.set_yticks(y, [f"user {u}" for u in spans["user"]], fontsize=7)
    ax.set_ylim(-0.8, len(spans) - 0.2)
    ax.grid(axis="y", visible=False)
    ax.set_title(f"Each user's own periods: {len(spans)} users of the user_temporal split, by validation cut")
    handles = [Patch(color=COLOURS[p], label=LABELS[p]) for p in kinds]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=len(handles), frameon=False)
    return fig, ax


def _global_timeline(data: SplitData, label_window: float | None):
    bounds = period_bounds(data, label_window).set_index("period")
    fig, ax = plt.subplots(figsize=(10, 4.2))
    months = {}
    for p in PERIODS:                                          # ratings per month of each period
        m = data.period(p).timestamp.astype("datetime64[s]").astype("datetime64[M]")
        u, c = np.unique(m, return_counts=True)
        months[p] = pd.Series(c, index=u)
    table = pd.DataFrame(months).fillna(0).sort_index()        # (months, 3)
    x = mdates.date2num(table.index.to_numpy().astype("datetime64[s]"))
    bottom = np.zeros(len(table))
    for p in PERIODS:
        ax.bar(x, table[p].to_numpy(), width=27, bottom=bottom, align="edge", color=COLOURS[p], linewidth=0,
               label=f"{LABELS[p]} ratings per month", gid=f"{p}-bars")
        bottom += table[p].to_numpy()
    for p in PERIODS:
        b = bounds.loc[p]
        if b["rows"]:
            ax.axvspan(_num(b["start"]), _num(b["end"]), color=COLOURS[p], alpha=0.10, zorder=0, gid=f"{p}-band")
    for p in ("valid", "test"):                                # the cut dates
        b = bounds.loc[p]
        if b["rows"]:
            ax.axvline(_num(b["start"]), color=COLOURS[p], ls="--", lw=1.4, gid=f"{p}-cut",
                       label=f"{LABELS[p]} from {b['start_date']}")
    if "window" in bounds.index:
        b = bounds.loc["window"]
        ax.axvspan(_num(b["start"]), _num(b["end"]), facecolor="none", edgecolor=COLOURS["window"],
                   hatch="///", lw=0, zorder=1, gid="window-band", label=f"label window (from {b['start_date']})")
    ax.set(ylabel="ratings per month", title="The global_temporal split: one time axis for every user")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, fontsize=8, frameon=False)
    return fig, ax


def timeline(data: SplitData, label_window: float | None = None, n_users: int = N_USERS):
    """The split's periods on a time axis (module docstring): a Figure. ``label_window`` is the
    run's ``reranker.label_window`` share (`label_window_share`), None for none."""
    if strategy(data) == "user_temporal":
        fig, ax = _user_timeline(data, label_window, n_users)
    else:
        fig, ax = _global_timeline(data, label_window)
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    fig.tight_layout()
    return fig


def timeline_caption(data: SplitData, label_window: float | None = None, n_users: int = N_USERS) -> str:
    """The words under `timeline`'s figure."""
    b = period_bounds(data, label_window).set_index("period")
    if strategy(data) == "user_temporal":
        spans = user_spans(data)
        n_ok = int(((spans["train_rows"] > 0) & (spans["valid_rows"] > 0) & (spans["test_rows"] > 0)).sum())
        shown = min(n_users, n_ok)
        words = (f"The split's periods for {shown} of the {n_ok:,} users with ratings in all three periods, taken at "
                 f"evenly spaced positions once ordered by their validation cut (their first validation rating), the "
                 f"earliest at the top: each line runs from the user's first to their last rating of the period, "
                 f"train in blue, validation in orange, test in green (dots: a period's first and last rating; a "
                 f"user who rated everything within a few days shows as dots alone). Every user has their own cuts, "
                 f"from {b.loc['valid', 'start_date']} to {_date(spans['valid_start'].max())}: "
                 f"a per-user split is not a time split across users, so under the causal catalogue a user is "
                 f"recommended only movies first rated before their own cut (docs/PROTOCOL.md).")
        if label_window:
            words += (f" Purple: the label window, each user's last max(1, floor({label_window:g} n)) of their n train "
                      f"ratings, whose lists the re-ranker may also train on (stage-1 models refit on the train "
                      f"ratings before it).")
        return words
    words = (f"The split's periods on one time axis, ratings per month coloured by period: train (blue) from "
             f"{b.loc['train', 'start_date']} to {b.loc['train', 'end_date']}, validation (orange) from "
             f"{b.loc['valid', 'start_date']} and test (green) from {b.loc['test', 'start_date']} to "
             f"{b.loc['test', 'end_date']}; dashed lines mark the cuts. No validation or test rating comes before a "
             f"train rating.")
    if "window" in b.index:
        words += (f" Hatched: the label window, the last {label_window:.0%} of the train ratings by time (from "
                  f"{b.loc['window', 'start_date']}), whose lists the re-ranker may also train on (stage-1 models "
                  f"refit on the train ratings before it).")
    return words
