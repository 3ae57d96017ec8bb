"""Issue 41, item 3: exact savings at ML-32M size, each against the path it replaced
(tests/unit/old_paths.py): the transition table counted without sorting every pair and kept in
the run folder, the blend's search on z-score tables spilt to disk when too large for memory, and
the negative sampler's membership built once per process for the same train rows. Every test
asserts the same arrays, weights and metrics bit for bit, and that the cache was hit (a counter,
not a timing)."""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from old_paths import old_transition_counts
from recsys_lib import config
from recsys_lib.models import transition
from recsys_lib.protocol.splitdata import Period, SplitData
from recsys_lib.run import state, tracking
from recsys_lib.run.experiment import TABLE_CACHE, Run


# ---------------------------------------------------------------- (a) transition counts
def _rows(n=4000, n_users=40, n_items=60, seed=0, period_order=False) -> Period:
    rng = np.random.default_rng(seed)
    p = Period(user=rng.integers(0, n_users, n), item=rng.integers(0, n_items, n),
               rating=rng.choice([2.0, 4.0, 5.0], n).astype(np.float32), timestamp=rng.integers(0, 50, n))
    if period_order:                                     # as a split's periods: (time, user, item)
        o = np.lexsort((p.item, p.user, p.timestamp))
        p = Period(p.user[o], p.item[o], p.rating[o], p.timestamp[o])
    return p


@pytest.mark.parametrize("period_order", [False, True])
@pytest.mark.parametrize("gap_decay", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("path", ["dense", "sort", "mixed"])
def test_transition_counts_equal_the_old_path_bit_for_bit(monkeypatch, path, gap_decay, period_order):
    """Every way a chunk is summed (a dense block, a direct sort, both in one count), plain and
    gap-weighted weights (0.0: zero weights still name their keys), rows in a split's order (one
    stable sort) or not (the lexsort): the keys and weights of the old sorted count, bit for bit."""
    rows = _rows(period_order=period_order)
    ratio = {"dense": 10 ** 9, "sort": 0, "mixed": 8}[path]
    monkeypatch.setattr(transition, "DENSE_RATIO", ratio)
    monkeypatch.setattr(transition, "DENSE_ENTRIES", 60 * 7)          # many chunks: 7 source items each
    for window, positives_only, chunk in ((1, False, 1 << 25), (6, False, 97), (6, True, 1), (40, False, 500)):
        want = old_transition_counts(rows, 60, window, gap_decay, positives_only, chunk_pairs=chunk)
        got = transition.transition_counts(rows, 60, window, gap_decay, positives_only, chunk_pairs=chunk)
        assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), (window, positives_only)


def test_user_time_order_is_the_lexsort(toy_data):
    for rows in (toy_data.train, _rows(seed=3), _rows(seed=4, period_order=True)):
        want = np.lexsort((rows.item, rows.timestamp, rows.user))
        assert np.array_equal(transition.user_time_order(rows.user, rows.timestamp, rows.item), want)


def test_transition_counts_of_the_toy_split_equal_the_old_path(toy_data):
    for window, gd in ((3, 1.0), (40, 0.9)):
        want = old_transition_counts(toy_data.train, toy_data.n_items, window, gd)
        got = transition.transition_counts(toy_data.train, toy_data.n_items, window, gd)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


# ---------------------------------------------------------------- (a) the run's table cache
def _fresh(data: SplitData) -> SplitData:
    """The split as another notebook's kernel loads it: no table counted in this process."""
    return pickle.loads(pickle.dumps(data))


def _counting(monkeypatch) -> list:
    calls = []
    real = transition.count_table

    def counted(*args, **kw):
        calls.append(args[1:])
        return real(*args, **kw)
    monkeypatch.setattr(transition, "count_table", counted)
    return calls


def _same_table(a, b) -> bool:
    (Ta, ta), (Tb, tb) = a, b
    return (Ta.shape == Tb.shape and all(np.array_equal(getattr(Ta, k), getattr(Tb, k)) and
                                         getattr(Ta, k).dtype == getattr(Tb, k).dtype
                                         for k in ("data", "indices", "indptr"))
            and np.array_equal(ta, tb) and ta.dtype == tb.dtype)


