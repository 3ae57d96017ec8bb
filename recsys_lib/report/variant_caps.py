"""Whether a model tuned by comparing named variants (the two-tower retriever, the re-ranker) kept
the last epoch or boosting round its chosen variant was allowed: the tuning table's "at edge" for
those rows, which `tables.tuning_table` leaves at "n/a (named variants)".

A grid-searched model's record carries ``tuning.epoch_cap``; a variant's does not, so a binding cap
on the retriever or the re-ranker went unflagged (the demo's retriever kept epoch 10 of 10 with its
validation Recall@500 still rising). The cap is read from the run's parameters (``Run.params``, with
each variant's overrides; not ``run.json``, which keeps the parameters of the split's notebook, so a
later change to ``two_tower`` that reran only 20 is not in it) and compared with the best epoch or
round its search rows record.

Only the report (90) loads this module, so the stage-aware resume reruns only the report when it
changes: `tables` is loaded by every notebook's kernel.
"""
from __future__ import annotations

import os
from typing import Any

from ..run.experiment import collect_metrics

NAMED_VARIANTS = "n/a (named variants)"
MLP_CAP, LGBM_CAP = "epochs", "n_estimators"


def variant_cap(section: dict, entry: Any, cap_key: str | None = None) -> tuple[str, int | None, str]:
    """(label, cap, unit) of one entry of a ``variants`` list: a kind's name (``"lgbm"``) or a
    dict naming a configuration of a kind (``{name: lgbm_lr02, variant: lgbm, n_estimators: 600}``).
    The cap is the entry's own value, else its kind's sub-section's, else the section's; ``unit``
    says what it counts (``epochs`` or ``rounds``)."""
    if isinstance(entry, str):
        kind, name, own = entry, entry, {}
    else:
        kind = entry.get("variant", entry.get("name"))
        name, own = entry.get("name", kind), entry
    key = cap_key or (LGBM_CAP if kind == "lgbm" else MLP_CAP)
    sub = section.get(kind) if isinstance(section.get(kind), dict) else {}
    cap = own.get(key, sub.get(key, section.get(key)))
    return str(name), (int(cap) if cap is not None else None), ("rounds" if key == LGBM_CAP else "epochs")


def _chosen(search: list[dict]) -> dict | None:
    return next((r for r in search if r.get("chosen") or r.get("best")), None)


def _best_values(row: dict) -> list[int]:
    v = row.get("best_epoch", row.get("best_epoch_or_round"))
    vals = v if isinstance(v, list) else [v]
    return [int(x) for x in vals if x is not None and x == x]


def cap_flag(search: list[dict], section: dict) -> str | None:
    """The "at edge" text of a named-variant search: ``epochs (best = cap 15)`` when the chosen
    variant's best epoch is its cap, ``rounds (best = cap 300 in 2 of 5 folds)`` when some of a
    cross-fitted variant's fold models kept their last round, ``no`` when none did; None when the
    search or the cap is not recorded (the table keeps "n/a (named variants)")."""
    row = _chosen(search)
    if row is None or not section:
        return None
    label = row.get("name", row.get("variant"))
    entry = next((v for v in section.get("variants", [])
                  if (v if isinstance(v, str) else v.get("name", v.get("variant"))) == label), None)
    if entry is None:
        return None
    _, cap, unit = variant_cap(section, entry)
    best = _best_values(row)
    if cap is None or not best:
        return None
    at_cap = sum(b >= cap for b in best)
    if not at_cap:
        return "no"
    folds = f" in {at_cap} of {len(best)} folds" if len(best) > 1 else ""
    return f"{unit} (best = cap {cap}{folds})"


def flag_variant_caps(table: "pd.DataFrame", run_dir: str | os.PathLike, params: dict) -> "pd.DataFrame":
    """``table`` (`report.tuning_table`) with each named-variant row's "at edge" set by `cap_flag`
    from the run's parameters ``params``: the retriever's from ``two_tower``, the re-ranker's from
    ``reranker``."""
    sections = {"two_tower": params.get("two_tower") or {}, "two_stage": params.get("reranker") or {}}
    flags = {}
    for m in collect_metrics(run_dir):
        name = m.get("model")
        if name in sections and m.get("search"):
            flag = cap_flag(m["search"], sections[name])
            if flag is not None:
                flags[name] = flag
    if table.empty or "at edge" not in table:
        return table
    out = table.copy()
    named = out["at edge"] == NAMED_VARIANTS
    out.loc[named, "at edge"] = [flags.get(m, NAMED_VARIANTS) for m in out.loc[named, "model"]]
    return out
