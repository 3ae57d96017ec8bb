"""Typed loaders of a fetched data set's files, and the ratings cache (see the package docstring)."""
from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .. import config
from ..errors import DataError
from .download import fetch
from .registry import DATASETS
from .verify import DataIntegrityWarning, data_files, mark_bad, md5_file, read_marker

INTERACTION_DTYPES = {"user_id": "int32", "item_id": "int32", "rating": "float32", "timestamp": "int64"}
TAG_COLUMNS = ["user_id", "item_id", "tag", "timestamp"]


@dataclass
class MovieLens:
    name: str
    path: Path
    interactions: pd.DataFrame
    items: pd.DataFrame
    tags: pd.DataFrame
    checksums: dict[str, str] = field(default_factory=dict)
    dropped_rows: int = 0          # rating rows dropped by check_integrity (unknown movie ids)


# ------------------------------------------------------------------ loading helpers
def _folder_of(path_or_name, mirror=None) -> Path:
    """A registry name is fetched; anything else must be an existing folder or file."""
    if isinstance(path_or_name, str) and path_or_name in DATASETS:
        return fetch(path_or_name, mirror=mirror)
    path = Path(path_or_name)
    if not path.exists():
        raise DataError(f"{path_or_name!r} is neither a dataset name ({', '.join(DATASETS)}) "
                        f"nor an existing folder or file")
    return path


# the file names of each kind, by family: CSV, ml-1m's .dat, ml-100k's u.* (no tags file)
_FILES = {"ratings": ("ratings.csv", "ratings.dat", "u.data"),
          "movies": ("movies.csv", "movies.dat", "u.item"),
          "tags": ("tags.csv", "tags.dat")}


def _find(path: Path, stem: str, required: bool = True) -> Path | None:
    if path.is_file():
        return path
    for fname in _FILES[stem]:
        if (path / fname).is_file():
            return path / fname
    if required:
        raise DataError(f"{path}: no {' or '.join(_FILES[stem])} in this folder; "
                        f"point the loader at a MovieLens folder (or fetch the data set)")
    return None


def _check_nonempty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; fetch the data set again (force=True)")


def _read_csv(path: Path, columns: dict[str, pa.DataType], what: str,
              newlines: bool = False) -> pa.Table:
    """Read the typed ``columns`` (header names -> arrow types) of a MovieLens CSV file."""
    _check_nonempty(path)
    with open(path, "rb") as f:
        header = f.readline().decode("utf-8", errors="replace").strip().lstrip("\ufeff")
    present = [c.strip().strip('"') for c in header.split(",")]
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} in the header {present}; "
                        f"a MovieLens {what} file has {list(columns)}")
    try:
        table = pacsv.read_csv(
            path, parse_options=pacsv.ParseOptions(newlines_in_values=newlines),
            convert_options=pacsv.ConvertOptions(column_types=columns, include_columns=list(columns)))
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot parse the {what} file ({exc}); ids, ratings and "
                        f"timestamps must be numeric; fix or re-fetch the file") from exc
    for name in columns:
        if columns[name] != pa.string() and table.column(name).null_count:
            raise DataError(f"{path}: column {name!r} has {table.column(name).null_count} empty "
                            f"value(s); fix or re-fetch the file")
    return table


def _read_dat(path: Path, names: list[str], types: list[pa.DataType], what: str) -> pa.Table:
    """ml-1m's ``::``-separated latin-1 files, read as typed columns."""
    _check_nonempty(path)
    raw = path.read_bytes().decode("latin-1").replace("::", "\x1f").encode("utf-8")
    try:
        return pacsv.read_csv(
            io.BytesIO(raw), read_options=pacsv.ReadOptions(column_names=names),
            parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=dict(zip(names, types))))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{path}: cannot parse the {what} file ({exc}); expected "
                        f"{'::'.join(names)} per line with numeric ids, ratings and timestamps") from exc


