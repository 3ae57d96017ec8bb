"""Write each report's results into the README (and the docs), so that no figure there is typed by hand.

The README holds one block per real data set, and docs/running.md the demo's::

    <!-- results: ml-latest-small -->
    ...generated: the test table, the headline and the commit that made them...
    <!-- /results -->

This script replaces each block's body from ``reports/<dataset>/metrics.json`` (written by the
pipeline): the test metrics of every model (``report.readme_table``), the headline
(``report.text.headline``, from the run's paired differences of the first seed: the primary comparison named in
docs/PROTOCOL.md first, the two-stage system against the blend, then the secondary, the strongest
single-stage model on validation, then one sentence on the exploratory rest), the seeds' sentence
(``report.seeds.abstract_sentences``: how many, and the primary comparison over seeds and users) and the commit and
command of the run. The re-ranker variants that were not chosen (``two_stage_<variant>``) stay in
the report. Run it after ``make report DATASET=...``::

    .venv/bin/python scripts/readme_results.py            # every block whose report exists, in every file
    .venv/bin/python scripts/readme_results.py --check    # exit 1 if a block is out of date
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from recsys_lib import config
from recsys_lib.report.tables import readme_table
from recsys_lib.report import seeds
from recsys_lib.report.text import headline

#: the files holding result blocks: the README (the real data sets) and the manual (the demo)
FILES = (config.PROJECT_ROOT / "README.md", config.PROJECT_ROOT / "docs" / "running.md")
BLOCK = re.compile(r"(<!-- results: (?P<dataset>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def seeds_of(metrics: dict) -> tuple[list[int] | None, list[int] | None]:
    """(the seeds the run used, the seeds params/ plan for its data set and profile); (None, None)
    when the metrics carry no run parameters."""
    params = metrics.get("params")
    if not isinstance(params, dict) or "seeds" not in params:
        return None, None
    try:
        planned = config.load_params(metrics.get("profile") or "full", metrics["dataset"]).get("seeds")
    except Exception:  # noqa: BLE001 - an unknown data set or profile: nothing to compare with
        return None, None
    return list(params["seeds"] or []), list(planned or [])


def results_block(metrics: dict) -> str:
    """The generated body of one data set's block (ends with a newline): every single-stage model
    and the two-stage system as the study reports it (``two_stage``, the chosen variant); the
    other variants are in the report."""
    metrics = {**metrics, "models": {k: v for k, v in metrics["models"].items() if not k.startswith("two_stage_")}}
    test_users = {m["test"].get("users") for m in metrics["models"].values() if m.get("test")}
    users = f"{test_users.pop():,} test users" if len(test_users) == 1 else "test users"
    commit = (metrics.get("git_commit") or "unknown")[:7]
    command = f"make report DATASET={metrics['dataset']}"
    if metrics.get("profile") not in (None, "full"):
        command += f" PROFILE={metrics['profile']}"
    ran, planned = seeds_of(metrics)
    if ran is not None and ran != planned:                  # a run over fewer (or other) seeds than params/ plan
        command = (f"python -m recsys_lib.pipeline --dataset {metrics['dataset']} --profile {metrics.get('profile') or 'full'}"
                   f" --set \"seeds=[{','.join(map(str, ran))}]\"")
    lines = [f"Test period, {users}, every model ranking the full catalogue minus what each user rated.",
             f"Made by `{command}` at commit `{commit}`.", "", readme_table(metrics), ""]
    if metrics.get("paired"):
        lines += [headline(metrics["paired"]), ""]
    if metrics.get("seeds"):
        lines += [seeds.abstract_sentences(metrics["seeds"]), ""]
    return "\n".join(lines)


def update(readme: str, reports: Path) -> tuple[str, list[str]]:
    """The README with every block whose report exists rewritten, and the data sets rewritten."""
    done = []

    def repl(m: re.Match) -> str:
        path = reports / m["dataset"] / "metrics.json"
        if not path.exists():
            return m[0]
        done.append(m["dataset"])
        return m[1] + results_block(json.loads(path.read_text())) + m[4]
    return BLOCK.sub(repl, readme), done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, nargs="+", default=list(FILES),
                        help="the files whose blocks are rewritten (default: README.md and docs/running.md)")
    parser.add_argument("--reports", type=Path, default=config.PROJECT_ROOT / "reports")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a block is out of date")
    args = parser.parse_args(argv)
    stale = 0
    for path in args.readme:
        old = path.read_text()
        new, done = update(old, args.reports)
        if args.check:
            print(f"up to date: {path}" if new == old else f"out of date: {path}")
            stale += new != old
            continue
        path.write_text(new)
        print(f"rewrote {', '.join(done) or 'nothing (no report found)'} in {path}")
    return int(stale > 0)


if __name__ == "__main__":
    sys.exit(main())
