"""The re-ranker interface every kind implements, and its one file format.

A fitted re-ranker scores candidate rows: ``score(inputs)`` -> (n_rows,) scores of
``inputs.cands`` (higher is better). Each kind subclasses `Reranker` with a ``kind`` (recorded in
the saved file; a subclass with a kind registers itself, so `load` needs no table of classes),
``score``, ``_state`` / ``_from_state`` (its part of the file) and, for single models, ``fit``.
"""
from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ...config import atomic_write
from ...models.train import load_checkpoint
from ..inputs import StageInputs
from .config import RerankerConfig, config_class


class Reranker:
    """A fitted re-ranker of one kind (see the module docstring)."""

    kind: ClassVar[str] = ""
    kinds: ClassVar[dict[str, type["Reranker"]]] = {}     # every kind a file may hold

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if cls.kind:
            Reranker.kinds[cls.kind] = cls

    def __init__(self, cfg: RerankerConfig, feature_names: list[str] | None = None, info: dict | None = None):
        self.cfg = cfg
        self.feature_names = list(feature_names or [])
        self.info: dict = info or {}

    @property
    def variant(self) -> str:
        return self.cfg.variant

    @property
    def label(self) -> str:
        return self.cfg.label

    def score(self, inputs: StageInputs) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def _features(self, inputs: StageInputs) -> np.ndarray:
        """``inputs.X``, checked against the columns this model was trained on."""
        X = inputs.X
        if X is None or X.shape != (len(inputs.cands), len(self.feature_names)) \
                or list(inputs.names) != self.feature_names:
            raise ValueError(f"{self.variant} re-ranker needs X of shape ({len(inputs.cands)}, "
                             f"{len(self.feature_names)}) with columns {self.feature_names}; got "
                             f"{None if X is None else X.shape} with columns {inputs.names}")
        return X

    # ------------------------------------------------------------ persistence
    def _state(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def _from_state(cls, cfg: RerankerConfig, blob: dict) -> "Reranker":  # pragma: no cover - interface
        raise NotImplementedError

    def to_blob(self) -> dict:
        """Everything needed to rebuild the model, as one picklable dict with its ``kind``."""
        return {"kind": self.kind, "config": asdict(self.cfg), "feature_names": self.feature_names,
                "info": self.info, **self._state()}

    @classmethod
    def from_blob(cls, blob: dict) -> "Reranker":
        """The model of ``blob["kind"]`` (any kind when called on `Reranker`)."""
        kind = blob.get("kind")
        if kind not in Reranker.kinds:
            raise ValueError(f"not a re-ranker of a known kind: {kind!r}; one of {sorted(Reranker.kinds)} "
                             "(files from before the kinds were recorded: rerun 30_reranker)")
        cfg_cls = config_class(blob["config"]["variant"])
        names = {f.name for f in fields(cfg_cls)}
        model = Reranker.kinds[kind]._from_state(cfg_cls(**{k: v for k, v in blob["config"].items() if k in names}),
                                                 blob)
        model.info = blob.get("info", {})
        if not isinstance(model, cls):
            raise ValueError(f"the blob holds a {kind} re-ranker, not a {cls.__name__}")
        return model

    def save(self, path: str | Path) -> Path:
        """One torch file (the blob), written atomically; every kind saves the same way."""
        with atomic_write(path) as tmp:
            torch.save(self.to_blob(), tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Reranker":
        """A saved re-ranker of the kind recorded in the file (an ensemble loads as one)."""
        return cls.from_blob(load_checkpoint(path))


def load(path: str | Path) -> Reranker:
    """Load a re-ranker saved by any kind's ``save``: the file's ``kind`` picks the class."""
    return Reranker.load(path)
