"""Resume records, stage-aware staleness, reads of the parameters, the run lock and corrupt-file
errors (run.state, run.tracking)."""
from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys

import pytest
import torch

from recsys_lib import config
from recsys_lib.run import state as runstate
from recsys_lib.run import tracking
from recsys_lib.errors import PipelineError

IDENTITY = {"DATASET": "d", "PROFILE": "p", "SEED": 1, "DEVICE": ""}
PARAMS = {"seed": 1, "mf": {"dim": 8}, "ease": {"reg": 10.0},
          "reranker": {"lgbm": {"leaves": 31}, "mlp": {"dim": 64}, "label_window": 0.1}}
MODULE = "recsys_lib.models.ease"


def make_notebooks(folder, names=("00_a", "10_b", "13_e", "20_c", "30_r")):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        p = folder / f"{n}.ipynb"
        p.write_text(json.dumps({"cells": [], "name": n}))
        out.append(p)
    return out


def finish(run_dir, nb, every, reads=(), writes=(), inputs=(), listings=(), modules=(), params=PARAMS):
    """What the pipeline and a kernel do around one notebook: fingerprint, note the kernel's reads
    (params through TrackedParams, files and modules as `tracking` notes them), write, record."""
    before = runstate.fingerprint(run_dir)
    notes = tracking.Notes(tracking.reads_path(run_dir, nb.stem), run_dir)
    tracked = tracking.TrackedParams(copy.deepcopy(params), notes)
    for key in reads:
        node = tracked
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            dict(node)                                  # the section read whole (a config built from it)
    for kind, values in (("inputs", inputs), ("listings", listings), ("modules", modules)):
        for v in values:
            notes.add(kind, v)
    notes.flush()
    for rel, text in writes:
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_text(text)
    return runstate.write_record(run_dir, nb, before, IDENTITY, params, every, {"seconds": 1.0})


@pytest.fixture
def done(tmp_path):
    """Five notebooks that finished: 00 wrote data.pt; 10 (mf), 13 (ease, loading models/ease.py)
    read it and wrote their metrics; 20 read 13's model and nothing of 10's; 30 read
    reranker.lgbm, listed metrics/ and read data.pt."""
    nbs = make_notebooks(tmp_path / "nb")
    run = tmp_path / "run"
    run.mkdir()
    finish(run, nbs[0], nbs, writes=[("data.pt", "x")])
    finish(run, nbs[1], nbs, reads=["mf"], inputs=["data.pt"], writes=[("metrics/mf.json", "{}")])
    finish(run, nbs[2], nbs, reads=["ease", "nosuch"], inputs=["data.pt"], modules=[MODULE],
           writes=[("metrics/ease.json", "{}"), ("models/ease.pt", "e")])
    finish(run, nbs[3], nbs, inputs=["models/ease.pt"], writes=[("candidates/valid.parquet", "c")])
    finish(run, nbs[4], nbs, reads=["reranker.lgbm"], inputs=["data.pt", "candidates/valid.parquet"],
           listings=["metrics"], writes=[("metrics/two_stage.json", "{}")])
    return nbs, run


def stale(nbs, run, params=PARAMS, shared=IDENTITY):
    return sorted(nbs[i].stem for i in runstate.stale_notebooks(nbs, run, shared, params))


def test_tracked_params_note_what_is_read_as_deep_as_it_is_read(tmp_path):
    notes = tracking.Notes(tmp_path / "reads.json", tmp_path)
    p = tracking.TrackedParams({"a": {"x": 1, "y": {"z": 2}}, "b": 2, "c": {"k": 3}}, notes)
    assert p["a"]["x"] == 1 and p.get("zz") is None and "b" in p
    assert p["a"]["y"].get("z") == 2
    assert json.loads((tmp_path / "reads.json").read_text())["params"] == ["a.x", "a.y.z", "b", "zz"]
    json.dumps(p), dict(p), copy.deepcopy(p)             # copying the whole run's params is not a read
    assert "c" not in notes.params
    dict(p["c"])                                         # but reading a section whole is: every key of it
    assert "c" in notes.params
    assert p["a"] is p["a"] and type(copy.deepcopy(p["a"])) is dict and pickle.loads(pickle.dumps(p["a"])) == p["a"]


