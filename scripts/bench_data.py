"""Benchmark of the data layer at MovieLens-32M scale (``make bench-data``).

1. Generates ``synthetic-32m`` (preset 32m, seed 0) if it is missing, in a subprocess, timing it
   and reading its peak RSS (``resource.getrusage(RUSAGE_CHILDREN)``).
2. Times the first load of ``ratings.csv`` (pyarrow.csv parse + writing the Arrow IPC cache) and
   the cached load, and prints both, the speed-up and the peak RSS, plus the set's shape.
3. Writes the figures to ``data/runs/synthetic-32m/bench_data.json``.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys_lib import config, data  # noqa: E402
from recsys_lib.data import load  # noqa: E402


def _rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0   # Linux: kilobytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="synthetic-32m", help="a synthetic registry name")
    args = ap.parse_args(argv)
    name = args.dataset
    info = data.dataset_info(name)
    path = config.raw_dir(name)
    rows: list[tuple[str, str]] = []
    gen_s = gen_rss = None
    if data.read_marker(path) is None:
        code = (f"from recsys_lib.data import synthetic; "
                f"synthetic.generate({info.preset!r}, seed={info.seed}, out_dir={str(path)!r})")
        print(f"generating {name} (preset {info.preset}, seed {info.seed}) into {path} ...", flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=config.PROJECT_ROOT)
        gen_s = time.perf_counter() - t
        gen_rss = _rss_mb(resource.RUSAGE_CHILDREN)
        rows += [("generate: wall time", f"{gen_s:,.1f} s"), ("generate: peak RSS", f"{gen_rss:,.0f} MB")]
    else:
        rows.append(("generate", f"skipped ({path} exists)"))

    ratings = path / "ratings.csv"
    cache = load._cache_file(ratings)
    cache.unlink(missing_ok=True)
    t = time.perf_counter()
    first = data.load_interactions(path)
    first_s = time.perf_counter() - t
    del first
    t = time.perf_counter()
    df = data.load_interactions(path)
    cached_s = time.perf_counter() - t
    load_rss = _rss_mb(resource.RUSAGE_SELF)

    ts = df["timestamp"].to_numpy()
    import numpy as np
    import pandas as pd
    late = float((ts >= int(pd.Timestamp("2018-01-01", tz="UTC").timestamp())).mean())
    n_items = len(data.load_items(path))
    n_tags = len(data.load_tags(path))
    rows += [
        ("ratings.csv size", f"{ratings.stat().st_size / 1e6:,.0f} MB"),
        ("first load (parse CSV + write cache)", f"{first_s:,.2f} s"),
        ("cached load (Arrow IPC, mmap)", f"{cached_s:,.2f} s"),
        ("speed-up", f"{first_s / cached_s:,.1f}x"),
        ("loader peak RSS", f"{load_rss:,.0f} MB"),
        ("users / movies / ratings / tags",
         f"{df['user_id'].nunique():,} / {n_items:,} / {len(df):,} / {n_tags:,}"),
        ("period", f"{pd.to_datetime(ts.min(), unit='s').date()} .. {pd.to_datetime(ts.max(), unit='s').date()}"),
        ("share of ratings from 2018", f"{late:.1%}"),
        ("share rating >= 4", f"{float((df['rating'].to_numpy() >= 4).mean()):.1%}"),
        ("ratings per user min / median / max",
         " / ".join(str(int(x)) for x in np.percentile(np.bincount(df['user_id'].to_numpy())[1:][
             np.bincount(df['user_id'].to_numpy())[1:] > 0], [0, 50, 100]))),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nbench-data: {name}  ({path})")
    print("-" * (width + 22))
    for k, v in rows:
        print(f"{k:<{width}}  {v:>18}")
    config.write_json(config.runs_dir(name) / "bench_data.json", {
        "dataset": name, "generate_s": gen_s, "generate_peak_rss_mb": gen_rss,
        "first_load_s": first_s, "cached_load_s": cached_s, "speedup": first_s / cached_s,
        "loader_peak_rss_mb": load_rss, "share_from_2018": late, "rows": dict(rows),
        "versions": config.package_versions(), "git_commit": config.git_commit()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
