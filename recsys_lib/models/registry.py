"""The one registry of every recorded model: name -> its role, the notebook that records it and,
where it has one, its class, config and tune function. Everything that needs a model by name
(loading a checkpoint as a candidate source or a re-ranker feature, checking a ``--set`` key, the
blend's members, a torchrun worker's search, the report's single-stage models, an error naming the
notebook to run first) reads it here.

Roles (`ROLES`): ``single_stage`` (the baselines), ``retriever`` (the two-tower: scored like a
baseline, it proposes the candidates), ``blend`` (the weighted blend of its declared members),
``two_stage`` (the chosen re-ranker over the candidates, ``two_stage``, and every other re-ranker
variant, ``two_stage_<variant>``) and ``ablation`` (the two-stage system less one stage). A model
joins the blend because its entry says so (``in_blend``), never because of where its notebook
sorts; `blend_members` checks that each member's notebook runs before the blend's."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError


#: what a recorded model is (module docstring)
ROLES = ("single_stage", "retriever", "blend", "two_stage", "ablation")


@dataclass(frozen=True)
class ModelSpec:
    """One model's entry. The model's module is imported on first use of ``cls``, ``config`` or
    ``tune``, not when the registry is: a notebook's kernel then loads only the model modules it
    uses, and the pipeline's resume (`run.state`) reruns a notebook only when one of those changed.
    Entries above the models layer (the two-stage systems, the ablations: `stage2`) name no class:
    the registry must not import upwards."""

    module: str | None       # the module under recsys_lib.models ("ease"); None above this layer
    class_name: str | None   # the Recommender (``cls.load(path, device)`` reads its checkpoint)
    config_name: str | None  # its config dataclass (a params section's keys are its fields)
    notebook: str            # the pipeline notebook that fits and records it
    role: str = "single_stage"   # one of ROLES
    in_blend: bool = False   # a default member of the blend (``blend.members`` in params overrides)
    worker: bool = False     # `python -m recsys_lib.worker NAME` can search it from a run folder
    variants: bool = False   # records named ``<name>_<variant>`` are this model's variants
    section: str | None = None   # its params section, when not its name (the two-stage system: reranker)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConfigError(f"ModelSpec role {self.role!r}: one of {ROLES}")

    def _attr(self, name: str) -> Any:
        if self.module is None:
            raise ConfigError(f"the {self.role} entry of notebook {self.notebook} has no model class here "
                              "(it is built above the models layer, in recsys_lib.stage2)")
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), name)

    @property
    def cls(self) -> type:
        return self._attr(self.class_name)

    @property
    def config(self) -> type:
        return self._attr(self.config_name)

    @property
    def tune(self) -> Callable[..., Any]:
        """tune(data, section, validate, device, seed) -> (model, search table)"""
        return self._attr("tune")


def _baseline(module: str, cls: str, notebook: str, **kw) -> ModelSpec:
    return ModelSpec(module, cls, f"{cls}Config", notebook, **kw)


REGISTRY: dict[str, ModelSpec] = {
    "popularity": _baseline("popularity", "Popularity", "10_popularity", in_blend=True),
    "mf": _baseline("mf", "MF", "11_mf", in_blend=True, worker=True),
    "neumf": _baseline("neumf", "NeuMF", "12_neumf", in_blend=True, worker=True),
    "ease": _baseline("ease", "EASE", "13_ease", in_blend=True),
    "ials": _baseline("ials", "IALS", "14_ials", in_blend=True),
    "transition": _baseline("transition", "Transition", "15_transition", in_blend=True),
    "sasrec": _baseline("sasrec", "SASRec", "16_sasrec", in_blend=True),
    "blend": ModelSpec("blend", "Blend", "BlendConfig", "17_blend", role="blend"),
    "two_tower": _baseline("two_tower", "TwoTower", "20_two_tower", role="retriever", worker=True),
    "two_stage": ModelSpec(None, None, None, "30_reranker", role="two_stage", variants=True, section="reranker"),
    "two_stage_no_two_tower": ModelSpec(None, None, None, "35_ablations", role="ablation", section="reranker"),
    "two_stage_no_reranker": ModelSpec(None, None, None, "35_ablations", role="ablation", section="reranker"),
}


def names(*roles: str) -> list[str]:
    """The registered names with one of ``roles`` (every name when none is given), in registry order."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ConfigError(f"unknown role(s) {sorted(unknown)}; one of {ROLES}")
    return [n for n, s in REGISTRY.items() if not roles or s.role in roles]


def record_spec(name: str) -> ModelSpec | None:
    """The entry a recorded model's name belongs to: its own, else the entry whose variants it is
    (``two_stage_lgbm`` -> ``two_stage``); None for a name the registry does not know."""
    if name in REGISTRY:
        return REGISTRY[name]
    owners = [n for n, s in REGISTRY.items() if s.variants and name.startswith(f"{n}_")]
    return REGISTRY[max(owners, key=len)] if owners else None


def role_of(name: str) -> str | None:
    """The role of a recorded model's name (`record_spec`); None when the registry does not know it."""
    found = record_spec(name)
    return found.role if found else None


def blend_members() -> list[str]:
    """The blend's default members, as declared (``in_blend``), each fit by a notebook that runs
    before the blend's: a member fit later would have no checkpoint when the blend is fit, so that
    is a ConfigError naming the fix rather than a member silently left out."""
    blend_notebook = REGISTRY["blend"].notebook
    members = [n for n, s in REGISTRY.items() if s.in_blend]
    late = [f"{n} ({REGISTRY[n].notebook})" for n in members if REGISTRY[n].notebook >= blend_notebook]
    if late:
        raise ConfigError(f"blend members fit after {blend_notebook}: {late}; number their notebooks below "
                          f"{blend_notebook[:2]} or drop in_blend")
    return members


def spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; ConfigError listing the known models otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}; one of {sorted(REGISTRY)}")
    return REGISTRY[name]