def test_a_later_process_reads_the_table_the_first_counted(toy_data, tmp_path, monkeypatch):
    """One count per distinct table and run: a fresh split (another notebook) with the run's
    folder reads the table back, the same arrays bit for bit and the same scores; another window,
    other rows or no folder count again."""
    calls = _counting(monkeypatch)
    model = transition.Transition(history=3, window=4, gap_decay=0.8, normalise="row")
    model.fit(toy_data)
    users = torch.from_numpy(toy_data.scored_users("valid"))
    plain = _fresh(toy_data)                                          # no folder: this process only
    want = model.table(plain.context("valid"))
    want_scores = model.score_all(users, plain.context("valid")).numpy()
    assert len(calls) == 1

    first = _fresh(toy_data).use_table_dir(tmp_path)
    assert _same_table(model.table(first.context("valid")), want) and len(calls) == 2   # counted, written
    assert len(list(tmp_path.glob("transition-*.npz"))) == 1
    later = _fresh(toy_data).use_table_dir(tmp_path)                   # the next notebook
    ctx = later.context("test")
    got = model.table(ctx)
    assert len(calls) == 2 and _same_table(got, want)                  # read, not counted
    assert np.array_equal(model.score_all(users, later.context("valid")).numpy(), want_scores)

    other = transition.Transition(history=3, window=5, gap_decay=0.8, normalise="row")
    other.fit(toy_data)
    other.table(_fresh(toy_data).use_table_dir(tmp_path).context("valid"))
    assert len(calls) == 3                                             # another window: its own table
    moved = dataclasses.replace(toy_data, _periods={**toy_data._periods, "train": Period(
        toy_data.train.user, np.roll(toy_data.train.item, 1), toy_data.train.rating, toy_data.train.timestamp)})
    moved_T = model.table(_fresh(moved).use_table_dir(tmp_path).context("valid"))
    assert len(calls) == 4 and not _same_table(moved_T, want)          # other rows: counted again
    window = _fresh(toy_data).use_table_dir(tmp_path).label_window(0.1)
    assert window.table_dir == tmp_path                                # the label window's refit shares it
    model.table(window.context("valid"))
    model.table(_fresh(toy_data).use_table_dir(tmp_path).label_window(0.1).context("valid"))
    assert len(calls) == 5 and len(list(tmp_path.glob("transition-*.npz"))) == 4


