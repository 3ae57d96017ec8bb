"""The one registry of single-stage models: name -> class, config, tune function and the notebook
that fits it. Everything that needs a model by name (loading a checkpoint as a candidate source or
a re-ranker feature, checking a ``--set`` key, a torchrun worker's search, an error naming the
notebook to run first) looks it up here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError
from . import ease, ials, mf, neumf, popularity, sasrec, transition, two_tower


@dataclass(frozen=True)
class ModelSpec:
    cls: type                # the Recommender (``cls.load(path, device)`` reads its checkpoint)
    config: type             # its config dataclass (a params section's keys are its fields)
    tune: Callable[..., Any]  # tune(data, section, validate, device, seed) -> (model, search table)
    notebook: str            # the pipeline notebook that fits and records it


REGISTRY: dict[str, ModelSpec] = {
    "popularity": ModelSpec(popularity.Popularity, popularity.PopularityConfig, popularity.tune, "10_popularity"),
    "mf": ModelSpec(mf.MF, mf.MFConfig, mf.tune, "11_mf"),
    "neumf": ModelSpec(neumf.NeuMF, neumf.NeuMFConfig, neumf.tune, "12_neumf"),
    "ease": ModelSpec(ease.EASE, ease.EASEConfig, ease.tune, "13_ease"),
    "ials": ModelSpec(ials.IALS, ials.IALSConfig, ials.tune, "14_ials"),
    "transition": ModelSpec(transition.Transition, transition.TransitionConfig, transition.tune, "15_transition"),
    "sasrec": ModelSpec(sasrec.SASRec, sasrec.SASRecConfig, sasrec.tune, "16_sasrec"),
    "two_tower": ModelSpec(two_tower.TwoTower, two_tower.TwoTowerConfig, two_tower.tune, "20_two_tower"),
}


def spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; ConfigError listing the known models otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}; one of {sorted(REGISTRY)}")
    return REGISTRY[name]
