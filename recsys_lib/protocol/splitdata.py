"""Contiguous ids, item features and user histories: the tensors every model and evaluation uses.

`SplitData.from_split(split, items, tags)` encodes a protocol split (recsys_lib.protocol.split.Split) into
contiguous ids over the train catalogue and exposes each period through the leakage guard
(recsys_lib.protocol.guard): fitting code that reads a period it may not learn from raises LeakageError.

Id conventions: users and items are 0..n-1 (train users, train items). Padded index tensors
(genres, tags, histories) shift everything by +1 so that 0 means "nothing".
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from . import guard

POSITIVE_RATING = 4.0
NEVER = np.iinfo(np.int64).max  # an item with no known row / a user with no row in the period
CHUNK_ROWS = 65_536        # rows (pairs, items) per chunk where a whole table would not fit in memory
PERIODS = ("train", "valid", "test")


@dataclass(frozen=True)
class IdMap:
    """Raw MovieLens ids <-> contiguous ids; ``raw[i]`` is the raw id of contiguous id ``i``."""

    raw: np.ndarray  # sorted unique raw ids

    def __len__(self) -> int:
        return len(self.raw)

    def encode(self, raw_ids) -> np.ndarray:
        """Contiguous ids (int64); -1 for ids not in the map."""
        raw_ids = np.asarray(raw_ids)
        if len(self.raw) == 0:
            return np.full(len(raw_ids), -1, dtype=np.int64)
        pos = np.searchsorted(self.raw, raw_ids).clip(0, len(self.raw) - 1)
        return np.where(self.raw[pos] == raw_ids, pos, -1).astype(np.int64)

    def decode(self, idx) -> np.ndarray:
        return self.raw[np.asarray(idx)]


@dataclass(frozen=True)
class Period:
    """One period's rows in contiguous ids, sorted by (timestamp, user, item)."""

    user: np.ndarray       # (n,) int64
    item: np.ndarray       # (n,) int64
    rating: np.ndarray     # (n,) float32
    timestamp: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.user)

    @property
    def positive(self) -> np.ndarray:
        return self.rating >= POSITIVE_RATING

    def matrix(self, n_users: int, n_items: int, positives_only: bool = False) -> sp.csr_matrix:
        keep = self.positive if positives_only else np.ones(len(self), bool)
        data = np.ones(int(keep.sum()), dtype=np.float32)
        m = sp.csr_matrix((data, (self.user[keep], self.item[keep])), shape=(n_users, n_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m


def rows_digest(rows) -> str:
    """A content hash of rows (``user``, ``item``, ``rating``, ``timestamp``: each array's dtype,
    length and bytes): the name of what a table counted on exactly these rows may be cached
    under, in any process (`ScoringContext.table_dir`). Hashes ~28 bytes a row (ML-32M's train
    rows: ~0.7 GB, about a second), so a caller that asks often keeps it (`ScoringContext.digest`)."""
    h = hashlib.sha256()
    for name in ("user", "item", "rating", "timestamp"):
        a = np.ascontiguousarray(getattr(rows, name))
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


@dataclass(frozen=True)
class ItemFeatures:
    """Side features of the train catalogue, as padded index tensors (0 = padding)."""

    genres: torch.Tensor        # (n_items, G) int64, genre index + 1
    year: torch.Tensor          # (n_items,) int64, year bucket index + 1, 0 = unknown
    tags: torch.Tensor          # (n_items, T) int64, tag index + 1 (top-T train-period tags)
    genre_vocab: list[str]
    year_vocab: list[int]       # first year of each bucket
    tag_vocab: list[str]
    years: np.ndarray           # (n_items,) float, release year or NaN

    @property
    def n_genres(self) -> int:
        return len(self.genre_vocab)

    @property
    def n_years(self) -> int:
        return len(self.year_vocab)

    @property
    def n_tags(self) -> int:
        return len(self.tag_vocab)


def _period_from_frame(df: pd.DataFrame, users: IdMap, items: IdMap) -> Period:
    u = users.encode(df["user_id"].to_numpy())
    i = items.encode(df["item_id"].to_numpy())
    keep = (u >= 0) & (i >= 0)
    order = np.lexsort((i[keep], u[keep], df["timestamp"].to_numpy()[keep]))
    return Period(user=u[keep][order], item=i[keep][order],
                  rating=df["rating"].to_numpy(np.float32)[keep][order],
                  timestamp=df["timestamp"].to_numpy(np.int64)[keep][order])


def build_item_features(items_df: pd.DataFrame, tags_df: pd.DataFrame | None, item_map: IdMap,
                        tag_cutoff: pd.Series | int | None = None, n_tags: int = 3,
                        year_bucket: int = 1, min_tag_count: int = 2) -> ItemFeatures:
    """Genres, release-year bucket and top-``n_tags`` tags for each train item.

    Tags are lower-cased and stripped; only tags applied before ``tag_cutoff`` count (an int UTC
    cut-off, or a Series user_id -> cut-off for per-user splits, where tags of unknown users use
    the smallest cut-off), so the vocabulary is built from the train period only.
    """
    n = len(item_map)
    meta = items_df.assign(idx=item_map.encode(items_df["item_id"].to_numpy()))
    meta = meta[meta["idx"] >= 0].sort_values("idx")
    # genres
    exploded = meta[["idx", "genres"]].explode("genres").dropna()
    genre_vocab = sorted(exploded["genres"].unique().tolist())
    gidx = {g: k + 1 for k, g in enumerate(genre_vocab)}
    exploded = exploded.assign(g=exploded["genres"].map(gidx).astype(np.int64))
    exploded = exploded.assign(slot=exploded.groupby("idx").cumcount())
    g_max = int(exploded["slot"].max()) + 1 if len(exploded) else 1
    genres = np.zeros((n, g_max), dtype=np.int64)
    genres[exploded["idx"].to_numpy(), exploded["slot"].to_numpy()] = exploded["g"].to_numpy()
    # year buckets
    years = np.full(n, np.nan)
    yr = meta["year"].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    years[meta["idx"].to_numpy()] = yr
    known = ~np.isnan(years)
    bucket_start = (np.floor(years[known] / year_bucket) * year_bucket).astype(int)
    year_vocab = sorted(set(bucket_start.tolist()))
    year = np.zeros(n, dtype=np.int64)
    year[known] = np.searchsorted(year_vocab, bucket_start) + 1
    # tags
    tags = np.zeros((n, n_tags), dtype=np.int64)
    tag_vocab: list[str] = []
    if tags_df is not None and len(tags_df) and n_tags > 0:
        t = tags_df.assign(idx=item_map.encode(tags_df["item_id"].to_numpy()),
                           tag=tags_df["tag"].astype(str).str.strip().str.lower())
        t = t[(t["idx"] >= 0) & (t["tag"] != "")]
        if isinstance(tag_cutoff, pd.Series):
            cut = t["user_id"].map(tag_cutoff).fillna(tag_cutoff.min()).to_numpy()
            t = t[t["timestamp"].to_numpy() < cut]
        elif tag_cutoff is not None:
            t = t[t["timestamp"] < tag_cutoff]
        counts = t.groupby(["idx", "tag"]).size().rename("count").reset_index()
        total = counts.groupby("tag")["count"].sum()
        counts = counts[counts["tag"].map(total) >= min_tag_count]
        counts = counts.sort_values(["idx", "count", "tag"], ascending=[True, False, True])
        counts = counts.assign(slot=counts.groupby("idx").cumcount())
        counts = counts[counts["slot"] < n_tags]
        tag_vocab = sorted(counts["tag"].unique().tolist())
        tidx = {tg: k + 1 for k, tg in enumerate(tag_vocab)}
        tags[counts["idx"].to_numpy(), counts["slot"].to_numpy()] = counts["tag"].map(tidx).to_numpy()
    return ItemFeatures(genres=torch.from_numpy(genres), year=torch.from_numpy(year),
                        tags=torch.from_numpy(tags), genre_vocab=genre_vocab, year_vocab=year_vocab,
                        tag_vocab=tag_vocab, years=years)


def last_items(user: np.ndarray, item: np.ndarray, n_users: int, n: int) -> torch.Tensor:
    """Each user's last ``n`` items of rows already sorted by time: (n_users, n) int64, item + 1,
    left-padded with 0 so the most recent item is in the last column."""
    out = np.zeros((n_users, n), dtype=np.int64)
    if len(user) == 0 or n == 0:
        return torch.from_numpy(out)
    order = np.argsort(user, kind="stable")          # group by user, keep time order
    u, i = user[order], item[order]
    counts = np.bincount(u, minlength=n_users)
    ends = np.cumsum(counts)
    from_end = ends[u] - np.arange(len(u)) - 1       # 0 for each user's last row
    keep = from_end < n
    out[u[keep], n - 1 - from_end[keep]] = i[keep] + 1
    return torch.from_numpy(out)


def histories_before_rows(user: np.ndarray, item: np.ndarray, n: int,
                          prefix: torch.Tensor | None = None) -> torch.Tensor:
    """For each row (rows sorted by time), the user's ``n`` previous items before that row:
    (rows, n) int64, item + 1, left-padded with 0. ``prefix`` (n_users, n) gives each user's
    history before the first row (e.g. train history when the rows are validation rows)."""
    rows = len(user)
    out = np.zeros((rows, n), dtype=np.int64)
    if rows == 0 or n == 0:
        return torch.from_numpy(out)
    order = np.argsort(user, kind="stable")
    u, i = user[order], item[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
    pos_in_user = np.arange(rows) - np.repeat(starts, np.diff(np.r_[starts, rows]))
    hist = np.zeros((rows, n), dtype=np.int64)
    for lag in range(1, n + 1):                      # n is small (5-50): loop over lags, not rows
        has = pos_in_user >= lag
        col = n - lag
        hist[has, col] = i[np.flatnonzero(has) - lag] + 1
        if prefix is not None:
            need = ~has                              # take from the prefix history
            k = lag - pos_in_user[need]              # how far back into the prefix
            hist[need, col] = prefix.numpy()[u[need], n - k]
    out[order] = hist
    return torch.from_numpy(out)


@dataclass(frozen=True)
class CausalCatalogue:
    """docs/PROTOCOL.md, "A causal catalogue": under ``user_temporal`` a user may be recommended only
    items whose first interaction in the known rows comes strictly before that user's scoring cut.

    ``item_first[i]`` is the earliest timestamp of item ``i`` in the rows known when the period is
    scored (train for validation; train and validation for test), ``NEVER`` if it has none there.
    ``cut[u]`` is the timestamp of user ``u``'s first row in the scored period, ``NEVER`` for a user
    with no row in it (they are not scored; only items with no known row are blocked for them).
    Item ``i`` is blocked for ``u`` iff ``item_first[i] >= cut[u]``: a tie in the same second is
    blocked (the data cannot say which came first). Under ``global_temporal`` none is built
    (`SplitData.causal`)."""

    item_first: np.ndarray  # (n_items,) int64
    cut: np.ndarray         # (n_users,) int64

    @classmethod
    def from_rows(cls, known: Period, period: Period, n_users: int, n_items: int) -> "CausalCatalogue":
        """Vectorised: ``known`` and ``period`` rows in any order (no loop over users or items)."""
        item_first = np.full(n_items, NEVER, dtype=np.int64)
        np.minimum.at(item_first, known.item, known.timestamp.astype(np.int64))
        cut = np.full(n_users, NEVER, dtype=np.int64)
        np.minimum.at(cut, period.user, period.timestamp.astype(np.int64))
        return cls(item_first=item_first, cut=cut)

    def blocked(self, users, device: torch.device | str | None = None) -> torch.Tensor:
        """(B, n_items) bool: True where the item did not yet exist at the user's cut."""
        users = users.cpu().numpy() if isinstance(users, torch.Tensor) else np.asarray(users, dtype=np.int64)
        first = torch.from_numpy(self.item_first).to(device)                   # (n_items,)
        cut = torch.from_numpy(self.cut[users]).to(device)                      # (B,)
        return first[None, :] >= cut[:, None]                                   # (B, n_items)

    def blocked_counts(self, users: np.ndarray) -> np.ndarray:
        """(U,) number of catalogue items blocked for each of ``users`` (sorted search, no U x items)."""
        return len(self.item_first) - np.searchsorted(np.sort(self.item_first), self.cut[np.asarray(users)], "left")

    def is_blocked(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(n,) bool for (user, item) pairs: item first seen at or after the user's cut."""
        return self.item_first[np.asarray(items)] >= self.cut[np.asarray(users)]


@dataclass
class ScoringContext:
    """What a scorer may know at scoring time for ``period``: each user's history (the items they
    rated before it, masked from rankings, the positives among them, their last items) and the
    rows a model's parameters may count.

    One test-time rule (docs/PROTOCOL.md): *parameters* (count tables, popularity counts,
    co-occurrence counts, factors, weights) come from the train rows only, at validation and at
    test alike (``parameter_rows``); *histories* (a user's own rows, last items, seen items, fold-in)
    come from every row before the period (``known_rows``: train for validation, train + validation
    for test).

    ``seen`` is what every ranking masks. A model fit on positives only builds a user's vector
    from ``seen_positive`` (docs/PROTOCOL.md: a model scores a user from the same kind of input it was
    fit on); ``input_matrix`` picks the right one. ``catalogue`` (``user_temporal`` only) is the
    causal catalogue every ranking also masks: items first seen at or after the user's scoring cut
    (`CausalCatalogue`); None where nothing is blocked (``global_temporal``, or switched off)."""

    period: str
    seen: sp.csr_matrix        # (n_users, n_items) 1 where rated before the period
    history: torch.Tensor      # (n_users, H) last items before the period, item + 1, 0 pad
    seen_positive: sp.csr_matrix | None = None  # (n_users, n_items) 1 where rated >= 4 before it
    rows: Period | None = None  # every row before the period (train; train + valid for test), time order
    train_rows: Period | None = None  # the train rows, whatever the period: what parameters count
    catalogue: CausalCatalogue | None = None  # items not yet seen at each user's cut (masked from rankings)
    table_dir: Path | None = None  # where tables counted on train_rows may be kept across processes (the run's)
    shared: dict = field(default_factory=dict, repr=False, compare=False)  # tables of train_rows, one per split
    _cache: dict = field(default_factory=dict, repr=False, compare=False)  # last_items, per context

    def known_rows(self) -> Period:
        """The rows known at scoring time (train; train + validation for test): what *histories*
        are read from (a user's last items, their own rows). Never count a parameter on them:
        that is `parameter_rows`."""
        if self.rows is None:
            raise ValueError(f"this {self.period} context carries no rows; build it with SplitData.context "
                             f"(a sequential model reads the rows before the period)")
        return self.rows

    def parameter_rows(self) -> Period:
        """The rows a model's parameters and the re-ranker's count features may count: the train
        rows, at validation and at test alike (docs/PROTOCOL.md, "One test-time rule"). Tables
        counted on them may be kept in ``shared``, which the contexts of one split share, so
        validation and test read the same table."""
        if self.train_rows is None:
            raise ValueError(f"this {self.period} context carries no train rows; build it with "
                             f"SplitData.context (count tables are counted on the train rows)")
        return self.train_rows

    def __getstate__(self) -> dict:
        """Pickled (a torchrun job's inputs) without the shared tables: they belong to the split."""
        return {**self.__dict__, "shared": {}}

    def digest(self, rows: Period) -> str:
        """`rows_digest` of ``rows`` (the parameter rows), hashed once per split: kept in ``shared``
        beside the rows it names, so another rows object never reads it."""
        memo = self.shared.setdefault("rows_digests", {})
        held = memo.get(id(rows))
        if held is None or held[0] is not rows:
            held = memo[id(rows)] = (rows, rows_digest(rows))
        return held[1]

    def last_items(self, n: int, positives_only: bool = False) -> torch.Tensor:
        """(n_users, n) each user's last ``n`` known items (``positives_only``: rated >= 4), item + 1,
        0 pad, most recent last; computed once per context from ``rows``."""
        key = ("last_items", int(n), bool(positives_only))
        if key not in self._cache:
            rows = self.known_rows()
            keep = rows.positive if positives_only else slice(None)
            self._cache[key] = last_items(rows.user[keep], rows.item[keep], self.seen.shape[0], int(n))
        return self._cache[key]

    def input_matrix(self, positives_only: bool) -> sp.csr_matrix:
        """The user rows a model fit on ``positives_only`` (or on every rated row) scores from."""
        if not positives_only:
            return self.seen
        if self.seen_positive is None:
            raise ValueError(f"this {self.period} context has no seen_positive matrix; build it with "
                             f"SplitData.context (a positives-only model must score from positives)")
        return self.seen_positive


@dataclass
class SplitData:
    """A protocol split in contiguous ids, with item features; periods behind the leakage guard."""

    name: str
    users: IdMap
    items: IdMap
    item_features: ItemFeatures | None
    _periods: dict[str, Period] = field(repr=False)
    split_params: dict = field(default_factory=dict)

    @classmethod
    def from_split(cls, split, items_df: pd.DataFrame | None = None, tags_df: pd.DataFrame | None = None,
                   n_tags: int = 3, year_bucket: int = 1, name: str = "") -> "SplitData":
        users = IdMap(np.unique(split.train["user_id"].to_numpy()))
        items = IdMap(np.unique(split.train["item_id"].to_numpy()))
        periods = {p: _period_from_frame(getattr(split, p), users, items) for p in PERIODS}
        feats = None
        if items_df is not None:
            later = pd.concat([split.valid, split.test])
            if split.params.get("strategy") == "user_temporal" and len(later):
                cutoff = later.groupby("user_id")["timestamp"].min()
            else:
                cutoff = int(later["timestamp"].min()) if len(later) else None
            feats = build_item_features(items_df, tags_df, items, cutoff, n_tags=n_tags,
                                        year_bucket=year_bucket)
        return cls(name=name, users=users, items=items, item_features=feats, _periods=periods,
                   split_params=dict(split.params))

    # ------------------------------------------------------------ sizes
    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    # ------------------------------------------------------------ guarded access
    def period(self, name: str) -> Period:
        if name not in PERIODS:
            raise KeyError(f"unknown period {name!r}; one of {PERIODS}")
        guard.check_read(name)
        return self._periods[name]

    @property
    def train(self) -> Period:
        return self.period("train")

    @property
    def valid(self) -> Period:
        return self.period("valid")

    @property
    def test(self) -> Period:
        return self.period("test")

    def before(self, period: str) -> list[str]:
        """Periods whose rows precede ``period`` (a user's known history when scoring it)."""
        return list(PERIODS[: PERIODS.index(period)])

    def positives(self, period: str) -> sp.csr_matrix:
        """(n_users, n_items) relevance labels of ``period``: rating >= 4."""
        return self.period(period).matrix(self.n_users, self.n_items, positives_only=True)

    def scored_users(self, period: str) -> np.ndarray:
        """Users with at least one positive in ``period`` (docs/PROTOCOL.md), sorted."""
        p = self.period(period)
        return np.unique(p.user[p.positive])

    def seen_before(self, period: str, positives_only: bool = False) -> sp.csr_matrix:
        """Items each user rated (``positives_only``: rated >= 4) before ``period``: train for
        valid; train and valid for test."""
        mats = [self.period(p).matrix(self.n_users, self.n_items, positives_only)
                for p in self.before(period)]
        if not mats:
            return sp.csr_matrix((self.n_users, self.n_items), dtype=np.float32)
        m = mats[0]
        for extra in mats[1:]:
            m = m + extra
        m.data[:] = 1.0
        return m.tocsr()

    def rows_before(self, period: str) -> Period:
        """All rows before ``period`` concatenated in time order."""
        parts = [self.period(p) for p in self.before(period)]
        cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("user", "item", "rating", "timestamp")}
        order = np.lexsort((cat["item"], cat["user"], cat["timestamp"]))
        return Period(**{k: v[order] for k, v in cat.items()})

    def history(self, period: str, n: int) -> torch.Tensor:
        """(n_users, n) each user's last ``n`` items before ``period`` (item + 1, 0 pad)."""
        rows = self.rows_before(period)
        return last_items(rows.user, rows.item, self.n_users, n)

    def causal_catalogue(self, period: str) -> CausalCatalogue:
        """Each item's first time in the rows known when ``period`` is scored and each user's
        scoring cut in ``period`` (docs/PROTOCOL.md, "A causal catalogue"). Reads ``period``'s
        timestamps: build it outside any fitting context, as the labels are."""
        return CausalCatalogue.from_rows(self.rows_before(period), self.period(period), self.n_users, self.n_items)

    def causal(self, causal_catalogue: bool | None = None) -> bool:
        """Whether rankings mask a causal catalogue: only under ``user_temporal``, and unless switched
        off (params ``eval.causal_catalogue``). Under ``global_temporal`` every known row precedes
        every scored row in the split's own order, so it is not built (docs/PROTOCOL.md)."""
        return causal_catalogue is not False and self.split_params.get("strategy") == "user_temporal"

    def context(self, period: str, history_len: int = 5, causal_catalogue: bool | None = None) -> ScoringContext:
        """What a scorer may know when scoring ``period``: histories from every row before it,
        parameters from the train rows (`ScoringContext`; docs/PROTOCOL.md, "One test-time rule").
        ``causal_catalogue`` (None: the default, on) also masks, under ``user_temporal``, the items
        not yet seen at each user's scoring cut (`causal`; docs/PROTOCOL.md, "A causal catalogue")."""
        rows = self.rows_before(period)
        catalogue = None
        if self.causal(causal_catalogue) and len(self.period(period)):
            catalogue = CausalCatalogue.from_rows(rows, self.period(period), self.n_users, self.n_items)
        return ScoringContext(period=period, seen=self.seen_before(period),
                              history=last_items(rows.user, rows.item, self.n_users, history_len),
                              seen_positive=self.seen_before(period, positives_only=True), rows=rows,
                              train_rows=self.train, shared=self.train_tables(), catalogue=catalogue,
                              table_dir=self.table_dir)

    def train_tables(self) -> dict:
        """A cache of tables counted on this split's train rows (the transition model's), shared by
        every context of the split: validation and test count a table once and read the same one.
        Not pickled (`__getstate__`); a split made by `label_window` has its own."""
        return self.__dict__.setdefault("_train_tables", {})

    @property
    def table_dir(self) -> Path | None:
        """The folder where tables counted on this split's train rows are kept across processes
        (`use_table_dir`; None: in this process only, `train_tables`)."""
        return self.__dict__.get("_table_dir")

    def use_table_dir(self, path: str | Path | None) -> "SplitData":
        """Keep tables counted on the train rows in ``path`` too (the run folder's, set by
        `run.experiment.Run`), so the notebooks after the first read them instead of counting
        again. A cached table is named by everything it depends on (the rows' content hash among
        it), so a split with other rows never reads it. Returns self."""
        self.__dict__["_table_dir"] = Path(path) if path is not None else None
        return self

    def __getstate__(self) -> dict:
        """Pickled (``data.pt``, a torchrun job) without this process's tables or the run's folder:
        the folder belongs to the run that loads it."""
        state = dict(self.__dict__)
        state.pop("_train_tables", None)
        state.pop("_table_dir", None)
        return state

    def label_window(self, share: float = 0.1) -> "SplitData":
        """The label window (docs/PROTOCOL.md, "Who learns from what"): a SplitData over the train rows
        only, whose ``train`` is the rows before the window and whose ``valid`` is the window (and
        ``test`` empty), with the same ids and item features. Under ``user_temporal`` the window is
        each user's last max(1, floor(share n)) train rows; under ``global_temporal`` the last
        ``share`` of the train rows by time. Stage-1 models refit on its ``train`` propose and score
        the window's candidates; the re-ranker may learn from those lists."""
        from fractions import Fraction
        train = self.train
        f = Fraction(str(share))
        n_rows = len(train)
        if self.split_params.get("strategy") == "user_temporal":
            order = np.lexsort((train.item, train.timestamp, train.user))       # by user, then time
            u = train.user[order]
            starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if n_rows else np.zeros(0, np.int64)
            sizes = np.diff(np.r_[starts, n_rows])
            pos = np.arange(n_rows) - np.repeat(starts, sizes)
            n = np.repeat(sizes, sizes)
            in_window = np.empty(n_rows, bool)
            in_window[order] = pos >= n - np.maximum(1, (n * f.numerator) // f.denominator)
        else:                                                                # rows are in time order
            cut = (n_rows * (1 - f).numerator) // (1 - f).denominator
            in_window = np.arange(n_rows) >= cut
        take = lambda mask: Period(train.user[mask], train.item[mask], train.rating[mask], train.timestamp[mask])
        empty = take(np.zeros(n_rows, bool))
        return SplitData(name=f"{self.name}:window", users=self.users, items=self.items,
                         item_features=self.item_features,
                         _periods={"train": take(~in_window), "valid": take(in_window), "test": empty},
                         split_params={**self.split_params, "label_window": str(share)}
                         ).use_table_dir(self.table_dir)

    @cached_property
    def item_popularity(self) -> np.ndarray:
        """(n_items,) number of train rows per item."""
        return np.bincount(self.period("train").item, minlength=self.n_items)
