"""A stage-2 experiment on a finished run's saved stage-1 models, on validation only.

The README's "What was tried" rows at synthetic-32m (the label window, recent-taste features,
5 folds) were measured this way, by throwaway scripts doing the same; the ``--stale`` figures by
this script. It never reads test rows: it builds the validation features (and, with
``reranker.label_window`` or ``reranker.stale_lists`` set, 25_label_window's lists) under the given
``--set`` overrides, trains the named re-ranker variants with cross-fitting inside the leakage guard
(on the stale lists when they are on), and prints their out-of-fold table. ``--reuse-lists`` takes
the run's own lists and features instead of rebuilding them (each is checked against the
checkpoints it came from), so only the re-rankers are fit. It works on a *copy* of the run folder
(``--into``): the run's own files, metrics and report stay as they are.

    python scripts/stage2_experiment.py --dataset synthetic-32m --into /tmp/exp \\
        --set reranker.recent_items=[10,50] --variants mlp_features lgbm_lr02

``--stale SHARE`` asks how the re-ranker fares when its stage-1 models are a period older than
the history they score, as at test time (fit on train, scoring users whose history includes the
validation rows). Every stage-1 model is refit on the train rows before the last SHARE of train
(the label window's rows, `refit.refit_stage1`); the refits propose and score the validation users'
candidates from their whole train history. On these "stale" lists it scores (a) the run's saved
re-rankers of the named variants, trained on fresh lists as the pipeline trains them, and (b) the
variants trained on the stale lists; each out-of-fold, paired against the refit iALS and EASE.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from recsys_lib.stage2 import candidates as cand
from recsys_lib.protocol import evaluate
from recsys_lib.run.experiment import Run
from recsys_lib.stage2 import refit, rerankers as rr, system as two_stage

STAGE1 = ("data.pt", "dataset.json", "run.json", "models", "metrics", "curves", "candidates")
REFIT_LISTS = ("window", "stale", "features")   # linked too with --reuse-lists (each is key-checked)


def copy_stage1(src: Path, dst: Path, reuse_lists: bool = False) -> None:
    """The run's split and stage-1 outputs, linked (not copied) into a fresh folder; re-ranker
    checkpoints and features are rebuilt there, and so are the lists built from stage-1 refits
    (25_label_window's) unless ``reuse_lists``."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in STAGE1 + (REFIT_LISTS if reuse_lists else ()):
        path = src / name
        if path.is_dir():
            (dst / name).mkdir()
            for f in path.iterdir():
                if not f.name.startswith("reranker"):
                    (dst / name / f.name).symlink_to(f.resolve())
        elif path.exists():
            (dst / name).symlink_to(path.resolve())


def stale_experiment(run: Run, src: Path, retriever, scorers: dict, share: float, variants: list[str]) -> None:
    """See ``--stale`` in the module docstring."""
    section, tt = run.params["reranker"], run.params["two_tower"]
    sources = two_stage.load_baselines(run, tt.get("candidate_sources", []))
    _, fits, seconds = refit.refit_stage1(run, refit.Stage1(retriever, sources, scorers), share)
    print(f"stage-1 refits before the last {share} of train: {seconds:.0f}s", flush=True)
    ev = run.evaluator("valid", history_len=retriever.cfg.history_len)
    both = {**fits.sources, **fits.scorers}
    refit_baselines = {n: ev(both[n]) for n in ("ials", "ease") if n in both}
    for n, res in refit_baselines.items():
        print(f"{n} (refit) validation nDCG@10 {res.means()['ndcg@10']:.4f}", flush=True)
    stale = fits.lists(run.data, ev.labels, int(tt["candidate_k"]), refit.recent_items(run.params))
    labels, c, k = ev.labels, stale.cands, int(tt["candidate_k"])
    print("stale lists, validation recall:", cand.source_recall(c, labels, (10, 100, k)), flush=True)

    def report(what: str, model) -> None:
        res = two_stage.out_of_fold_ranked(model, stale)
        print(f"{what}: out-of-fold nDCG@10 {res.means()['ndcg@10']:.4f}", flush=True)
        for n, base in refit_baselines.items():
            print(f"    minus {n} (refit): {evaluate.compare(res, base)}", flush=True)

    for name in variants:                                   # (a) the run's re-rankers, fresh-trained
        path = src / "models" / f"reranker_{name}.pt"
        try:
            report(f"(a) {name} as the run trained it (fresh lists)", rr.load(path))
        except (OSError, ValueError) as e:                  # none saved, or from older code
            print(f"(a) {name}: skipped, the run's re-ranker does not load or does not fit these lists ({e})", flush=True)
    keep = [v for v in section["variants"] if (v if isinstance(v, str) else v["name"]) in variants]
    _, search, models = two_stage.fit(run, stale, fits.retriever, dict(section, variants=keep), None)
    print(search.to_string(), flush=True)
    for name, model in models.items():                      # (b) trained on the stale lists
        report(f"(b) {name} trained on the stale lists", model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--profile", default="full")
    ap.add_argument("--run-dir", default="", help="the finished run (default data/runs/<dataset>/<profile>)")
    ap.add_argument("--into", required=True, help="folder for the experiment (replaced)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--variants", nargs="+", required=True, help="re-ranker variant names to train")
    ap.add_argument("--stale", type=float, default=0.0, metavar="SHARE",
                    help="refit stage 1 before the last SHARE of train and re-rank validation from it")
    ap.add_argument("--device", default="", help="cpu | cuda | mps (default: the profile's)")
    ap.add_argument("--reuse-lists", action="store_true",
                    help="use the run's label-window and stale lists (25_label_window) instead of rebuilding them")
    a = ap.parse_args()
    src = Path(a.run_dir) if a.run_dir else Path("data/runs") / a.dataset / a.profile
    copy_stage1(src, Path(a.into), a.reuse_lists)
    run = Run.open(a.dataset, a.profile, a.into, a.overrides, None, a.device or None)
    section, tt = run.params["reranker"], run.params["two_tower"]
    retriever = two_stage.load_retriever(run)
    scorers = two_stage.load_baselines(run, two_stage.scorer_names(section))
    if a.stale:                                  # builds its own candidates from the refits
        return stale_experiment(run, src, retriever, scorers, a.stale, a.variants)
    saved = pq.read_schema(run.require("candidates", "valid.parquet", stage="20_two_tower")).names
    saved = ["retriever"] + [c[:-5] for c in saved if c.endswith("_rank") and c != "retriever_rank"]
    if saved != ["retriever", *tt.get("candidate_sources", [])]:      # the run's lists are reused
        raise SystemExit(f"the run's candidates come from {saved}, but two_tower.candidate_sources is "
                         f"{tt.get('candidate_sources', [])}: rerun the pipeline from 20_two_tower first")
    if not a.reuse_lists:                        # else the run's own lists, checked against its checkpoints
        for kind, summary in refit.build_refit_lists(run).items():
            print(f"{kind}: {summary}" if kind == "refit" else f"{kind}: {summary['users']:,} users, "
                  f"{summary['rows']:,} rows, {summary['seconds']:.0f}s", flush=True)
    t = two_stage.training_inputs(run)           # as 30_reranker builds them
    names = lambda v: v if isinstance(v, str) else v["name"]
    unknown = set(a.variants) - {names(v) for v in section["variants"]}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; the run's: {[names(v) for v in section['variants']]}")
    section = dict(section, variants=[v for v in section["variants"] if names(v) in a.variants])
    t0 = time.perf_counter()
    _, search, _ = two_stage.fit(run, t.train, t.retriever, section, t.window)
    print(f"fit {time.perf_counter() - t0:.0f}s", flush=True)
    print(search.to_string(), flush=True)


if __name__ == "__main__":
    main()
