"""What every notebook does before its own work: the first cell's set-up (`setup`) and, after the
``parameters`` cell papermill fills in, the run it works in (`open_run`)."""
from __future__ import annotations

import os
import warnings

from .. import config
from .experiment import Run


def setup() -> None:
    """Quiet the warnings a reader need not see (deprecations, tqdm without ipywidgets), show four
    decimals in tables, and print the versions of the packages in use."""
    import pandas as pd
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="IProgress not found")
    pd.set_option("display.precision", 4)
    print(config.package_versions())


def open_run(dataset: str, profile: str, run_dir: str | os.PathLike = "", overrides: list[str] | None = None,
             seed: int | None = None, device: str | None = "") -> Run:
    """`Run.open` with the notebook's shared parameters (``RUN_DIR`` "" is the default folder,
    ``DEVICE`` "" the profile's), printing what it opened."""
    run = Run.open(dataset, profile, run_dir or None, overrides, seed, device)
    print(f"dataset={run.dataset} profile={run.profile} seed={run.seed} device={run.device}")
    print(f"run folder: {run.dir}")
    return run