def _read_sep(path: Path, names: list[str], types: list[pa.DataType], what: str, delimiter: str,
              encoding: str = "utf8") -> pa.Table:
    """A headerless ``delimiter``-separated file (ml-100k's u.data, u.item), read as typed columns
    (``encoding`` transcoded to UTF-8 by pyarrow); DataError on a bad line or an empty number."""
    _check_nonempty(path)
    try:
        table = pacsv.read_csv(
            path, read_options=pacsv.ReadOptions(column_names=names, encoding=encoding),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=dict(zip(names, types))))
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot parse the {what} file ({exc}); expected {len(names)} "
                        f"{delimiter!r}-separated fields per line with numeric ids, ratings, "
                        f"timestamps and flags") from exc
    for name, typ in zip(names, types):
        if typ != pa.string() and table.column(name).null_count:
            raise DataError(f"{path}: column {name!r} has {table.column(name).null_count} empty "
                            f"value(s); fix or re-fetch the file")
    return table


def _cache_file(src: Path) -> Path:
    src = src.resolve()
    raw = config.raw_dir()
    try:
        rel = src.parent.relative_to(raw)
        return config.processed_dir(rel.parts[0]) / "cache" / f"{src.stem}.arrow"
    except (ValueError, IndexError):
        digest = hashlib.sha1(str(src).encode()).hexdigest()[:16]
        return config.processed_dir("_external") / "cache" / digest / f"{src.stem}.arrow"


def _fingerprint(src: Path) -> dict[bytes, bytes]:
    st = src.stat()
    return {b"recsys_source": str(src.resolve()).encode(), b"recsys_size": str(st.st_size).encode(),
            b"recsys_mtime_ns": str(st.st_mtime_ns).encode()}


def _ratings_table(path: Path, cache: bool) -> pa.Table:
    names = ["user_id", "item_id", "rating", "timestamp"]
    types = [pa.int32(), pa.int32(), pa.float32(), pa.int64()]
    if path.suffix == ".dat":
        table = _read_dat(path, names, types, "ratings")
    elif path.suffix == ".data":      # ml-100k's u.data: tab-separated, no header (no cache: 2 MB)
        table = _read_sep(path, names, types, "ratings", "\t")
    else:
        cfile = _cache_file(path) if cache else None
        fp = _fingerprint(path)
        if cfile is not None and cfile.is_file():
            try:
                reader = pa.ipc.open_file(pa.memory_map(str(cfile), "r"))
                meta = reader.schema.metadata or {}
                if all(meta.get(k) == v for k, v in fp.items()):
                    return reader.read_all()
            except (OSError, pa.ArrowException):
                pass   # unreadable cache: rebuild it
        table = _read_csv(path, {"userId": pa.int32(), "movieId": pa.int32(), "rating": pa.float32(),
                                 "timestamp": pa.int64()}, "ratings")
        table = table.rename_columns(names)
        _check_ratings(table, path)
        if cfile is not None:
            with config.atomic_write(cfile) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
                    pa.ipc.new_file(sink, table.schema.with_metadata(fp)) as writer:
                writer.write_table(table, max_chunksize=1 << 22)
        return table
    _check_ratings(table, path)
    return table


def _check_ratings(table: pa.Table, path: Path) -> None:
    if table.num_rows == 0:
        raise DataError(f"{path}: the ratings file has a header but no rows; re-fetch the data set")
    lo, hi = pc.min_max(table.column("rating")).values()
    if lo.as_py() < 0 or hi.as_py() > 5:
        raise DataError(f"{path}: ratings outside 0-5 (min {lo}, max {hi}); "
                        f"this is not a MovieLens ratings file")


# ------------------------------------------------------------------ public loaders
def load_interactions(path_or_name, mirror=None, cache: bool = True) -> pd.DataFrame:
    """Ratings as user_id int32, item_id int32, rating float32, timestamp int64.

    ``path_or_name``: a registry name (fetched if needed), a data-set folder, or a ratings file.
    ``cache`` reads/writes the Arrow IPC cache of a ``ratings.csv`` (see the module docstring)."""
    path = _find(_folder_of(path_or_name, mirror), "ratings")
    df = _ratings_table(path, cache).to_pandas()
    if df.dtypes.astype(str).to_dict() != INTERACTION_DTYPES:   # pragma: no cover
        df = df.astype(INTERACTION_DTYPES)
    return df


