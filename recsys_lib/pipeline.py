"""Run the study end to end: every notebook in order with papermill, then the HTML report.

    python -m recsys_lib.pipeline --dataset synthetic --profile full
    python -m recsys_lib.pipeline --dataset ml-latest-small --set mf.epochs=5
    python -m recsys_lib.pipeline --dataset synthetic --from 30        # rerun 30_reranker onwards

Each notebook runs in a fresh kernel (the named `recsys` kernel) with the shared parameters
(DATASET, PROFILE, RUN_DIR, SEED, DEVICE, OVERRIDES, FORCE) and an execution timeout.

- **Resume, by stage.** A notebook that finished has a completion record in ``<run>/state/``
  (``recsys_lib.run.state``): the parameters it read (as deep as it read them), the library modules
  its kernel loaded, the run files it read and wrote. A rerun runs only the stale notebooks: those
  whose own record no longer holds, and those that read a file a stale one writes. So
  ``--set reranker.lgbm.num_leaves=63`` reruns 30_reranker and its readers, and an edit to
  ``models/ease.py`` reruns 13_ease and the notebooks that read its files. ``--force`` starts the
  run folder afresh. ``--from NN`` reruns from a notebook to the end. ``--only`` runs the named
  notebooks and nothing else.
- **Named runs and forks.** ``--run NAME`` keeps a run in ``data/runs/<dataset>/NAME`` (default:
  the profile's name) with its report in ``reports/<dataset>--NAME/``; ``--fork RUN --run NAME``
  starts it as a copy of run RUN, so a variant reruns only what its change touches and RUN's files
  stay as they were.
- **One run per folder.** A lock (``<runs>/<dataset>/.<name>.lock``) makes a second run on the
  same folder fail at once, naming the first run. Each further seed has a lock of its own, so
  ``--seeds-only 45 46`` in a second process runs those seeds beside the run's own command, which
  leaves a held seed to it, tries that seed again after its own, and renders the report only once
  every seed is done. Started while that command still runs the first seed, it waits for it.
- **What each notebook cost.** Its console line and record give wall and CPU seconds and peak RSS;
  each run records the machine's speed index (``recsys_lib.run.usage``).
- **The next kernel starts early.** While a notebook runs, the next one's kernel starts on a
  background thread and imports the heavy third-party modules every notebook loads (`PRELOAD`;
  never ``recsys_lib``), with exactly the environment and working directory its own start would
  have had, so the notebook begins on a ready kernel (`run.prestart.Prestart`). Results are unchanged; a
  notebook's wall seconds no longer include its kernel's start when that was ready in time. The
  idle kernel is left out of the running notebook's peak RSS; its CPU counts in its own notebook's.
  ``RECSYS_PRESTART=0`` turns this off; a kernel that fails to start early is started as usual.
- **Quiet console.** The console gets one line as each notebook starts and ends (with the metric
  it recorded). Kernel output and progress bars go to ``<run>/logs/<notebook>.log``; ``--verbose``
  streams them instead. On failure, the console names the notebook, the cell's error and both
  files. Ctrl-C prints one line and exits 130.
- **Reports from complete runs only.** Executed notebooks are kept in ``<run>/notebooks/``. When
  every notebook's record holds, they are rendered together into ``reports/<dataset>/``, which is
  replaced as a whole. A failed or interrupted run leaves the last good report untouched.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from . import config
from .run import state as runstate
from .errors import PipelineError, RecsysError
from .run.experiment import default_run_dir
from .run import usage
from .run.layout import notebooks
from .run.prestart import Prestart, prestart_enabled

KERNEL = "recsys"


class Interrupted(PipelineError):
    """Ctrl-C during a notebook."""

    def __init__(self, notebook: str):
        super().__init__(f"interrupted in {notebook}; rerun the same command to resume")
        self.notebook = notebook


def ensure_kernel(name: str = KERNEL) -> str:
    """Register the named kernel for this interpreter if Jupyter does not know it yet."""
    from jupyter_client.kernelspec import KernelSpecManager
    if name not in KernelSpecManager().find_kernel_specs():
        from ipykernel.kernelspec import install
        install(kernel_name=name, display_name=f"Python 3 ({name})", prefix=sys.prefix)
    return name


def lock_path(dataset: str, name: str) -> Path:
    """Beside the run folder, not inside it: ``--force`` removes the folder while holding the lock."""
    return config.runs_dir(dataset) / f".{name}.lock"


def seed_lock_path(dataset: str, name: str, seed: int) -> Path:
    """The lock of one further seed's run (``seeds/<seed>/``), so that two processes can run two
    seeds of one run at once (``--seeds-only``) and never the same seed twice."""
    return config.runs_dir(dataset) / f".{name}.seed{int(seed)}.lock"


# ---------------------------------------------------------------- console
class Console:
    """Lines for the terminal. During a notebook, the process's stdout and stderr (file
    descriptors 1 and 2) point at the notebook's log. The kernel started then inherits them, so
    its warnings and progress bars go there too. The console keeps a copy of the original stdout."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        sys.stdout.flush()
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):   # a stdout without a file (captured in-process)
            fd = 1
        self.out = os.fdopen(os.dup(fd), "w", buffering=1)
        self.bar = None

    def progress(self, total: int) -> None:
        """One bar over the notebooks still to run (on a terminal only: a log file gets lines)."""
        if total and self.out.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, file=self.out, unit="notebook", leave=False,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"[pipeline] {text}", file=self.out)
        else:
            self.out.write(f"[pipeline] {text}\n")
            self.out.flush()

    @contextlib.contextmanager
    def to_log(self, log: Path):
        """fds 1 and 2, Python's stdout/stderr and papermill's cell output go to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        pm_log = logging.getLogger("papermill")
        if self.verbose:
            pm_log.addHandler(handler)
            pm_log.setLevel(logging.INFO)
            try:
                yield
            finally:
                pm_log.removeHandler(handler)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(log, "a", buffering=1) as fh:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            handler = logging.StreamHandler(fh)
            handler.setFormatter(logging.Formatter("%(message)s"))
            pm_log.addHandler(handler)
            pm_log.setLevel(logging.INFO)
            pm_log.propagate = False
            try:
                yield
            finally:
                pm_log.removeHandler(handler)
                pm_log.propagate = True
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        with contextlib.suppress(OSError):
            self.out.close()


def recorded_metrics(run_dir: Path, outputs: dict) -> str:
    """'mf: valid nDCG@10 0.0734' for the models a notebook recorded (at most three named)."""
    parts = []
    for rel in sorted(outputs):
        if rel.startswith("metrics/") and rel.endswith(".json"):
            try:
                m = json.loads((run_dir / rel).read_text())
                parts.append(f"{m['model']} {m['valid']['ndcg@10']:.4f}")
            except (OSError, ValueError, KeyError, TypeError):
                continue
    if not parts:
        return ""
    more = f" (+{len(parts) - 3} more)" if len(parts) > 3 else ""
    return "  valid nDCG@10: " + ", ".join(parts[:3]) + more


# ---------------------------------------------------------------- the run
IDENTITY_KEYS = ("DATASET", "PROFILE", "SEED", "DEVICE")


def run_identity(shared: dict) -> dict:
    """The part of a notebook's shared parameters that a completion record must match to hold
    (`run.state.stale_notebooks`): the data set, the profile, the seed and the device. The run
    folder, the overrides and ``FORCE`` are not in it: the parameters a notebook read are checked
    one by one instead."""
    return {k: shared[k] for k in IDENTITY_KEYS}


def run_pipeline(dataset: str = "synthetic", profile: str = "full", overrides: list[str] | None = None,
                 force: bool = False, only: list[str] | None = None, timeout: int = 14400,
                 seed: int | None = None, device: str = "", render: bool = True,
                 start: str | None = None, verbose: bool = False, run_name: str | None = None,
                 fork: str | None = None, seeds_only: list[int] | None = None) -> Path:
    """Execute the notebooks that need it and render the report; returns the report's index.html.

    Without ``only`` or ``start``, the run resumes: it runs only the stale notebooks
    (`run.state.stale_notebooks`). ``start`` (a notebook name or prefix) reruns from that notebook
    on; ``only`` runs just the named notebooks; ``force`` removes the run folder first.
    ``run_name`` names the run folder (``data/runs/<dataset>/<run_name>``, default: the profile)
    and its report (``reports/<dataset>--<run_name>/``); ``fork`` first copies that named run's
    folder of the same dataset into it, so a variant reruns only what its changes touch and the
    original run is left as it was. ``seeds_only`` runs just those further seeds (`run_seeds_only`),
    beside a run that goes on with the others."""
    import papermill as pm
    from .data import dataset_info
    from .params import check_overrides
    dataset_info(dataset)                                          # fail fast, before anything is written:
    check_overrides(config.load_params(profile, dataset), overrides)   # unknown dataset, profile or key,
    params = config.load_params(profile, dataset, overrides)      # a value of the wrong type or range
    name = run_name or profile
    check_run_name(name)
    every = notebooks()
    chosen = notebooks(only) if only else None
    start_at = None
    if start is not None:
        matches = [i for i, p in enumerate(every) if p.stem == start or p.stem.startswith(start)]
        if not matches:
            raise PipelineError(f"--from {start!r} matches no notebook in {config.notebooks_dir()}")
        start_at = matches[0]
    run_dir = default_run_dir(dataset, name)
    report_dir = report_dir_of(dataset, name, profile)
    source = None
    if fork is not None:
        check_run_name(fork)
        source = default_run_dir(dataset, fork)
        if not runstate.read_record(source, every[0].stem) and not (source / "state").is_dir():
            raise PipelineError(f"--fork {fork}: {source} holds no run to fork")
        if source.resolve() == run_dir.resolve():
            raise PipelineError(f"--fork {fork}: a run cannot fork itself; name the new run with --run")
    shared = {"DATASET": dataset, "PROFILE": profile, "RUN_DIR": str(run_dir),
              "SEED": int(params["seed"] if seed is None else seed), "DEVICE": device,
              "OVERRIDES": list(overrides or []), "FORCE": bool(force)}
    identity = run_identity(shared)
    if seeds_only:
        if force or only or start is not None or fork is not None:
            raise PipelineError("--seeds-only runs further seeds of a finished first seed's run; it takes "
                                "no --force, --only, --from or --fork")
        return run_seeds_only(seeds_only, dataset, profile, overrides, name, run_dir, report_dir, shared,
                              identity, params, every, timeout, verbose, pm)
    console = Console(verbose)
    try:
        with runstate.RunLock(lock_path(dataset, name), run_dir):
            if force and run_dir.exists():
                shutil.rmtree(run_dir)
            if source is not None:
                fork_run(source, run_dir, console)
            run_dir.mkdir(parents=True, exist_ok=True)
            kernel = ensure_kernel()
            seeds = seed_list(params)
            first = every if len(seeds) < 2 or chosen is not None else [nb for nb in every if nb.stem != REPORT]
            todo = _resume(first, chosen, start_at, run_dir, shared, identity, params, kernel, timeout, console, pm)
            left: list[int] = []
            if chosen is None and len(seeds) > 1:
                pins = seed_pins(run_dir, params)
                left = run_further_seeds(seeds[1:], lambda other: _run_seed(
                    other, seeds, pins, dataset, profile, overrides, run_dir, shared, kernel, timeout, console, pm,
                    name))
                if left:                        # the report waits for every seed: not run, not rendered
                    console.line(f"the report waits for seed(s) {', '.join(map(str, left))}, which another "
                                 f"process runs; rerun this command when it ends")
                else:
                    todo += _resume(every, None, None, run_dir, shared, identity, params, kernel, timeout,
                                    console, pm)
            stale = runstate.stale_notebooks(every, run_dir, identity, params)
            summary = runstate.run_summary(every, run_dir)
            complete = not stale and not left
            if render and complete:
                render_report(dataset, run_dir, report_dir, run=summary, params=params)
            elif render:
                console.line(f"report not rendered: the run is incomplete; {report_dir} keeps the "
                             f"last complete run's report (rerun without --only to finish)")
    finally:
        console.close()
    return report_dir / "index.html"


#: the notebook that renders the report; with several seeds it runs after every seed's run
REPORT = "90_report"
#: notebooks a further seed's run leaves out: the report (the first seed's reads every seed) and the
#: leakage audit (a property of the protocol, shown once, on the first seed)
NOT_PER_SEED = (REPORT, "50_leakage_audit")


def _resume(every: list[Path], chosen: list[Path] | None, start_at: int | None, run_dir: Path, shared: dict,
            identity: dict, params: dict, kernel: str, timeout: int, console: "Console", pm) -> list[Path]:
    """Run the stale notebooks of ``every`` in ``run_dir`` (or just ``chosen``; or from ``start_at``
    on), then once more any whose readers show up stale only now; returns what ran."""
    if chosen is not None:
        todo = chosen
    else:
        stale = runstate.stale_notebooks(every, run_dir, identity, params)
        if start_at is not None:
            stale.update({i: f"--from {every[start_at].stem}" for i in range(start_at, len(every))
                          if i not in stale})
        todo = plan(every, stale, run_dir, console)
    machine = usage.speed_index() if todo else None
    if machine is not None:
        console.line(f"machine speed index {machine['speed_index']:.2f} (1.0 = the reference "
                     f"machine; figures cached per boot)")
    console.progress(len(todo))
    ran = list(todo)
    run_notebooks(todo, run_dir, shared, identity, params, kernel, timeout, every, console, pm, machine)
    stale = runstate.stale_notebooks(every, run_dir, identity, params)
    if chosen is None and stale and todo:
        # a notebook whose record was torn or missing wrote files nobody knew it wrote:
        # their readers show up only now; one more pass runs them
        todo = plan(every, stale, run_dir, console)
        run_notebooks(todo, run_dir, shared, identity, params, kernel, timeout, every, console, pm, machine,
                      advance=False)
        ran += todo
    return ran


def run_notebooks(todo: list[Path], run_dir: Path, shared: dict, identity: dict, params: dict, kernel: str,
                  timeout: int, every: list[Path], console: "Console", pm, machine: dict | None,
                  advance: bool = True) -> None:
    """Execute ``todo`` in order, stopping at the first failure. Unless ``$RECSYS_PRESTART`` is 0,
    each notebook's kernel is started (its `PRELOAD` imports done) while the notebook before it
    runs (`run.prestart.Prestart`); whatever happens, no kernel started here outlives this call."""
    early = prestart_enabled() and bool(todo)
    current = Prestart.start(todo[0], kernel, run_dir, console) if early else None
    upcoming = None
    try:
        for i, nb in enumerate(todo):
            upcoming = (Prestart.start(todo[i + 1], kernel, run_dir, console, after=current)
                        if early and i + 1 < len(todo) else None)
            execute(nb, run_dir, shared, identity, params, kernel, timeout, every, console, pm, machine,
                    prestarted=current, idle=upcoming)
            if advance:
                console.advance()
            current, upcoming = upcoming, None
    finally:
        for handle in list(Prestart.live):      # a failure, Ctrl-C: the kernels nobody will use
            handle.close(now=True)


def run_further_seeds(seeds: list[int], run_one: Callable[[int], bool]) -> list[int]:
    """Run each of ``seeds`` in turn (``run_one`` returns False, having run nothing, when another
    process holds that seed), then try each held seed once more: the process that held it (``--seeds-only``)
    may have finished meanwhile, and its seed then resumes with nothing left to run, so the report need
    not wait for a second command. Returns the seeds still held by another process."""
    held = [s for s in seeds if not run_one(s)]
    return [s for s in held if not run_one(s)]


def seed_list(params: dict) -> list[int]:
    """The run's seeds, the first seed (``seed``, where every search runs) first: ``seeds`` lists
    every seed the study runs with and must include ``seed``; absent or empty, just ``seed``."""
    first = int(params.get("seed", 42))
    seeds = [int(s) for s in (params.get("seeds") or [])]
    if seeds and first not in seeds:
        raise PipelineError(f"seeds {seeds} must include the run's seed {first} (where the searches run)")
    return [first] + [s for s in dict.fromkeys(seeds) if s != first]


def seed_pins(run_dir: Path, params: dict) -> list[str]:
    """Overrides that fix every searched hyper-parameter at what the first seed's searches chose
    (its ``metrics/<model>.json``): each searched axis at its chosen value and the grid emptied, and
    the retriever's variants cut to the chosen one. Left free: epochs (each seed early-stops on
    validation), the blend's weights and the re-ranker's selection, which are fits, not searches."""
    import json as _json
    pins: list[str] = []
    for f in sorted((run_dir / "metrics").glob("*.json")):
        rec = _json.loads(f.read_text())
        name, section = rec.get("model"), params.get(rec.get("model"))
        if not isinstance(section, dict):
            continue
        chosen = rec.get("params") or {}
        if name == "two_tower":
            best = next((r.get("name") for r in rec.get("search") or [] if r.get("best")), None)
            entries = [v for v in section.get("variants", [])
                       if (v.get("name") if isinstance(v, dict) else v) == best]
            if entries:
                pins.append(f"two_tower.variants={_json.dumps(entries[:1])}")
            continue
        axes = (rec.get("tuning") or {}).get("axes") or {}
        if "grid" not in section or not axes:
            continue
        for axis, a in axes.items():
            value = chosen.get(axis, a.get("chosen"))
            pins.append(f"{name}.{axis}={_json.dumps(value)}")
        pins.append(f"{name}.grid={{}}")
    return pins


def seed_dir(run_dir: Path, seed: int) -> Path:
    """Where a further seed's run lives: inside the first seed's run, ``seeds/<seed>/``."""
    return run_dir / "seeds" / str(int(seed))


def _run_seed(seed: int, seeds: list[int], pins: list[str], dataset: str, profile: str,
              overrides: list[str] | None, run_dir: Path, shared: dict, kernel: str, timeout: int,
              console: "Console", pm, name: str) -> bool:
    """One further seed's run, resumed like any run: the notebooks but the report and the audit,
    with the first seed's choices pinned (`seed_pins`), under the seed's own lock. False, having
    run nothing, when another process holds that lock (``--seeds-only`` beside this run)."""
    try:
        with runstate.RunLock(seed_lock_path(dataset, name, seed), seed_dir(run_dir, seed)):
            _run_seed_locked(seed, seeds, pins, dataset, profile, overrides, run_dir, shared, kernel, timeout,
                             console, pm)
    except runstate.RunLocked as exc:
        console.line(f"seed {seed}: left to the process that holds it ({exc})")
        return False
    return True


def _run_seed_locked(seed: int, seeds: list[int], pins: list[str], dataset: str, profile: str,
                     overrides: list[str] | None, run_dir: Path, shared: dict, kernel: str, timeout: int,
                     console: "Console", pm) -> None:
    sub = seed_dir(run_dir, seed)
    sub.mkdir(parents=True, exist_ok=True)
    over = [*(overrides or []), *pins]
    params = config.load_params(profile, dataset, over)
    params["seed"] = int(seed)
    every = [nb for nb in notebooks() if nb.stem not in NOT_PER_SEED]
    sub_shared = {**shared, "RUN_DIR": str(sub), "SEED": int(seed), "OVERRIDES": over}
    identity = run_identity(sub_shared)
    console.line(f"seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}): {sub}; hyper-parameters pinned "
                 f"at seed {seeds[0]}'s choices ({len(pins)} values)")
    _resume(every, None, None, sub, sub_shared, identity, params, kernel, timeout, console, pm)


#: seconds between two looks of ``--seeds-only`` at a first seed that another process is still running
FIRST_SEED_POLL_SECONDS = 30.0


def run_is_running(dataset: str, name: str, run_dir: Path) -> bool:
    """Whether another process holds the run's own lock (its command runs the first seed, or the
    further seeds after it). Found by taking the lock for an instant and giving it back: a run command
    started in that same instant would be refused, so start the run's own command first (docs/running.md)."""
    try:
        with runstate.RunLock(lock_path(dataset, name), run_dir):
            return False
    except runstate.RunLocked:
        return True


