"""The leakage audit's stage-2 pieces (50_leakage_audit; an audit, never a result).

The design we start from trained its re-ranker on every validation user and scored it on those
same users' validation positives. `design_as_run` reproduces that; `in_fold_audit` scores the
study's own cross-fitted re-rankers on the users they trained on, beside the honest numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from ..errors import ConfigError
from ..protocol import guard
from ..protocol.evaluate import Labels, evaluate_ranking
from ..run.experiment import Run, read_json
from . import selection
from .inputs import StageInputs
from .ranking import candidate_labels
from .rerankers import Reranker, from_params, load
from .system import in_fold_ranked, out_of_fold_ranked, ranked


@dataclass
class AuditConfig:
    """The params ``audit:`` section."""

    design_runs: list = field(default_factory=list)   # [epochs, batch size] of each design-as-run fit

    @classmethod
    def from_params(cls, section: dict | None) -> "AuditConfig":
        section = dict(section or {})
        unknown = sorted(set(section) - {"design_runs"})
        if unknown:
            raise ConfigError(f"audit: unknown parameter(s) {unknown}; valid: ['design_runs']")
        out = cls(**section)
        for run in out.design_runs:
            if len(run) != 2 or int(run[0]) < 1 or int(run[1]) < 1:
                raise ConfigError(f"audit.design_runs: each entry is [epochs, batch size], both >= 1; got {run}")
        return out


def design_as_run(run: Run, valid: StageInputs, test: StageInputs, retriever, epochs: int,
                  batch_size: int) -> dict:
    """The leakage audit's re-ranker trained the way the design we start from trains it: the
    ``id_mlp`` network on *every* validation user, a fixed number of epochs at ``batch_size``, no
    held-out users and no early stopping; then scored on those same users' validation positives
    (in-sample), and on the test period. Returns its nDCG@10 in-sample under our protocol (IDCG
    over all of a user's positives), in-sample counting only the positives among the candidates
    (a positive the retriever missed is not counted, as a candidate-level evaluation does), and
    on test."""
    cfg = from_params(run.params["reranker"], "id_mlp", run.seed)
    cfg = replace(cfg, name=f"id_mlp_design_{epochs}x{batch_size}", epochs=int(epochs),
                     batch_size=int(batch_size))
    users = valid.labels.users
    with guard.fitting("reranker_design_as_run", allow=("train", "valid")):
        model = selection.fit_reranker(cfg, valid, run.data, retriever, train_users=users,
                                held_users=np.zeros(0, np.int64))
    top = selection.topk(model, valid, users, k_keep=10)
    in_sample = evaluate_ranking(top, valid.labels, (10,), keep=10).means()["ndcg@10"]
    in_candidates = evaluate_ranking(top, positives_among_candidates(valid), (10,), keep=10).means()["ndcg@10"]
    n_pos = int(model.info["train_positives"])
    return {"re-ranker": cfg.name, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "training positives": n_pos, "optimizer steps": cfg.epochs * -(-n_pos // cfg.batch_size),
            "in-sample valid (protocol IDCG)": float(in_sample),
            "in-sample valid (positives among candidates)": float(in_candidates),
            "honest test": float(ranked(model, test, k_keep=10, ks=(10,)).means()["ndcg@10"]),
            "fit_seconds": float(model.info["fit_seconds"])}


def in_fold_audit(run: Run, valid: StageInputs, stale: StageInputs | None = None) -> list[dict]:
    """Each saved re-ranker (``models/reranker_*.pt``) scored on the validation users it trained on
    (in-fold, the seed protocol), on those it did not (out-of-fold), and its recorded test score.
    With ``stale`` (the stale validation lists it trained on, ``reranker.stale_lists``) the chosen
    one is also scored on those lists: the fresh lists alone understate what it memorised. Only
    nDCG@10 is kept, so lists stop at 10 (each ensemble scoring costs ~10 s at ml-32m sizes)."""
    chosen = json.loads(run.require("metrics", "two_stage.json", stage="30_reranker").read_text())["params"]["reranker"]
    rows = []
    for path in sorted((run.dir / "models").glob("reranker_*.pt")):
        m = load(path)
        label = "two_stage" if chosen == m.label else f"two_stage_{m.label}"
        rows.append({"re-ranker": m.label, "folds": m.folds,
                     "seed protocol: valid users it trained on": _ndcg10(in_fold_ranked, m, valid),
                     "out-of-fold valid users": _ndcg10(out_of_fold_ranked, m, valid),
                     "honest test": read_json(run.dir, "metrics", f"{label}.json")["test"]["ndcg@10"]})
        if stale is not None and label == "two_stage":
            rows[-1]["stale lists it trained on: its users"] = _ndcg10(in_fold_ranked, m, stale)
            rows[-1]["stale lists: out-of-fold users"] = _ndcg10(out_of_fold_ranked, m, stale)
    return rows


def _ndcg10(fold_ranked, model: Reranker, lists: StageInputs) -> float:
    return fold_ranked(model, lists, k_keep=10, ks=(10,)).means()["ndcg@10"]


def positives_among_candidates(inputs: StageInputs) -> Labels:
    """The period's labels less the positives its candidates missed (a candidate-level evaluation)."""
    labels = inputs.labels
    c = inputs.cands[candidate_labels(inputs.cands, labels) > 0]
    row = np.searchsorted(labels.users, c["user"].to_numpy(np.int64))
    pos = sp.csr_matrix((np.ones(len(c), np.float32), (row, c["item"].to_numpy(np.int64))),
                        shape=(len(labels.users), labels.n_items))
    return Labels(period=labels.period, users=labels.users, positives=pos, ctx=labels.ctx, n_items=labels.n_items)
