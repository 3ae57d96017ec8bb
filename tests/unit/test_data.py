"""The data layer: registry, verified atomic fetch (mirror, zip), typed loaders, cache, errors."""
from __future__ import annotations

import os
import warnings
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys_lib import config, data
from recsys_lib.data import download, load, verify
from recsys_lib.errors import DataError

MIRROR = Path(os.environ.get("MOVIELENS_MIRROR", config.PROJECT_ROOT.parent / "shared" / "movielens"))
needs_mirror = pytest.mark.skipif(not (MIRROR / "ml-latest-small").is_dir(),
                                  reason=f"no ml-latest-small in the mirror {MIRROR}")
needs_mirror_100k = pytest.mark.skipif(not (MIRROR / "ml-100k").is_dir(),
                                       reason=f"no ml-100k in the mirror {MIRROR}")

RATINGS = "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n1,20,3.5,964982800\n2,10,0.5,964990000\n"
MOVIES = ('movieId,title,genres\n10,Toy Story (1995),Adventure|Animation|Children\n'
          '20,"American President, The (1995)",Comedy|Drama|Romance\n'
          '30,"Cité des enfants perdus, La (1995)",Fantasy\n'
          '40,Babylon 5,(no genres listed)\n')
TAGS = 'userId,movieId,tag,timestamp\n1,10,funny,1445714994\n2,20,"quotable, very",1445714996\n'


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setenv("RECSYS_DATA_DIR", str(root))
    monkeypatch.delenv("MOVIELENS_MIRROR", raising=False)
    return root


def write_set(folder: Path, ratings=RATINGS, movies=MOVIES, tags=TAGS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("ratings.csv", ratings), ("movies.csv", movies), ("tags.csv", tags)):
        if text is not None:
            (folder / name).write_text(text, encoding="utf-8")
    return folder


def copy_mirror_set(dest: Path) -> Path:
    """A writable copy of the mirror's ml-latest-small."""
    out = dest / "ml-latest-small"
    out.mkdir(parents=True)
    for f in (MIRROR / "ml-latest-small").iterdir():
        shutil.copyfile(f, out / f.name)
    return out


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] if folder.exists() else []


# ------------------------------------------------------------------ registry
def test_registry_and_unknown_name():
    assert set(data.DATASETS) >= {"ml-latest-small", "ml-100k", "ml-1m", "ml-20m", "ml-25m", "ml-32m",
                                  "synthetic", "synthetic-tiny", "synthetic-32m"}
    assert data.DATASETS["ml-100k"].url == "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
    assert data.DATASETS["ml-100k"].md5 is None       # no per-file md5s published: recorded, see below
    assert data.DATASETS["ml-32m"].url == "https://files.grouplens.org/datasets/movielens/ml-32m.zip"
    assert data.DATASETS["ml-32m"].md5["ratings.csv"] == "cf12b74f9ad4b94a011f079e26d4270a"
    assert data.DATASETS["synthetic"].preset == "demo"
    with pytest.raises(DataError, match="valid names: .*ml-latest-small"):
        data.fetch("ml-99m")
    with pytest.raises(DataError, match="ml-99m"):
        data.load_dataset("ml-99m")
    with pytest.raises(DataError, match="neither a dataset name"):
        data.load_interactions("no-such-set")


# ------------------------------------------------------------------ real data through the mirror
@needs_mirror
def test_mirror_ml_latest_small_counts_and_noop(data_dir, monkeypatch):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (MIRROR / "ml-latest-small").iterdir())
    path = data.fetch("ml-latest-small", mirror=MIRROR)
    assert path == data_dir / "raw" / "ml-latest-small"
    marker = data.read_marker(path)
    assert marker["verified_against"] == "registry md5"
    assert marker["checksums"]["ratings.csv"] == "ac0cf1d26aed3a5b6777a295231976ad"
    # a second fetch does nothing: no hashing, no copying
    monkeypatch.setattr(verify, "md5_file", lambda p: pytest.fail("second fetch hashed a file"))
    monkeypatch.setattr(download.shutil, "copyfile", lambda *a: pytest.fail("second fetch copied"))
    monkeypatch.setenv("MOVIELENS_MIRROR", str(MIRROR))
    assert data.fetch("ml-latest-small") == path
    monkeypatch.undo()
    monkeypatch.setenv("RECSYS_DATA_DIR", str(data_dir))
    items = data.load_items("ml-latest-small")
    assert len(items) == 9_742
    assert len(data.load_tags("ml-latest-small")) == 3_683
    by_id = items.set_index("item_id")
    assert by_id.loc[29, "title"] == "City of Lost Children, The (Cité des enfants perdus, La) (1995)"
    assert by_id.loc[29, "year"] == 1995
    assert by_id.loc[114335, "genres"] == []
    assert items["year"].isna().sum() > 0                          # titles without a year exist
    # the mirror is only read
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (MIRROR / "ml-latest-small").iterdir()) == before
    assert not leftovers(data_dir / "raw")