def wait_for_first_seed(unfinished: Callable[[], tuple[str, str] | None], running: Callable[[], bool],
                        console: "Console", poll: float = FIRST_SEED_POLL_SECONDS,
                        sleep: Callable[[float], None] = time.sleep) -> None:
    """Return once the first seed's run has finished (``unfinished()``: None, else the first notebook
    not done and why). While it has not and ``running()`` says the run's own command is at it, wait,
    with one console line per notebook waited on; when nothing runs it, fail naming that notebook.
    Why wait: the second process of a seeds-in-two-lanes run can then be started beside the first
    (docs/running.md, "Seeds side by side") instead of by hand when the first seed ends, hours later."""
    waited_on = None
    while (pending := unfinished()) is not None:
        stem, why = pending
        if not running():
            raise PipelineError(f"--seeds-only needs the first seed's run finished; {stem} is not ({why}) and no "
                                f"process runs it: run the command without --seeds-only first")
        if stem != waited_on:
            console.line(f"waiting for the first seed's run, which another process runs ({stem} is not done); "
                         f"looking again every {poll:.0f} s")
            waited_on = stem
        sleep(poll)


def run_seeds_only(chosen: list[int], dataset: str, profile: str, overrides: list[str] | None, name: str,
                   run_dir: Path, report_dir: Path, shared: dict, identity: dict, params: dict,
                   every: list[Path], timeout: int, verbose: bool, pm) -> Path:
    """Run just the further seeds ``chosen`` of a run whose first seed has finished, each under its
    own lock and not the run's, so that a second process can take seeds off a run that goes on with
    the others: the run skips a seed this process holds and finds it done later. The report is left
    to the run's own command (it waits for every seed)."""
    seeds = seed_list(params)
    unknown = [s for s in chosen if int(s) not in seeds[1:]]
    if unknown:
        raise PipelineError(f"--seeds-only {unknown}: not further seeds of this run (its seeds: {seeds}; the first, "
                            f"{seeds[0]}, runs with the run itself)")
    first = [nb for nb in every if nb.stem != REPORT]

    def unfinished() -> tuple[str, str] | None:
        stale = runstate.stale_notebooks(first, run_dir, identity, params)
        return (first[min(stale)].stem, stale[min(stale)]) if stale else None

    console = Console(verbose)
    try:
        wait_for_first_seed(unfinished, lambda: run_is_running(dataset, name, run_dir), console)
        kernel = ensure_kernel()
        pins = seed_pins(run_dir, params)
        ran = [seed for seed in dict.fromkeys(int(s) for s in chosen)
               if _run_seed(seed, seeds, pins, dataset, profile, overrides, run_dir, shared, kernel, timeout,
                            console, pm, name)]
        skipped = [int(s) for s in dict.fromkeys(chosen) if int(s) not in ran]
        if ran:
            console.line(f"seed(s) {', '.join(map(str, ran))} done; the report is the run's own command's "
                         f"(without --seeds-only), once every seed is")
        if skipped:
            console.line(f"seed(s) {', '.join(map(str, skipped))} not run here: another process holds them")
    finally:
        console.close()
    return report_dir / "index.html"


