"""Train / validation / test splits exactly as docs/PROTOCOL.md, "Splits", describes them.

Two strategies, both deterministic (ties in time break by user_id, then item_id; rating is a
last tie-breaker so even duplicate rows come out in one order) and fully vectorised:

``global_temporal(interactions, min_date=None, train_frac=0.8, valid_frac=0.1, train_core=20, eval_core=10)``
    1. optional clip: keep rows with ``timestamp >= min_date`` (ISO date, UTC);
    2. sort by (timestamp, user_id, item_id); with n rows, rows [0, floor(train_frac n)) are
       train, [floor(train_frac n), floor((train_frac + valid_frac) n)) validation, the rest test;
    3. train: iterative n-core, every user and item >= ``train_core`` rows, until stable;
    4. validation and test: keep rows whose user and item survive in train, then keep users
       with >= ``eval_core`` rows in that period (one pass, as the protocol says).

``user_temporal(interactions, core=5, valid_frac=0.1, test_frac=0.1)``
    1. iterative n-core on the whole data (users and items >= ``core``);
    2. per user with n rows ordered by (timestamp, item_id): the last max(1, floor(test_frac n))
       rows are test, the max(1, floor(valid_frac n)) before them validation, the rest train;
    3. drop validation / test rows whose item is not in train.

``make_split(dataset, params)`` computes a split once and stores it under
``config.processed_dir(dataset)/<split_id>/`` (train/valid/test.parquet + split.json); the id
names the strategy and every parameter, so a changed parameter never reuses a stale split.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import config
from ..errors import ConfigError, DataError
from .splitdata import POSITIVE_RATING   # docs/PROTOCOL.md: a positive is a row with rating >= 4.0

#: bump when the splitting code changes in a way that changes its output: old folders are then
#: not reused (the version is part of the split id's hash).
SPLIT_VERSION = 1
REQUIRED_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
PERIODS = ("train", "valid", "test")
SORT_KEYS = ["timestamp", "user_id", "item_id"]

#: the parameters each strategy reads, with their defaults (the function signatures' defaults)
STRATEGY_PARAMS: dict[str, dict[str, Any]] = {
    "global_temporal": {"min_date": None, "train_frac": 0.8, "valid_frac": 0.1,
                        "train_core": 20, "eval_core": 10},
    "user_temporal": {"core": 5, "valid_frac": 0.1, "test_frac": 0.1},
}


@dataclass
class Split:
    """One split: three interaction frames, each sorted by (timestamp, user_id, item_id)."""
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    params: dict                      # {"strategy": ..., every parameter of that strategy}
    stats: dict = field(default_factory=dict)
    split_id: str = ""
    path: Path | None = None

    def frames(self) -> dict[str, pd.DataFrame]:
        return {"train": self.train, "valid": self.valid, "test": self.test}


# ---------------------------------------------------------------- helpers
def _check_interactions(interactions: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in interactions.columns]
    if missing:
        raise DataError(f"interactions lack column(s) {missing}; expected {list(REQUIRED_COLUMNS)}")


def _frac(value: Any, name: str) -> Fraction:
    """A fraction parameter as an exact Fraction, so floor(0.9 * n) is never off by one."""
    try:
        f = Fraction(str(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"split parameter {name}={value!r} is not a number") from exc
    if not 0 <= f <= 1:
        raise ConfigError(f"split parameter {name}={value!r} must lie in [0, 1]")
    return f


def _core(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"split parameter {name}={value!r} must be a non-negative integer")
    return int(value)


def _to_utc_seconds(min_date: str) -> int:
    try:
        ts = pd.Timestamp(min_date)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"split parameter min_date={min_date!r} is not an ISO date, "
                          "e.g. '2018-01-01'") from exc
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return int(ts.value // 10**9) if ts.value % 10**9 == 0 else math.ceil(ts.value / 10**9)


def _time_order(df: pd.DataFrame) -> np.ndarray:
    """Row order by (timestamp, user_id, item_id, rating)."""
    return np.lexsort((df["rating"].to_numpy(), df["item_id"].to_numpy(),
                       df["user_id"].to_numpy(), df["timestamp"].to_numpy()))


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.iloc[_time_order(df)].reset_index(drop=True)


def n_core_mask(users: np.ndarray, items: np.ndarray, core: int) -> np.ndarray:
    """Boolean mask of the rows kept by the iterative n-core filter: repeatedly drop rows whose
    user or item has fewer than ``core`` kept rows, until nothing changes."""
    n = len(users)
    keep = np.ones(n, dtype=bool)
    if core <= 1 or n == 0:
        return keep
    u, _ = pd.factorize(users)
    i, _ = pd.factorize(items)
    nu, ni = int(u.max()) + 1, int(i.max()) + 1
    while True:
        uc = np.bincount(u[keep], minlength=nu)
        ic = np.bincount(i[keep], minlength=ni)
        bad = keep & ((uc[u] < core) | (ic[i] < core))
        if not bad.any():
            return keep
        keep &= ~bad


def _iso_date(ts: int | None) -> str | None:
    return None if ts is None else pd.Timestamp(int(ts), unit="s", tz="UTC").strftime("%Y-%m-%d")


def period_stats(df: pd.DataFrame) -> dict:
    """rows, users, items, positives (rating >= 4), users scored (>= 1 positive), first/last date."""
    pos = df["rating"].to_numpy() >= POSITIVE_RATING
    ts = df["timestamp"].to_numpy()
    first = int(ts.min()) if len(ts) else None
    last = int(ts.max()) if len(ts) else None
    return {
        "rows": int(len(df)),
        "users": int(df["user_id"].nunique()),
        "items": int(df["item_id"].nunique()),
        "positives": int(pos.sum()),
        "users_scored": int(pd.unique(df["user_id"].to_numpy()[pos]).size),
        "first_date": _iso_date(first),
        "last_date": _iso_date(last),
        "first_timestamp": first,
        "last_timestamp": last,
    }


def _totals(df: pd.DataFrame) -> dict:
    return {"rows": int(len(df)), "users": int(df["user_id"].nunique()),
            "items": int(df["item_id"].nunique())}


def _make_stats(strategy: str, before: pd.DataFrame, train: pd.DataFrame, valid: pd.DataFrame,
                test: pd.DataFrame, **extra: Any) -> dict:
    after = pd.concat([train[["user_id", "item_id"]], valid[["user_id", "item_id"]],
                       test[["user_id", "item_id"]]], ignore_index=True)
    stats: dict[str, Any] = {"strategy": strategy,
                             "before": _totals(before),
                             "after": {"rows": int(len(after)),
                                       "users": int(after["user_id"].nunique()),
                                       "items": int(after["item_id"].nunique())}}
    stats.update(extra)
    for name, df in zip(PERIODS, (train, valid, test)):
        stats[name] = period_stats(df)
    return stats


# ---------------------------------------------------------------- strategies
def global_temporal(interactions: pd.DataFrame, min_date: str | None = None, train_frac: float = 0.8,
                    valid_frac: float = 0.1, train_core: int = 20, eval_core: int = 10) -> Split:
    """Global time split (docs/PROTOCOL.md, ``global_temporal``); see the module docstring."""
    _check_interactions(interactions)
    f_train, f_valid = _frac(train_frac, "train_frac"), _frac(valid_frac, "valid_frac")
    if f_train + f_valid > 1:
        raise ConfigError(f"train_frac + valid_frac = {float(f_train + f_valid)} exceeds 1")
    train_core, eval_core = _core(train_core, "train_core"), _core(eval_core, "eval_core")
    params = {"strategy": "global_temporal", "min_date": None if min_date is None else str(min_date),
              "train_frac": train_frac, "valid_frac": valid_frac,
              "train_core": train_core, "eval_core": eval_core}

    df = interactions
    if min_date is not None:
        df = df[df["timestamp"].to_numpy() >= _to_utc_seconds(str(min_date))]
    clipped_rows = int(len(df))
    df = _sorted(df)
    n = len(df)
    a = math.floor(f_train * n)
    b = math.floor((f_train + f_valid) * n)
    train, valid, test = df.iloc[:a], df.iloc[a:b], df.iloc[b:]

    train = train[n_core_mask(train["user_id"].to_numpy(), train["item_id"].to_numpy(), train_core)]
    train_users = pd.unique(train["user_id"].to_numpy())
    train_items = pd.unique(train["item_id"].to_numpy())

    def _eval_period(period: pd.DataFrame) -> pd.DataFrame:
        known = (period["user_id"].isin(train_users).to_numpy()
                 & period["item_id"].isin(train_items).to_numpy())
        period = period[known]
        counts = period.groupby("user_id", sort=False)["user_id"].transform("size").to_numpy()
        return period[counts >= eval_core]

    valid, test = _eval_period(valid), _eval_period(test)
    train, valid, test = (x.reset_index(drop=True) for x in (train, valid, test))
    stats = _make_stats("global_temporal", interactions, train, valid, test,
                        after_clip={"rows": clipped_rows},
                        boundaries={"train_end_row": a, "valid_end_row": b})
    return Split(train, valid, test, params=params, stats=stats, split_id=split_id(params))


def user_temporal(interactions: pd.DataFrame, core: int = 5, valid_frac: float = 0.1,
                  test_frac: float = 0.1) -> Split:
    """Per-user time split (docs/PROTOCOL.md, ``user_temporal``); see the module docstring.

    A user with fewer than 3 rows (possible only with ``core`` < 3) may get no train or no
    validation row: the last row always goes to test first."""
    _check_interactions(interactions)
    f_valid, f_test = _frac(valid_frac, "valid_frac"), _frac(test_frac, "test_frac")
    core = _core(core, "core")
    params = {"strategy": "user_temporal", "core": core, "valid_frac": valid_frac,
              "test_frac": test_frac}

    df = interactions
    df = df[n_core_mask(df["user_id"].to_numpy(), df["item_id"].to_numpy(), core)]
    cored_rows = int(len(df))
    order = np.lexsort((df["rating"].to_numpy(), df["item_id"].to_numpy(),
                        df["timestamp"].to_numpy(), df["user_id"].to_numpy()))
    df = df.iloc[order].reset_index(drop=True)
    u = df["user_id"].to_numpy()
    # rows are grouped by user: per-user run starts and lengths, without a Python loop
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, len(u)]).astype(np.int64)
    pos = np.arange(len(u), dtype=np.int64) - np.repeat(starts, sizes)   # 0-based rank in user
    n = np.repeat(sizes, sizes)                                           # the user's row count
    n_test = np.maximum(1, (n * f_test.numerator) // f_test.denominator)
    n_valid = np.maximum(1, (n * f_valid.numerator) // f_valid.denominator)
    test_start = n - n_test
    valid_start = test_start - n_valid
    is_test = pos >= test_start
    is_valid = ~is_test & (pos >= valid_start)
    is_train = pos < valid_start

    train = df[is_train]
    train_items = pd.unique(train["item_id"].to_numpy())
    known_item = df["item_id"].isin(train_items).to_numpy()
    valid = df[is_valid & known_item]
    test = df[is_test & known_item]
    train, valid, test = (_sorted(x) for x in (train, valid, test))
    stats = _make_stats("user_temporal", interactions, train, valid, test,
                        after_core={"rows": cored_rows})
    return Split(train, valid, test, params=params, stats=stats, split_id=split_id(params))


STRATEGIES = {"global_temporal": global_temporal, "user_temporal": user_temporal}


# ---------------------------------------------------------------- parameters and ids
def resolve_params(params: dict) -> dict:
    """The strategy and only its own parameters (defaults filled in); unknown strategy ->
    ConfigError. Keys meant for the other strategy are ignored."""
    if not isinstance(params, dict):
        raise ConfigError(f"split params must be a dict, got {type(params).__name__}")
    strategy = params.get("strategy")
    if strategy not in STRATEGY_PARAMS:
        raise ConfigError(f"unknown split strategy {strategy!r}; valid strategies: "
                          f"{sorted(STRATEGY_PARAMS)}")
    out: dict[str, Any] = {"strategy": strategy}
    for key, default in STRATEGY_PARAMS[strategy].items():
        value = params.get(key, default)
        if key == "min_date" and value is not None:
            value = str(value)          # YAML may parse an unquoted date into a date object
        out[key] = value
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "all"
    return str(value).replace("-", "").replace(":", "").replace(" ", "")


def split_id(params: dict) -> str:
    """A readable id naming the strategy and every parameter, plus a short hash of the
    canonical parameters and SPLIT_VERSION, e.g. ``user_temporal-core5-v0.1-t0.1-3f2a9c1b``."""
    p = resolve_params(params)
    if p["strategy"] == "global_temporal":
        readable = (f"global_temporal-from{_fmt(p['min_date'])}-tr{_fmt(p['train_frac'])}"
                    f"-v{_fmt(p['valid_frac'])}-tc{p['train_core']}-ec{p['eval_core']}")
    else:
        readable = f"user_temporal-core{p['core']}-v{_fmt(p['valid_frac'])}-t{_fmt(p['test_frac'])}"
    canonical = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and k.endswith("_frac") else v) for k, v in p.items()}
    blob = json.dumps({"params": canonical, "version": SPLIT_VERSION}, sort_keys=True)
    return f"{readable}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


def apply_strategy(interactions: pd.DataFrame, params: dict) -> Split:
    """Run the strategy named in ``params`` with its own parameters (the others are ignored)."""
    p = resolve_params(params)
    kwargs = {k: v for k, v in p.items() if k != "strategy"}
    return STRATEGIES[p["strategy"]](interactions, **kwargs)


# ---------------------------------------------------------------- persistence
def _fingerprint(interactions: pd.DataFrame) -> str:
    cols = [c for c in REQUIRED_COLUMNS]
    h = pd.util.hash_pandas_object(interactions[cols], index=False).to_numpy()
    # order-independent: the split does not depend on the input's row order
    return hashlib.sha1(np.sort(h).tobytes()).hexdigest()[:16]


def save_split(split: Split, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``split`` to folder ``path`` atomically: a temporary sibling folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        for name, df in split.frames().items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        meta = {"split_id": split.split_id, "params": split.params, "stats": split.stats,
                "version": SPLIT_VERSION, **(extra or {})}
        config.write_json(tmp / "split.json", meta)
        config.replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    split.path = path
    return path


def load_split(path: str | os.PathLike) -> Split:
    """Read a split folder written by ``make_split`` / ``save_split``."""
    path = Path(path)
    meta_path = path / "split.json"
    if not meta_path.exists():
        raise DataError(f"no split at {path}: {meta_path} is missing; run "
                        "`python -m recsys_lib split DATASET` or split.make_split first")
    meta = json.loads(meta_path.read_text())
    frames = {}
    for name in PERIODS:
        f = path / f"{name}.parquet"
        if not f.exists():
            raise DataError(f"split folder {path} lacks {f.name}; delete the folder and split again")
        frames[name] = pd.read_parquet(f)
    return Split(frames["train"], frames["valid"], frames["test"], params=meta["params"],
                 stats=meta["stats"], split_id=meta.get("split_id", path.name), path=path)


def make_split(dataset: str, params: dict | None = None, mirror=None, force: bool = False,
               interactions: pd.DataFrame | None = None) -> Split:
    """Split ``dataset`` under ``params`` (the "split" section: strategy + parameters; None ->
    ``config.load_params("full", dataset)["split"]``), stored in
    ``config.processed_dir(dataset)/<split_id>/``. An existing folder is loaded unless ``force``.

    ``interactions`` skips ``data.load_dataset`` (tests, notebooks that already hold the data);
    a stored split made from different interactions (fingerprint mismatch) is then recomputed.
    """
    if params is None:
        params = config.load_params("full", dataset)["split"]
    p = resolve_params(params)
    sid = split_id(p)
    path = config.processed_dir(dataset) / sid
    fingerprint = _fingerprint(interactions) if interactions is not None else None
    if path.exists() and not force:
        try:
            split = load_split(path)
        except (DataError, OSError, ValueError) as exc:
            warnings.warn(f"split folder {path} is unreadable ({exc}); splitting again")
        else:
            stored = (json.loads((path / "split.json").read_text())).get("source_fingerprint")
            if fingerprint is None or stored == fingerprint:
                return split
            warnings.warn(f"split {path} was made from other interactions; splitting again")
    if interactions is None:
        from ..data import load_dataset
        interactions = load_dataset(dataset, mirror=mirror).interactions
        fingerprint = _fingerprint(interactions)
    split = apply_strategy(interactions, p)
    split.stats["dataset"] = dataset
    save_split(split, path, extra={"dataset": dataset, "source_fingerprint": fingerprint})
    return split
