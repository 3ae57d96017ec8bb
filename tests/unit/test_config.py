"""Parameters, overrides, device choice, pins and the notebooks' shape."""
import json
import re
from pathlib import Path

import pytest
import yaml

from recsys_lib import config
from recsys_lib.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_requirements_and_environment_yml_carry_the_same_pins():
    req = {l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines()
           if l.strip() and not l.startswith("#")}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert set(pip) == req
    assert "torch==2.13.0" in req
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.]+", r) for r in req), "every requirement is pinned"
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])


def test_profiles_merge_dataset_defaults_and_overrides():
    p = config.load_params("full", "ml-32m", ["split.eval_core=5", "mf.epochs=2"])
    assert p["split"]["strategy"] == "global_temporal" and p["split"]["min_date"] == "2018-01-01"
    assert p["split"]["eval_core"] == 5 and p["mf"]["epochs"] == 2
    s = config.load_params("quick", "synthetic-anything")
    assert s["split"]["strategy"] == "user_temporal" and s["profile"] == "quick"


@pytest.mark.parametrize("bad", ["noequals", "=3"])
def test_bad_override_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="override"):
        config.load_params("quick", "synthetic", [bad])


def test_unknown_profile_lists_valid_ones():
    with pytest.raises(ConfigError, match="quick"):
        config.load_params("nope", "synthetic")


def test_device_auto_falls_back_to_cpu_and_rejects_nonsense():
    import torch
    dev = config.resolve_device("auto")
    assert dev.type in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        assert dev.type in {"mps", "cpu"}
    with pytest.raises(ConfigError):
        config.resolve_device("quantum")


def test_write_json_is_atomic_and_handles_numpy(tmp_path):
    import numpy as np
    out = config.write_json(tmp_path / "a" / "m.json", {"x": np.float32(0.5), "n": np.int64(3), "a": np.arange(2)})
    assert json.loads(out.read_text()) == {"x": 0.5, "n": 3, "a": [0, 1]}
    assert not list(tmp_path.glob("a/*.tmp"))


def test_atomic_write_leaves_no_partial_file_when_the_writer_raises(tmp_path):
    path = tmp_path / "sub" / "features.npz"
    with pytest.raises(RuntimeError):
        with config.atomic_write(path) as tmp:
            tmp.write_bytes(b"half a fil")
            raise RuntimeError("writer died")
    assert not path.exists() and list(path.parent.iterdir()) == []       # nor its temporary file
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with config.atomic_write(path) as tmp:
            tmp.write_bytes(b"new, half")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old" and list(path.parent.iterdir()) == [path]   # old file kept


def test_atomic_write_replaces_and_keeps_the_suffix(tmp_path):
    import numpy as np
    path = tmp_path / "features.npz"
    with config.atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".npz"      # np.savez adds no 2nd suffix
        np.savez(tmp, x=np.arange(3))
    assert np.load(path)["x"].tolist() == [0, 1, 2] and list(tmp_path.iterdir()) == [path]


def test_notebooks_have_parameters_kernelspec_and_no_outputs():
    import nbformat
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert nbs, "no notebooks"
    for path in nbs:
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: exactly one cell tagged parameters"
        for key in ("DATASET", "RUN_DIR", "SEED", "DEVICE"):
            assert re.search(rf"^{key} = ", tagged[0].source, re.M), f"{path.name} lacks {key}"
        assert nb.metadata["kernelspec"]["language"] == "python"
        assert nb.metadata["kernelspec"]["name"] == "recsys"
        for c in nb.cells:
            if c.cell_type == "code":
                assert not c.outputs and c.execution_count is None, f"{path.name} has outputs"
                assert len(c.source.splitlines()) <= 16, f"{path.name}: a cell over 15 lines belongs in recsys_lib"


