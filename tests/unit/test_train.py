"""The shared training pieces: negative sampling, index batches, fit_loop's early stopping, checkpoints."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recsys_lib.models.train import (LoopConfig, NegativeSampler, adam, count_parameters, fit_loop, load_checkpoint, permuted_batches, positive_batches, save_checkpoint)



def dense_known(n_users=30, n_items=12, density=0.6, seed=0) -> sp.csr_matrix:
    """A dense-ish known matrix; every user keeps at least one unknown item."""
    rng = np.random.default_rng(seed)
    m = rng.random((n_users, n_items)) < density
    m[np.arange(n_users), rng.integers(0, n_items, n_users)] = False
    return sp.csr_matrix(m.astype(np.float32))


# ---------------------------------------------------------------- NegativeSampler
def test_negative_sampler_never_returns_a_known_item():
    known = dense_known()
    dense = known.toarray().astype(bool)
    sampler = NegativeSampler(known, seed=0, rounds=100)   # 0.6^100: collisions impossible in practice
    users = np.repeat(np.arange(known.shape[0]), 50)
    neg = sampler.sample(users, n_neg=4)                   # (1500, 4)
    assert neg.shape == (len(users), 4)
    assert neg.min() >= 0 and neg.max() < known.shape[1]
    assert not dense[users[:, None], neg].any()
    # every unknown item of a user can be drawn (uniform over the complement, not a fixed subset)
    for u in range(5):
        drawn = set(neg[users == u].ravel().tolist())
        assert drawn == set(np.flatnonzero(~dense[u]).tolist())


def test_negative_sampler_default_rounds_exact_on_dense_users():
    known = dense_known(density=0.6)
    dense = known.toarray().astype(bool)
    users = np.repeat(np.arange(known.shape[0]), 200)
    neg = NegativeSampler(known, seed=0).sample(users, n_neg=4)
    assert not dense[users[:, None], neg].any()


def test_negative_sampler_is_reproducible_with_a_seed():
    known = dense_known()
    users = np.arange(known.shape[0])
    a = NegativeSampler(known, seed=7).sample(users, 3)
    b = NegativeSampler(known, seed=7).sample(users, 3)
    c = NegativeSampler(known, seed=8).sample(users, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_negative_sampler_is_known():
    known = sp.csr_matrix(np.array([[1, 0, 1], [0, 0, 1]], dtype=np.float32))
    s = NegativeSampler(known)
    np.testing.assert_array_equal(s.is_known(np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 2])),
                                  [True, False, True, False, True])


def test_negative_sampler_bitmap_and_search_agree_and_draw_the_same_negatives():
    """The bitmap lookup (the default) answers as the binary search does, so the same seed draws
    the very same negatives: MF, NeuMF and the two-tower train on identical batches either way."""
    known = dense_known(n_users=57, n_items=37, density=0.4, seed=3)   # 57 * 37 is not a multiple of 8
    bitmap, search = NegativeSampler(known, seed=5), NegativeSampler(known, seed=5, lookup="search")
    assert bitmap.lookup == "bitmap" and search.lookup == "search"
    uu, ii = np.meshgrid(np.arange(57), np.arange(37), indexing="ij")
    np.testing.assert_array_equal(bitmap.is_known(uu.ravel(), ii.ravel()), known.toarray().ravel() > 0)
    np.testing.assert_array_equal(bitmap.is_known(uu.ravel(), ii.ravel()), search.is_known(uu.ravel(), ii.ravel()))
    users = np.repeat(np.arange(57), 40)
    for _ in range(3):
        np.testing.assert_array_equal(bitmap.sample(users, 4), search.sample(users, 4))
    # a grid over the byte budget falls back to the search
    assert NegativeSampler(known, max_bitmap_bytes=8).lookup == "search"
    with pytest.raises(ValueError, match="lookup"):
        NegativeSampler(known, lookup="hash")


# ---------------------------------------------------------------- batches
def test_permuted_batches_cover_every_index_once():
    gen = torch.Generator().manual_seed(0)
    batches = permuted_batches(103, 10, gen)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert torch.equal(torch.sort(torch.cat(batches)).values, torch.arange(103))
    again = permuted_batches(103, 10, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


# ---------------------------------------------------------------- fit_loop
class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))


def _toy_run(metrics: list[float], patience: int, epochs: int | None = None):
    """Train a toy model whose weights move every epoch; validation returns ``metrics`` in order.
    Returns (model, history, snapshot of the weights at each validation)."""
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.tensor([1.0, -2.0, 3.0])
    snapshots: list[torch.Tensor] = []
    values = iter(metrics)

    def validate():
        snapshots.append(model.w.detach().clone())
        return next(values)

    def loss_fn(m, batch):
        return ((m.w - target) ** 2).sum() * batch

    cfg = LoopConfig(epochs=epochs or len(metrics), patience=patience, progress=False, log_every_epoch=False)
    hist = fit_loop(model, lambda epoch: [1.0, 1.0], loss_fn, opt, cfg, validate=validate)
    return model, hist, snapshots


def test_fit_loop_early_stops_and_restores_the_best_state():
    model, hist, snaps = _toy_run([0.1, 0.5, 0.3, 0.2, 0.9, 1.0], patience=2)
    assert len(hist.records) == 4                      # epochs 3 and 4 did not improve: stop
    assert hist.best_epoch == 2 and hist.best_metric == 0.5
    assert [r["valid_metric"] for r in hist.records] == [0.1, 0.5, 0.3, 0.2]
    assert not torch.equal(snaps[1], snaps[3])         # the weights did move after the best epoch
    assert torch.equal(model.w.detach(), snaps[1])     # ...and the best epoch's weights are back
    assert not model.training
    losses = [r["loss"] for r in hist.records]
    assert all(a > b for a, b in zip(losses, losses[1:]))


def test_fit_loop_patience_zero_runs_every_epoch():
    model, hist, snaps = _toy_run([0.3, 0.2, 0.1, 0.05], patience=0)
    assert len(hist.records) == 4 and hist.best_epoch == 1
    assert torch.equal(model.w.detach(), snaps[0])


def test_fit_loop_without_validation_keeps_the_last_state():
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = LoopConfig(epochs=3, progress=False, log_every_epoch=False)
    hist = fit_loop(model, lambda e: [None], lambda m, b: (m.w - 1).pow(2).sum(), opt, cfg)
    assert hist.best_epoch == 3 and len(hist.records) == 3
    assert "valid_metric" not in hist.records[0]
    torch.testing.assert_close(model.w.detach(), 1 - 0.8 ** 3 * torch.ones(3))


# ---------------------------------------------------------------- checkpoints
@dataclass
class ToyConfig:
    dim: int = 3       # size
    lr: float = 0.1    # rate


def test_checkpoint_round_trip(tmp_path):
    model = Toy()
    with torch.no_grad():
        model.w.copy_(torch.tensor([1.0, 2.0, 3.0]))
    path = save_checkpoint(tmp_path / "sub" / "toy.pt", model, ToyConfig(dim=3), n_items=7)
    assert path.exists() and not path.with_name("toy.pt.tmp").exists()
    ckpt = load_checkpoint(path)
    assert ckpt["config"] == {"dim": 3, "lr": 0.1} and ckpt["n_items"] == 7
    other = Toy()
    other.load_state_dict(ckpt["state_dict"])
    assert torch.equal(other.w, model.w)
    assert count_parameters(other) == 3


def test_negative_sampler_finds_the_only_unknown_item():
    import scipy.sparse as sp
    known = np.ones((3, 50), dtype=np.float32)
    known[1, 17] = 0
    neg = NegativeSampler(sp.csr_matrix(known), seed=1).sample(np.array([1] * 20), n_neg=3)
    assert (neg == 17).all()


# ---------------------------------------------------------------- positive_batches, adam
def test_positive_batches_cover_every_train_positive_once_per_epoch_with_unknown_negatives(toy_data):
    batches, n = positive_batches(toy_data, batch_size=64, n_neg=3, seed=0, device=torch.device("cpu"))
    train = toy_data.train
    expected = sorted(zip(train.user[train.positive].tolist(), train.item[train.positive].tolist()))
    assert n == len(expected)
    known = train.matrix(toy_data.n_users, toy_data.n_items).toarray() > 0
    for epoch in range(2):
        seen = []
        for u, i, neg in batches(epoch):
            assert neg.shape == (len(u), 3)
            assert not known[u.numpy()[:, None], neg.numpy()].any()            # negatives unknown
            seen += list(zip(u.tolist(), i.tolist()))
        assert sorted(seen) == expected


def test_adam_is_fused_on_cpu_and_steps_like_plain_adam():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    fused, plain = adam(a.parameters(), lr=0.01), torch.optim.Adam(b.parameters(), lr=0.01)
    assert fused.defaults["fused"] is True
    x = torch.randn(8, 4)
    for _ in range(3):
        for net, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight)