def plan(every: list[Path], stale: dict[int, str], run_dir: Path, console: "Console") -> list[Path]:
    """The stale notebooks in order, each named with why it runs; their earlier records and the
    files they wrote are forgotten first (`run.state.forget`)."""
    kept = [nb.stem for i, nb in enumerate(every) if i not in stale]
    if kept:
        console.line(f"{_span(kept)}: finished earlier and unchanged, skipped")
    if stale and not kept and set(stale.values()) == {"not finished in an earlier run"}:
        console.line(f"a new run: every notebook runs; logs in {run_dir / 'logs'}")
    elif stale:
        for i in sorted(stale):
            console.line(f"{every[i].stem} will run: {stale[i]}")
        console.line(f"logs in {run_dir / 'logs'}")
    runstate.forget(every, run_dir, stale)
    return [every[i] for i in sorted(stale)]


def _span(stems: list[str]) -> str:
    """'00_data .. 17_blend' for a run of names, or a comma list when they are not contiguous."""
    every = [p.stem for p in notebooks()]
    idx = [every.index(s) for s in stems if s in every]
    if idx and idx == list(range(idx[0], idx[0] + len(idx))) and len(idx) > 2:
        return f"{stems[0]} .. {stems[-1]}"
    return ", ".join(stems)


def check_run_name(name: str) -> None:
    """A run name is a folder name: letters, digits, ``-``, ``_`` and ``.``, not starting with a dot."""
    import re
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name or ""):
        raise PipelineError(f"run name {name!r}: use letters, digits, '-', '_' and '.' (e.g. --run no-window)")