def test_a_torn_cache_file_is_counted_again(toy_data, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    model = transition.Transition(window=3)
    model.fit(toy_data)
    want = model.table(_fresh(toy_data).use_table_dir(tmp_path).context("valid"))
    (path,) = tmp_path.glob("transition-*.npz")
    path.write_bytes(path.read_bytes()[:100])
    assert _same_table(model.table(_fresh(toy_data).use_table_dir(tmp_path).context("valid")), want)
    assert len(calls) == 2


def test_the_run_keeps_tables_in_a_folder_no_record_reads(toy_data, tmp_path):
    """`Run` points its split at ``.cache/tables/``; the folder is not pickled into data.pt, and
    the completion records never see it (a cache read is no input: the next run is not stale)."""
    run = Run(dataset="toy", profile="quick", dir=tmp_path, params={}, seed=0, device=torch.device("cpu"))
    run.save_data(_fresh(toy_data), {})
    folder = tmp_path.joinpath(*TABLE_CACHE)
    assert run.data.table_dir == folder
    reloaded = Run(dataset="toy", profile="quick", dir=tmp_path, params={}, seed=0, device=torch.device("cpu"))
    assert reloaded.data.table_dir == folder and reloaded.data is not run.data
    assert torch.load(tmp_path / "data.pt", weights_only=False).table_dir is None
    model = transition.Transition(window=3)
    model.fit(reloaded.data)
    model.table(reloaded.data.context("valid"))
    (path,) = folder.glob("transition-*.npz")
    assert tracking.Notes(tmp_path / "notes.json", tmp_path).relative(path) is None
    assert not any(p.startswith(".cache") for p in state.fingerprint(tmp_path))


# ---------------------------------------------------------------- (b) the blend's search
class _Fixed:
    """A member with fixed (n_users, n_items) scores."""

    def __init__(self, table):
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def score_all(self, users, ctx):
        return self.table[users].clone()


def _blend_case(seed: int, n_users: int = 60, n_items: int = 80, blocked: bool = False):
    """Members that agree and disagree, with exact ties (integer scores), a floored score (EASE's
    cap), seen items, and users with few eligible items; optionally a causal catalogue."""
    from recsys_lib.protocol.evaluate import Labels
    from recsys_lib.protocol.splitdata import CausalCatalogue
    rng = np.random.default_rng(seed)
    truth = rng.random((n_users, n_items))
    seen_m = rng.random((n_users, n_items)) < 0.2
    seen_m[:3, :-8] = True                                            # three users with 8 unseen items
    positives = sp.csr_matrix(((rng.random((n_users, n_items)) < 0.12) & ~seen_m).astype(np.float32))
    members = {
        "ties": _Fixed(rng.integers(0, 4, (n_users, n_items))),       # many exact ties
        "good": _Fixed(positives.toarray() + 0.8 * rng.random((n_users, n_items))),
        "pop": _Fixed(np.tile(np.sort(rng.pareto(1.0, n_items)), (n_users, 1))),
        "capped": _Fixed(np.where(rng.random((n_users, n_items)) < 0.3, -1e6, truth)),
        "noise": _Fixed(rng.standard_normal((n_users, n_items))),
    }
    seen = sp.csr_matrix(seen_m.astype(np.float32))
    users = np.flatnonzero(np.diff(positives.indptr) > 0)
    catalogue = None
    if blocked:
        catalogue = CausalCatalogue(item_first=rng.integers(0, 100, n_items), cut=rng.integers(50, 150, n_users))
    ctx = type("Ctx", (), {"seen": seen, "period": "valid", "catalogue": catalogue})()
    labels = Labels(period="valid", users=users, positives=positives[users], ctx=ctx, n_items=n_items)
    return members, labels


@pytest.mark.parametrize("seed,blocked,batch", [(0, False, 1024), (1, True, 1024), (2, False, 7), (3, True, 16),
                                                (4, False, 13)])
def test_the_blend_search_on_spilled_tables_equals_the_old_search_bit_for_bit(seed, blocked, batch, tmp_path):
    """Same steps, members added, weights and validation nDCG@10 (exact floats) as the search over
    every member's users x items table in memory (the old code, verbatim), with one user batch or
    several, read back in other batches (``batch_bytes``), with and without a causal catalogue;
    the spilled tables are removed after."""
    from old_paths import old_blend_tune
    from recsys_lib.models import blend, blend_spill
    members, labels = _blend_case(seed, blocked=blocked)
    want_model, want = old_blend_tune(members, labels, steps=12, batch_users=batch)
    in_memory = blend.tune(members, labels, steps=12, batch_users=batch, verbose=False, spill_dir=tmp_path)
    made = []
    real = blend_spill.SpilledTables

    class Small(real):                                                 # read back 5 users at a time
        def __init__(self, *a, **k):
            super().__init__(*a, **k, batch_bytes=5 * 4 * 80 * len(members))
            made.append(self)
    blend_spill.SpilledTables = Small
    try:
        spilled = blend.tune(members, labels, steps=12, batch_users=batch, verbose=False, spill_dir=tmp_path,
                             in_memory_bytes=0)
    finally:
        blend_spill.SpilledTables = real
    assert len(made) == 1 and made[0].rows == 5 and not made[0].folder.exists()
    for model, table in (in_memory, spilled):
        pd.testing.assert_frame_equal(table, want, check_exact=True)
        assert model.weights == want_model.weights
    assert len(set(want["added"])) > 1


def test_the_blend_search_of_fitted_models_equals_the_old_one(toy_data, tmp_path):
    """The library's own members on the toy split (its causal catalogue on): popularity (ties),
    EASE, transition and iALS; the old search, the new one in memory and on spilled tables agree
    step for step."""
    from old_paths import old_blend_tune
    from recsys_lib.models import blend
    from recsys_lib.models.ease import EASE
    from recsys_lib.models.ials import IALS
    from recsys_lib.models.popularity import Popularity
    from recsys_lib.protocol.evaluate import Labels
    members = {"popularity": Popularity(device="cpu"), "ease": EASE(device="cpu"),
               "transition": transition.Transition(window=3, device="cpu"),
               "ials": IALS(factors=8, iterations=3, device="cpu")}
    for m in members.values():
        m.fit(toy_data)
    labels = Labels.build(toy_data, "valid")
    assert labels.ctx.catalogue is not None
    want_model, want = old_blend_tune(members, labels, steps=8, batch_users=64)
    for kw in ({}, {"spill_dir": tmp_path, "in_memory_bytes": 0}):
        got_model, got = blend.tune(members, labels, steps=8, batch_users=64, verbose=False, **kw)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        assert got_model.weights == want_model.weights and len(set(got["added"])) > 1
    assert not any(tmp_path.iterdir())                                 # nothing left behind


def test_only_a_search_too_large_for_memory_loads_the_spill_module(tmp_path):
    import subprocess
    import sys
    code = ("import sys, numpy as np\n"
            "sys.path.insert(0, 'tests/unit')\n"
            "import test_savings as t\n"
            "from recsys_lib.models import blend\n"
            "members, labels = t._blend_case(0)\n"
            f"blend.tune(members, labels, steps=2, verbose=False, spill_dir={str(tmp_path)!r})\n"
            "print('recsys_lib.models.blend_spill' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=config.PROJECT_ROOT,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------- (c) the negative sampler
def _known(seed: int = 0, n_users: int = 50, n_items: int = 70) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    m = (rng.random((n_users, n_items)) < 0.3) | (np.arange(n_items) < 3)
    m[0, :] = True                                                    # a user who knows every item
    m[1, :-1] = True                                                  # one with a single unknown item
    return sp.csr_matrix(m.astype(np.float32))


@pytest.mark.parametrize("lookup", ["bitmap", "search"])
def test_samplers_of_the_same_rows_share_one_membership_and_draw_the_same(lookup):
    """A second sampler of the same known pairs (another matrix object, as every fit builds) reuses
    the first's membership, and draws what a sampler built from scratch draws (the old path)."""
    from recsys_lib.models import train
    train.clear_membership_cache()
    known = _known()
    before = dict(train.MEMBERSHIP_STATS)
    first = train.NegativeSampler(known, seed=3, lookup=lookup)
    second = train.NegativeSampler(_known(), seed=3, lookup=lookup)   # equal content, new object
    assert train.MEMBERSHIP_STATS["built"] == before["built"] + 1
    assert train.MEMBERSHIP_STATS["reused"] == before["reused"] + 1
    assert second.keys is first.keys and second.known is first.known
    assert (second.bits is first.bits) if lookup == "bitmap" else second.bits is None
    old = train.NegativeSampler(_known(), seed=3, lookup=lookup, cache=False)
    assert train.MEMBERSHIP_STATS["built"] == before["built"] + 2   # the old path builds its own
    assert old.keys is not first.keys and np.array_equal(old.keys, first.keys)
    if lookup == "bitmap":
        assert np.array_equal(old.bits, first.bits)
    assert (old.known != first.known).nnz == 0
    users = np.random.default_rng(9).integers(0, 50, 500)
    for _ in range(3):
        want = old.sample(users, 4)
        assert np.array_equal(second.sample(users, 4), want)
    known.data[:10] = 0                                                # the caller's matrix stays theirs
    known.eliminate_zeros()
    assert np.array_equal(first.keys, old.keys)
    other = train.NegativeSampler(_known(seed=1), seed=3, lookup=lookup)
    assert other.keys is not first.keys                                # other rows: built again
    assert not first.keys.flags.writeable


def test_positive_batches_of_one_split_build_the_membership_once(toy_data):
    """MF's and NeuMF's batches: every fit of a search on the same train rows shares it, and the
    negatives are those of the old path."""
    from recsys_lib.models import train
    train.clear_membership_cache()
    before = dict(train.MEMBERSHIP_STATS)
    draws = []
    for _ in range(3):
        batches, _ = train.positive_batches(toy_data, 256, 2, seed=5, device=torch.device("cpu"))
        draws.append([neg.numpy() for _, _, neg in batches(0)])
    assert train.MEMBERSHIP_STATS["built"] == before["built"] + 1
    assert train.MEMBERSHIP_STATS["reused"] == before["reused"] + 2
    old = train.NegativeSampler(toy_data.train.matrix(toy_data.n_users, toy_data.n_items), seed=5, cache=False)
    users = torch.from_numpy(toy_data.train.user[toy_data.train.positive]).long()
    gen = torch.Generator().manual_seed(5)
    want = [old.sample(users[idx].numpy(), 2) for idx in train.permuted_batches(len(users), 256, gen)]
    for got in draws:
        assert all(np.array_equal(g, w) for g, w in zip(got, want)) and len(got) == len(want)


def test_the_membership_cache_keeps_the_last_two(monkeypatch):
    from recsys_lib.models import train
    train.clear_membership_cache()
    before = dict(train.MEMBERSHIP_STATS)
    for seed in (0, 1, 2, 0):                                          # 0 was dropped when 2 came
        train.NegativeSampler(_known(seed), lookup="bitmap")
    assert train.MEMBERSHIP_STATS["built"] == before["built"] + 4 and len(train._MEMBERSHIPS) == 2
