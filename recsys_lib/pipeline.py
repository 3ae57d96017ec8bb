"""Run the study end to end: every notebook in order with papermill, then the HTML report.

    python -m recsys_lib.pipeline --dataset synthetic --profile full
    python -m recsys_lib.pipeline --dataset ml-latest-small --set mf.epochs=5 --force

Each notebook runs in a fresh kernel (the named `recsys` kernel) with the shared parameters
(DATASET, PROFILE, RUN_DIR, SEED, DEVICE, OVERRIDES, FORCE) and an execution timeout; executed
copies go to reports/<dataset>/notebooks/. The pipeline stops at the first failing notebook,
names it and the failing cell's error, and keeps (and renders) what ran.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from . import config
from .errors import PipelineError, RecsysError
from .experiment import default_run_dir

KERNEL = "recsys"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The pipeline's notebooks in order (``NN_name.ipynb``), optionally a subset by prefix/name."""
    found = sorted(p for p in config.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(p.stem == o or p.stem.startswith(o) for o in only)]
        if not found:
            raise PipelineError(f"--only {only} matches no notebook in {config.NOTEBOOKS_DIR}")
    return found


def ensure_kernel(name: str = KERNEL) -> str:
    """Register the named kernel for this interpreter if Jupyter does not know it yet."""
    from jupyter_client.kernelspec import KernelSpecManager
    if name not in KernelSpecManager().find_kernel_specs():
        from ipykernel.kernelspec import install
        install(kernel_name=name, display_name=f"Python 3 ({name})", prefix=sys.prefix)
    return name


def run_pipeline(dataset: str = "synthetic", profile: str = "full", overrides: list[str] | None = None,
                 force: bool = False, only: list[str] | None = None, timeout: int = 3600,
                 seed: int | None = None, device: str = "", render: bool = True) -> Path:
    """Execute the notebooks and render the report; returns reports/<dataset>/index.html."""
    import papermill as pm
    from .data import dataset_info
    from .param_check import check_overrides
    dataset_info(dataset)                                          # fail fast, before anything is written:
    check_overrides(config.load_params(profile, dataset), overrides)   # unknown dataset, profile or key,
    params = config.load_params(profile, dataset, overrides)      # a value of the wrong type or range
    run_dir = default_run_dir(dataset, profile)
    report_dir = config.reports_dir(dataset)
    nb_dir = report_dir / "notebooks"
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    nb_dir.mkdir(parents=True, exist_ok=True)
    kernel = ensure_kernel()
    shared = {"DATASET": dataset, "PROFILE": profile, "RUN_DIR": str(run_dir),
              "SEED": int(params["seed"] if seed is None else seed), "DEVICE": device,
              "OVERRIDES": list(overrides or []), "FORCE": bool(force)}
    timings = {}
    failure = None
    for nb in notebooks(only):
        out = nb_dir / nb.name
        print(f"[pipeline] {nb.stem} ...", flush=True)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(out), parameters=shared, kernel_name=kernel,
                                log_output=True, progress_bar=False, execution_timeout=timeout,
                                cwd=str(config.NOTEBOOKS_DIR))
        except pm.PapermillExecutionError as exc:
            failure = PipelineError(f"notebook {nb.name} failed in cell {exc.exec_count}: "
                                    f"{exc.ename}: {exc.evalue} (executed copy kept: {out})")
        except Exception as exc:  # kernel death, timeout, ...
            failure = PipelineError(f"notebook {nb.name} failed: {type(exc).__name__}: {exc} "
                                    f"(executed copy kept: {out})")
        timings[nb.stem] = time.perf_counter() - t0
        print(f"[pipeline] {nb.stem} {'FAILED' if failure else 'done'} in {timings[nb.stem]:.1f} s", flush=True)
        if failure:
            break
    if render:
        render_report(dataset, run_dir, report_dir, timings)
    if failure:
        raise failure
    return report_dir / "index.html"


def render_report(dataset: str, run_dir: Path, report_dir: Path, timings: dict | None = None) -> Path:
    """HTML page per executed notebook (with code), index.html from 90_report (without code),
    and metrics.json."""
    from .report import render_notebook, write_metrics_json
    nb_dir = report_dir / "notebooks"
    for ipynb in sorted(nb_dir.glob("*.ipynb")):
        render_notebook(ipynb, ipynb.with_suffix(".html"), include_code=True)
    report_nb = nb_dir / "90_report.ipynb"
    index = report_dir / "index.html"
    if report_nb.exists():
        render_notebook(report_nb, index, include_code=False)
    write_metrics_json(run_dir, report_dir / "metrics.json", {"notebook_seconds": timings or {}})
    print(f"[pipeline] report: {index}", flush=True)
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys_lib.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--profile", default="full", help="params/<profile>.yaml: quick | full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set mf.epochs=5 (repeatable)")
    parser.add_argument("--force", action="store_true", help="redo everything: fetch, split and every model")
    parser.add_argument("--only", nargs="*", default=None, help="run only these notebooks (name or prefix)")
    parser.add_argument("--timeout", type=int, default=3600, help="per-cell execution timeout, seconds")
    parser.add_argument("--device", default="", help="auto | cpu | cuda | mps (default: the profile's)")
    args = parser.parse_args(argv)
    try:
        index = run_pipeline(args.dataset, args.profile, args.set, args.force, args.only, args.timeout,
                             device=args.device)
    except RecsysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