@needs_mirror
def test_mirror_ml_latest_small_official_counts():
    """README of ml-latest-small: 100,836 ratings by 610 users, 9,742 movies, 3,683 tags. The
    official file has no rating of an unknown movie, so nothing is dropped and nothing warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", data.DataIntegrityWarning)
        ds = data.load_dataset("ml-latest-small", mirror=MIRROR)
    assert ds.dropped_rows == 0
    assert len(ds.interactions) == 100_836
    assert ds.interactions["user_id"].nunique() == 610
    assert len(ds.items) == 9_742
    assert len(ds.tags) == 3_683
    assert ds.checksums == dict(data.DATASETS["ml-latest-small"].md5)
    assert ds.interactions.dtypes.astype(str).to_dict() == data.INTERACTION_DTYPES


@needs_mirror
def test_corrupted_mirror_file_is_rejected(tmp_path, data_dir):
    mirror = tmp_path / "mirror"
    bad = copy_mirror_set(mirror)
    raw = bytearray((bad / "ratings.csv").read_bytes())
    raw[5000] = ord("9") if raw[5000] != ord("9") else ord("8")
    (bad / "ratings.csv").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"ratings\.csv.*expected md5 ac0cf1d26aed3a5b6777a295231976ad, got"):
        data.fetch("ml-latest-small", mirror=mirror)
    assert not (data_dir / "raw" / "ml-latest-small").exists()
    assert not leftovers(data_dir / "raw")


@needs_mirror
def test_mirror_zip_and_force_replace(tmp_path, data_dir):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "ml-latest-small.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted((MIRROR / "ml-latest-small").iterdir()):
            zf.write(f, f"ml-latest-small/{f.name}")            # one top-level folder, like grouplens
    path = data.fetch("ml-latest-small", mirror=mirror)
    assert (path / "ratings.csv").stat().st_size == (MIRROR / "ml-latest-small" / "ratings.csv").stat().st_size
    (path / "junk.txt").write_text("x")
    assert data.fetch("ml-latest-small", mirror=mirror) == path and (path / "junk.txt").exists()
    data.fetch("ml-latest-small", mirror=mirror, force=True)
    assert not (path / "junk.txt").exists()                      # replaced as a whole
    assert data.read_marker(path)["source"].endswith("ml-latest-small.zip")
    assert not leftovers(data_dir / "raw")


def test_mirror_without_the_set(tmp_path, data_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*ml-latest-small\.zip.*ml-latest-small/"):
        data.fetch("ml-latest-small", mirror=tmp_path / "empty")
    assert not (data_dir / "raw" / "ml-latest-small").exists()
    assert not leftovers(data_dir / "raw")


# ------------------------------------------------------------------ zips, .dat family, checksums.txt
def make_ml1m_zip(path: Path, checksums: str | None = None) -> Path:
    files = {
        "ratings.dat": "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n".encode(),
        "movies.dat": ("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                       "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                       "3::Ça commence aujourd'hui (1999)::Drama\n").encode("latin-1"),
        "users.dat": b"1::F::1::10::48067\n2::M::56::16::70072\n",
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, raw in files.items():
            zf.writestr(f"ml-1m/{name}", raw)
        if checksums is not None:
            zf.writestr("ml-1m/checksums.txt", checksums)
    return path


def test_dat_family_from_zip(tmp_path, data_dir):
    mirror = tmp_path / "m"
    mirror.mkdir()
    make_ml1m_zip(mirror / "ml-1m.zip")
    ds = data.load_dataset("ml-1m", mirror=mirror)
    assert ds.interactions.dtypes.astype(str).to_dict() == data.INTERACTION_DTYPES
    assert ds.interactions["rating"].tolist() == [5.0, 3.0, 4.0]
    items = ds.items.set_index("item_id")
    assert items.loc[3, "title"] == "Ça commence aujourd'hui (1999)"   # latin-1 decoded
    assert items.loc[661, "genres"] == ["Animation", "Children's", "Musical"]
    assert list(ds.tags.columns) == load.TAG_COLUMNS and len(ds.tags) == 0
    assert ds.tags.dtypes.astype(str).tolist()[:2] == ["int32", "int32"]
    assert str(ds.tags["timestamp"].dtype) == "int64"
    assert set(ds.checksums) == {"movies.dat", "ratings.dat", "users.dat"}


def test_archive_checksums_txt_is_used(tmp_path, data_dir):
    mirror = tmp_path / "m"
    mirror.mkdir()
    make_ml1m_zip(mirror / "ml-1m.zip", checksums="0" * 32 + "  ratings.dat\n")
    with pytest.raises(DataError, match=r"ratings\.dat.*expected md5 0{32}, got"):
        data.fetch("ml-1m", mirror=mirror)
    assert not (data_dir / "raw" / "ml-1m").exists()
    good = tmp_path / "good"
    good.mkdir()
    make_ml1m_zip(good / "ml-1m.zip")
    import hashlib
    with zipfile.ZipFile(good / "ml-1m.zip") as zf:
        md5 = hashlib.md5(zf.read("ml-1m/ratings.dat")).hexdigest()
    make_ml1m_zip(mirror / "ml-1m.zip", checksums=f"MD5 (ratings.dat) = {md5}\n")
    path = data.fetch("ml-1m", mirror=mirror)
    assert data.read_marker(path)["verified_against"] == "checksums.txt"


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_zip(tmp_path, data_dir, damage):
    mirror = tmp_path / "m"
    mirror.mkdir()
    z = make_ml1m_zip(mirror / "ml-1m.zip")
    raw = z.read_bytes()
    z.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"PK\x03\x04" + b"\x00" * 200)
    with pytest.raises(DataError, match=r"ml-1m\.zip.*corrupt or truncated"):
        data.fetch("ml-1m", mirror=mirror)
    assert not (data_dir / "raw" / "ml-1m").exists()
    assert not leftovers(data_dir / "raw")


def test_hand_placed_folder_is_verified_not_modified(data_dir):
    folder = write_set(data_dir / "raw" / "ml-20m")
    files = sorted(p.name for p in folder.iterdir())
    assert data.fetch("ml-20m") == folder
    assert sorted(p.name for p in folder.iterdir()) == files      # no marker written into it
    bad = write_set(data_dir / "raw" / "ml-32m")                  # wrong md5s for ml-32m
    with pytest.raises(DataError, match="--force"):
        data.fetch("ml-32m")
    assert sorted(p.name for p in bad.iterdir()) == files


# ------------------------------------------------------------------ loaders on small folders
def test_csv_loaders_types_and_parsing(tmp_path):
    folder = write_set(tmp_path / "set")
    inter = data.load_interactions(folder)
    assert inter.dtypes.astype(str).to_dict() == data.INTERACTION_DTYPES
    assert inter["rating"].tolist() == [4.0, 3.5, 0.5]
    items = data.load_items(folder)
    assert items["item_id"].dtype == np.int32 and str(items["year"].dtype) == "Int16"
    assert items["title"].tolist()[1] == "American President, The (1995)"
    assert items["title"].tolist()[2] == "Cité des enfants perdus, La (1995)"
    assert items["year"].tolist()[:3] == [1995, 1995, 1995] and pd.isna(items["year"].iloc[3])
    assert items["genres"].tolist() == [["Adventure", "Animation", "Children"],
                                        ["Comedy", "Drama", "Romance"], ["Fantasy"], []]
    tags = data.load_tags(folder)
    assert tags["tag"].tolist() == ["funny", "quotable, very"]
    assert tags.dtypes.astype(str).to_dict()["user_id"] == "int32"
    assert len(data.load_tags(write_set(tmp_path / "notags", tags=None))) == 0


@pytest.mark.parametrize("ratings, match", [
    ("userId,movieId,timestamp\n1,10,964982703\n", r"ratings\.csv: missing column\(s\) \['rating'\]"),
    ("userId,movieId,rating,timestamp\n1,10,good,964982703\n", r"ratings\.csv: cannot parse.*numeric"),
    ("userId,movieId,rating,timestamp\n1,10,4.0,yesterday\n", r"ratings\.csv: cannot parse.*numeric"),
    ("", r"ratings\.csv: the file is empty"),
    ("userId,movieId,rating,timestamp\n", r"ratings\.csv: the ratings file has a header but no rows"),
    ("userId,movieId,rating,timestamp\n1,10,,964982703\n", r"ratings\.csv: column 'rating' has 1 empty"),
    ("userId,movieId,rating,timestamp\n1,10,7.0,964982703\n", r"ratings\.csv: ratings outside 0-5"),
])
def test_bad_ratings_files(tmp_path, ratings, match):
    folder = write_set(tmp_path / "bad", ratings=ratings)
    with pytest.raises(DataError, match=match):
        data.load_interactions(folder)


def test_bad_movies_and_tags_files(tmp_path):
    folder = write_set(tmp_path / "bad", movies="movieId,name\n1,x\n", tags="")
    with pytest.raises(DataError, match=r"movies\.csv: missing column\(s\) \['title', 'genres'\]"):
        data.load_items(folder)
    with pytest.raises(DataError, match=r"tags\.csv: the file is empty"):
        data.load_tags(folder)
    with pytest.raises(DataError, match=r"no ratings\.csv or ratings\.dat"):
        data.load_interactions(tmp_path)


def test_parquet_cache_is_used_and_invalidated(tmp_path, data_dir):
    folder = write_set(tmp_path / "set")
    first = data.load_interactions(folder)
    cache = load._cache_file(folder / "ratings.csv")
    assert cache.is_file() and str(cache).startswith(str(data_dir / "processed"))
    assert sorted(p.name for p in folder.iterdir()) == ["movies.csv", "ratings.csv", "tags.csv"]
    pd.testing.assert_frame_equal(data.load_interactions(folder), first)
    # the cached copy is what is read (the CSV is not parsed again) ...
    cache_mtime = cache.stat().st_mtime_ns
    data.load_interactions(folder)
    assert cache.stat().st_mtime_ns == cache_mtime
    # ... until the source changes
    (folder / "ratings.csv").write_text(RATINGS + "3,30,2.0,964999999\n")
    assert len(data.load_interactions(folder)) == 4
    # a set under data/raw caches under data/processed/<name>/cache
    raw = write_set(data_dir / "raw" / "ml-25m")
    data.load_interactions(raw)
    assert (data_dir / "processed" / "ml-25m" / "cache" / "ratings.arrow").is_file()


def test_integrity_rated_movie_missing_from_movies(tmp_path, data_dir):
    write_set(data_dir / "raw" / "ml-20m", ratings=RATINGS + "999,999999,5.0,1493846415\n")
    with pytest.warns(data.DataIntegrityWarning, match=r"dropped 1 rating row\(s\).*user 999, movie 999999"):
        ds = data.load_dataset("ml-20m")
    assert 999999 not in set(ds.interactions["item_id"]) and ds.dropped_rows == 1


def test_ratings_of_unknown_movies_are_dropped_with_a_warning():
    inter = pd.DataFrame({"user_id": [1, 2], "item_id": [10, 99], "rating": [4.0, 5.0], "timestamp": [1, 2]})
    items = pd.DataFrame({"item_id": [10], "title": ["A (2000)"], "genres": [["Drama"]]})
    with pytest.warns(data.DataIntegrityWarning, match="movie 99"):
        kept, dropped = data.check_integrity(inter, items, "ratings.csv")
    assert dropped == 1 and kept["item_id"].tolist() == [10]


# ------------------------------------------------------------------ sets without published checksums
def test_unverifiable_copy_records_md5s_and_a_loader_failure_forces_a_real_refetch(tmp_path, data_dir):
    """ml-20m from a mirror without checksums: the md5s seen are recorded; when the loader refuses
    the copy (a truncated ratings.csv) it is marked bad, so the next fetch copies it again instead
    of trusting the marker; a mirror whose copy changed is fetched and verified again."""
    mirror = tmp_path / "m"
    write_set(mirror / "ml-20m", ratings=RATINGS + "2,20,4")           # cut mid-row
    path = data.fetch("ml-20m", mirror=mirror)
    marker = data.read_marker(path)
    assert marker["verified_against"].startswith("nothing") and set(marker["checksums"]) >= {"ratings.csv"}
    with pytest.raises(DataError, match="marked bad"):
        data.load_dataset("ml-20m", mirror=mirror)
    assert data.read_marker(path)["status"] == "bad"
    data.fetch("ml-20m", mirror=mirror)                                 # really fetched again
    assert "status" not in data.read_marker(path)
    write_set(mirror / "ml-20m")                                        # the mirror's copy repaired
    with pytest.warns(data.DataIntegrityWarning, match="ratings.csv differ"):
        ds = data.load_dataset("ml-20m", mirror=mirror)
    assert len(ds.interactions) == 3
    assert data.fetch("ml-20m", mirror=mirror) == path and "status" not in data.read_marker(path)


# ------------------------------------------------------------------ ml-100k (u.data, u.item, u.genre)
# Made-up rows in ml-100k's layout: u.data tab-separated, u.item pipe-separated latin-1 with 19
# genre flags (unknown, Action, Adventure, Animation, Children's, Comedy, ...), u.genre naming them.
ML100K_DATA = "7\t3\t4\t880000000\n7\t1\t2\t880000100\n9\t3\t5\t879000000\n9\t4\t1\t879500000\n"
GENRE_NAMES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def _flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRE_NAMES)


KIDS = "Children's"
ML100K_ITEM = (f"1|Paper Lanterns (1994)|01-Mar-1994||http://example.org/1|"
               f"{_flags('Animation', KIDS, 'Comedy')}\n"
               f"2|Été à Lyon, L' (1996)|12-Jul-1996|||{_flags('Drama', 'Romance')}\n"
               f"3|Nobody Knows|||http://example.org/3|{_flags('unknown')}\n"
               f"4|Grey Orbit (1971)|01-Jan-1971|||{_flags('unknown', 'Sci-Fi')}\n")
ML100K_GENRE = "".join(f"{g}|{i}\n" for i, g in enumerate(GENRE_NAMES)) + "\n"


def write_ml100k(folder: Path, data_text=ML100K_DATA, item=ML100K_ITEM, genre=ML100K_GENRE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text(data_text, encoding="ascii")
    (folder / "u.item").write_bytes(item.encode("latin-1"))
    if genre is not None:
        (folder / "u.genre").write_text(genre, encoding="ascii")
    (folder / "u.user").write_text("7|30|F|writer|00000\n9|41|M|other|00000\n", encoding="ascii")
    return folder


def test_ml100k_loaders_match_the_csv_frames(tmp_path):
    folder = write_ml100k(tmp_path / "ml-100k")
    csv = write_set(tmp_path / "csv")
    inter = data.load_interactions(folder)
    assert inter.dtypes.astype(str).to_dict() == data.INTERACTION_DTYPES
    assert inter.values.tolist() == [[7, 3, 4, 880000000], [7, 1, 2, 880000100],
                                     [9, 3, 5, 879000000], [9, 4, 1, 879500000]]
    pd.testing.assert_frame_equal(data.load_interactions(folder / "u.data"), inter)   # a file works too
    items = data.load_items(folder)
    assert list(items.columns) == ["item_id", "title", "year", "genres"]
    assert items.dtypes.to_dict() == data.load_items(csv).dtypes.to_dict()
    assert items["item_id"].tolist() == [1, 2, 3, 4]
    assert items["title"].tolist() == ["Paper Lanterns (1994)", "Été à Lyon, L' (1996)", "Nobody Knows",
                                       "Grey Orbit (1971)"]              # latin-1 decoded
    assert items["year"].tolist()[:2] == [1994, 1996] and pd.isna(items["year"].iloc[2])
    assert items["year"].iloc[3] == 1971
    assert items["genres"].tolist() == [["Animation", "Children's", "Comedy"], ["Drama", "Romance"],
                                        [], ["Sci-Fi"]]           # "unknown" is "no genres"
    tags = data.load_tags(folder)
    assert len(tags) == 0
    assert tags.dtypes.to_dict() == load._empty_tags().dtypes.to_dict()
    assert list(tags.columns) == load.TAG_COLUMNS


def test_ml100k_genre_names_come_from_u_genre(tmp_path):
    renamed = ML100K_GENRE.replace("Sci-Fi|15", "Science Fiction|15")
    items = data.load_items(write_ml100k(tmp_path / "a", genre=renamed))
    assert items["genres"].iloc[3] == ["Science Fiction"]
    # without u.genre beside u.item: the release's own 19 names
    items = data.load_items(write_ml100k(tmp_path / "b", genre=None) / "u.item")
    assert items["genres"].iloc[0] == ["Animation", "Children's", "Comedy"]
    assert load.ML100K_GENRES == GENRE_NAMES


@pytest.mark.parametrize("kwargs, match", [
    ({"data_text": "7\t3\t4\n"}, r"u\.data: cannot parse the ratings file"),
    ({"data_text": "7\t3\tgood\t880000000\n"}, r"u\.data: cannot parse the ratings file"),
    ({"data_text": "7\t3\t9\t880000000\n"}, r"u\.data: ratings outside 0-5"),
    ({"data_text": ""}, r"u\.data: the file is empty"),
    ({"item": "1|A (1990)|||" + "|0" * 18 + "\n"}, r"u\.item: 18 genre flag\(s\).*19 genres"),
    ({"genre": "Action|1\nunknown|0\n"}, r"u\.genre: expected 'name\|index' lines"),
])
def test_ml100k_bad_files(tmp_path, kwargs, match):
    folder = write_ml100k(tmp_path / "bad", **kwargs)
    with pytest.raises(DataError, match=match):
        data.load_interactions(folder) if "data_text" in kwargs else data.load_items(folder)


def test_ml100k_fetch_records_or_checks_md5s(tmp_path, data_dir):
    """From an official-layout zip (no checksums file) the md5s seen are recorded; from a mirror
    folder with its own checksums.md5 they are checked against it, and a mismatch is refused."""
    import hashlib
    src = write_ml100k(tmp_path / "src")
    mirror = tmp_path / "zipped"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "ml-100k.zip", "w") as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, f"ml-100k/{f.name}")                     # one top-level folder, like grouplens
    ds = data.load_dataset("ml-100k", mirror=mirror)
    marker = data.read_marker(ds.path)
    assert marker["verified_against"].startswith("nothing")
    assert set(marker["checksums"]) == {"u.data", "u.genre", "u.item", "u.user"}
    assert ds.checksums["u.data"] == hashlib.md5(ML100K_DATA.encode()).hexdigest()
    assert len(ds.interactions) == 4 and len(ds.items) == 4 and len(ds.tags) == 0 and ds.dropped_rows == 0

    folder_mirror = tmp_path / "folder"
    good = write_ml100k(folder_mirror / "ml-100k")
    (good / "checksums.md5").write_text(
        "".join(f"{data.md5_file(good / f)}  {f}\n" for f in ("u.data", "u.item", "u.genre", "u.user")))
    path = data.fetch("ml-100k", mirror=folder_mirror, force=True)
    assert data.read_marker(path)["verified_against"] == "checksums.md5"
    (good / "u.data").write_text(ML100K_DATA.replace("880000000", "880000001"))
    with pytest.raises(DataError, match=r"checksum mismatch for u\.data"):
        data.fetch("ml-100k", mirror=folder_mirror, force=True)
    assert not leftovers(data_dir / "raw")


@needs_mirror_100k
def test_mirror_ml100k_counts(data_dir):
    """README of ml-100k: 100,000 ratings (1-5) by 943 users on 1,682 movies; no tags."""
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (MIRROR / "ml-100k").iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error", data.DataIntegrityWarning)
        ds = data.load_dataset("ml-100k", mirror=MIRROR)
    assert ds.path == data_dir / "raw" / "ml-100k"
    assert ds.dropped_rows == 0
    assert len(ds.interactions) == 100_000
    assert ds.interactions["user_id"].nunique() == 943
    assert len(ds.items) == 1_682 and ds.interactions["item_id"].nunique() == 1_682
    assert ds.interactions.dtypes.astype(str).to_dict() == data.INTERACTION_DTYPES
    assert set(ds.interactions["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(ds.tags) == 0 and list(ds.tags.columns) == load.TAG_COLUMNS
    assert {"u.data", "u.item"} <= set(ds.checksums)
    assert ds.items["year"].notna().mean() > 0.99
    assert all(isinstance(g, list) for g in ds.items["genres"])
    assert not any("unknown" in g for g in ds.items["genres"])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (MIRROR / "ml-100k").iterdir()) == before


def test_a_real_data_set_never_loads_the_synthetic_generator():
    """Why: a notebook's completion record lists the modules its kernel loaded, and an edit to any
    of them reruns it (docs/running.md). The demo's generator must not be one of a real run's."""
    import subprocess
    import sys
    code = ("import sys\nfrom recsys_lib import data\nfrom recsys_lib.run import experiment\n"
            "print('recsys_lib.data.synthetic' in sys.modules, 'recsys_lib.models.blend' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]                # nor do the notebooks before 17_blend the blend