_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _items_frame(ids: np.ndarray, titles: list[str], genres: list[str], path: Path) -> pd.DataFrame:
    titles = [t.strip() for t in titles]
    years = pd.array([int(m.group(1)) if (m := _YEAR.search(t)) else None for t in titles],
                     dtype="Int16")
    glists = [[] if (not g or g == "(no genres listed)") else g.split("|") for g in genres]
    if len(ids) == 0:
        raise DataError(f"{path}: the movies file has a header but no rows; re-fetch the data set")
    return pd.DataFrame({"item_id": np.asarray(ids, dtype=np.int32),
                         "title": pd.Series(titles, dtype="str"),
                         "year": years,
                         "genres": pd.Series(glists, dtype="object")})


# ml-100k's 19 genre flags, as its u.genre names them (used when u.genre is not beside u.item).
# The names are kept as the release spells them, like ml-1m's ("Children's", where the CSV
# releases say "Children"); "unknown" is ml-100k's "no genre" and is dropped from the lists.
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]
ML100K_NO_GENRE = "unknown"


def _ml100k_genres(item_path: Path) -> list[str]:
    """The genre names of u.item's flag columns, in order: u.genre's (``name|index`` lines)
    when it lies beside u.item, else :data:`ML100K_GENRES`."""
    gpath = item_path.parent / "u.genre"
    if not gpath.is_file():
        return list(ML100K_GENRES)
    pairs = [line.rsplit("|", 1) for line in gpath.read_bytes().decode("latin-1").splitlines()
             if line.strip()]
    if not pairs or any(len(p) != 2 or p[1].strip() != str(i) for i, p in enumerate(pairs)):
        raise DataError(f"{gpath}: expected 'name|index' lines with indices 0, 1, 2, ... in order; "
                        f"fix or re-fetch the data set")
    return [p[0].strip() for p in pairs]


def _load_ml100k_items(path: Path) -> pd.DataFrame:
    """ml-100k's u.item: ``id|title|release date|video release date|IMDb URL|flag*19``, latin-1,
    no header. The flags become genre lists through u.genre's names (see ML100K_GENRES); the year
    comes from the title's "(YYYY)" like every other release (the release date is not used)."""
    genres = _ml100k_genres(path)
    with open(path, "rb") as f:
        first = f.readline().decode("latin-1").rstrip("\r\n")
    n_flags = first.count("|") - 4
    if first and n_flags != len(genres):
        raise DataError(f"{path}: {n_flags} genre flag(s) on the first line, but {len(genres)} genres "
                        f"in u.genre; expected id|title|release date|video release date|URL|flags")
    flag_cols = [f"g{i}" for i in range(len(genres))]
    names = ["item_id", "title", "release_date", "video_release_date", "url", *flag_cols]
    table = _read_sep(path, names, [pa.int32(), *[pa.string()] * 4, *[pa.int8()] * len(genres)],
                      "movies", "|", encoding="latin-1")
    # "Action|Comedy"-style strings, built one genre column at a time with numpy, then parsed by
    # _items_frame like the other releases' genre fields
    joined = np.full(table.num_rows, "", dtype=object)
    for col, name in zip(flag_cols, genres):
        if name != ML100K_NO_GENRE:
            joined = joined + np.where(table.column(col).to_numpy() != 0, name + "|", "")
    return _items_frame(table.column("item_id").to_numpy(), table.column("title").to_pylist(),
                        [g[:-1] for g in joined], path)


