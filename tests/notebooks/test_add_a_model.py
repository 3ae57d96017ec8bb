"""docs/developing.md's "Add a model", followed as written, reaches the results and the blend.

Why it exists: the doc promises that a new single-stage model joins the results table and the
blend through the registry, one notebook and its params alone, with no edit to the blend's code
(`models/blend.py`, `run/experiment.py`). Nothing else checks that promise, and the doc's steps
drift from the code unnoticed. So this test adds the doc's worked example, `itempop_recent`
(popularity with each train row weighted by its recency), to a temporary COPY of the project
(`recsys_lib/`, `notebooks/`, `params/`; never `data/` or `reports/`, and the real tree is not
touched), step by step, taking every snippet from the doc itself: the config dataclass, the
class's declared attributes and `tune` (step 1), the registry line (step 2), the notebook to copy
and its name (steps 2-3), the yaml section and the quick grid (step 4), the range-check set
(step 5). Only what the doc describes in comments (the methods of step 1, modelled on
`popularity.py`) and the notebook's title text are written here. If the doc changes, the test
follows it; if the doc stops working, the test fails.

Then, in the copy, as a user runs it (`python -m recsys_lib.pipeline`, synthetic-tiny, quick,
stage 1 only: 00_data .. 17_blend), it asserts:
- the doc's "check it before any run" parameter command accepts the new keys; after the run, with
  the copy's library, the step 5 range check refuses `half_life_days=0` and tests/unit/test_house.py's
  check that the registry's notebook fits each model passes;
- the kernels ran the copy (the original registry has no `itempop_recent`: its metrics file could
  not exist otherwise; its completion record lists `recsys_lib.models.itempop_recent`);
- `metrics/itempop_recent.json` holds valid and test nDCG@10 in [0, 1], scored on the same test
  users as every other model (count and the per-user ids);
- `metrics/blend.json`'s `params.members` contains `itempop_recent`, which the blend read from the
  registry (its declared members, `in_blend=True` in the doc's registry line: here, every model the run fit);
- the results table: `report.results_frame(run_dir, "test")`, the function that builds the
  report's "Results on the test period" table (90_report, 40_evaluation, 30_reranker) straight
  from the run's `metrics/*.json` (it needs no output of 40_evaluation), run with the copy's
  library, has an `itempop_recent` row, and `report.scored_users` finds one test-user count;
- the copy differs from the original tree by exactly the files the doc names (two added, four
  edited), and `models/blend.py` and `run/experiment.py` are byte-identical to the originals.

Cost: about 2 CPU-minutes, most of it eleven kernels starting (~13 s each on this machine); 4 minutes
of wall time on 2 cores shared with other runs. `RECSYS_TORCH_THREADS` defaults to 1 here."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "developing.md"
NAME = "itempop_recent"
COPIED = ("recsys_lib", "notebooks", "params")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints", "*.egg-info")
UNTOUCHED = ("recsys_lib/models/blend.py", "recsys_lib/run/experiment.py")   # the blend's code


# ---------------------------------------------------------------- the doc's snippets
def doc_section() -> str:
    text = DOC.read_text()
    start = text.index("## Add a model")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def fenced(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


class Doc:
    """Every snippet of "Add a model" the steps use, found by what it is, not by line number."""

    def __init__(self):
        s = doc_section()
        step1 = next(b for b in fenced(s, "python") if "@dataclass" in b)
        model_at = re.search(r"^class \w+\(.*\):$", step1, re.M).start()   # the Recommender, not the config
        self.config_src = step1[step1.index("@dataclass"):model_at].strip() + "\n"
        cls = step1[model_at:step1.index("\ndef tune")]
        head, *body = cls.strip().splitlines()
        self.class_head = head                                      # class ItemPopRecent(torch.nn.Module, Recommender):
        self.class_attrs = [l for l in body if l.strip() and not l.strip().startswith("#")]
        self.tune_src = step1[step1.index("def tune"):].strip() + "\n"
        self.registry_line = next(b for b in fenced(s, "python") if f'"{NAME}": _baseline(' in b).strip()
        self.notebook = re.search(r'_baseline\([^)]*"(\d\d_\w+)"', self.registry_line).group(1)
        self.template, self.copy_to = re.search(
            r"Copy `notebooks/(\d\d_\w+\.ipynb)` \(JSON\) to `notebooks/(\d\d_\w+)\.ipynb`", s).groups()
        self.fit_call = re.search(r'`(run\.fit_model\("\w+"\))`', s).group(1)
        self.full_yaml = next(b for b in fenced(s, "yaml") if b.startswith(f"{NAME}:"))
        self.quick_yaml = re.search(rf"`({NAME}: \{{grid: .*?\}}\}})`", s).group(1)
        key, rangeset = re.search(r"here `(\w+)` to `(\w+)`", s).groups()
        self.range_key, self.range_set = key, rangeset
        self.check_cmd = next(l for b in fenced(s, "bash") for l in b.splitlines()
                              if "recsys_lib params" in l)


# ---------------------------------------------------------------- step 1: the model's methods
# What the doc's class sketch gives as comments, written after popularity.py (which the doc says to copy).
MODEL_HEADER = '''"""Recency-weighted popularity (docs/developing.md, "Add a model", the worked example): every user
gets the train period's most popular unseen items, each train row weighted 0.5 ** (age / half_life_days),
its age counted in days before the end of the train period. Counts come from the train rows only."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import tuning
from ..protocol.splitdata import ScoringContext, SplitData
from .train import save_checkpoint
from . import Recommender