def test_dataset_sections_size_the_searches():
    """A dataset's grid replaces the profile's whole: the ml-32m search is the configurations its
    section names, none of the demo grid's values."""
    from recsys_lib.models import tuning
    from recsys_lib.stage2 import refit
    big = config.load_params("full", "ml-32m")
    demo = config.load_params("full")["ials"]["grid"]
    assert set(big["ials"]["grid"]) == set(demo)
    assert not set(big["ials"]["grid"]["factors"]) & set(demo["factors"])
    assert len(tuning.expand_grid(big["ials"]["grid"])) == 16 and big["ials"]["max_edge_steps"] == 4
    assert big["two_tower"]["candidate_sources"] == ["ease", "ials"] and big["reranker"]["label_window"] is None
    assert big["reranker"]["stale_lists"] == 0.1 and refit.refit_share(big["reranker"]) == 0.1
    small = config.load_params("full", "ml-latest-small")
    assert len(tuning.expand_grid(small["ials"]["grid"])) == 16
    assert small["two_tower"]["candidate_sources"] == ["ease", "ials"] and small["reranker"]["label_window"] == 0.1
    assert small["reranker"]["stale_lists"] is None


def test_atomic_write_temp_names_are_unique_per_writer(tmp_path):
    from recsys_lib.config import atomic_write
    target = tmp_path / "m.json"
    with atomic_write(target) as a, atomic_write(target) as b:     # two writers of one file
        assert a != b and a.parent == b.parent == tmp_path and a.suffix == b.suffix == ".json"
        a.write_text("1")
        b.write_text("2")
    assert target.read_text() == "1" and not list(tmp_path.glob(".m.tmp-*"))


def test_profiles_extend_full_and_grids_replace_whole():
    quick, full = config.load_params("quick", "synthetic-tiny"), config.load_params("full", "synthetic-tiny")
    assert quick["mf"]["grid"] == {"lr": [0.01, 0.03]}              # not merged with full's dim axis
    assert quick["mf"]["l2"] == full["mf"]["l2"] and quick["history_len"] == full["history_len"]  # inherited
    assert config.load_params("full", "ml-32m")["mf"]["grid"] == {"dim": [32, 64], "lr": [0.003, 0.01]}
    assert config.load_params("full", "synthetic")["neumf"]["grid"] == {"lr": [0.003], "n_neg": [4, 16]}
    assert config.load_params("quick", "ml-32m")["mf"]["epochs"] == 2   # full's dataset caps are full's own


def test_a_profile_that_extends_itself_is_refused(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("extends: b\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    (tmp_path / "c.yaml").write_text("extends: nowhere\n")
    monkeypatch.setattr(config, "PARAMS_DIR", tmp_path)
    with pytest.raises(ConfigError, match="extends"):
        config.load_params("a")
    with pytest.raises(ConfigError, match="unknown profile 'nowhere'"):
        config.load_params("c")


@pytest.mark.parametrize("profile,dataset", [("quick", "synthetic-tiny"), ("full", "ml-32m"), ("gpu", "ml-32m"),
                                             ("full", "ml-latest-small")])
def test_every_resolved_value_has_its_layer(profile, dataset):
    overrides = ["mf.epochs=7", "ials.grid.factors=[4, 8]"]
    params = config.load_params(profile, dataset, overrides)
    origin = config.param_origins(profile, dataset, overrides)
    assert set(origin) == {path for path, _ in config._leaves(params)}
    assert origin[("mf", "epochs")] == origin[("ials", "grid", "factors")] == "--set"
    assert origin[("mf", "l2")] == "params/full.yaml"
    assert origin[("split", "strategy")].startswith("params/datasets.yaml")
    if dataset == "ml-32m" and profile == "full":
        assert origin[("ials", "grid", "alpha")] == "params/full.yaml: datasets.ml-32m"
        assert ("ials", "grid", "iterations") in origin
    if profile == "quick":
        assert origin[("mf", "dim")] == "params/quick.yaml" and ("mf", "grid", "dim") not in origin
