"""Shared fixtures: a small split with planted structure, built without the data layer.

Threads: ``RECSYS_TORCH_THREADS=1 make test`` runs the whole suite with one torch thread (this
process, the pipeline's kernels and torchrun workers, which inherit the variable); unset, torch's
default. Another thread count changes the last bits of float sums, as another machine's CPU does,
so every assertion on a trained model must hold under both (see docs/running.md, "Determinism")."""
from __future__ import annotations

import os
import types

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_lib import config as recsys_config
from recsys_lib.protocol.splitdata import SplitData

TORCH_THREADS = recsys_config.torch_threads()


def pytest_report_header(config) -> str:
    how = "forced by" if os.environ.get(recsys_config.THREADS_ENV) else "torch's default; force with"
    return f"torch {torch.__version__}: {TORCH_THREADS} intra-op thread(s) ({how} {recsys_config.THREADS_ENV})"


def toy_interactions(n_users: int = 300, n_items: int = 200, per_user: int = 40, dim: int = 4,
                     seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Users pick items by latent taste (with a popularity bias and a sequential pull towards the
    previous item's neighbours); ratings are higher for better matches. Returns
    (interactions, items, tags) in the loader's formats."""
    rng = np.random.default_rng(seed)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]
    item_vec = rng.normal(size=(n_items, dim))
    user_vec = rng.normal(size=(n_users, dim))
    pop = -1.0 * np.log(np.arange(1, n_items + 1))
    rows = []
    for u in range(n_users):
        logits = user_vec[u] @ item_vec.T + 0.5 * pop
        p = np.exp(logits - logits.max()); p /= p.sum()
        items = rng.choice(n_items, size=per_user, replace=False, p=p)
        match = (user_vec[u] @ item_vec[items].T)
        rating = np.clip(np.round((3.0 + match) * 2) / 2, 0.5, 5.0)
        ts = 1_500_000_000 + np.sort(rng.integers(0, 100_000_000, size=per_user))
        rows.append(pd.DataFrame({"user_id": u + 1, "item_id": items + 1, "rating": rating, "timestamp": ts}))
    inter = pd.concat(rows, ignore_index=True).astype(
        {"user_id": "int32", "item_id": "int32", "rating": "float32", "timestamp": "int64"})
    g = np.argmax(item_vec[:, :min(dim, len(genres))], axis=1)
    items_df = pd.DataFrame({
        "item_id": np.arange(1, n_items + 1, dtype=np.int32),
        "title": [f"Movie {i} ({1990 + i % 30})" for i in range(n_items)],
        "year": pd.array([1990 + i % 30 for i in range(n_items)], dtype="Int16"),
        "genres": [[genres[k], genres[(k + 1) % len(genres)]] for k in g],
    })
    n_tags = 600
    tags = pd.DataFrame({"user_id": rng.integers(1, n_users + 1, n_tags).astype(np.int32),
                         "item_id": rng.integers(1, n_items + 1, n_tags).astype(np.int32),
                         "tag": [f"Tag{k % 25}" for k in range(n_tags)],
                         "timestamp": rng.integers(1_500_000_000, 1_560_000_000, n_tags).astype(np.int64)})
    return inter, items_df, tags


def toy_split(inter: pd.DataFrame) -> types.SimpleNamespace:
    """Per-user last 10% test, previous 10% validation (docs/PROTOCOL.md user_temporal, no core filter)."""
    df = inter.sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)
    n = df.groupby("user_id")["item_id"].transform("size").to_numpy()
    k = np.maximum(1, n // 10)
    pos = df.groupby("user_id").cumcount().to_numpy()
    test = pos >= n - k
    valid = (pos >= n - 2 * k) & ~test
    train = df[~test & ~valid]
    keep = lambda d: d[d["item_id"].isin(train["item_id"])].reset_index(drop=True)
    return types.SimpleNamespace(train=train.reset_index(drop=True), valid=keep(df[valid]),
                                 test=keep(df[test]), params={"strategy": "user_temporal"})


@pytest.fixture(scope="session")
def toy_data() -> SplitData:
    inter, items, tags = toy_interactions()
    return SplitData.from_split(toy_split(inter), items, tags, name="toy")


@pytest.fixture(scope="session")
def toy_rows() -> pd.DataFrame:
    """The toy's interaction rows alone, for tests that build their own split. (A test module
    cannot `from conftest import ...`: which conftest that names depends on the order pytest
    put the test folders on sys.path.)"""
    return toy_interactions()[0]
