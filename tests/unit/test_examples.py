"""The report's three example users (recsys_lib.report.examples): picked by the stated rule (the
median user of each activity tercile, ties to the smallest user id), shown by their data set ids
with titles from the data set, a hit marked exactly where a listed movie is a test positive."""
import json
import statistics
import types

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_lib.protocol.splitdata import SplitData
from recsys_lib.report import analysis, examples

ODD_TITLE = 'Fish <b>&amp; "Chips" (1999)'      # must be escaped, never rendered as markup


def _split(rows: pd.DataFrame):
    """Per-user last 10% test, the 10% before validation (docs/PROTOCOL.md user_temporal)."""
    df = rows.sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)
    n = df.groupby("user_id")["item_id"].transform("size").to_numpy()
    k = np.maximum(1, n // 10)
    pos = df.groupby("user_id").cumcount().to_numpy()
    test, valid = pos >= n - k, (pos >= n - 2 * k) & (pos < n - k)
    train = df[~test & ~valid]
    keep = lambda d: d[d["item_id"].isin(train["item_id"])].reset_index(drop=True)
    return types.SimpleNamespace(train=train.reset_index(drop=True), valid=keep(df[valid]), test=keep(df[test]),
                                 params={"strategy": "user_temporal"})


def _rows(n_users: int = 120, n_items: int = 150, seed: int = 0) -> pd.DataFrame:
    """Users of very different activity (20 + 7u mod 83 ratings: counts repeat, so ties occur), most
    ratings positive, so test periods hold several positives."""
    rng = np.random.default_rng(seed)
    parts = []
    for u in range(1, n_users + 1):
        n = 20 + (7 * u) % 83
        parts.append(pd.DataFrame({"user_id": u, "item_id": rng.choice(np.arange(1, n_items + 1), n, replace=False),
                                   "rating": rng.choice([2.0, 3.0, 4.0, 4.5, 5.0], n),
                                   "timestamp": 1_500_000_000 + np.sort(rng.integers(0, 10**8, n))}))
    return pd.concat(parts, ignore_index=True).astype({"user_id": "int32", "item_id": "int32", "rating": "float32"})


@pytest.fixture(scope="module")
def toy():
    split = _split(_rows())
    ids = np.sort(pd.concat([split.train, split.valid, split.test])["item_id"].unique())
    items = pd.DataFrame({"item_id": ids.astype(np.int32),
                          "title": [f"Film number {i} with a rather long title ({1950 + i % 60})" for i in ids],
                          "year": pd.array([1950 + i % 60 for i in ids], dtype="Int16"),
                          "genres": [["Drama"] for _ in ids]})
    items.loc[0, "title"] = ODD_TITLE
    data = SplitData.from_split(split, items, None, name="toy-examples")
    return data, split, items


def _write_run(tmp_path, data: SplitData, models: dict[str, np.ndarray], users: np.ndarray, valid: dict,
               paired: dict | None = None):
    """A run folder: data.pt, run.json, per_user/<m>-test.parquet (user, ndcg@10, top_0..9) and
    metrics/<m>.json with each model's validation nDCG@10."""
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "run.json").write_text(json.dumps({"dataset": "toy", "params": {"eval": {"causal_catalogue": True}}}))
    (tmp_path / "per_user").mkdir()
    (tmp_path / "metrics").mkdir()
    for i, (m, top) in enumerate(models.items()):
        frame = pd.DataFrame({"user": users, "ndcg@10": np.linspace(0, 1, len(users))})
        for j in range(top.shape[1]):
            frame[f"top_{j}"] = top[:, j]
        frame.to_parquet(tmp_path / "per_user" / f"{m}-test.parquet", index=False)
        record = {"model": m, "written": f"2024-01-01T00:00:{i:02d}", "valid": {"ndcg@10": valid[m]}}
        (tmp_path / "metrics" / f"{m}.json").write_text(json.dumps(record))
    if paired is not None:
        (tmp_path / "analysis").mkdir()
        (tmp_path / "analysis" / "paired.json").write_text(json.dumps(paired))


