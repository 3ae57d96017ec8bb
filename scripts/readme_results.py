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
the report.

The README's answer is generated too, between ``<!-- answer -->`` and ``<!-- /answer -->``
(`answer_block`): the primary comparison on every real data set with a block and a report, over its
seeds and users, then the demo's; the secondary; what each stage adds (each ablation over seeds and
users, from ``analysis/seeds.json``). Its words follow the CIs, whichever way they fall. What the
answer reads from each report is kept in ``docs/results/<dataset>.json`` (committed): a data set whose
report is not on this machine keeps its place in the answer from that record, with its commit.
Run it after ``make report DATASET=...``::

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
from recsys_lib.run.usage import THREAD_VARS

#: the files holding result blocks: the README (the real data sets) and the manual (the demo)
FILES = (config.PROJECT_ROOT / "README.md", config.PROJECT_ROOT / "docs" / "running.md")
BLOCK = re.compile(r"(<!-- results: (?P<dataset>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
ANSWER = re.compile(r"(<!-- answer -->\n)(?P<body>.*?)(<!-- /answer -->)", re.S)
#: the embedded demo: stated after the real data sets, as not evidence about real users
DEMO = "synthetic"
#: each report's answer inputs (`answer_record`), committed, for the answer when that report is absent
RECORDS = config.PROJECT_ROOT / "docs" / "results"
#: what each ablation takes out, in the answer's words (35_ablations' names)
WITHOUT = {"two_stage_no_reranker": "without the re-ranker (the candidates ordered by the blend)",
           "two_stage_no_two_tower": "without the two-tower retriever"}


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


def thread_prefix(metrics: dict) -> tuple[str, str]:
    """(the thread variables every notebook of the first seed's run recorded, as a command prefix;
    a note when they differ or some notebooks ran before they were recorded). Float sums, and so the
    last digits, move with thread counts: the command reproduces them only with the same settings."""
    notebooks = ((metrics.get("run") or {}).get("notebooks") or {}).values()
    seen = {json.dumps(nb.get("threads"), sort_keys=True) for nb in notebooks}
    if not seen or seen == {"null"}:
        return "", ""
    if len(seen) > 1:
        return "", " (its notebooks ran under different thread settings: see each record's `threads`)"
    settings = json.loads(seen.pop())
    order = [k for k in THREAD_VARS if k in settings] + sorted(set(settings) - set(THREAD_VARS))
    return "".join(f"{k}={settings[k]} " for k in order), ""


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
    threads = thread_prefix(metrics)
    lines = [f"Test period, {users}, every model ranking the full catalogue minus what each user rated.",
             f"Made by `{threads[0]}{command}` at commit `{commit}`{threads[1]}.", "", readme_table(metrics), ""]
    if metrics.get("paired"):
        lines += [headline(metrics["paired"]), ""]
    if metrics.get("seeds"):
        lines += [seeds.abstract_sentences(metrics["seeds"]), ""]
    return "\n".join(lines)


def _ci(c: dict) -> str:
    return f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"


def _says(c: dict, rival: str) -> str:
    """The verdict of a comparison's 95% CI against ``rival``, in a few words."""
    return (f"beats {rival}" if c["lo"] > 0 else f"is beaten by {rival}" if c["hi"] < 0
            else f"does not separate from {rival}")


def _over(summary: dict, metrics: dict) -> str:
    n = len(summary.get("seeds") or [])
    ran, planned = seeds_of(metrics)
    of = f" of the {len(planned)} planned" if planned and ran is not None and len(planned) > n else ""
    users = (seeds.comparison(summary, "primary") or {}).get("n_users")
    return f"{n} seed{'s' if n != 1 else ''}{of}" + (f", {users:,} test users" if users else "")


def answer_block(reports: dict[str, dict]) -> str | None:
    """The README's answer (ends with a newline) from each data set's ``metrics.json`` (``reports``:
    data set -> metrics, the real ones in the README's order, the demo last); None when none of
    them has its seeds' summary. Every number is a paired difference, two-stage system minus the
    other, with its 95% CI over seeds and users (`report.seeds`)."""
    rows = [(d, m, m.get("seeds")) for d, m in reports.items() if m.get("seeds")]
    rows = [r for r in rows if seeds.comparison(r[2], "primary")]
    if not rows:
        return None

    def name(d: str) -> str:
        return "the synthetic demo" if d == DEMO else d

    def over(d: str, m: dict, sm: dict) -> str:
        return _over(sm, m) + ("; not evidence about real users" if d == DEMO else "")

    primary = "; ".join(f"on {name(d)} it {_says(seeds.comparison(s, 'primary'), 'the blend')}, "
                        f"{_ci(seeds.comparison(s, 'primary'))} ({over(d, m, s)})" for d, m, s in rows)
    second = "; ".join(f"on {name(d)} it {_says(c, c['against'])}, {_ci(c)}"
                       for d, m, s in rows if (c := seeds.comparison(s, "secondary")))
    stages = []
    for key, words in WITHOUT.items():
        found = [(d, c) for d, m, s in rows for c in s.get("comparisons", []) if c["role"] == "ablation"
                 and c["against"] == key]
        if found:
            stages.append(f"{words}, the full system minus it: " + ", ".join(
                f"{_ci(c)} on {name(d)}" for d, c in found))
    lines = ["**The answer.** The two-stage system against the z-scored blend of the single-stage models (the "
             "primary comparison, named in advance in the [protocol](docs/PROTOCOL.md): the like-for-like rival of "
             f"a re-ranker that takes all their scores as features): {primary}. Each figure is the paired difference in test nDCG@10, "
             "two-stage minus the other, with its 95% CI over seeds and users."]
    if second:
        lines.append(f"Against the secondary, the strongest single-stage model on validation: {second}. Every "
                     "other comparison is exploratory.")
    if stages:
        lines.append("What each stage adds (exploratory, over seeds and users): " + "; ".join(stages) + ".")
    commits = sorted({(m.get("git_commit") or "unknown")[:7] for _, m, _ in rows})
    lines.append(f"Generated by `scripts/readme_results.py` from the reports' `metrics.json`, as kept in `docs/results/` "
                 f"(commit {', '.join(f'`{c}`' for c in commits)}).")
    return "\n".join(lines) + "\n"


def answer_record(metrics: dict) -> dict:
    """What the answer reads from one report (`answer_block`): the data set, its profile and commit, the
    seeds it ran and its seeds' comparisons. Kept in ``docs/results/<dataset>.json`` so that the answer
    can still name a data set whose report is not on this machine (reports/ is never committed, and a
    five-seed run takes hours: one data set's report is usually all a machine has)."""
    keep = {k: metrics[k] for k in ("dataset", "profile", "git_commit") if k in metrics}
    if isinstance(metrics.get("params"), dict) and "seeds" in metrics["params"]:
        keep["params"] = {"seeds": metrics["params"]["seeds"]}
    summary = metrics.get("seeds") or {}
    keep["seeds"] = {k: summary[k] for k in ("seeds", "first_seed", "comparisons") if k in summary}
    return keep


def read_answer_inputs(readme: str, reports: Path, records: Path | None = None) -> dict[str, dict]:
    """data set -> what the answer reads, for every block of ``readme`` and the demo: the report's
    ``metrics.json`` where it exists, else the record that an earlier run of this script kept in
    ``records`` (`answer_record`), else nothing."""
    found = {}
    for name in dict.fromkeys([m["dataset"] for m in BLOCK.finditer(readme)] + [DEMO]):
        path = reports / name / "metrics.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
        elif records is not None and (records / f"{name}.json").exists():
            found[name] = json.loads((records / f"{name}.json").read_text())
    return found


def write_records(reports: Path, records: Path, names: set[str] | None = None) -> list[str]:
    """Keep each report's `answer_record` in ``records`` (``<dataset>.json``), for the data sets in
    ``names`` (those the answer reads: a block's or the demo's; None: every one); returns the data
    sets written. A report of a data set the answer does not read (the bench's synthetic-32m, a probe
    with ``--set`` overrides) is not kept."""
    written = []
    for path in sorted(reports.glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        if (not metrics.get("seeds") or path.parent.name != metrics.get("dataset")
                or metrics.get("profile", "full") != "full"):
            continue                                # a named run (reports/<dataset>--<run>/) or a quick one is not the study's
        if names is not None and path.parent.name not in names:
            continue
        records.mkdir(parents=True, exist_ok=True)
        (records / f"{path.parent.name}.json").write_text(json.dumps(answer_record(metrics), indent=1) + "\n")
        written.append(path.parent.name)
    return written


def update(readme: str, reports: Path, records: Path | None = None) -> tuple[str, list[str]]:
    """The README with every block whose report exists rewritten (and the answer, where the file
    has one, from every report or, for a data set whose report is absent, its kept record in
    ``records``), and the data sets rewritten."""
    done = []
    found = read_answer_inputs(readme, reports, records)
    answer = answer_block({d: m for d, m in found.items() if d != DEMO} | ({DEMO: found[DEMO]} if DEMO in found else {}))
    if answer is not None:
        readme = ANSWER.sub(lambda m: m[1] + answer + m[3], readme)

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
    parser.add_argument("--records", type=Path, default=RECORDS,
                        help="where each report's answer inputs are kept (default: docs/results)")
    args = parser.parse_args(argv)
    stale = 0
    if not args.check:
        names = {m["dataset"] for path in args.readme for m in BLOCK.finditer(path.read_text())} | {DEMO}
        kept = write_records(args.reports, args.records, names)
        if kept:
            print(f"kept the answer's inputs of {', '.join(kept)} in {args.records}")
    for path in args.readme:
        old = path.read_text()
        new, done = update(old, args.reports, args.records)
        if args.check:
            print(f"up to date: {path}" if new == old else f"out of date: {path}")
            stale += new != old
            continue
        path.write_text(new)
        answered = ANSWER.search(old) is not None and ANSWER.search(old)["body"] != ANSWER.search(new)["body"]
        what = done + (["the answer"] if answered else [])
        print(f"rewrote {', '.join(what) or 'nothing (no report found, the answer unchanged)'} in {path}")
    return int(stale > 0)


if __name__ == "__main__":
    sys.exit(main())
