"""Overrides are checked before any kernel starts: unknown keys, wrong types and out-of-range
values exit 2 with one line and write nothing; JSON files are strict (no bare NaN)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from recsys_lib import config, pipeline
from recsys_lib.errors import ConfigError
from recsys_lib.params import check_overrides

BASE = config.load_params("quick", "synthetic-tiny")


@pytest.mark.parametrize("override, message", [
    ("mf.epochz=3", "unknown parameter 'epochz' in mf; valid: "),
    ("nosuch.x=1", "unknown parameter 'nosuch'"),
    ("mf.epochs=abc", "expected a number"),
    ("mf.epochs=-1", "at least 1"),
    ("mf.epochs=0", "at least 1"),
    ("mf.epochs=2.5", "expected an integer"),
    ("mf.lr=0", "above 0"),
    ("reranker.label_window=1.5", "between 0 and 1"),
    ("reranker.held_out_share=0.2", "unknown parameter 'held_out_share' in reranker"),
    ("reranker.id_mlp.loss=softmax", "unknown parameter 'loss' in reranker.id_mlp"),
    ("reranker.lgbm.num_leafs=3", "unknown parameter 'num_leafs' in reranker.lgbm"),
    ("two_tower.amp_bf16=3", "true or false"),
    ("mf.epochs.x=3", "is a value, not a section"),
])
def test_bad_overrides_are_refused_with_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        check_overrides(BASE, [override])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["mf.epochs=5", "mf.lr=0.01", "reranker.lgbm.num_leaves=15",
                                      "two_tower.candidate_k=100", "reranker.label_window=null",
                                      "reranker.label_window=0.2", "eval.ks=[10, 50]",
                                      "neumf.lr=0.01",
                                      "ease.max_items=500", "two_tower.user_encoder=attention"])
def test_good_overrides_pass(override):
    check_overrides(BASE, [override])            # a config field absent from params/ is known too


def test_pipeline_exits_2_before_writing_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RECSYS_REPORTS_DIR", str(tmp_path / "reports"))
    for argv in (["--dataset", "ml-99"], ["--dataset", "synthetic-tiny", "--profile", "quick", "--set", "mf.epochz=3"],
                 ["--dataset", "synthetic-tiny", "--profile", "fast"]):
        assert pipeline.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


def test_json_is_strict(tmp_path):
    path = config.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [np.float64("inf"), 1.5],
                                                   "c": np.array([np.nan, 2.0]), "d": np.float32(0.5)})
    def refuse(const):
        raise ValueError(f"bare {const} in JSON")
    got = json.loads(path.read_text(), parse_constant=refuse)
    assert got == {"a": None, "b": [None, 1.5], "c": [None, 2.0], "d": 0.5}
    assert not math.isnan(got["d"])


def test_params_command_names_each_values_layer(capsys):
    from recsys_lib.__main__ import main
    assert main(["params", "--dataset", "ml-32m", "--profile", "full", "--set", "mf.dim=8"]) == 0
    out = capsys.readouterr().out.splitlines()
    line = {l.split(" = ")[0]: l for l in out if " = " in l}
    assert line["mf.dim"].endswith("# --set") and line["mf.epochs"].endswith("# params/full.yaml: datasets.ml-32m")
    assert line["mf.init_std"].endswith("# default (MFConfig)") and "mf.seed" not in line
    assert line["split.min_date"].endswith("# params/datasets.yaml: ml-32m")
    keys = [l.split(" = ")[0] for l in out if " = " in l]
    assert keys.index("mf.init_std") < keys.index("neumf.dim_gmf")     # defaults listed with their section
    assert main(["params", "--dataset", "ml-32m", "--set", "mf.dimm=8"]) == 2
