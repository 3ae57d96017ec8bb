"""Distributed training and scoring (recsys_lib.dist, recsys_lib.run.launch, recsys_lib.worker).

Fast tests check the pieces in one process (row blocks, shard-aware dropout, the softmax's masked
pairs, the gpu profile, parameters, torchrun's failure summary). The ``slow`` ones launch torchrun
with gloo on the synthetic-tiny run (quick profile, 2 epochs): 2 processes give the retriever's and
the MLP re-rankers' validation metrics of 1 process to 1e-4; sharded scoring gives exactly the
single-process top-K lists; a two-node run on localhost matches; a killed rank fails the run with
a message naming it and leaves no checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys_lib import dist
from recsys_lib.run import launch
from recsys_lib.stage2 import system as two_stage
from recsys_lib.protocol import guard
from recsys_lib.config import THREADS_ENV, load_params, load_torch
from recsys_lib.errors import ConfigError
from recsys_lib.models.two_tower import _same_item_pairs
from svd_retriever import SVDRetriever


# ---------------------------------------------------------------- one process
def test_shard_range_partitions_rows():
    for n in (0, 1, 5, 1024, 1027):
        for size in (1, 2, 3, 8):
            blocks = [dist.shard_range(n, r, size) for r in range(size)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            assert max(h - lo for lo, h in blocks) - min(h - lo for lo, h in blocks) <= 1


@pytest.mark.parametrize("per", [1, 3])
def test_shard_dropout_applies_the_global_masks_rows(per):
    """Each block of rows gets exactly what dropout of the whole batch gives those rows."""
    n, h, p = 10, 7, 0.3
    x = torch.randn(n * per, h)
    torch.manual_seed(5)
    full = F.dropout(x, p, training=True)
    layer = dist.ShardDropout(p).train()
    parts = []
    for lo, hi in ((0, 4), (4, 7), (7, 10)):
        torch.manual_seed(5)
        with dist.rows(lo, hi, n):
            parts.append(layer(x[lo * per:hi * per]))
    assert torch.equal(torch.cat(parts), full)
    torch.manual_seed(5)
    assert torch.equal(layer(x), full)                       # outside `rows`: plain dropout


def test_shard_dropout_swaps_only_dropout_modules():
    from recsys_lib.models.layers import mlp
    net = mlp([4, 8, 8, 1], dropout=0.3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    dist.shard_dropout(net)
    assert sum(isinstance(m, dist.ShardDropout) for m in net.modules()) == 2
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_same_item_pairs_of_a_block_are_the_full_pairs_of_its_rows():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 12, (40,), generator=gen)
    cand = torch.cat([pos, torch.randint(0, 12, (9,), generator=gen)])
    rows, cols = _same_item_pairs(pos, cand)
    full = {(int(r), int(c)) for r, c in zip(rows, cols)}
    for lo, hi in ((0, 13), (13, 27), (27, 40)):
        r, c = _same_item_pairs(pos[lo:hi], cand, lo)
        assert {(int(a) + lo, int(b)) for a, b in zip(r, c)} == {(a, b) for a, b in full if lo <= a < hi}


def test_helpers_are_no_ops_outside_a_process_group():
    assert not dist.sharding() and dist.rank() == 0 and dist.world() == 1 and dist.is_main()
    assert list(dist.my_batches(range(0, 10, 3))) == [0, 3, 6, 9]
    out = np.arange(6)
    dist.share_rows(out, range(0, 6, 2), 2)
    assert out.tolist() == list(range(6))
    assert dist.sum_float(2.5) == 2.5


def test_settings_and_overrides():
    from recsys_lib.params import check_overrides
    params = load_params("quick", "synthetic-tiny")
    assert launch.settings(params)["nproc"] == 1 and not launch.distributed(params)
    assert launch.distributed({"dist": {"nproc": 2}})
    assert launch.settings({"dist": {"nproc": "auto"}})["nproc"] == max(torch.cuda.device_count(), 1)
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        launch.settings({"dist": {"nnodes": 2}})
    check_overrides(params, ["dist.nproc=2", "dist.nproc=auto", "dist.nnodes=2", "dist.rdzv_endpoint=h:29500"])
    with pytest.raises(ConfigError):
        check_overrides(params, ["dist.nproc=0"])


def test_gpu_profile_is_full_without_its_caps():
    """params/gpu.yaml extends full.yaml: full's values, its own epoch caps and devices, and none of
    full.yaml's per-dataset budget caps at ml-32m."""
    full, g = load_params("full", "ml-32m"), load_params("gpu", "ml-32m")
    assert g["dist"]["nproc"] == "auto" and len(g["two_tower"]["variants"]) == 3
    assert g["ease"]["max_items"] is None and g["reranker"]["label_window"] == 0.1
    assert g["mf"]["grid"] == load_params("full")["mf"]["grid"] != full["mf"]["grid"]
    assert g["two_tower"]["amp_bf16"] is True and g["mf"]["epochs"] == 100
    assert g["reranker"]["lgbm"]["learning_rate"] == full["reranker"]["lgbm"]["learning_rate"]   # inherited
    assert g["audit"]["design_runs"] == [[12, 4096], [20, 2048]]


