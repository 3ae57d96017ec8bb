"""Resume records, reads of the parameters, the run lock and corrupt-file errors (runstate)."""
from __future__ import annotations

import json
import subprocess
import sys
import copy

import pytest
import torch

from recsys_lib import config
from recsys_lib.run import state as runstate
from recsys_lib.errors import PipelineError

IDENTITY = {"DATASET": "d", "PROFILE": "p", "SEED": 1, "DEVICE": ""}
PARAMS = {"seed": 1, "mf": {"dim": 8}, "ease": {"reg": 10.0}}


def make_notebooks(folder, names=("00_a", "10_b", "20_c")):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        p = folder / f"{n}.ipynb"
        p.write_text(json.dumps({"cells": [], "name": n}))
        out.append(p)
    return out


def finish(run_dir, nb, every, reads=(), writes=(), params=PARAMS, code="c1"):
    """What the pipeline does around one notebook: fingerprint, 'run' it, record it."""
    before = runstate.fingerprint(run_dir)
    tracked = runstate.TrackedParams(params, run_dir / "state" / f"{nb.stem}.reads.json")
    for key in reads:
        tracked.get(key)
    for rel, text in writes:
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_text(text)
    i = every.index(nb)
    upstream = runstate.upstream_digest([runstate.read_record(run_dir, p.stem) for p in every[:i]])
    return runstate.write_record(run_dir, nb, before, IDENTITY, params, code, upstream, 1.0)


@pytest.fixture
def done(tmp_path):
    """Three notebooks that finished: 00 read nothing and wrote data.pt, 10 read mf, 20 read ease."""
    nbs = make_notebooks(tmp_path / "nb")
    run = tmp_path / "run"
    run.mkdir()
    finish(run, nbs[0], nbs, writes=[("data.pt", "x")])
    finish(run, nbs[1], nbs, reads=["mf"], writes=[("metrics/mf.json", "{}")])
    finish(run, nbs[2], nbs, reads=["ease", "nosuch"], writes=[("metrics/ease.json", "{}")])
    return nbs, run


def test_tracked_params_note_top_level_reads_only(tmp_path):
    log = tmp_path / "reads.json"
    p = runstate.TrackedParams({"a": {"x": 1}, "b": 2, "c": 3}, log)
    assert p["a"]["x"] == 1 and p.get("zz") is None
    assert json.loads(log.read_text()) == ["a", "zz"]
    json.dumps(p), dict(p), copy.deepcopy(p)             # serialising or copying is not a read
    assert json.loads(log.read_text()) == ["a", "zz"]


def test_every_record_holds_after_a_complete_run(done):
    nbs, run = done
    assert runstate.first_stale(nbs, run, IDENTITY, PARAMS, "c1") == (3, "every notebook is up to date")
    rec = runstate.read_record(run, "20_c")
    assert rec["reads"] == {"ease": {"reg": 10.0}, "nosuch": None}
    assert set(rec["outputs"]) == {"metrics/ease.json"}


@pytest.mark.parametrize("change, index, why", [
    (lambda p: p["mf"].update(dim=16), 1, "'mf'"),              # a section 10 read: rerun from 10
    (lambda p: p["ease"].update(reg=20.0), 2, "'ease'"),
    (lambda p: p.update(nosuch={"x": 1}), 2, "'nosuch'"),       # a key it looked for appeared
    (lambda p: p.update(unread=1), 3, "up to date"),            # nobody read it: nothing reruns
])
def test_a_changed_parameter_reruns_from_its_first_reader(done, change, index, why):
    nbs, run = done
    params = copy.deepcopy(PARAMS)
    change(params)
    i, reason = runstate.first_stale(nbs, run, IDENTITY, params, "c1")
    assert i == index and why in reason


def test_code_notebook_identity_and_outputs_invalidate(done):
    nbs, run = done
    assert runstate.first_stale(nbs, run, IDENTITY, PARAMS, "c2")[0] == 0
    assert runstate.first_stale(nbs, run, {**IDENTITY, "SEED": 2}, PARAMS, "c1")[0] == 0
    (run / "metrics" / "mf.json").write_text("{} ")                 # a file 10 wrote was changed
    assert runstate.first_stale(nbs, run, IDENTITY, PARAMS, "c1")[0] == 1
    nbs[2].write_text("{}")                                          # the notebook was edited
    finish(run, nbs[1], nbs, reads=["mf"], writes=[("metrics/mf.json", "{}")])
    assert runstate.first_stale(nbs, run, IDENTITY, PARAMS, "c1") == (2, "the notebook changed")


def test_a_rerun_upstream_invalidates_what_follows(done):
    nbs, run = done
    finish(run, nbs[0], nbs, writes=[("data.pt", "x")])               # 00 ran again (e.g. --only 00)
    assert runstate.first_stale(nbs, run, IDENTITY, PARAMS, "c1") == (1, "an earlier notebook ran again")


def test_unfinished_or_torn_records_are_not_trusted(done):
    nbs, run = done
    runstate.record_path(run, "10_b").write_text('{"notebook": "10_b", "fini')
    assert runstate.first_stale(nbs, run, IDENTITY, PARAMS, "c1")[0] == 1


def test_forget_removes_later_records_and_their_files(done):
    nbs, run = done
    runstate.forget_from(nbs, run, 1)
    assert (run / "data.pt").exists()
    assert not (run / "metrics" / "mf.json").exists() and not (run / "metrics" / "ease.json").exists()
    assert runstate.read_record(run, "00_a") and not runstate.read_record(run, "10_b")
    assert runstate.run_summary(nbs, run)["complete"] is False


HOLD = ("import sys; from recsys_lib.run import state as runstate\n"
        "with runstate.RunLock(sys.argv[1]):\n    print('ready', flush=True); sys.stdin.read()")


def hold(path):
    """A second process that takes the lock and holds it until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_second_run_on_a_folder_is_refused_with_the_holder(tmp_path):
    path = tmp_path / ".full.lock"
    holder = hold(path)
    try:
        with pytest.raises(runstate.RunLocked, match=rf"PID {holder.pid}, started \d{{4}}-"):
            with runstate.RunLock(path):
                pass
    finally:
        holder.stdin.close()
        holder.wait(30)
    with runstate.RunLock(path):                                    # released when the holder ends
        pass
    holder = hold(path)
    holder.kill()                                                    # a killed holder leaves no stale lock
    holder.wait(30)
    with runstate.RunLock(path):
        pass


def test_a_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "models" / "two_tower.pt"
    path.parent.mkdir()
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(PipelineError, match=r"two_tower\.pt is corrupt or truncated.*rerun"):
        config.load_torch(path)
    from recsys_lib.models.train import load_checkpoint
    with pytest.raises(PipelineError, match="two_tower.pt"):
        load_checkpoint(path)
