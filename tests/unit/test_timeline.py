"""The protocol timeline (recsys_lib.report.timeline): one line per sampled user under user_temporal,
drawn from that user's own rows, periods in order, the label window where SplitData.label_window
puts it; under global_temporal the periods' bands and cut dates."""
import types

import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from recsys_lib.protocol.splitdata import SplitData  # noqa: E402
from recsys_lib.report import timeline  # noqa: E402


def _by_gid(fig, gid):
    found = [c for ax in fig.axes for c in [*ax.collections, *ax.lines, *ax.patches] if c.get_gid() == gid]
    assert found, f"nothing drawn with gid {gid}"
    return found


def _user_split(rows: pd.DataFrame):
    df = rows.sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)
    n = df.groupby("user_id")["item_id"].transform("size").to_numpy()
    k = np.maximum(1, n // 10)
    pos = df.groupby("user_id").cumcount().to_numpy()
    test, valid = pos >= n - k, (pos >= n - 2 * k) & (pos < n - k)
    return types.SimpleNamespace(train=df[~test & ~valid], valid=df[valid], test=df[test],
                                 params={"strategy": "user_temporal"})


def _global_split(rows: pd.DataFrame):
    df = rows.sort_values(["timestamp", "user_id", "item_id"]).reset_index(drop=True)
    a, b = int(0.8 * len(df)), int(0.9 * len(df))
    return types.SimpleNamespace(train=df.iloc[:a], valid=df.iloc[a:b], test=df.iloc[b:],
                                 params={"strategy": "global_temporal"})


@pytest.fixture(scope="module")
def user_split(toy_rows):
    rows = toy_rows.sort_values(["user_id", "timestamp"])
    rows = rows[rows.groupby("user_id").cumcount().to_numpy() < 12 + (5 * rows["user_id"].to_numpy()) % 29]
    split = _user_split(rows)
    return split, SplitData.from_split(split, name="toy-user")


def test_one_line_per_sampled_user_from_that_users_rows(user_split):
    split, data = user_split
    fig = timeline.timeline(data, label_window=0.1, n_users=12)
    spans = timeline.sample_users(timeline.user_spans(data, 0.1), 12)
    assert len(spans) == 12 and spans["user"].is_unique
    for gid in ("train", "valid", "test", "window"):
        (lines,) = _by_gid(fig, gid)
        assert len(lines.get_segments()) == 12, gid
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert sorted(labels) == sorted(f"user {u}" for u in spans["user"])
    # the train line of the top user runs from their first to their last train rating (raw rows)
    (train,) = _by_gid(fig, "train")
    top = spans.iloc[0]["user"]                                     # earliest validation cut: drawn on top
    mine = split.train[split.train["user_id"] == top]["timestamp"]
    seg = max(train.get_segments(), key=lambda s: s[0][1])
    expected = mdates.date2num(np.array([mine.min(), mine.max()]).astype("datetime64[s]"))
    assert np.allclose(seg[:, 0], expected)
    plt.close(fig)


def test_sample_is_evenly_spaced_by_validation_cut(user_split):
    split, data = user_split
    spans = timeline.user_spans(data)
    picked = timeline.sample_users(spans, 10)
    cut = split.valid.groupby("user_id")["timestamp"].min()
    ordered = cut.reset_index().sort_values(["timestamp", "user_id"], kind="stable")["user_id"].to_numpy()
    ordered = ordered[np.isin(ordered, split.test["user_id"].unique())]
    assert picked["user"].tolist() == ordered[np.round(np.linspace(0, len(ordered) - 1, 10)).astype(int)].tolist()
    assert picked["user"].iloc[0] == ordered[0] and picked["user"].iloc[-1] == ordered[-1]
    assert len(timeline.sample_users(spans, 10_000)) == len(ordered)


def test_each_users_periods_are_in_order_and_the_window_ends_train(user_split):
    _, data = user_split
    s = timeline.user_spans(data, 0.1)
    s = s[s["valid_rows"] > 0]
    assert (s["train_start"] <= s["train_end"]).all() and (s["train_end"] <= s["valid_start"]).all()
    assert (s["valid_start"] <= s["valid_end"]).all() and (s["valid_end"] <= s["test_start"]).all()
    assert (s["test_start"] <= s["test_end"]).all()
    # the label window: each user's last max(1, floor(0.1 n)) train rows, ending with train
    assert (s["window_rows"] == np.maximum(1, s["train_rows"] // 10)).all()
    assert (s["window_end"] == s["train_end"]).all() and (s["window_start"] >= s["train_start"]).all()
    words = timeline.timeline_caption(data, 0.1, n_users=12)
    assert "12 of the" in words and "max(1, floor(0.1 n))" in words
    assert "label window" not in timeline.timeline_caption(data, None)


def test_global_split_draws_bands_and_cut_dates_in_order(toy_rows):
    data = SplitData.from_split(_global_split(toy_rows), name="toy-global")
    b = timeline.period_bounds(data, 0.1).set_index("period")
    assert list(b.index) == ["train", "valid", "test", "window"]
    assert b.loc["train", "end"] <= b.loc["valid", "start"] <= b.loc["valid", "end"] <= b.loc["test", "start"]
    assert b.loc["window", "start"] == data.label_window(0.1).valid.timestamp.min()   # SplitData's definition
    assert b.loc["window", "end"] == b.loc["train", "end"]
    assert b.loc["window", "rows"] == len(data.label_window(0.1).valid)
    fig = timeline.timeline(data, label_window=0.1)
    for p in ("valid", "test"):
        (cut,) = _by_gid(fig, f"{p}-cut")
        assert np.isclose(cut.get_xdata()[0], mdates.date2num(np.datetime64(int(b.loc[p, "start"]), "s")))
    for gid in ("train-band", "valid-band", "test-band", "window-band"):
        _by_gid(fig, gid)
    for p in ("train", "valid", "test"):                            # ratings per month add up to the period's rows
        assert sum(r.get_height() for r in _by_gid(fig, f"{p}-bars")) == b.loc[p, "rows"]
    words = timeline.timeline_caption(data, 0.1)
    assert b.loc["valid", "start_date"] in words and b.loc["test", "start_date"] in words
    assert "last 10% of the train ratings" in words
    plt.close(fig)
