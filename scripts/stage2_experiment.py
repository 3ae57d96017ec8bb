"""A stage-2 experiment on a finished run's saved stage-1 models, on validation only.

The README's "What was tried" rows at synthetic-32m (the label window, recent-taste features,
5 folds) were measured this way. It never reads test rows: it builds the validation features (and,
with ``reranker.label_window`` set, the window's lists) under the given ``--set`` overrides, trains
the named re-ranker variants with cross-fitting inside the leakage guard, and prints their
out-of-fold table. It works on a *copy* of the run folder (``--into``): the run's own files,
metrics and report stay as they are.

    python scripts/stage2_experiment.py --dataset synthetic-32m --into /tmp/exp \\
        --set reranker.recent_items=[10,50] --variants mlp_features lgbm_lr02
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from recsys_lib import two_stage
from recsys_lib.experiment import Run

STAGE1 = ("data.pt", "dataset.json", "run.json", "models", "metrics", "curves", "candidates")


def copy_stage1(src: Path, dst: Path) -> None:
    """The run's split and stage-1 outputs, linked (not copied) into a fresh folder; re-ranker
    checkpoints, features and the window's lists are rebuilt there."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in STAGE1:
        path = src / name
        if path.is_dir():
            (dst / name).mkdir()
            for f in path.iterdir():
                if not f.name.startswith("reranker"):
                    (dst / name / f.name).symlink_to(f.resolve())
        elif path.exists():
            (dst / name).symlink_to(path.resolve())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--profile", default="full")
    ap.add_argument("--run-dir", default="", help="the finished run (default data/runs/<dataset>/<profile>)")
    ap.add_argument("--into", required=True, help="folder for the experiment (replaced)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--variants", nargs="+", required=True, help="re-ranker variant names to train")
    ap.add_argument("--device", default="", help="cpu | cuda | mps (default: the profile's)")
    a = ap.parse_args()
    src = Path(a.run_dir) if a.run_dir else Path("data/runs") / a.dataset / a.profile
    copy_stage1(src, Path(a.into))
    run = Run.open(a.dataset, a.profile, a.into, a.overrides, None, a.device or None)
    section, tt = run.params["reranker"], run.params["two_tower"]
    saved = pq.read_schema(run.require("candidates", "valid.parquet", stage="20_two_tower")).names
    saved = ["retriever"] + [c[:-5] for c in saved if c.endswith("_rank") and c != "retriever_rank"]
    if saved != ["retriever", *tt.get("candidate_sources", [])]:      # before minutes of window refits
        raise SystemExit(f"the run's candidates come from {saved}, but two_tower.candidate_sources is "
                         f"{tt.get('candidate_sources', [])}: rerun the pipeline from 20_two_tower first")
    retriever = two_stage.load_retriever(run)
    extra = two_stage.load_baselines(run, section.get("extra_scorers", []))
    window = None
    if section.get("label_window"):
        t0 = time.perf_counter()
        sources = two_stage.load_baselines(run, tt.get("candidate_sources", []))
        lists, summary = two_stage.build_label_window(run, retriever, sources, extra,
                                                      float(section["label_window"]), int(tt["candidate_k"]))
        two_stage.save_label_window(run, lists, summary)
        print(f"label window: {summary['users']:,} users, {summary['rows']:,} rows, "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    valid = two_stage.stage_inputs(run, retriever, "valid", extra)
    if section.get("label_window"):
        window = two_stage.load_label_window(run, valid.names)
    names = lambda v: v if isinstance(v, str) else v["name"]
    unknown = set(a.variants) - {names(v) for v in section["variants"]}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; the run's: {[names(v) for v in section['variants']]}")
    section = dict(section, variants=[v for v in section["variants"] if names(v) in a.variants])
    t0 = time.perf_counter()
    _, search, _ = two_stage.fit(run, valid, retriever, section, window)
    print(f"fit {time.perf_counter() - t0:.0f}s", flush=True)
    print(search.to_string(), flush=True)


if __name__ == "__main__":
    main()