def load_items(path_or_name, mirror=None) -> pd.DataFrame:
    """Movies as item_id int32, title str (full title), year Int16 (NA if none), genres list[str]."""
    path = _find(_folder_of(path_or_name, mirror), "movies")
    if path.suffix == ".item":
        return _load_ml100k_items(path)
    if path.suffix == ".dat":
        _check_nonempty(path)
        ids, titles, genres = [], [], []
        for n, line in enumerate(path.read_bytes().decode("latin-1").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("::")
            if len(parts) != 3 or not parts[0].strip().isdigit():
                raise DataError(f"{path}: line {n} is not MovieID::Title::Genres: {line[:80]!r}")
            ids.append(int(parts[0]))
            titles.append(parts[1])
            genres.append(parts[2].strip())
        return _items_frame(np.array(ids), titles, genres, path)
    table = _read_csv(path, {"movieId": pa.int32(), "title": pa.string(), "genres": pa.string()},
                      "movies", newlines=True)
    return _items_frame(table.column("movieId").to_numpy(),
                        [t or "" for t in table.column("title").to_pylist()],
                        [g or "" for g in table.column("genres").to_pylist()], path)


def _empty_tags() -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series([], dtype="int32"), "item_id": pd.Series([], dtype="int32"),
                         "tag": pd.Series([], dtype="str"), "timestamp": pd.Series([], dtype="int64")})


def load_tags(path_or_name, mirror=None) -> pd.DataFrame:
    """Tags as user_id int32, item_id int32, tag str, timestamp int64; empty for sets without tags
    (ml-1m, ml-100k). Missing tag text is read as ""."""
    folder = _folder_of(path_or_name, mirror)
    path = folder if folder.is_file() else _find(folder, "tags", required=False)
    if path is None:
        return _empty_tags()
    if path.suffix == ".dat":
        table = _read_dat(path, TAG_COLUMNS, [pa.int32(), pa.int32(), pa.string(), pa.int64()], "tags")
    else:
        table = _read_csv(path, {"userId": pa.int32(), "movieId": pa.int32(), "tag": pa.string(),
                                 "timestamp": pa.int64()}, "tags", newlines=True)
        table = table.rename_columns(TAG_COLUMNS)
    if table.num_rows == 0:
        return _empty_tags()
    df = pd.DataFrame({"user_id": table.column("user_id").to_numpy().astype(np.int32),
                       "item_id": table.column("item_id").to_numpy().astype(np.int32),
                       "tag": pd.Series(table.column("tag").fill_null("").to_pylist(), dtype="str"),
                       "timestamp": table.column("timestamp").to_numpy().astype(np.int64)})
    return df


def check_integrity(interactions: pd.DataFrame, items: pd.DataFrame, source: str) -> tuple[pd.DataFrame, int]:
    """Drop rating rows whose movie is missing from the movies file, with a warning.

    Every official MovieLens release is consistent (ids agree between ratings, tags, movies and
    links); a row that references an unknown movie cannot be given features or a title, so it
    is dropped and counted rather than passed on. Returns (kept rows, number dropped)."""
    unknown = ~interactions["item_id"].isin(items["item_id"])
    if not unknown.any():
        return interactions, 0
    bad = interactions[unknown]
    example = bad.iloc[0]
    warnings.warn(
        f"{source}: dropped {int(unknown.sum())} rating row(s) whose movie id is missing from the movies "
        f"file (e.g. user {int(example['user_id'])}, movie {int(example['item_id'])}); official MovieLens "
        f"releases have none, so check the source of this copy.", DataIntegrityWarning, stacklevel=2)
    return interactions[~unknown].reset_index(drop=True), int(unknown.sum())



def load_dataset(name: str, mirror=None) -> MovieLens:
    """Fetch ``name`` if needed and load its interactions, items and tags.

    Also checks that every rated movie is in the movies file (:func:`check_integrity`)."""
    path = fetch(name, mirror=mirror)
    marker = read_marker(path) or {}
    sums = marker.get("checksums") or {f: md5_file(path / f) for f in data_files(path)}
    try:
        interactions, items = load_interactions(path), load_items(path)
        interactions, dropped = check_integrity(interactions, items, str(path))
        tags = load_tags(path)
    except DataError as exc:
        if read_marker(path) is None:
            raise
        mark_bad(path, str(exc))
        raise DataError(f"{exc} (this copy is now marked bad: the next run, or `python -m recsys_lib "
                        f"fetch {name}`, fetches it again)") from exc
    return MovieLens(name=name, path=path, interactions=interactions, items=items,
                     tags=tags, checksums=dict(sums), dropped_rows=dropped)