def _lists(data: SplitData, users: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Top-10 lists: two_stage puts each user's test positives first (so it has hits), blend ends
    with a padding slot (-1), ease is random, popularity the most rated items for everybody."""
    rng = np.random.default_rng(seed)
    pos = data.positives("test").tocsr()
    two_stage, ease = [], []
    for u in users:
        p = pos.indices[pos.indptr[u]:pos.indptr[u + 1]][:4]
        rest = rng.permutation(np.setdiff1d(np.arange(data.n_items), p))[: 10 - len(p)]
        two_stage.append(np.r_[p, rest])
        ease.append(rng.permutation(data.n_items)[:10])
    two_stage = np.array(two_stage, dtype=np.int64)
    blend = np.roll(two_stage, 1, axis=1)
    blend[:, -1] = -1
    popularity = np.tile(np.argsort(-data.item_popularity, kind="stable")[:10], (len(users), 1))
    ease = np.array(ease, dtype=np.int64)
    return {"two_stage": two_stage, "blend": blend, "ease": ease, "mf": ease[:, ::-1].copy(), "popularity": popularity}


@pytest.fixture(scope="module")
def run(toy, tmp_path_factory):
    data, split, items = toy
    users = data.scored_users("test")[5:]                           # not every user with a positive
    path = tmp_path_factory.mktemp("run")
    _write_run(path, data, _lists(data, users), users,
               valid={"two_stage": 0.9, "blend": 0.8, "ease": 0.3, "mf": 0.2, "popularity": 0.1})
    shown = examples.example_users(path, items=items)
    return path, users, shown


def test_the_three_users_are_each_terciles_median_with_ties_to_the_smallest_id(toy, run):
    data, _, _ = toy
    _, users, shown = run
    counts = np.bincount(data.train.user, minlength=data.n_users)
    seg = analysis.activity_segments(data, users)
    assert [e["segment"] for e in shown] == ["light", "medium", "heavy"]
    for e in shown:
        members = seg.index[seg.astype(str) == e["segment"]].to_numpy()
        median = statistics.median_low(counts[members].tolist())
        with_median = members[counts[members] == median]
        assert len(with_median) > 1 or e["segment"] == "heavy"      # the toy has ties: the tie-break matters
        assert e["index"] == with_median.min()
        assert e["train_ratings"] == median == counts[e["index"]]
        assert e["user"] == data.users.raw[e["index"]] == e["index"] + 1   # the data set's id, not the index
        assert e["index"] in users and e["segment_users"] == len(members)
    assert shown[0]["train_ratings"] < shown[1]["train_ratings"] < shown[2]["train_ratings"]
    assert "median" in examples.example_rule() and "smallest user id" in examples.example_rule()


def test_median_is_the_lower_middle_value_and_ties_go_to_the_smallest_id():
    """12 users, thirds of 4: light counts 3, 3, 5, 7 (median 3: users 2 and 9 tie, 2 wins), medium
    8, 8, 8, 9 (median 8: users 5, 7, 11 tie, 5 wins), heavy 12, 13, 15, 20 (lower middle 13, user 4)."""
    counts = {9: 3, 2: 3, 12: 5, 1: 7, 7: 8, 11: 8, 5: 8, 3: 9, 10: 12, 4: 13, 8: 15, 6: 20}
    rows = pd.DataFrame([(u, i + 1, 4.0, 1_600_000_000 + 10 * i) for u, c in counts.items() for i in range(c)],
                        columns=["user_id", "item_id", "rating", "timestamp"])
    split = types.SimpleNamespace(train=rows, valid=rows.iloc[:0], test=rows.iloc[:0],
                                  params={"strategy": "user_temporal"})
    data = SplitData.from_split(split, name="hand")
    picked = examples.pick_users(data, data.users.encode(list(counts)))
    assert picked["user"].tolist() == [2, 5, 4]
    assert picked["train_ratings"].tolist() == [3, 8, 13]
    assert picked["segment"].tolist() == ["light", "medium", "heavy"]


def test_pick_users_breaks_ties_by_smallest_id_and_needs_three_users(toy):
    data, _, _ = toy
    counts = np.bincount(data.train.user, minlength=data.n_users)
    same = np.flatnonzero(counts == np.bincount(counts).argmax())   # the most common count
    assert len(same) >= 3
    picked = examples.pick_users(data, same[::-1])                  # order of the input does not matter
    seg = analysis.activity_segments(data, same)
    assert picked["index"].tolist() == [seg.index[seg.astype(str) == s].min() for s in ("light", "medium", "heavy")]
    assert picked["index"].iloc[0] == same.min()
    assert (picked["train_ratings"] == counts[same[0]]).all()
    assert examples.pick_users(data, same[:2]).empty
    assert examples.example_html([]).count("No scored test users") == 1


def test_hits_are_exactly_the_test_positives_and_titles_come_from_the_data_set(toy, run):
    data, split, items = toy
    _, _, shown = run
    title = items.set_index("item_id")["title"]
    test = split.test
    for e in shown:
        liked = set(test.loc[(test["user_id"] == e["user"]) & (test["rating"] >= 4), "item_id"])
        assert set(e["positives"]["item_id"]) == liked
        assert (e["positives"]["title"].to_numpy() == title.reindex(e["positives"]["item_id"]).to_numpy()).all()
        assert [m for m, _ in e["models"]] == ["two_stage", "blend", "ease", "popularity"]   # ease: best valid
        for m, top in e["tops"].items():
            real = top["item_id"].notna().to_numpy()
            ids = top["item_id"].to_numpy(dtype=float, na_value=np.nan)
            expected = np.array([r and int(i) in liked for r, i in zip(real, np.nan_to_num(ids))])
            assert (top["hit"].to_numpy() == expected).all(), m
            assert (top.loc[real, "title"].to_numpy() == title.reindex(ids[real].astype(int)).to_numpy()).all()
        assert e["tops"]["two_stage"]["hit"].sum() == min(len(liked), 4)    # the positives planted first
        assert e["tops"]["blend"]["title"].isna().tolist() == [False] * 9 + [True]   # padding: no title, no hit
        assert not e["tops"]["blend"]["hit"].iloc[-1]


def test_history_is_the_last_ratings_before_test_newest_first(toy, run):
    _, split, items = toy
    _, _, shown = run
    for e in shown:
        before = pd.concat([split.train, split.valid])
        before = before[before["user_id"] == e["user"]].sort_values(["timestamp", "item_id"], ascending=False)
        assert e["n_history"] == len(before)
        h = e["history"]
        assert len(h) == min(10, len(before))
        assert h["item_id"].tolist() == before["item_id"].head(10).tolist()
        assert h["rating"].tolist() == before["rating"].head(10).astype(float).tolist()
        assert h["title"].tolist() == items.set_index("item_id")["title"].reindex(h["item_id"]).tolist()
        assert set(h["period"]) <= {"train", "valid"}


def test_html_marks_every_hit_escapes_titles_and_stays_offline(toy, run):
    _, _, shown = run
    shown = [dict(e) for e in shown]
    first = shown[0]
    tops = {m: f.copy() for m, f in first["tops"].items()}
    tops["ease"].loc[0, "title"] = ODD_TITLE                        # an odd title in a list
    first["tops"] = tops
    first["history"] = first["history"].copy()
    first["history"].loc[first["history"].index[0], "title"] = ODD_TITLE   # and in a history
    html = examples.example_html(shown)
    n_hits = sum(int(f["hit"].sum()) for e in shown for f in e["tops"].values())
    assert html.count("<td class=\"rs-ex-hit\"") == n_hits > 0
    assert html.count(examples.HIT_MARK) == n_hits + 1              # one more in the legend line
    assert "<b>" not in html
    assert html.count("Fish &lt;b&gt;&amp;amp; &quot;Chips&quot;") == 4   # text and hover title, twice
    for e in shown:
        assert f"User {e['user']} ({e['segment']}: {e['train_ratings']} train ratings" in html
    assert "table-layout: fixed" in html and "text-overflow: ellipsis" in html
    assert "http" not in html and "src=" not in html and "<script" not in html


def test_models_follow_paired_json_and_skip_missing_files(toy, tmp_path):
    data, _, items = toy
    users = data.scored_users("test")
    lists = _lists(data, users)
    del lists["popularity"]
    _write_run(tmp_path, data, lists, users, valid={"two_stage": 0.9, "blend": 0.8, "ease": 0.3, "mf": 0.2},
               paired={"target": "two_stage", "strongest_single_stage": {"model": "mf", "valid_ndcg@10": 0.2}})
    assert [m for m, _ in examples.example_models(tmp_path)] == ["two_stage", "blend", "mf"]
    shown = examples.example_users(tmp_path, items=items)
    assert len(shown) == 3 and list(shown[0]["tops"]) == ["two_stage", "blend", "mf"]
