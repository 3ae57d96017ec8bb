"""One training step of every deep model, distributed against one process (run by test_dist.py
under ``torchrun --nproc-per-node=2``; not a test module itself).

Each model's own ``fit`` runs up to its call of ``fit_loop``, which is replaced here by a probe:
it takes the first global batch, computes the single-process gradient on a copy of the network
(plain dropout, whole batch), then the distributed gradient (`dist.data_parallel`: this rank's
rows, scaled, shard-aware dropout, DDP averaging) from the same random state, and records the
largest difference relative to the gradient's size. Rank 0 writes {case: difference} as JSON.

    torchrun --standalone --nproc-per-node=2 tests/unit/dist_step_worker.py RUN_DIR OUT.json
"""
from __future__ import annotations

import copy
import json
import sys

import torch

from recsys_lib import config, dist
from recsys_lib.stage2.candidates import generate_candidates
from recsys_lib.protocol.evaluate import Labels
from recsys_lib.models import mf, neumf, train, two_tower
from recsys_lib.stage2 import rerankers as reranker, selection
from recsys_lib.stage2.inputs import StageInputs
from recsys_lib.stage2.ranking import split_users
from recsys_lib.stage2.rerankers import mlp as reranker_mlp
from recsys_lib.stage2.features import build_features, retriever_user_table
from svd_retriever import SVDRetriever

NOISE = 1e-7          # a parameter whose whole gradient is below this is rounding noise (BPR-invariant biases)


class Probed(Exception):
    pass


def probe(results: dict, case: str):
    def fit_loop(model, batches, loss_fn, optimizer, cfg, validate=None, scheduler=None,
                 batch_size_of=None, name="model", shard=None):
        batch = next(iter(batches(0)))
        ref = copy.deepcopy(model).train()
        state = torch.get_rng_state()
        loss_fn(ref, batch).backward()
        torch.set_rng_state(state)
        ddp = dist.data_parallel(model, loss_fn, shard).train()
        ddp(batch).backward()
        worst = 0.0
        for (k, p), q in zip(model.named_parameters(), ref.parameters()):
            scale = float(q.grad.abs().max()) if q.grad is not None else 0.0
            if scale > NOISE:
                worst = max(worst, float((p.grad - q.grad).abs().max()) / scale)
        results[case] = worst
        raise Probed
    return fit_loop


def main(run_dir: str, out: str) -> None:
    dist.init("cpu")
    data = config.load_torch(f"{run_dir}/data.pt")
    results: dict[str, float] = {}
    small = dict(dim=16, side_dim=8, lstm_hidden=16, user_hidden=[32], item_hidden=[32], device="cpu", seed=0)
    fits = {
        "mf (257 rows)": lambda: mf.MF(dim=8, batch_size=257, device="cpu", verbose=False).fit(data),
        "mf (1 row: rank 1 idle at weight 0)": lambda: mf.MF(dim=8, batch_size=1, device="cpu", verbose=False).fit(data),
        "neumf": lambda: neumf.NeuMF(batch_size=301, n_neg=2, device="cpu", verbose=False).fit(data),
        "two_tower bpr": lambda: two_tower.TwoTower(two_tower.TwoTowerConfig(variant="bpr", batch_size=301,
                                                                             **small)).fit(data),
        "two_tower softmax": lambda: two_tower.TwoTower(two_tower.TwoTowerConfig(
            variant="softmax", batch_size=301, n_uniform_neg=7, dropout=0.2, **small)).fit(data),
    }
    labels = Labels.build(data, "valid")
    svd = SVDRetriever(data)
    cands = generate_candidates(svd, labels, k=30)
    ue = retriever_user_table(svd, labels.users, labels.ctx, data.n_users)
    X, names = build_features(cands, data, labels.ctx, "valid", svd, {}, ue)
    inputs = StageInputs(labels, cands, X, names, ue)
    train_users, held_users = split_users(labels.users, 0.2, 42)
    for cfg in (reranker.IdMLPConfig(batch_size=101, emb_dim=8, dropout=0.3, hidden=[16, 8]),
                reranker.FeatureMLPConfig(loss="softmax", users_per_batch=9, dropout=0.3, hidden=[16, 8])):
        fits[f"reranker {cfg.variant} (dropout 0.3)"] = lambda cfg=cfg: selection.fit_reranker(
            cfg, inputs, data, svd, train_users=train_users, held_users=held_users)
    modules = (train, two_tower, reranker_mlp)    # where each fit looks fit_loop up
    for case, fit in fits.items():
        for module in modules:
            module.fit_loop = probe(results, case)
        try:
            fit()
        except Probed:
            pass
    if dist.is_main():
        with config.atomic_write(out) as tmp:
            tmp.write_text(json.dumps(results, indent=1))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
