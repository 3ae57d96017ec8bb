"""Rendering: executed notebooks -> HTML that opens offline, and the report's metrics.json.

`render_notebook` uses nbconvert's HTMLExporter with our `offline` template (the lab template
without require.js, MathJax or mermaid from a CDN). The reader's report (`index.html`) is the
executed 90_report notebook rendered without code; each notebook also gets its own page with code.
"""
from __future__ import annotations

import os
from pathlib import Path

import nbformat

from .. import config
from ..run.experiment import collect_metrics

TEMPLATES = Path(__file__).with_name("templates")

def render_notebook(ipynb: str | os.PathLike, html: str | os.PathLike, include_code: bool = True) -> Path:
    """Render one executed notebook to a standalone HTML page (atomic write)."""
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    exporter = HTMLExporter(template_name="offline", extra_template_basedirs=[str(TEMPLATES)])
    if not include_code:      # the reader's report: no set-up output (versions, paths)
        exporter.register_preprocessor(TagRemovePreprocessor(remove_cell_tags={"setup", "parameters",
                                                                               "injected-parameters"}), enabled=True)
    exporter.exclude_input = not include_code
    exporter.exclude_input_prompt = not include_code
    exporter.exclude_output_prompt = True
    nb = nbformat.read(str(ipynb), as_version=4)
    nb.metadata.pop("widgets", None)
    body, _ = exporter.from_notebook_node(nb)
    html = Path(html)
    html.parent.mkdir(parents=True, exist_ok=True)
    with config.atomic_write(html) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return html

def notebook_links(report_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """(title, relative href) of each rendered notebook page, in pipeline order."""
    pages = sorted(Path(report_dir, "notebooks").glob("*.html"))
    return [(p.stem, f"notebooks/{p.name}") for p in pages]

def write_metrics_json(run_dir: str | os.PathLike, out: str | os.PathLike, extra: dict | None = None) -> Path:
    """reports/<dataset>/metrics.json: every model's validation and test metrics, with the run's
    parameters, dataset checksums, package versions and git commit."""
    import json
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    payload = {
        "dataset": info.get("dataset"),
        "profile": info.get("profile"),
        "params": info.get("params"),
        "split": info.get("split"),
        "dataset_checksums": info.get("checksums"),
        "git_commit": config.git_commit(),
        "packages": config.package_versions(),
        "machine": _machine(),
        "models": {m["model"]: m for m in collect_metrics(run_dir)},
        **(extra or {}),
    }
    return config.write_json(out, payload)


def _machine() -> dict:
    """The speed figures of the machine that rendered the report (each notebook's record holds the
    index of the machine that ran it: ``run.notebooks``)."""
    from ..run.usage import speed_index
    return speed_index()
