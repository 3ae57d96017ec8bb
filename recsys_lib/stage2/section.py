"""The params ``reranker:`` section, typed: every stage-2 option and its default, once.

Each kind's own parameters live in its sub-section (``reranker.lgbm``, ...) and are checked by
that kind's config (`rerankers.config`); this is the rest: which variants are compared, how they
are chosen, and what they learn from.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from .rerankers.config import VARIANTS, config_class, kind_of

#: the stage-1 models whose scores of a candidate are re-ranker features, when the params name none
SCORERS = ("ease", "mf", "ials")


@dataclass
class RerankerSection:
    variants: list = field(default_factory=lambda: list(VARIANTS))   # kinds or {name, variant, ...} dicts
    extra_scorers: list[str] = field(default_factory=lambda: list(SCORERS))  # stage-1 scores as features
    recent_items: list[int] = field(default_factory=list)  # N: EASE/iALS scores from a user's last N rows
    label_window: float | None = None  # 25_label_window: the last share of train as extra lists (lgbm)
    stale_lists: float | None = None   # 25_label_window: train on validation lists of stage 1 refit
                                       # before the same share of train (LightGBM only)
    folds: int = 5                     # cross-fitting folds over validation users (at least 2)
    k_eval: int = 10                   # out-of-fold nDCG@k_eval picks epochs / trees and the variant
    id_mlp: dict = field(default_factory=dict)        # each kind's own parameters (its config's fields)
    mlp_features: dict = field(default_factory=dict)
    lgbm: dict = field(default_factory=dict)

    @classmethod
    def from_params(cls, section: dict | None) -> "RerankerSection":
        """The section with its defaults filled in; an unknown key, a variant of no known kind or
        fewer than 2 folds is a ConfigError naming it."""
        section = dict(section or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - names)
        if unknown:
            raise ConfigError(f"reranker: unknown parameter(s) {unknown}; valid: {sorted(names)}")
        out = cls(**section)
        for v in out.variants:
            config_class(kind_of(v))
        if int(out.folds) < 2:
            raise ConfigError(f"reranker.folds must be at least 2 (cross-fitting), got {out.folds}")
        return out

    @classmethod
    def options(cls, section: dict | None, *keys: str) -> "RerankerSection":
        """The section with only ``keys`` read from the params (the rest at their defaults). A
        notebook that needs a few options (25_label_window) then depends on those alone, and a
        change to ``reranker.lgbm`` does not rerun it (`run.state`); the pipeline has checked the
        whole section before any kernel started."""
        section = {} if section is None else section       # not `or`: truth reads the whole section
        return cls.from_params({k: section[k] for k in keys if k in section})

    @property
    def kinds(self) -> set[str]:
        return {kind_of(v) for v in self.variants}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