def test_every_record_holds_after_a_complete_run(done):
    nbs, run = done
    assert stale(nbs, run) == []
    assert runstate.first_stale(nbs, run, IDENTITY, PARAMS) == (5, "every notebook is up to date")
    rec = runstate.read_record(run, "13_e")
    assert rec["reads"] == {"ease": {"reg": 10.0}, "nosuch": tracking.ABSENT}
    assert set(rec["outputs"]) == {"metrics/ease.json", "models/ease.pt"} and set(rec["inputs"]) == {"data.pt"}
    assert set(rec["modules"]) == {MODULE} and rec["before"] == ["00_a", "10_b"]
    assert runstate.read_record(run, "30_r")["listings"] == {"metrics": ["ease.json", "mf.json"]}


@pytest.mark.parametrize("change, expected", [
    (lambda p: p["mf"].update(dim=16), ["10_b", "30_r"]),          # its reader and 30 (lists metrics/), not 13 or 20
    (lambda p: p["ease"].update(reg=20.0), ["13_e", "20_c", "30_r"]),   # and the readers of its files
    (lambda p: p.update(nosuch={"x": 1}), ["13_e", "20_c", "30_r"]),    # a key it looked for appeared
    (lambda p: p["reranker"]["lgbm"].update(leaves=63), ["30_r"]),       # a sub-key it read
    (lambda p: p["reranker"]["mlp"].update(dim=32), []),                 # a sub-key nobody read
    (lambda p: p.update(unread=1), []),
])
def test_a_changed_parameter_reruns_its_readers_and_theirs(done, change, expected):
    nbs, run = done
    params = copy.deepcopy(PARAMS)
    change(params)
    assert stale(nbs, run, params) == expected


def test_a_changed_module_reruns_the_notebooks_that_loaded_it_and_their_readers(done):
    nbs, run = done
    rec = runstate.read_record(run, "13_e")
    rec["modules"][MODULE] = "an-older-hash"                       # as if models/ease.py had been edited
    config.write_json(runstate.record_path(run, "13_e"), rec)
    found = runstate.stale_notebooks(nbs, run, IDENTITY, PARAMS)
    assert sorted(nbs[i].stem for i in found) == ["13_e", "20_c", "30_r"]
    assert found[2] == f"library module {MODULE} changed"
    assert found[3] == "it reads models/ease.pt, which 13_e writes again"
    assert found[4].startswith("it reads candidates/valid.parquet") or found[4].startswith("it lists metrics/")


def test_module_files_and_hashes_follow_the_library():
    assert runstate.module_files(MODULE) == [runstate.PACKAGE_DIR / "models" / "ease.py"]
    report = runstate.module_files("recsys_lib.report")
    assert report[0].name == "__init__.py" and any(f.suffix == ".j2" for f in report)   # templates count
    assert runstate.module_hash("recsys_lib.no_such_module") == "missing"
    assert runstate.module_hash(MODULE) == runstate.module_hash(MODULE) != runstate.module_hash("recsys_lib.models.mf")


def test_identity_notebook_and_outputs_invalidate(done):
    nbs, run = done
    assert stale(nbs, run, shared={**IDENTITY, "SEED": 2}) == [nb.stem for nb in nbs]
    (run / "metrics" / "mf.json").write_text("{} ")                 # a file 10 wrote was changed
    assert stale(nbs, run) == ["10_b", "30_r"]                       # 30 listed metrics/
    finish(run, nbs[1], nbs, reads=["mf"], inputs=["data.pt"], writes=[("metrics/mf.json", "{}")])
    nbs[3].write_text("{}")                                          # the notebook was edited
    found = runstate.stale_notebooks(nbs, run, IDENTITY, PARAMS)
    assert found[3] == "the notebook changed" and sorted(found) == [3, 4]


