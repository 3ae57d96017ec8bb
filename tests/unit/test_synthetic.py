"""The synthetic MovieLens-shaped data set: format, determinism, and that it is learnable."""
from __future__ import annotations

import dataclasses
import csv
import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recsys_lib import data
from recsys_lib.data import synthetic
from recsys_lib.errors import DataError

TITLE = re.compile(r"^.+ \((\d{4})\)$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset, generated once for the module into a private data folder."""
    root = tmp_path_factory.mktemp("data")
    mp = pytest.MonkeyPatch()
    mp.setenv("RECSYS_DATA_DIR", str(root))
    path = synthetic.generate("tiny", seed=0)
    yield path
    mp.undo()


def test_generate_writes_movielens_files(tiny):
    assert tiny.name == "synthetic-tiny"
    assert {p.name for p in tiny.iterdir()} >= {"ratings.csv", "movies.csv", "tags.csv", "links.csv",
                                                "checksums.txt", data.MARKER}
    heads = {n: (tiny / n).read_text(encoding="utf-8").split("\n", 1)[0] for n in synthetic.FILES}
    assert heads == {"ratings.csv": "userId,movieId,rating,timestamp",
                     "movies.csv": "movieId,title,genres",
                     "tags.csv": "userId,movieId,tag,timestamp",
                     "links.csv": "movieId,imdbId,tmdbId"}


def test_ratings_format_and_order(tiny):
    lines = (tiny / "ratings.csv").read_text().splitlines()[1:]
    assert len(lines) == synthetic.PRESETS["tiny"].n_ratings
    pat = re.compile(r"^\d+,\d+,(0\.5|[1-4]\.[05]|5\.0),\d{10}$")
    assert all(pat.match(line) for line in lines[:5000]), lines[:3]
    df = pd.read_csv(tiny / "ratings.csv")
    assert set(df["rating"].unique()) <= {x / 2 for x in range(1, 11)}
    assert 0.4 < (df["rating"] >= 4).mean() < 0.6
    # sorted by userId then timestamp, like MovieLens; one rating per (user, movie)
    key = df[["userId", "timestamp"]].to_numpy()
    assert (np.diff(key[:, 0]) >= 0).all()
    same = np.diff(key[:, 0]) == 0
    assert (np.diff(key[:, 1])[same] >= 0).all()
    assert not df.duplicated(["userId", "movieId"]).any()
    assert df["userId"].nunique() == 400
    per_user = df.groupby("userId").size()
    assert per_user.min() >= 15
    years = pd.to_datetime(df["timestamp"], unit="s").dt.year
    assert years.min() >= 2015 and years.max() <= 2023


def test_movies_titles_genres_links(tiny):
    with open(tiny / "movies.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert len(rows) == 300
    assert sum(bool(TITLE.match(t)) for _, t, _ in rows) >= 0.95 * len(rows)
    assert any("," in t for _, t, _ in rows)                       # some titles need quoting...
    raw = (tiny / "movies.csv").read_text(encoding="utf-8")
    assert re.search(r'^\d+,"[^"\n]*,[^"\n]*",', raw, re.M)        # ...and are quoted
    vocab = set(synthetic.GENRES)
    for _, _, g in rows:
        assert g == synthetic.NO_GENRES or set(g.split("|")) <= vocab
    ids = [int(m) for m, _, _ in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    links = pd.read_csv(tiny / "links.csv", dtype=str)
    assert links["imdbId"].str.fullmatch(r"\d{7}").all()
    assert links["movieId"].astype(int).tolist() == ids
    tags = pd.read_csv(tiny / "tags.csv")
    assert len(tags) == synthetic.PRESETS["tiny"].n_tags
    assert set(tags["movieId"]) <= set(ids)


def test_loader_reads_generated_set(tiny):
    ds = data.load_dataset("synthetic-tiny")      # same RECSYS_DATA_DIR: no regeneration
    assert ds.path == tiny
    assert len(ds.interactions) == 25_000 and len(ds.items) == 300 and len(ds.tags) == 2_000
    assert ds.checksums["ratings.csv"] == data.md5_file(tiny / "ratings.csv")


def test_deterministic_same_bytes(tiny, tmp_path):
    again = synthetic.generate("tiny", seed=0, out_dir=tmp_path / "again")
    for name in synthetic.FILES + ["checksums.txt"]:
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    other = synthetic.generate("tiny", seed=1, out_dir=tmp_path / "other")
    assert (other / "ratings.csv").read_bytes() != (tiny / "ratings.csv").read_bytes()


def test_generate_is_idempotent_and_force_replaces(tiny, tmp_path):
    mtime = (tiny / "ratings.csv").stat().st_mtime_ns
    assert synthetic.generate("tiny", seed=0) == tiny
    assert (tiny / "ratings.csv").stat().st_mtime_ns == mtime
    out = synthetic.generate("tiny", seed=0, out_dir=tmp_path / "t")
    with pytest.raises(DataError, match="force"):
        synthetic.generate("tiny", seed=3, out_dir=out)
    synthetic.generate("tiny", seed=3, out_dir=out, force=True)
    assert data.read_marker(out)["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp leftovers
    with pytest.raises(DataError, match="valid presets"):
        synthetic.generate("huge")


def test_a_folder_from_an_older_definition_of_the_preset_is_written_again(tiny, tmp_path, monkeypatch):
    """The demo preset shrank on 2026-12-06: a folder generated before must not be kept at the old size."""
    out = synthetic.generate("tiny", seed=0, out_dir=tmp_path / "t")
    first = (out / "ratings.csv").read_bytes()
    smaller = dataclasses.replace(synthetic.PRESETS["tiny"], n_ratings=20_000)
    monkeypatch.setitem(synthetic.PRESETS, "tiny", smaller)
    synthetic.generate("tiny", seed=0, out_dir=out)
    assert data.read_marker(out)["sizes"]["n_ratings"] == 20_000
    assert len((out / "ratings.csv").read_text().splitlines()) == 20_000 + 1
    monkeypatch.undo()
    synthetic.generate("tiny", seed=0, out_dir=out)          # back to the current definition: the same bytes
    assert (out / "ratings.csv").read_bytes() == first


# ------------------------------------------------------------------ learnability
def _holdout(df: pd.DataFrame):
    """Each user's last 10% of rows (at least one) are held out, the rest is history."""
    df = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    n = df.groupby("user_id")["item_id"].transform("size").to_numpy()
    pos = df.groupby("user_id").cumcount().to_numpy()
    test = pos >= n - np.maximum(1, n // 10)
    return df[~test], df[test]


def _hit_rate(scores: np.ndarray, seen: sp.csr_matrix, truth: sp.csr_matrix, k: int = 10) -> float:
    scores = np.where(seen.toarray() > 0, -np.inf, scores)
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    hits = np.take_along_axis(truth.toarray() > 0, top, axis=1).any(1)
    users = np.asarray(truth.sum(1)).ravel() > 0
    return float(hits[users].mean())


def test_planted_structure_beats_popularity(tiny):
    """Item-item co-occurrence over each user's earlier rows beats global popularity."""
    df = data.load_interactions(tiny)
    train, test = _holdout(df)
    users, uidx = np.unique(df["user_id"], return_inverse=True)
    items, iidx = np.unique(df["item_id"], return_inverse=True)
    umap = dict(zip(users, range(len(users))))
    imap = dict(zip(items, range(len(items))))

    def mat(part, values=None):
        r = part["user_id"].map(umap).to_numpy()
        c = part["item_id"].map(imap).to_numpy()
        v = np.ones(len(part)) if values is None else values
        return sp.csr_matrix((v, (r, c)), shape=(len(users), len(items)))

    X = mat(train)
    truth = mat(test[test["rating"] >= 4])
    pop = np.asarray(X.sum(0)).ravel()
    hr_pop = _hit_rate(np.tile(pop, (len(users), 1)), X, truth)
    co = (X.T @ X).toarray()
    np.fill_diagonal(co, 0)
    co = co / np.sqrt(np.outer(pop, pop) + 1e-9)            # cosine co-occurrence
    hr_co = _hit_rate(X @ co, X, truth)
    assert hr_co >= 1.3 * hr_pop, (hr_co, hr_pop)
    # history-aware: the last 5 rows alone already carry signal (sequential correlation)
    last = train.groupby("user_id").tail(5)
    hr_last = _hit_rate(mat(last) @ co, X, truth)
    assert hr_last >= 1.3 * hr_pop, (hr_last, hr_pop)
