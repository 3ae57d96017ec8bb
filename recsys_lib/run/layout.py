"""The pipeline's notebooks, in order, and which one fits each model: the study's table of contents.

Notebooks are ``notebooks/NN_name.ipynb`` (``RECSYS_NOTEBOOKS_DIR`` points elsewhere: tests run a
subset); 0x data, 1x single-stage models, 2x retrieval, 3x re-ranking, 4x-5x evaluation, 90 the
report. A model's notebook comes from the model registry (`models.registry`)."""
from __future__ import annotations

from pathlib import Path

from .. import config
from ..errors import PipelineError
from ..models.registry import REGISTRY

#: the notebook that fits and records the two-stage systems (``two_stage``, ``two_stage_<variant>``)
RERANKER_NOTEBOOK = "30_reranker"
#: the notebook that blends the single-stage models fit before it (``blend``)
BLEND_NOTEBOOK = "17_blend"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The pipeline's notebooks in order (``NN_name.ipynb``), optionally a subset by prefix/name."""
    found = sorted(p for p in config.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(p.stem == o or p.stem.startswith(o) for o in only)]
        if not found:
            raise PipelineError(f"--only {only} matches no notebook in {config.notebooks_dir()}")
    return found


def notebook_of(model: str) -> str:
    """The notebook that fits ``model`` (``ease`` -> ``13_ease``), for errors that say what to run."""
    if model == "two_stage" or model.startswith("two_stage_"):
        return RERANKER_NOTEBOOK
    if model == "blend":
        return BLEND_NOTEBOOK
    return REGISTRY[model].notebook if model in REGISTRY else f"the notebook of {model}"