def test_a_rerun_upstream_invalidates_its_readers_only(done):
    nbs, run = done
    finish(run, nbs[0], nbs, writes=[("data.pt", "y")])               # 00 ran again (e.g. --only 00)
    assert stale(nbs, run) == ["10_b", "13_e", "20_c", "30_r"]        # 20 through 13's model
    finish(run, nbs[3], nbs, inputs=["models/ease.pt"], writes=[("candidates/valid.parquet", "d")])
    found = runstate.stale_notebooks(nbs, run, IDENTITY, PARAMS)
    assert found[4] == "a file it read changed: candidates/valid.parquet"


def test_a_new_notebook_before_it_reruns_what_follows(done, tmp_path):
    nbs, run = done
    extra = make_notebooks(tmp_path / "nb", names=("15_new",))
    every = sorted(nbs + extra)
    assert stale(every, run) == ["15_new", "20_c", "30_r"]


def test_a_listing_ignores_what_later_notebooks_write(done):
    nbs, run = done
    finish(run, nbs[4], nbs, reads=["reranker.lgbm"], inputs=["data.pt", "candidates/valid.parquet"],
           listings=["metrics"], writes=[("metrics/two_stage_mlp.json", "{}")])   # a new variant's file
    assert stale(nbs, run) == []
    (run / "metrics" / "stray.json").write_text("{}")                 # a file no notebook wrote
    assert stale(nbs, run) == ["30_r"]


def test_unfinished_torn_or_old_records_are_not_trusted(done):
    nbs, run = done
    runstate.record_path(run, "10_b").write_text('{"notebook": "10_b", "fini')
    assert stale(nbs, run) == ["10_b"]                               # 30 lists metrics/ but reads none of 10's
    rec = runstate.read_record(run, "20_c")
    del rec["modules"]                                               # written before stage-aware resume
    config.write_json(runstate.record_path(run, "20_c"), rec)
    assert runstate.stale_notebooks(nbs, run, IDENTITY, PARAMS)[3] == "recorded before stage-aware resume"


def test_forget_removes_those_records_and_their_files_only(done):
    nbs, run = done
    runstate.forget(nbs, run, [2])
    assert (run / "data.pt").exists() and (run / "metrics" / "mf.json").exists()
    assert not (run / "metrics" / "ease.json").exists() and not (run / "models" / "ease.pt").exists()
    assert runstate.read_record(run, "10_b") and not runstate.read_record(run, "13_e")
    assert runstate.run_summary(nbs, run)["complete"] is False
    runstate.forget_from(nbs, run, 3)
    assert not (run / "metrics" / "two_stage.json").exists() and not runstate.read_record(run, "30_r")


def test_run_summary_gives_each_notebooks_cost(done):
    nbs, run = done
    summary = runstate.run_summary(nbs, run)
    assert summary["complete"] and set(summary["notebooks"]) == {nb.stem for nb in nbs}
    assert summary["notebooks"]["10_b"]["seconds"] == 1.0 and "peak_rss_gb" in summary["notebooks"]["10_b"]


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


def test_the_feature_cache_key_follows_the_code_that_makes_the_features(monkeypatch):
    closure = runstate.import_closure("recsys_lib.stage2.features")
    assert {"recsys_lib.stage2.features", "recsys_lib.models.transition", "recsys_lib.protocol.splitdata"} <= set(closure)
    assert "recsys_lib.models.ease" not in closure and "recsys_lib.report.plots" not in closure
    mods = ["recsys_lib.stage2.features", "recsys_lib.models.ease"]
    before = runstate.code_digest(mods)
    real = runstate.module_hash
    monkeypatch.setattr(runstate, "module_hash",        # as if models/transition.py had been edited
                        lambda n: "edited" if n == "recsys_lib.models.transition" else real(n))
    assert runstate.code_digest(mods) != before
    monkeypatch.setattr(runstate, "module_hash",        # a module outside the closure changes nothing
                        lambda n: "edited" if n == "recsys_lib.report.plots" else real(n))
    assert runstate.code_digest(mods) == before