SECONDS_PER_DAY = 86_400


'''

MODEL_METHODS = '''
    def __init__(self, config: ItemPopRecentConfig | None = None, **overrides):
        super().__init__()
        self.configure(config, **overrides)
        self.register_buffer("scores", torch.zeros(0))          # (n_items,) weighted count, higher first

    def fit(self, data: SplitData, validate=None) -> dict:
        """Weighted count of the train rows per item; nothing to early-stop (``validate`` unused)."""
        t0 = time.perf_counter()
        train = data.train
        keep = train.positive if self.cfg.positives_only else np.ones(len(train), bool)
        end = train.timestamp.max() if len(train) else 0
        age_days = (end - train.timestamp[keep]).astype(np.float64) / SECONDS_PER_DAY       # (n_kept,)
        weight = np.exp2(-age_days / float(self.cfg.half_life_days))                       # (n_kept,)
        counts = np.bincount(train.item[keep], weights=weight, minlength=data.n_items)     # (n_items,)
        self.scores = torch.from_numpy(counts.astype(np.float32)).to(self.device)
        return {"seconds": time.perf_counter() - t0, "n_items": data.n_items,
                "items_with_counts": int((counts > 0).sum())}

    @torch.no_grad()
    def score_all(self, users: torch.Tensor, ctx: ScoringContext | None = None) -> torch.Tensor:
        # a fresh tensor, not an expanded view: callers mask seen items in place
        return self.scores.unsqueeze(0).repeat(len(users), 1)                               # (B, n_items)

    @torch.no_grad()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor, ctx: ScoringContext | None = None,
                    batch_users: int = 1024) -> torch.Tensor:
        return self.scores[items.to(self.scores.device)].float().cpu()                       # (N,)

    def save(self, path) -> None:
        save_checkpoint(path, self, self.cfg, n_items=int(self.scores.numel()))

    @classmethod
    def load(cls, path, device: str | None = None) -> "ItemPopRecent":
        model, ckpt = cls.from_checkpoint(path, device)
        model.scores = torch.zeros(ckpt["n_items"])
        model.load_state_dict(ckpt["state_dict"])
        return model.to(model.device)


