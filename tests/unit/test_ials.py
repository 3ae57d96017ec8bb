"""iALS through ``implicit``: it learns the toy's planted tastes, folds users in from the rows before
the scored period (so validation rows move a user's test-time vector, and nothing else), scores from
the kind of matrix it was fit on, and round-trips through save/load."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_lib.protocol import guard
from recsys_lib.models import tuning
from recsys_lib.protocol.evaluate import Evaluator
from recsys_lib.models.ials import IALS, IALSConfig



@pytest.fixture(scope="module")
def validate(toy_data):
    return tuning.validator(Evaluator(toy_data, "valid", ks=(10,)))


@pytest.fixture(scope="module")
def fitted(toy_data):
    model = IALS(IALSConfig(factors=16, regularization=1.0, alpha=10.0, iterations=8, device="cpu", seed=0))
    with guard.fitting("ials"):                                    # reads train rows only
        model.fit(toy_data)
    return model


def test_ials_learns_the_planted_structure(fitted, toy_data, validate):
    assert fitted.item_factors.shape == (toy_data.n_items, 16)
    random = np.mean([validate(lambda u, ctx, s=s: torch.rand(len(u), toy_data.n_items,
                                                              generator=torch.Generator().manual_seed(s)))
                      for s in range(3)])
    assert validate(fitted) > max(0.15, 3 * random)


def test_ials_fold_in_uses_validation_rows_at_test_time(fitted, toy_data):
    """A user's test-time vector is the least-squares fit to train + validation positives; at
    validation time to train positives only. Users with validation positives change; users without
    do not (the item factors are fixed)."""
    users = torch.arange(toy_data.n_users)
    at_valid = fitted.user_factors(users, toy_data.context("valid"))
    at_test = fitted.user_factors(users, toy_data.context("test"))
    gained = np.diff(toy_data.seen_before("test", True).indptr) > np.diff(toy_data.seen_before("valid", True).indptr)
    assert gained.any() and (~gained).any()
    moved = (at_test - at_valid).abs().amax(dim=1) > 1e-5
    assert moved[torch.from_numpy(gained)].all()
    assert not moved[torch.from_numpy(~gained)].any()


def test_ials_fold_in_is_the_least_squares_solution(fitted, toy_data):
    """implicit's convention: confidence alpha on observed pairs, 1 elsewhere, preference 1 on
    observed pairs: u = (Y^T C Y + reg I)^-1 Y^T C p."""
    ctx = toy_data.context("test")
    y = fitted.item_factors.double().numpy()
    for u in (0, 7, 31):
        items = ctx.seen_positive[u].indices
        c = np.ones(len(y))
        c[items] = fitted.cfg.alpha
        p = np.zeros(len(y))
        p[items] = 1.0
        a = y.T @ (c[:, None] * y) + fitted.cfg.regularization * np.eye(y.shape[1])
        expected = np.linalg.solve(a, y.T @ (c * p))
        got = fitted.user_factors(torch.tensor([u]), ctx)[0].double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_ials_scores_from_the_kind_of_matrix_it_was_fit_on(toy_data):
    ctx = toy_data.context("valid")
    users = torch.arange(10)
    for positives_only in (True, False):
        model = IALS(IALSConfig(factors=8, iterations=3, positives_only=positives_only, device="cpu"))
        model.fit(toy_data)
        expected = torch.from_numpy(model._solver.recalculate_user(
            np.arange(10), ctx.input_matrix(positives_only)[:10].astype(np.float32))) @ model.item_factors.T
        torch.testing.assert_close(model.score_all(users, ctx), expected)


def test_ials_save_load_round_trip(fitted, toy_data, tmp_path):
    fitted.save(tmp_path / "ials.pt")
    loaded = IALS.load(tmp_path / "ials.pt")
    assert loaded.cfg == fitted.cfg
    ctx = toy_data.context("test")
    users = torch.arange(toy_data.n_users)
    assert torch.equal(fitted.score_all(users, ctx), loaded.score_all(users, ctx))


def test_ials_tune_searches_its_grid(toy_data, validate):
    from recsys_lib.models import ials
    section = {"factors": 8, "iterations": 3, "grid": {"regularization": [0.1, 1.0]}}
    model, table = ials.tune(toy_data, section, validate, device="cpu", seed=0, verbose=False)
    assert isinstance(model, IALS) and len(table) >= 2
    assert model.cfg.regularization == table.loc[table["best"], "regularization"].item()


def test_ials_search_resumes_shorter_runs_with_the_same_models(toy_data, validate, monkeypatch):
    """issue 27: inside `ials.tune` a fit of n iterations resumes from a shorter fit of the same
    configuration (`warm_start_cache`). The search table and the chosen factors are those of fits
    that each start afresh, bit for bit, and implicit runs fewer ALS rounds."""
    from recsys_lib.models import ials
    section = {"grid": {"factors": [8], "iterations": [3, 6], "regularization": [0.1, 1.0]},
               "max_edge_steps": 1}
    fresh, table0 = tuning.tune_model(IALS, toy_data, section, validate, device="cpu", seed=0, verbose=False)
    rounds = []
    real = ials._als
    monkeypatch.setattr(ials, "_als", lambda cfg, use_gpu: rounds.append(cfg.iterations) or real(cfg, use_gpu))
    resumed, table1 = ials.tune(toy_data, section, validate, device="cpu", seed=0, verbose=False)
    pd.testing.assert_frame_equal(table0.drop(columns="fit_seconds"), table1.drop(columns="fit_seconds"))
    assert torch.equal(fresh.item_factors, resumed.item_factors)
    asked = table1["iterations"].astype(int).tolist()
    fitted = rounds[::2]          # _als is made twice a fit: the rounds it runs, then the fold-in solver
    assert len(fitted) == len(asked) == len(table0)
    assert sum(fitted) < sum(asked)
    assert fitted[asked.index(6)] == 3                      # 6 iterations: the 3-iteration state, 3 more
    assert ials._STATES is None                                           # the cache ends with the search
    # outside a search nothing is resumed
    model = IALS(IALSConfig(factors=8, iterations=6, regularization=0.1, device="cpu", seed=0))
    assert model.fit(toy_data)["resumed_from"] == 0
