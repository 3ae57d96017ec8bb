"""Stage 1's outputs as stage 2 takes them: the retriever and the baselines' checkpoints, and the
candidate lists (20_two_tower writes them). Kept apart from `system` (features, the re-ranker's
fit) so that 20_two_tower's kernel loads neither: an edit to the features reruns the re-ranker,
not the retriever (the pipeline's stage-aware resume follows the modules a notebook loads)."""
from __future__ import annotations

import time

from . import candidates as cand
from .. import config
from ..models.registry import spec
from ..models.two_tower import TwoTower, history_len_needed
from ..run.experiment import Run
from ..run.layout import notebook_of


def load_retriever(run: Run):
    return TwoTower.load(run.require("models", "two_tower.pt", stage="20_two_tower"), device=str(run.device))


def load_baselines(run: Run, names: list[str]) -> dict:
    """Fitted baselines (from their notebooks' checkpoints): candidate sources or scorers whose
    scores become re-ranker features. A missing checkpoint is an error naming the notebook to run
    first: a silently skipped source would change the candidates and the features."""
    out = {}
    for name in names:
        path = run.require("models", f"{name}.pt", stage=notebook_of(name))
        out[name] = spec(name).cls.load(path, device=str(run.device))
    return out


def write_candidates(run: Run, retriever, sources: dict) -> dict:
    """Write ``candidates/{valid,test}.parquet``: the retriever's top ``two_tower.candidate_k``
    unseen items per user, joined (union) by each of ``sources``' own top ``candidate_k`` (stage-1
    models fit on train, like the retriever). Validation candidates come from histories up to the
    validation period, test candidates from histories that include the validation rows.
    Also writes ``candidates/timing.json`` and ``candidates/recall.json`` (validation and test
    Recall@K of each source and of the union); returns the recall."""
    section = run.params["two_tower"]
    k, history_len = int(section["candidate_k"]), history_len_needed(section)
    timing, recall = {}, {}
    for period in ("valid", "test"):
        labels = run.evaluator(period, history_len=history_len).labels
        t0 = time.perf_counter()
        c = cand.generate_candidates(retriever, labels, k=k, progress=True)
        c = cand.add_sources(c, retriever, sources, labels.ctx, k=k) if sources else c
        timing[period] = time.perf_counter() - t0
        cand.save_candidates(c, run.path("candidates", f"{period}.parquet"))
        recall[period] = cand.source_recall(c, labels, [x for x in run.eval.ks if x <= k])
        print(f"{period}: {c['user'].nunique()} users, {len(c):,} candidates ({len(c) / c['user'].nunique():.0f} "
              f"a user) from {cand.source_names(c)} in {timing[period]:.1f}s")
    config.write_json(run.path("candidates", "timing.json"), timing)
    config.write_json(run.path("candidates", "recall.json"), recall)
    return recall
