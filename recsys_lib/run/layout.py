"""The pipeline's notebooks, in order, and which one fits each model: the study's table of contents.

Notebooks are ``notebooks/NN_name.ipynb`` (``RECSYS_NOTEBOOKS_DIR`` points elsewhere: tests run a
subset); 0x data, 1x single-stage models, 2x retrieval, 3x re-ranking, 4x-5x evaluation, 90 the
report. A model's notebook comes from the model registry (`models.registry`)."""
from __future__ import annotations

from pathlib import Path

from .. import config
from ..errors import PipelineError
from ..models.registry import REGISTRY, record_spec

#: the notebook that fits and records the two-stage systems (``two_stage``, ``two_stage_<variant>``)
RERANKER_NOTEBOOK = REGISTRY["two_stage"].notebook
#: the notebook that blends the single-stage models declared its members (``blend``)
BLEND_NOTEBOOK = REGISTRY["blend"].notebook


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The pipeline's notebooks in order (``NN_name.ipynb``), optionally a subset by prefix/name."""
    found = sorted(p for p in config.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(p.stem == o or p.stem.startswith(o) for o in only)]
        if not found:
            raise PipelineError(f"--only {only} matches no notebook in {config.notebooks_dir()}")
    return found


def notebook_of(model: str) -> str:
    """The notebook that fits ``model`` (``ease`` -> ``13_ease``, ``two_stage_lgbm`` -> ``30_reranker``),
    for errors that say what to run."""
    found = record_spec(model)
    return found.notebook if found else f"the notebook of {model}"
