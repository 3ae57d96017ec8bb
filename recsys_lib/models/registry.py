"""The one registry of single-stage models: name -> class, config, tune function and the notebook
that fits it. Everything that needs a model by name (loading a checkpoint as a candidate source or
a re-ranker feature, checking a ``--set`` key, a torchrun worker's search, an error naming the
notebook to run first) looks it up here."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """One model's entry. The model's module is imported on first use of ``cls``, ``config`` or
    ``tune``, not when the registry is: a notebook's kernel then loads only the model modules it
    uses, and the pipeline's resume (`run.state`) reruns a notebook only when one of those changed."""

    module: str              # the module under recsys_lib.models ("ease")
    class_name: str          # the Recommender (``cls.load(path, device)`` reads its checkpoint)
    config_name: str         # its config dataclass (a params section's keys are its fields)
    notebook: str            # the pipeline notebook that fits and records it

    def _attr(self, name: str) -> Any:
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


REGISTRY: dict[str, ModelSpec] = {
    "popularity": ModelSpec("popularity", "Popularity", "PopularityConfig", "10_popularity"),
    "mf": ModelSpec("mf", "MF", "MFConfig", "11_mf"),
    "neumf": ModelSpec("neumf", "NeuMF", "NeuMFConfig", "12_neumf"),
    "ease": ModelSpec("ease", "EASE", "EASEConfig", "13_ease"),
    "ials": ModelSpec("ials", "IALS", "IALSConfig", "14_ials"),
    "transition": ModelSpec("transition", "Transition", "TransitionConfig", "15_transition"),
    "sasrec": ModelSpec("sasrec", "SASRec", "SASRecConfig", "16_sasrec"),
    "two_tower": ModelSpec("two_tower", "TwoTower", "TwoTowerConfig", "20_two_tower"),
}


def spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; ConfigError listing the known models otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}; one of {sorted(REGISTRY)}")
    return REGISTRY[name]