'''

TITLE = (f"# 16 · Recency-weighted popularity (`{NAME}`)\n\n"
         "The toy model of docs/developing.md, \"Add a model\": popularity with each train row weighted by "
         "its recency, a row's weight halving every `half_life_days` before the end of the train period. "
         "Counts come from the train rows only; the half-life (and positives only or not) is tuned on "
         "validation.\n\n"
         f"*Reads:* `<RUN_DIR>/data.pt`. *Writes:* `<RUN_DIR>/models/{NAME}.pt`, "
         f"`<RUN_DIR>/metrics/{NAME}.json`, `<RUN_DIR>/per_user/{NAME}-*.parquet`.")


# ---------------------------------------------------------------- helpers
def tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for top in COPIED:
        for p in sorted((root / top).rglob("*")):
            rel = p.relative_to(root)
            if p.is_file() and not any(part in ("__pycache__", ".ipynb_checkpoints") for part in rel.parts) \
                    and p.suffix != ".pyc":
                out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def insert_registry_line(path: Path, line: str) -> None:
    """Step 2: the doc's line as the last entry of ``REGISTRY = {...}`` (text edit)."""
    text = path.read_text()
    start = text.index("REGISTRY: dict[str, ModelSpec] = {")
    close = text.index("\n}\n", start)
    path.write_text(text[:close] + "\n    " + line + text[close:])


def add_to_set(path: Path, set_name: str, key: str) -> None:
    """Step 5: ``key`` into the module-level set literal ``set_name = {...}`` (text edit)."""
    text = path.read_text()
    start = text.index(f"\n{set_name} = {{") + 1
    text = text[:start] + f'{set_name} = {{"{key}", ' + text[start + len(f"{set_name} = {{"):]
    path.write_text(text)


def copy_notebook(src: Path, dst: Path, fit_call: str, title: str) -> None:
    """Step 3: a JSON copy of the template with a new first markdown cell and fit call, no outputs."""
    nb = json.loads(src.read_text())
    cells = nb["cells"]
    first_md = next(c for c in cells if c["cell_type"] == "markdown")
    first_md["source"] = title.splitlines(keepends=True)
    fits = [c for c in cells if c["cell_type"] == "code" and "run.fit_model(" in "".join(c["source"])]
    assert len(fits) == 1, f"{src.name}: expected one fit cell"
    fits[0]["source"] = re.sub(r'run\.fit_model\("\w+"\)', fit_call,
                               "".join(fits[0]["source"])).splitlines(keepends=True)
    for c in cells:
        if c["cell_type"] == "code":
            c["outputs"], c["execution_count"] = [], None
    dst.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


#: run with the copy's library after the pipeline: the report's results table from the run folder
#: (`report.results_frame`, what 30_reranker, 40_evaluation and 90_report show; it reads only
#: metrics/*.json), the one test-user count (`report.scored_users`), step 5's range check (what
#: `--set` runs before anything is written), and tests/unit/test_house.py's check that the registry's
#: notebook fits each model (its function, on the copy's registry and notebooks)
CHECKS = """
import importlib.util, json, sys
from recsys_lib import config, params, report
from recsys_lib.errors import ConfigError
run_dir, bad, house = sys.argv[1:4]
table = report.results_frame(run_dir, "test")
try:
    params.check_overrides(config.load_params("quick", "synthetic"), [bad])
    refused = ""
except ConfigError as exc:
    refused = str(exc)
spec = importlib.util.spec_from_file_location("house", house)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.test_every_registered_model_is_recorded_by_its_notebook()
print(json.dumps({"models": list(table["model"]), "columns": list(table.columns), "refused": refused,
                  "users": report.scored_users(run_dir, "test"), "lib": report.__file__}))
"""


def run(cmd: list[str], proj: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- the test
def test_a_model_added_by_the_doc_reaches_the_results_and_the_blend(tmp_path):
    doc = Doc()
    proj = tmp_path / "proj"
    for top in COPIED:
        shutil.copytree(ROOT / top, proj / top, ignore=IGNORED)
    original = tree_hashes(proj)                       # the originals, as copied
    originals = {rel: (ROOT / rel).read_bytes() for rel in UNTOUCHED}
    assert all(hashlib.sha256(b).hexdigest() == original[rel] for rel, b in originals.items())
    assert NAME not in (ROOT / "recsys_lib/models/registry.py").read_text(), \
        "the original registry must not know the toy, or the run below proves nothing"

    # 1. the model's file: the doc's config, class attributes and tune; methods after popularity.py
    model_py = proj / "recsys_lib" / "models" / f"{NAME}.py"
    assert not model_py.exists()
    model_py.write_text(MODEL_HEADER + doc.config_src + "\n\n" + doc.class_head + "\n"
                        + "\n".join(doc.class_attrs) + "\n" + MODEL_METHODS + doc.tune_src)
    # 2. the registry line
    insert_registry_line(proj / "recsys_lib" / "models" / "registry.py", doc.registry_line)
    # 3. the notebook: a copy of the template, named as the registry line names it
    assert doc.copy_to == doc.notebook and doc.fit_call == f'run.fit_model("{NAME}")', (doc.copy_to, doc.fit_call)
    nb_dir = proj / "notebooks"
    copy_notebook(nb_dir / doc.template, nb_dir / f"{doc.copy_to}.ipynb", doc.fit_call, TITLE)
    params_cell = lambda p: next(c for c in json.loads(p.read_text())["cells"]
                                 if "parameters" in c["metadata"].get("tags", []))
    assert params_cell(nb_dir / f"{doc.notebook}.ipynb") == params_cell(nb_dir / doc.template)
    # 4. parameters: full's section, quick's grid
    with open(proj / "params" / "full.yaml", "a") as fh:
        fh.write(doc.full_yaml)
    with open(proj / "params" / "quick.yaml", "a") as fh:
        fh.write(doc.quick_yaml + "\n")
    # 5. the range check
    add_to_set(proj / "recsys_lib" / "params.py", doc.range_set, doc.range_key)

    env = {k: v for k, v in os.environ.items() if k not in ("RECSYS_NOTEBOOKS_DIR", "PYTHONPATH")}
    env.update({"PYTHONPATH": str(proj), "RECSYS_DATA_DIR": str(tmp_path / "data"),
                "RECSYS_REPORTS_DIR": str(tmp_path / "reports"), "PYTHONUNBUFFERED": "1",
                "RECSYS_TORCH_THREADS": os.environ.get("RECSYS_TORCH_THREADS", "1")})
    py = sys.executable

    # "Check it before any run": the doc's parameter command accepts the new section's keys
    args = doc.check_cmd.split()[1:]                   # drop the doc's .venv/bin/python
    assert args[:2] == ["-m", "recsys_lib"], doc.check_cmd
    ok = run([py, *args], proj, env, 300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"{NAME}.half_life_days" in ok.stdout and f"{NAME}.positives_only" in ok.stdout, ok.stdout[-3000:]

    # stage 1 of the pipeline, in the copy, as a user runs it
    stems = [p.stem for p in sorted(nb_dir.glob("[0-9][0-9]_*.ipynb")) if p.stem <= "17_blend"]
    assert doc.notebook in stems and stems[-1] == "17_blend", stems
    done = run([py, "-m", "recsys_lib.pipeline", "--dataset", "synthetic-tiny", "--profile", "quick",
                "--timeout", "600", "--only", *stems], proj, env, 1200)
    run_dir = tmp_path / "data" / "runs" / "synthetic-tiny" / "quick"
    failed = [l for l in done.stdout.splitlines() if " FAILED " in l]
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*.log"))
                   if any(p.stem in l for l in failed))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:] + logs
    started = [l.split()[1] for l in done.stdout.splitlines() if l.startswith("[pipeline]") and l.endswith(" ...")]
    assert started == stems, done.stdout[-4000:]      # 16_itempop_recent before 16_sasrec and 17_blend

    # the kernels ran the copy: the original registry has no itempop_recent
    record = json.loads((run_dir / "state" / f"{doc.notebook}.json").read_text())
    assert f"recsys_lib.models.{NAME}" in record["modules"], sorted(record["modules"])

    # the results: valid and test nDCG@10, on the same test users as every other model
    metrics = {p.stem: json.loads(p.read_text()) for p in (run_dir / "metrics").glob("*.json")}
    toy = metrics[NAME]
    assert toy["model"] == NAME and set(toy["params"]) >= {"half_life_days", "positives_only"}
    for period in ("valid", "test"):
        s = toy[period]
        assert 0.0 <= s["ndcg@10"] <= 1.0 and s["users"] > 0, (period, s)
        lo, hi = s["ndcg@10_ci"]
        assert lo <= s["ndcg@10"] <= hi
    assert {m["test"]["users"] for m in metrics.values()} == {toy["test"]["users"]}, \
        {n: m["test"]["users"] for n, m in metrics.items()}
    import pandas as pd
    users = {n: set(pd.read_parquet(run_dir / "per_user" / f"{n}-test.parquet")["user"]) for n in metrics}
    assert all(u == users[NAME] for u in users.values()), "every model is scored on the same test users"

    # the blend: the toy is a member, found in the registry with no edit to the blend's code
    members = metrics["blend"]["params"]["members"]
    assert NAME in members, members
    assert set(members) | {"blend"} == set(metrics), sorted(metrics)    # every stage-1 model, no other

    # with the copy's library (one process): the results table, step 5's range check, the house test
    checked = run([py, "-c", CHECKS, str(run_dir), f"{NAME}.{doc.range_key}=0",
                   str(ROOT / "tests" / "unit" / "test_house.py")], proj, env, 300)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    out = json.loads(checked.stdout.strip().splitlines()[-1])
    assert Path(out["lib"]).resolve().is_relative_to(proj.resolve()), out["lib"]
    assert NAME in out["models"] and "blend" in out["models"] and "nDCG@10 [95% CI]" in out["columns"], out
    assert out["users"] == toy["test"]["users"], out
    assert "must be above 0" in out["refused"], out["refused"]

    # the copy differs from the originals by the doc's files only; the blend's code is untouched
    now = tree_hashes(proj)
    added = sorted(set(now) - set(original))
    edited = sorted(k for k in set(now) & set(original) if now[k] != original[k])
    assert added == [f"notebooks/{doc.notebook}.ipynb", f"recsys_lib/models/{NAME}.py"], added
    assert edited == ["params/full.yaml", "params/quick.yaml", "recsys_lib/models/registry.py",
                      "recsys_lib/params.py"], edited
    assert not set(original) - set(now)
    for rel, data in originals.items():
        assert (proj / rel).read_bytes() == data, f"{rel} was edited"
