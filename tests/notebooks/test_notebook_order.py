"""A notebook opened in JupyterLab and run top to bottom with its default parameters, from
notebooks/, before the notebooks it depends on have run: its first cell that needs a missing file
stops with an error naming the notebook to run first. Each runs here with nbclient, as JupyterLab
would (no parameters injected), in an empty data folder."""
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from recsys_lib import config, pipeline
from recsys_lib.run import layout


def _first_source() -> str:
    """The notebook of the retriever's first candidate source under the default parameters (the
    retriever's notebook checks its sources before it trains), else 01_split."""
    sources = config.load_params("full", "synthetic")["two_tower"].get("candidate_sources") or []
    return layout.notebook_of(sources[0]) if sources else "01_split"


#: notebook -> the notebook its first missing file names
FIRST = {"10_popularity": "01_split", "20_two_tower": _first_source(), "30_reranker": "20_two_tower",
         "40_evaluation": "30_reranker", "90_report": "01_split"}


@pytest.mark.slow
@pytest.mark.parametrize("name, first", FIRST.items())
def test_a_notebook_run_too_early_names_the_notebook_to_run_first(name, first, tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RECSYS_REPORTS_DIR", str(tmp_path / "reports"))
    nb = nbformat.read(config.NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name=pipeline.ensure_kernel(),
                            resources={"metadata": {"path": str(config.NOTEBOOKS_DIR)}})
    with pytest.raises(CellExecutionError) as info:
        client.execute()
    message = str(info.value)
    assert "PipelineError" in message and f"run {first} first" in message, message[-2000:]
    ran = [c for c in nb.cells if c.cell_type == "code" and c.get("execution_count")]
    failed = next(c for c in ran if any(o.get("output_type") == "error" for o in c.outputs))
    assert "parameters" not in failed.metadata.get("tags", []), "the defaults themselves must run"
    assert not (tmp_path / "data" / "raw").exists(), "a notebook run too early must not fetch data"


@pytest.mark.slow
def test_default_parameters_name_the_default_run_folder():
    """The parameters cell's defaults are the pipeline's shared keys, so the same notebook runs
    under papermill and, untouched, in JupyterLab."""
    for path in layout.notebooks():
        nb = nbformat.read(path, as_version=4)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, path.name
        for key in ("DATASET", "PROFILE", "RUN_DIR", "SEED", "DEVICE", "OVERRIDES", "FORCE"):
            assert f"\n{key} = " in "\n" + cells[0].source, (path.name, key)
        assert nb.metadata["kernelspec"]["language"] == "python", path.name
