"""Each re-ranker kind's configuration: the fields it reads, and no other.

A params ``reranker:`` section names variants: a kind (``lgbm``) or a configuration of a kind
(``{name: lgbm_leaves7, variant: lgbm, num_leaves: 7}``). `from_params` builds a variant's config
from the section's ``k_eval``, then the kind's own sub-section (``reranker.lgbm``), then the
variant's keys; a key the kind does not read is an error, not silently dropped (``id_mlp`` is
always BPR: it has no ``loss``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from ...errors import ConfigError


@dataclass
class RerankerConfig:
    """What every kind reads."""

    variant: str = ""                # the kind: id_mlp | mlp_features | lgbm
    name: str = ""                   # the variant's label in tables and file names ("" = variant)
    seed: int = 42                   # initialisation, negative sampling, LightGBM
    k_eval: int = 10                 # held-out nDCG@k_eval picks epochs / trees (and the variant)

    @property
    def label(self) -> str:
        return self.name or self.variant


@dataclass
class MLPConfig(RerankerConfig):
    """What the torch kinds read."""

    hidden: list[int] = field(default_factory=lambda: [256, 128])  # MLP widths before the output unit
    dropout: float = 0.3             # dropout after each hidden layer
    epochs: int = 20                 # maximum epochs
    patience: int = 3                # epochs without held-out improvement before stopping
    lr: float = 1e-3                 # Adam learning rate
    weight_decay: float = 0.0        # Adam weight decay
    negatives: int = 4               # bpr: sampled negative candidates per positive
    batch_size: int = 512            # bpr: positives per step


@dataclass
class IdMLPConfig(MLPConfig):
    """``id_mlp``, the design we start from: trained with BPR, as the design trains it."""

    variant: str = "id_mlp"
    emb_dim: int = 32                # user / genre / year / tag embedding size
    loss: ClassVar[str] = "bpr"      # not a parameter


@dataclass
class FeatureMLPConfig(MLPConfig):
    """``mlp_features``: pairwise (bpr) or listwise (softmax over each user's candidates)."""

    variant: str = "mlp_features"
    loss: str = "bpr"                # bpr | softmax
    users_per_batch: int = 32        # softmax: candidate lists per step


@dataclass
class LGBMConfig(RerankerConfig):
    """``lgbm``: LightGBM LambdaRank, deterministic."""

    variant: str = "lgbm"
    n_estimators: int = 300          # maximum boosting rounds
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 20
    early_stopping_rounds: int = 30  # rounds without held-out improvement
    num_threads: int = 2             # LightGBM threads (deterministic=True)
    drop_features: list[str] = field(default_factory=list)  # columns or groups left out (ablations)


#: kind -> its config class
CONFIGS: dict[str, type[RerankerConfig]] = {"id_mlp": IdMLPConfig, "mlp_features": FeatureMLPConfig,
                                            "lgbm": LGBMConfig}
VARIANTS = tuple(CONFIGS)
MLP_KINDS = ("id_mlp", "mlp_features")       # the kinds trained with torch (torchrun can share them out)
SECTION_KEYS = ("k_eval",)                   # keys of the ``reranker:`` section every variant reads


def kind_of(variant: "str | dict") -> str:
    """The kind a variant entry names (``lgbm`` or ``{..., variant: lgbm}``)."""
    return variant if isinstance(variant, str) else variant.get("variant", "")


def config_class(kind: str) -> type[RerankerConfig]:
    if kind not in CONFIGS:
        renamed = " (the variant called seed is now id_mlp)" if kind == "seed" else ""
        raise ConfigError(f"unknown re-ranker variant {kind!r}; one of {VARIANTS}{renamed}")
    return CONFIGS[kind]


def from_params(section: dict, variant: "str | dict", seed: int | None = None) -> RerankerConfig:
    """Config of ``variant`` from the params ``reranker:`` section: its ``k_eval``, the kind's
    sub-section, then the variant's own keys (see the module docstring)."""
    spec = {"variant": variant} if isinstance(variant, str) else dict(variant)
    kind = spec.pop("variant", "")
    cls = config_class(kind)
    names = {f.name for f in fields(cls)} - {"variant"}
    label = spec.get("name") or kind
    sub = dict((section or {}).get(kind) or {})
    for where, keys in ((f"reranker.{kind}", sub), (f"re-ranker variant {label!r}", spec)):
        unknown = sorted(set(keys) - names)
        if unknown:
            raise ConfigError(f"{where}: {kind} has no parameter(s) {unknown}; valid: {sorted(names)}")
    kw = {k: (section or {})[k] for k in SECTION_KEYS if k in (section or {})}
    kw.update(sub)
    kw.update(spec)
    if seed is not None:
        kw["seed"] = seed
    return cls(**kw)
