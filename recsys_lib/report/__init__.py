"""What the reader sees: comparisons, tables, words and figures, each computed from a run folder.

- `analysis`: paired bootstrap tables, the strongest single-stage model, user segments, hit popularity;
- `tables`: every table as formatted text (results, paired differences, tuning, timings, ...);
- `text`: the abstract, the headline, captions and the provenance footer;
- `audit`: the leakage audit in words;
- `plots`: the figures;
- `render`: executed notebooks -> offline HTML, and the report's metrics.json;
- `browser_check`: the rendered report in headless Chromium (``make report-check``).

The notebooks read it as one facade (``report.results_frame(...)``, ``report.abstract(...)``).
"""
from .tables import (DASH, RESULT_METRICS, ci_frame, dataset_frame, dataset_summary, fmt_ci, fmt_count, fmt_metric,
                     fmt_p, fmt_percent, fmt_seconds, learning_curve_data, metric_label, paired_frame, readme_table,
                     results_frame, scored_users, search_points, split_frame, split_table, stage_seconds, table_html,
                     tidy, timing_frame, tuning_table)
from .text import Captions, abstract, figure_png, headline, missing, provenance, verdict

__all__ = ["DASH", "RESULT_METRICS", "ci_frame", "dataset_frame", "dataset_summary", "fmt_ci", "fmt_count",
           "fmt_metric", "fmt_p", "fmt_percent", "fmt_seconds", "learning_curve_data", "metric_label",
           "paired_frame", "readme_table", "results_frame", "scored_users", "search_points", "split_frame",
           "split_table", "stage_seconds", "table_html", "tidy", "timing_frame", "tuning_table", "Captions",
           "abstract", "figure_png", "headline", "missing", "provenance", "verdict"]