def report_dir_of(dataset: str, name: str, profile: str) -> Path:
    """``reports/<dataset>/`` for the default run (named as its profile); ``reports/<dataset>--<name>/``
    for a named one, so a variant never replaces the study's report."""
    return config.reports_dir(dataset if name == profile else f"{dataset}--{name}")


def fork_run(source: Path, run_dir: Path, console: "Console") -> None:
    """Copy ``source`` (a run folder) to ``run_dir``, which must not exist yet, keeping each file's
    mtime so that the copied completion records still hold. Files are copied, never linked: a
    notebook of the fork that rewrites a file in place cannot touch the original run."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise PipelineError(f"--fork: {run_dir} exists already; fork into a new --run name, or drop --fork "
                            f"to resume it")
    t0 = time.perf_counter()
    tmp = run_dir.with_name(f".{run_dir.name}.fork-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, symlinks=True, ignore=shutil.ignore_patterns("dist"),
                    copy_function=shutil.copy2)
    if run_dir.exists():
        run_dir.rmdir()
    os.replace(tmp, run_dir)
    console.line(f"forked {source} into {run_dir} in {time.perf_counter() - t0:.1f} s")


def execute(nb: Path, run_dir: Path, shared: dict, identity: dict, params: dict,
            kernel: str, timeout: int, every: list[Path], console: Console, pm,
            machine: dict | None = None, prestarted: Prestart | None = None,
            idle: Prestart | None = None) -> dict:
    """Run one notebook into ``<run>/notebooks/`` with its output in ``<run>/logs/``; on success
    write its completion record, with what it cost. Failure: PipelineError naming the cell, the
    copy and the log. ``prestarted``: the notebook's kernel, started early (`run.prestart.Prestart`), which this
    closes whatever happens; ``idle``: the next notebook's, starting meanwhile, left out of this
    notebook's peak RSS."""
    out = run_dir / "notebooks" / nb.name
    log = run_dir / "logs" / f"{nb.stem}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    if prestarted is not None:
        prestarted.claim_log(log)
    runstate.record_path(run_dir, nb.stem).unlink(missing_ok=True)
    before = runstate.fingerprint(run_dir)
    console.line(f"{nb.stem} ...")
    failure = None
    os.environ[runstate.ENV_NOTEBOOK] = nb.stem
    cost = usage.Usage(exclude=idle.pids if idle is not None else ())
    try:
        with console.to_log(log), cost:
            interrupted = False
            try:
                km = prestarted.take(console) if prestarted is not None else None
                pm.execute_notebook(str(nb), str(out), parameters=shared, kernel_name=kernel,
                                    log_output=True, progress_bar=False, execution_timeout=timeout,
                                    cwd=str(config.notebooks_dir()), **({"km": km} if km is not None else {}))
            except KeyboardInterrupt:
                interrupted = True
                raise
            finally:
                if prestarted is not None:       # in the block: the kernel is reaped, its CPU counted, here
                    prestarted.close(now=interrupted)
    except KeyboardInterrupt:
        raise Interrupted(nb.stem) from None
    except pm.PapermillExecutionError as exc:
        failure = f"cell {exc.exec_count}: {exc.ename}: {_first_line(exc.evalue)}"
    except Exception as exc:  # noqa: BLE001 - kernel death, timeout, ...: named, not re-raised raw
        failure = f"{type(exc).__name__}: {_first_line(str(exc))}"
    finally:
        os.environ.pop(runstate.ENV_NOTEBOOK, None)
    figures = cost.figures()
    if failure:
        console.line(f"{nb.stem} FAILED after {usage.describe(figures)}: {failure}")
        raise PipelineError(f"notebook {nb.name} failed in {failure}\n  executed notebook: {out}\n"
                            f"  log: {log}")
    if machine is not None:
        figures["speed_index"] = machine["speed_index"]
    figures["threads"] = usage.thread_settings()          # the thread variables its kernel ran under
    rec = runstate.write_record(run_dir, nb, before, identity, params, every, figures)
    console.line(f"{nb.stem} done in {usage.describe(figures)}{recorded_metrics(run_dir, rec['outputs'])}")
    return rec


