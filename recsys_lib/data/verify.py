"""Checksums and the verification marker of a raw data folder.

A fetched (or generated) folder holds ``.recsys-verified.json``: its source, what it was verified
against and the md5 of every data file. ``verify`` checks a folder against the registry's md5s or
the checksums file the archive ships."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .. import config
from ..errors import DataError
from .registry import DatasetInfo

MARKER = ".recsys-verified.json"


class DataIntegrityWarning(UserWarning):
    """A loaded file had rows that had to be dropped (e.g. ratings of unknown movies), or a fetched
    copy differs from the one fetched before."""


def md5_file(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The verification marker of a raw folder, or None when absent or unreadable."""
    path = Path(folder) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_marker(folder: str | os.PathLike, info: dict) -> None:
    config.write_json(Path(folder) / MARKER, info)


_SUM_LINE = [re.compile(r"^([0-9a-fA-F]{32})\s+\*?(.+?)\s*$"),
             re.compile(r"^MD5\s*\((.+?)\)\s*=\s*([0-9a-fA-F]{32})\s*$")]


def parse_checksums(path: Path) -> dict[str, str]:
    """``md5sum`` lines (``HASH  file``) or BSD lines (``MD5 (file) = HASH``) -> {file: md5}."""
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        m = _SUM_LINE[0].match(line)
        if m:
            out[Path(m.group(2)).name] = m.group(1).lower()
            continue
        m = _SUM_LINE[1].match(line)
        if m:
            out[Path(m.group(1)).name] = m.group(2).lower()
    return out


# the CSV family, ml-1m's .dat files, and ml-100k's u.data, u.item, u.genre, u.user, u.info,
# u.occupation and its u1-u5/ua/ub .base/.test splits
DATA_SUFFIXES = (".csv", ".dat", ".data", ".item", ".genre", ".user", ".info", ".occupation",
                 ".base", ".test")
RATINGS_FILES = ("ratings.csv", "ratings.dat", "u.data")   # one of them makes a MovieLens set


def data_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith("."))


def verify(folder: Path, info: DatasetInfo, source: str) -> tuple[dict[str, str], str]:
    """Check ``folder`` against the registry md5s or its own checksums file.

    Without registry md5s, a ``checksums.txt`` the archive ships or a ``checksums.md5`` (a
    mirror's own list, e.g. the shared mirror's ml-100k: it shows the copy is intact, not that it
    is the official release) is checked; without either (e.g. ml-100k.zip from the network)
    nothing is, and the md5s seen are only recorded.
    Returns (file -> md5 of every data file, what it was verified against)."""
    if info.md5:
        expected, against = dict(info.md5), "registry md5"
    else:
        expected, against = {}, "nothing (no checksums shipped)"
        for fname in ("checksums.txt", "checksums.md5"):
            if (folder / fname).is_file():
                expected, against = parse_checksums(folder / fname), fname
                break
    if not any((folder / f).is_file() for f in RATINGS_FILES):
        raise DataError(f"{source}: no ratings.csv, ratings.dat or u.data in it; it is not a MovieLens set "
                        f"({info.name}). Fetch it again or fix the source.")
    sums = {}
    for fname in sorted(set(data_files(folder)) | set(expected)):
        path = folder / fname
        if not path.is_file():
            raise DataError(f"{source}: {fname} is missing (listed in the {against}); "
                            f"fetch {info.name} again or complete the source")
        sums[fname] = md5_file(path)
        if fname in expected and sums[fname] != expected[fname]:
            raise DataError(f"{source}: checksum mismatch for {fname}: expected md5 {expected[fname]}, "
                            f"got {sums[fname]}; the file is corrupt or not the official {info.name}. "
                            f"Download it again (or replace it in the mirror); nothing was written.")
    return sums, against



def mark_bad(folder: Path, error: str) -> None:
    """After a loader refused a fetched copy: the next fetch replaces it instead of trusting it."""
    marker = read_marker(folder)
    if marker is not None:
        write_marker(folder, {**marker, "status": "bad", "error": error})

