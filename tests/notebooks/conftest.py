"""A report built by the pipeline, shared by the notebook tests that only read it.

``built_report`` runs the whole pipeline once per session on the tiny synthetic set with the
`quick` profile (as tests/notebooks/test_pipeline.py's ``report`` fixture does), with the data
and reports folders in a temporary directory. The environment is restored as soon as the
pipeline has run, so the tests that follow see their own settings."""
import pytest

from recsys_lib import pipeline


@pytest.fixture(scope="session")
def built_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_report")
    mp = pytest.MonkeyPatch()
    mp.setenv("RECSYS_DATA_DIR", str(root / "data"))
    mp.setenv("RECSYS_REPORTS_DIR", str(root / "reports"))
    try:
        index = pipeline.run_pipeline("synthetic-tiny", "quick", timeout=600)
    finally:
        mp.undo()
    return index