def _first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


def render_report(dataset: str, run_dir: Path, report_dir: Path, timings: dict | None = None,
                  run: dict | None = None, params: dict | None = None) -> Path:
    """Render a run folder's executed notebooks into ``report_dir``: a page per notebook (with
    code), index.html from 90_report (without code), and metrics.json. The folder is built
    beside the old one and swapped in whole, so a reader never sees a mix of two runs."""
    from .report.render import render_notebook, write_metrics_json
    run_dir, report_dir = Path(run_dir), Path(report_dir)
    src = run_dir / "notebooks"
    if run is None:
        run = runstate.run_summary(notebooks(), run_dir)
    seconds = timings or {k: v["seconds"] for k, v in run.get("notebooks", {}).items()}
    report_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = report_dir.with_name(f".{report_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "notebooks").mkdir(parents=True)
        for ipynb in sorted(src.glob("*.ipynb")):
            shutil.copyfile(ipynb, tmp / "notebooks" / ipynb.name)
            render_notebook(ipynb, tmp / "notebooks" / f"{ipynb.stem}.html", include_code=True)
        report_nb = src / "90_report.ipynb"
        if report_nb.exists():
            render_notebook(report_nb, tmp / "index.html", include_code=False)
        paired = Path(run_dir, "analysis", "paired.json")   # the headline's paired test differences
        seeds = Path(run_dir, "analysis", "seeds.json")     # every seed's scores, the comparisons over seeds
        write_metrics_json(run_dir, tmp / "metrics.json",
                           {"notebook_seconds": seconds, "run": {**run, "run_dir": str(run_dir)},
                            "paired": json.loads(paired.read_text()) if paired.exists() else None,
                            "seeds": json.loads(seeds.read_text()) if seeds.exists() else None,
                            # the run's parameters now, which every record agrees with (run.json
                            # keeps 01_split's, older when a later --set reran only its readers)
                            **({"params": params} if params is not None else {})})
        config.replace_dir(tmp, report_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[pipeline] report: {report_dir / 'index.html'}", flush=True)
    return report_dir / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys_lib.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--profile", default="full", help="params/<profile>.yaml: quick | full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set mf.epochs=5 (repeatable)")
    parser.add_argument("--force", action="store_true",
                        help="start the run folder afresh: fetch, split and every model again")
    parser.add_argument("--from", dest="start", default=None, metavar="NN",
                        help="rerun from this notebook (name or prefix) to the end")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these notebooks (name or prefix), whatever their records say")
    parser.add_argument("--timeout", type=int, default=14400,
                        help="per-cell execution timeout, seconds (a real set's SASRec search, 10-15 fits in one cell, can pass an hour on 2 cores)")
    parser.add_argument("--device", default="", help="auto | cpu | cuda | mps (default: the profile's)")
    parser.add_argument("--verbose", action="store_true",
                        help="stream kernel output to the console instead of the logs")
    parser.add_argument("--run", dest="run_name", default=None, metavar="NAME",
                        help="a named run folder, data/runs/<dataset>/NAME (default: the profile's); "
                             "its report goes to reports/<dataset>--NAME/")
    parser.add_argument("--fork", default=None, metavar="RUN",
                        help="start the --run NAME folder as a copy of run RUN (e.g. full), then resume: "
                             "only what the changes touch runs, and RUN is left untouched")
    parser.add_argument("--seeds-only", nargs="+", type=int, default=None, metavar="SEED",
                        help="run just these further seeds beside the run's own command (each seed has its own "
                             "lock; that command skips a seed held here); waits while that command runs the first seed")
    args = parser.parse_args(argv)
    if args.fork and not args.run_name:
        parser.error("--fork needs --run NAME, the new run's name")
    try:
        index = run_pipeline(args.dataset, args.profile, args.set, args.force, args.only, args.timeout,
                             device=args.device, start=args.start, verbose=args.verbose,
                             run_name=args.run_name, fork=args.fork, seeds_only=args.seeds_only)
    except (Interrupted, KeyboardInterrupt) as exc:
        # nbclient's cell task dies with the kernel; asyncio would log it at exit ("Task exception
        # was never retrieved"): the one line below is all the user needs
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        msg = exc if isinstance(exc, Interrupted) else "interrupted; rerun the same command to resume"
        print(f"\n{msg}", file=sys.stderr)
        return 130
    except RecsysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
