"""Fetching: a verified, idempotent copy of a data set in ``config.raw_dir(name)``, from the
network (pooch) or a local mirror, extracted and verified in a temporary folder, then renamed."""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

from .. import config
from ..errors import DataError
from .registry import DatasetInfo, dataset_info
from .verify import MARKER, DataIntegrityWarning, read_marker, verify, write_marker


def _extract_zip(zpath: Path, dest: Path, source: str) -> None:
    """Extract ``zpath`` into ``dest``, dropping a single top-level folder; DataError if corrupt."""
    try:
        with zipfile.ZipFile(zpath) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            tops = {n.split("/", 1)[0] for n in names}
            strip = len(tops) == 1 and all("/" in n for n in names)
            for member in names:
                rel = member.split("/", 1)[1] if strip else member
                parts = Path(rel).parts
                if not parts or Path(rel).is_absolute() or ".." in parts or parts[-1].startswith("."):
                    continue
                if "__MACOSX" in parts:
                    continue
                out = dest.joinpath(*parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError) as exc:
        raise DataError(f"{source}: corrupt or truncated zip archive ({exc}); delete it and "
                        f"download it again") from exc


def _copy_folder(src: Path, dest: Path) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            out = dest / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)   # contents only: never the mirror's read-only modes


def _download(info: DatasetInfo, workdir: Path) -> Path:
    import pooch
    try:
        return Path(pooch.retrieve(info.url, known_hash=None, fname=f"{info.name}.zip",
                                   path=workdir, progressbar=False))
    except Exception as exc:  # network errors come in many types
        raise DataError(f"could not download {info.url} ({exc}); check the network, or put "
                        f"{info.name}.zip or {info.name}/ in a folder and set MOVIELENS_MIRROR "
                        f"(or pass --mirror)") from exc




def fetch(name: str, mirror: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Make ``config.raw_dir(name)`` hold the verified data set ``name``; return that folder.

    ``mirror`` (default ``$MOVIELENS_MIRROR``) is a folder holding ``NAME.zip`` or ``NAME/``,
    used instead of the network. ``force`` fetches again and replaces the folder atomically.
    """
    info = dataset_info(name)
    target = config.raw_dir(name)
    if info.preset is not None:       # imported here: a real data set's run never loads the generator
        from . import synthetic
        return synthetic.generate(info.preset, seed=info.seed, out_dir=target, force=force)
    mirror_path = config.mirror_dir(mirror)
    if target.exists() and not force:
        marker = read_marker(target)
        if marker is not None and marker.get("status") != "bad" and not _source_changed(marker, name, mirror_path):
            return target
        if marker is not None:     # marked bad by the loader, or the mirror's copy changed: fetch again
            force = True
    if target.exists() and not force:
        try:   # a folder put there by hand: verify it read-only, never write into it
            verify(target, info, str(target))
        except DataError as exc:
            raise DataError(f"{exc} ({target} was not fetched by recsys_lib; "
                            f"run `python -m recsys_lib fetch {name} --force` to replace it)") from exc
        return target
    previous = read_marker(target) if target.exists() else None
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        dest = work / "data"
        dest.mkdir()
        if mirror_path is not None:
            folder, zpath = mirror_path / name, mirror_path / f"{name}.zip"
            if folder.is_dir():
                source = str(folder)
                _copy_folder(folder, dest)
            elif zpath.is_file():
                source = str(zpath)
                _extract_zip(zpath, dest, source)
            else:
                raise DataError(
                    f"mirror {mirror_path} has no {name}: it should contain {name}.zip (as downloaded "
                    f"from {info.url}) or the extracted folder {name}/ with ratings.csv, movies.csv, "
                    f"... ; add it, or unset MOVIELENS_MIRROR / drop --mirror to download")
        else:
            zpath = _download(info, work)
            source = info.url
            _extract_zip(zpath, dest, source)
            zpath.unlink()
        sums, against = verify(dest, info, source)
        if previous and previous.get("checksums") and previous["checksums"] != sums:
            changed = sorted(f for f in set(sums) | set(previous["checksums"])
                             if sums.get(f) != previous["checksums"].get(f))
            warnings.warn(f"{name}: {', '.join(changed)} differ from the copy fetched before "
                          f"(md5s recorded in {target / MARKER})", DataIntegrityWarning, stacklevel=2)
        write_marker(dest, {"name": name, "source": source, "verified_against": against,
                            "checksums": sums, "source_fingerprint": _source_fingerprint(source)})
        config.replace_dir(dest, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target



def _mirror_source(name: str, mirror_path: Path | None) -> Path | None:
    if mirror_path is None:
        return None
    folder, zpath = mirror_path / name, mirror_path / f"{name}.zip"
    return folder if folder.is_dir() else zpath if zpath.is_file() else None


def _source_fingerprint(source: str) -> list | None:
    """Sizes and mtimes of a local source (a mirror's zip or folder); None for a URL."""
    path = Path(source)
    if source.startswith(("http://", "https://")) or not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def _source_changed(marker: dict, name: str, mirror_path: Path | None) -> bool:
    """The mirror now offers another copy than the one fetched (another path, or its files
    changed size or time): it is fetched and verified again."""
    src = _mirror_source(name, mirror_path)
    if src is None or "source_fingerprint" not in marker:
        return False
    return marker.get("source") != str(src) or marker["source_fingerprint"] != _source_fingerprint(str(src))