def test_failure_message_names_the_failed_rank():
    summary = """
============================================================
recsys_lib.worker FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_10:00:00
  host      : box
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242) (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
============================================================
"""
    msg = launch.failure_message("mf", 1, summary.splitlines(keepends=True))
    assert "rank 1 (local rank 1, pid 4242) was killed by SIGKILL" in msg and "No checkpoint" in msg
    assert "torchrun exited with code 1" in launch.failure_message("mf", 1, ["boom\n"])


def test_command_lines():
    one = launch.command(["mf", "--run-dir", "r"], 2)
    assert "--standalone" in one and "--nproc-per-node=2" in one and one[-3:] == ["mf", "--run-dir", "r"]
    assert one[one.index("-m", 3):][:2] == ["-m", "recsys_lib.worker"]
    two = launch.command(["mf"], 8, nnodes=2, rdzv_endpoint="h:1", node_rank=1)
    assert "--nnodes=2" in two and "--rdzv-endpoint=h:1" in two and "--node-rank=1" in two


# ---------------------------------------------------------------- torchrun (gloo, 2 processes)
OVERRIDES = {                 # the quick profile, small enough for a few seconds a fit
    "eval.batch_users": 64,   # several scoring batches, so sharded scoring has work to split
    "mf.grid": {"lr": [0.01]}, "mf.max_edge_steps": 0,
    "neumf.grid": {"lr": [0.01]}, "neumf.max_edge_steps": 0,
    "reranker.variants": ["id_mlp", "mlp_features"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """01_split's run folder for synthetic-tiny (quick profile, seed 42, cpu)."""
    from recsys_lib import data
    from recsys_lib.protocol import split as splitting
    from recsys_lib.run.experiment import Run
    from recsys_lib.protocol.splitdata import SplitData
    root = tmp_path_factory.mktemp("dist")
    mp = pytest.MonkeyPatch()
    mp.setenv("RECSYS_DATA_DIR", str(root / "data"))
    before = torch.get_num_threads()
    # as each of 2 workers on 2 cores (launch.worker_env), or $RECSYS_TORCH_THREADS, which they obey
    torch.set_num_threads(int(os.environ.get(THREADS_ENV) or 1))
    run = Run.open("synthetic-tiny", "quick", root / "run", OVERRIDES, 42, "cpu")
    ds = data.load_dataset("synthetic-tiny")
    split = splitting.make_split("synthetic-tiny", run.params["split"], interactions=ds.interactions)
    enc = SplitData.from_split(split, ds.items, ds.tags, n_tags=3, year_bucket=1, name="synthetic-tiny")
    run.save_data(enc, {"split": {"id": split.split_id}})
    yield run
    torch.set_num_threads(before)
    mp.undo()


def test_early_stopping_ranks_full_lists_only_for_models_whose_scores_tie(tiny_run):
    """Run.early_stopping_metric (the notebooks' and the workers' callback) ranks the list head
    for learnt scores and the full lists for counts, whose tied items' order depends on k."""
    assert tiny_run.early_stopping_metric(model="popularity").full_lists
    assert tiny_run.early_stopping_metric(model="transition").full_lists
    assert not tiny_run.early_stopping_metric(model="mf").full_lists
    assert not tiny_run.early_stopping_metric().full_lists


def _with_nproc(run, nproc: int):
    from dataclasses import replace
    return replace(run, params={**run.params, "dist": {**run.params["dist"], "nproc": nproc}},
                   _evaluators={})


def _means_close(a: dict, b: dict, tol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    bad = {k: (a[k], b[k]) for k in a if abs(a[k] - b[k]) > tol}
    assert not bad, bad


@pytest.mark.slow
def test_retriever_two_processes_match_one(tiny_run):
    """Both variants (BPR; in-batch softmax over the gathered item embeddings) through the path
    `Run.fit_model` takes: `launch.tune` in-process (nproc 1) and launched (nproc 2)."""
    from recsys_lib.models import two_tower
    run = tiny_run
    sec = run.params["two_tower"]
    H, K = two_tower.history_len_needed(sec), int(sec["candidate_k"])
    metric = two_tower.selection_metric(K, run.data.n_items)
    fits = {}
    for nproc in (1, 2):
        r = _with_nproc(run, nproc)
        validate = r.early_stopping_metric(None, metric, H)       # built before the fit, as fit_model does
        with guard.fitting("two_tower"):
            fits[nproc] = launch.tune(r, "two_tower", two_tower.tune, validate, metric=metric, history_len=H)
    (ref, ref_search), (got, search) = fits[1], fits[2]
    assert list(search["name"]) == ["bpr", "softmax"] and list(search["epochs"]) == list(ref_search["epochs"])
    softmax, seed = 1, 0
    assert abs(search["valid_metric"][softmax] - ref_search["valid_metric"][softmax]) <= 1e-4
    # BPR (seed): a step's gradient is the single-process one (test_one_step_gradients...), but Adam
    # turns the rounding noise of its BPR-invariant item-tower biases (true gradient 0) into
    # lr-sized steps; one process with 2 threads instead of 1 drifts as far (0.01 in the weights
    # after one epoch). Its metrics agree to a ranking flip or two, not to 1e-4.
    assert abs(search["valid_metric"][seed] - ref_search["valid_metric"][seed]) <= 0.01
    assert search["best"][softmax] and ref_search["best"][softmax]
    assert got.curve["best_epoch"] == ref.curve["best_epoch"]      # the curve came back with the model
    _means_close(run.evaluator("valid", history_len=H)(got).means(), run.evaluator("valid", history_len=H)(ref).means())


@pytest.mark.slow
def test_one_step_gradients_of_every_model_match_one_process(tiny_run, tmp_path):
    """MF, NeuMF, both two-tower variants (softmax with dropout) and both MLP re-rankers (dropout
    0.3): one step's gradient with 2 ranks = one process's, to rounding (tests/unit/dist_step_worker.py).
    Unscaled shard losses give 3e-3 to 0.1 here, per-rank dropout masks 2 to 6."""
    out = tmp_path / "steps.json"
    worker = Path(__file__).with_name("dist_step_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker),
           str(tiny_run.dir), str(out)]
    proc = subprocess.run(cmd, env=launch.worker_env(2), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    worst = json.loads(out.read_text())
    assert len(worst) == 7 and max(worst.values()) < 1e-3, worst


@pytest.mark.slow
def test_mlp_rerankers_two_processes_match_one(tiny_run):
    """Both MLP kinds (dropout 0.3: shard-aware masks), cross-fitted on 2 folds, through the
    launcher `two_stage.fit` uses."""
    from recsys_lib.stage2.candidates import generate_candidates
    from recsys_lib.stage2 import selection
    from recsys_lib.stage2.inputs import StageInputs
    from recsys_lib.stage2.features import build_features, retriever_user_table
    run = tiny_run
    retriever = SVDRetriever(run.data)
    labels = run.evaluator("valid").labels
    cands = generate_candidates(retriever, labels, k=50)
    ue = retriever_user_table(retriever, labels.users, labels.ctx, run.data.n_users)
    X, names = build_features(cands, run.data, labels.ctx, "valid", retriever, {}, ue)
    inputs = StageInputs(labels, cands, X, names, ue)
    section = run.params["reranker"]
    with guard.fitting("reranker", allow=("train", "valid")):
        _, ref_table, ref = selection.tune(section, inputs, run.data, retriever, seed=run.seed)
        _, table, got = two_stage.fit_distributed(_with_nproc(run, 2), inputs, retriever, section)
    assert list(got) == list(ref) == ["id_mlp", "mlp_features"]
    for label in ref:
        a, b = got[label].info, ref[label].info
        assert abs(a["out_of_fold_ndcg"] - b["out_of_fold_ndcg"]) <= 1e-4, (label, a["out_of_fold_ndcg"], b["out_of_fold_ndcg"])
        assert a["best_epoch_or_round"] == b["best_epoch_or_round"]
        assert np.allclose(a["fold_ndcg"], b["fold_ndcg"], atol=1e-4, rtol=0)
    assert np.allclose(table["out_of_fold_ndcg"], ref_table["out_of_fold_ndcg"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_two_nodes_on_localhost_match_one_process_and_sharded_scoring_is_exact(tiny_run, tmp_path):
    """``--nnodes=2 --nproc-per-node=1``, c10d rendezvous: two torchrun agents, as on two machines,
    running the command line entry point with ``--score valid``."""
    from recsys_lib.protocol.evaluate import evaluate_ranking, rank_topk
    from recsys_lib.models import neumf
    run = tiny_run
    validate = run.early_stopping_metric()
    with guard.fitting("neumf"):
        _, ref_search = launch.tune(run, "neumf", neumf.tune, validate)
    endpoint = f"localhost:{_free_port()}"
    out = tmp_path / "out"
    args = ["neumf", "--run-dir", str(run.dir), "--out-dir", str(out), "--score", "valid"]
    env = launch.worker_env(2)             # two processes on this machine
    nodes = [subprocess.Popen(launch.command(args, 1, 2, endpoint, "two-nodes", node_rank=r), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs
    result = load_torch(out / "result.pt")
    assert result["world"] == 2
    assert np.allclose(result["search"]["valid_metric"], ref_search["valid_metric"], atol=1e-4, rtol=0)
    # sharded scoring (2 ranks, round-robin batches of 64 users) = one process, exactly
    model = neumf.NeuMF.load(out / "model.pt", device="cpu")
    labels = run.evaluator("valid").labels
    items, scores = rank_topk(model, labels.users, labels.ctx, 1000, labels.n_items, 64, with_scores=True)
    got = result["scores"]["valid"]
    assert len(labels.users) > 2 * 64
    assert np.array_equal(got["items"], items) and np.array_equal(got["scores"], scores)
    assert got["metrics"] == evaluate_ranking(items, labels).means()


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_naming_it_and_leaves_no_checkpoint(tiny_run, tmp_path):
    out = tmp_path / "out"
    pids: dict[int, int] = {}
    killed = threading.Event()

    def on_line(line: str) -> None:
        # findall, not match: two processes share the pipe, so one line may hold both ranks' lines
        for rank, pid in re.findall(r"\[dist\] rank (\d+)/2 pid (\d+)", line):
            pids[int(rank)] = int(pid)
        if re.search(r"mf epoch \d+:", line) and 1 in pids and not killed.is_set():
            os.kill(pids[1], signal.SIGKILL)           # only the worker this test started
            killed.set()

    with pytest.raises(launch.DistributedError) as err:
        launch.launch(["mf", "--run-dir", str(tiny_run.dir), "--out-dir", str(out), "--set", "mf.epochs=500",
                           "--set", "mf.patience=0"], nproc=2, on_line=on_line)
        assert killed.is_set(), f"the run ended without the test killing rank 1 (pids seen: {pids})"
    assert killed.is_set()
    msg = str(err.value)
    assert "rank 1" in msg and "SIGKILL" in msg and "No checkpoint" in msg, msg
    assert not (out / "model.pt").exists() and not (out / "result.pt").exists()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
