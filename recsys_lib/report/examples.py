"""Three test users, shown whole: what they rated before the test period, what they liked in it,
and the top 10 of four models with the hits marked (the report's "What the models recommend").

Who is shown follows one fixed rule (`example_rule`), stated in the report: the scored test users
(those of the per-user files, ``per_user/<model>-test.parquet``) are cut into equal thirds by their
number of train ratings (`analysis.activity_segments`, light, medium, heavy), and each third
contributes the user whose train count is the third's median (the lower of the two middle values
when the third has an even number of users), the smallest user id among those with that count.
The four models are the two-stage system, the blend of the single-stage models (the primary
comparison), the strongest single-stage model on validation (the secondary) and popularity.

Everything comes from the run folder (``data.pt``, ``per_user/``, ``analysis/paired.json`` or
``metrics/``) and, for the titles, from the data set's own movies file (``items``: the frame of
`recsys_lib.data.load_items`, loaded by the run's data set name when not given). Users and movies
are shown by the data set's own ids, never the encoded indices.
"""
from __future__ import annotations

import os
import re
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from ..protocol.splitdata import POSITIVE_RATING, SplitData
from . import analysis

#: the models shown, in column order: (role, how the model is found)
ROLES = ("two-stage system", "blend (primary comparison)", "strongest single-stage on validation (secondary)",
         "popularity")
N_TOP = 10           # slots of each model's list shown (the per-user files keep top_0..top_9)
N_HISTORY = 10       # history rows shown, newest first
PADDING = -1         # a top-list slot past the items the user may be recommended (protocol.evaluate.rank_topk)
_YEAR_SUFFIX = re.compile(r"\s*\(\d{4}\)\s*$")


def example_rule(n_segments: int = 3) -> str:
    """The rule that picks the example users, in words (the notebook prints it)."""
    thirds = "thirds" if n_segments == 3 else f"{n_segments} equal groups"
    return (f"How the users were picked: the test users scored (those with a test positive, the users of every "
            f"model's per-user file) are cut into equal {thirds} by their number of train ratings (light, medium, "
            f"heavy; the activity segments of the figure above, ties in count split by user index). In each we take "
            f"the user whose number of train ratings is the group's median (the lower of the two middle values "
            f"when the group has an even number of users), and among the users with that count the one with the "
            f"smallest user id. Users and movies are shown by the data set's own ids; a user's history holds every "
            f"rating before their test period (train and validation rows), newest first.")


def pick_users(data: SplitData, users, n_segments: int = 3) -> pd.DataFrame:
    """The example users by `example_rule`: one row per activity segment (lightest first) with the
    segment, the chosen encoded ``index``, raw ``user`` id, ``train_ratings``, and the segment's size
    and median. ``users`` are the scored users (encoded); fewer than ``n_segments`` of them: no row."""
    users = np.unique(np.asarray(users, dtype=np.int64))
    cols = ["segment", "index", "user", "train_ratings", "segment_users", "segment_median"]
    if len(users) < n_segments:
        return pd.DataFrame(columns=cols)
    seg = analysis.activity_segments(data, users, n_segments)                       # index: encoded user
    counts = np.bincount(data.train.user, minlength=data.n_users)[users]
    frame = pd.DataFrame({"index": users, "count": counts, "segment": seg.reindex(users).astype(str).to_numpy()})
    rows = []
    for s in analysis.segment_order(frame["segment"].unique()):
        g = frame[frame["segment"] == s]
        median = int(np.sort(g["count"].to_numpy())[(len(g) - 1) // 2])           # the lower middle value
        index = int(g.loc[g["count"] == median, "index"].min())                    # smallest id: ids sort as raw ids
        rows.append({"segment": s, "index": index, "user": data.users.decode(index).item(),
                     "train_ratings": median, "segment_users": len(g), "segment_median": median})
    return pd.DataFrame(rows, columns=cols)


def example_models(run_dir: str | os.PathLike, target: str | None = None) -> list[tuple[str, str]]:
    """(model, role) of the four models shown, in column order, without repeats: the two-stage
    system (``analysis/paired.json``'s target, else ``two_stage``), ``blend``, the strongest
    single-stage model on validation (paired.json's ``strongest_single_stage``, else
    `analysis.strongest_single_stage` over ``metrics/*.json``) and ``popularity``. A model with no
    ``per_user/<model>-test.parquet`` is left out."""
    from ..run.experiment import collect_metrics, read_json
    paired = read_json(run_dir, "analysis", "paired.json") or {}
    target = target or paired.get("target") or "two_stage"
    strongest = paired.get("strongest_single_stage") or analysis.strongest_single_stage(collect_metrics(run_dir))
    names = [target, "blend", (strongest or {}).get("model"), "popularity"]
    out, seen = [], set()
    for name, role in zip(names, ROLES):
        if name and name not in seen and Path(run_dir, "per_user", f"{name}-test.parquet").exists():
            out.append((name, role))
            seen.add(name)
    return out


def _item_table(items: pd.DataFrame | None, data: SplitData) -> pd.DataFrame:
    """Title and year of each train item by encoded index (the data set's ``items`` frame)."""
    raw = data.items.raw
    if items is None:
        title = pd.Series([f"movie {r}" for r in raw])
        year = pd.Series(np.nan, index=range(len(raw)))
    else:
        meta = items.drop_duplicates("item_id").set_index("item_id")
        title = meta["title"].reindex(raw).astype(object).reset_index(drop=True)
        title = title.where(title.notna(), pd.Series([f"movie {r}" for r in raw]))
        year = meta["year"].reindex(raw).astype("Float64").reset_index(drop=True)
    if data.item_features is not None:
        year = year.fillna(pd.Series(data.item_features.years))
    return pd.DataFrame({"item_id": raw, "title": title.astype(str).to_numpy(),
                         "year": pd.array(year, dtype="Float64").round().astype("Int64")})


def _rows_of(data: SplitData, period: str, users: np.ndarray) -> pd.DataFrame:
    p = data.period(period)
    keep = np.isin(p.user, users)
    return pd.DataFrame({"index": p.user[keep], "item": p.item[keep], "rating": p.rating[keep],
                         "timestamp": p.timestamp[keep], "period": period})


def _first_known(data: SplitData, items: np.ndarray) -> pd.Series:
    """Earliest timestamp of each of ``items`` in the train and validation rows (the known rows at
    test: docs/PROTOCOL.md "A causal catalogue"); missing where an item has none."""
    parts = []
    for period in ("train", "valid"):
        p = data.period(period)
        keep = np.isin(p.item, items)
        parts.append(pd.DataFrame({"item": p.item[keep], "timestamp": p.timestamp[keep]}))
    return pd.concat(parts).groupby("item")["timestamp"].min()


def example_users(run_dir: str | os.PathLike, data: SplitData | None = None, items: pd.DataFrame | None = None,
                  models: list[tuple[str, str]] | None = None, n_top: int = N_TOP,
                  n_history: int = N_HISTORY) -> list[dict]:
    """The example users of a run (`pick_users`), lightest first, each a dict:

    ``user`` (raw id), ``index`` (encoded), ``segment``, ``train_ratings``, ``n_history`` (ratings
    before the test period); ``history``: the last ``n_history`` of them, newest first (date,
    title, year, rating, period); ``positives``: the test positives in time order (date, title,
    year, rating, ``allowed``: False where the movie was first rated at or after the user's test
    cut, so no model could recommend it under the causal catalogue); ``tops``: for each model
    (`example_models`), a frame of its top ``n_top`` (rank, item_id, title, hit; a padding slot has
    item_id None and is never a hit); ``models``: [(model, role)]; ``ndcg``: model -> the user's test
    nDCG@10.

    ``data`` is the run's SplitData (``data.pt`` when not given) and ``items`` the data set's movies
    (`recsys_lib.data.load_items` of run.json's data set when not given)."""
    from .. import config
    from ..run.experiment import read_json
    run_dir = Path(run_dir)
    if data is None:
        data = config.load_torch(run_dir / "data.pt")
    info = read_json(run_dir, "run.json") or {}
    if items is None and info.get("dataset"):
        from ..data import load_items
        items = load_items(info["dataset"])
    models = example_models(run_dir) if models is None else models
    if not models:
        return []
    tops = {m: pd.read_parquet(run_dir / "per_user" / f"{m}-test.parquet",
                               columns=["user", "ndcg@10", *[f"top_{j}" for j in range(n_top)]])
            for m, _ in models}
    scored = np.unique(np.concatenate([df["user"].to_numpy() for df in tops.values()]))
    for df in tops.values():                                        # the users every shown model scored
        scored = scored[np.isin(scored, df["user"].to_numpy())]
    picked = pick_users(data, scored)
    if picked.empty:
        return []
    chosen = picked["index"].to_numpy(np.int64)
    meta = _item_table(items, data)

    history = pd.concat([_rows_of(data, p, chosen) for p in data.before("test")], ignore_index=True)
    history = history.sort_values(["index", "timestamp", "item"], ascending=[True, False, False], kind="stable")
    test = _rows_of(data, "test", chosen)
    positives = test[test["rating"] >= POSITIVE_RATING].sort_values(["index", "timestamp", "item"], kind="stable")
    causal = data.causal((info.get("params") or {}).get("eval", {}).get("causal_catalogue"))
    first = _first_known(data, positives["item"].unique()) if causal else pd.Series(dtype=np.int64)
    cut = test.groupby("index")["timestamp"].min()                  # each user's test cut

    def describe(rows: pd.DataFrame) -> pd.DataFrame:
        m = meta.iloc[rows["item"].to_numpy()].reset_index(drop=True)
        return pd.DataFrame({"date": pd.to_datetime(rows["timestamp"].to_numpy(), unit="s").strftime("%Y-%m-%d"),
                             "item_id": m["item_id"].to_numpy(), "title": m["title"].to_numpy(),
                             "year": m["year"].to_numpy(), "rating": rows["rating"].to_numpy(np.float64)})

    out = []
    for row in picked.itertuples(index=False):
        u = row.index
        hist = history[history["index"] == u]
        pos = positives[positives["index"] == u]
        pos_frame = describe(pos)
        if causal:
            pos_frame["allowed"] = (pos["item"].map(first).fillna(np.iinfo(np.int64).max).to_numpy()
                                    < cut.get(u, np.iinfo(np.int64).max))
        else:
            pos_frame["allowed"] = True
        pos_items = set(pos["item"].tolist())
        top_frames, ndcg = {}, {}
        for m, _ in models:
            r = tops[m][tops[m]["user"] == u].iloc[0]
            idx = r[[f"top_{j}" for j in range(n_top)]].to_numpy(np.int64)
            real = idx != PADDING
            sel = meta.iloc[np.where(real, idx, 0)]
            top_frames[m] = pd.DataFrame({
                "rank": np.arange(1, n_top + 1),
                "item_id": pd.Series(np.where(real, sel["item_id"].to_numpy(), 0), dtype="Int64").where(real),
                "title": pd.Series(np.where(real, sel["title"].to_numpy(), None), dtype=object),
                "hit": real & np.isin(idx, list(pos_items))})
            ndcg[m] = float(r["ndcg@10"])
        out.append({"user": row.user, "index": int(u), "segment": row.segment, "train_ratings": int(row.train_ratings),
                    "segment_users": int(row.segment_users), "n_history": int(len(hist)),
                    "history": describe(hist.head(n_history)).assign(period=hist["period"].head(n_history).to_numpy()),
                    "positives": pos_frame, "tops": top_frames, "models": list(models), "ndcg": ndcg})
    return out


# ---------------------------------------------------------------- HTML
_CSS = """
.rs-examples { max-width: 100%; font-size: 0.86em; }
.rs-examples .rs-ex-user { margin: 0.6em 0 1.8em 0; max-width: 100%; }
.rs-examples .rs-ex-head { font-weight: bold; font-size: 1.08em; margin: 0 0 0.35em 0; }
.rs-examples .rs-ex-row { display: flex; flex-wrap: wrap; gap: 0.4em 1.6em; max-width: 100%; }
.rs-examples .rs-ex-box { flex: 1 1 26em; min-width: 0; max-width: 100%; }
.rs-examples .rs-ex-label { color: #444; margin: 0.5em 0 0.2em 0; }
.rs-examples table.rs-ex-table { table-layout: fixed; width: 100%; max-width: 100%; border-collapse: collapse;
  margin: 0; font-size: 1em; }
.rs-examples table.rs-ex-table th, .rs-examples table.rs-ex-table td { padding: 0.18em 0.45em; text-align: left;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; border-bottom: 1px solid #e4e4e4;
  vertical-align: top; max-width: none; }
.rs-examples table.rs-ex-table th { font-weight: bold; color: #222; white-space: normal; overflow-wrap: break-word; }
.rs-examples table.rs-ex-table td.rs-ex-num, .rs-examples table.rs-ex-table th.rs-ex-num { text-align: right;
  font-variant-numeric: tabular-nums; }
.rs-examples table.rs-ex-table td.rs-ex-hit { font-weight: bold; background: #e3f2e1; }
.rs-examples table.rs-ex-table td.rs-ex-pad { color: #999; }
.rs-examples ul.rs-ex-pos { margin: 0; padding-left: 1.2em; }
.rs-examples ul.rs-ex-pos li { overflow-wrap: anywhere; }
"""
HIT_MARK = "\u2713"   # ✓


def _e(value) -> str:
    return escape("" if value is None or value is pd.NA else str(value), quote=True)


def _cell(text: str, cls: str = "", title: str | None = None) -> str:
    c = f' class="{cls}"' if cls else ""
    t = f' title="{_e(title)}"' if title else ""
    return f"<td{c}{t}>{text}</td>"


def _history_table(hist: pd.DataFrame) -> str:
    head = ('<colgroup><col style="width:7.4em"><col><col style="width:3.9em"><col style="width:4.9em">'
            '<col style="width:4.6em"></colgroup><thead><tr><th>date</th><th>title</th><th class="rs-ex-num">year'
            '</th><th class="rs-ex-num">rating</th><th>period</th></tr></thead>')
    body = "".join(
        "<tr>" + _cell(_e(r.date)) + _cell(_e(_YEAR_SUFFIX.sub("", r.title)), title=r.title)
        + _cell(_e("" if pd.isna(r.year) else int(r.year)), "rs-ex-num") + _cell(f"{r.rating:g}", "rs-ex-num")
        + _cell(_e(r.period)) + "</tr>" for r in hist.itertuples(index=False))
    return f'<table class="rs-ex-table rs-ex-history">{head}<tbody>{body}</tbody></table>'


def _positives_list(pos: pd.DataFrame) -> str:
    if pos.empty:
        return "<p>(none)</p>"
    items = []
    for r in pos.itertuples(index=False):
        note = "" if r.allowed else " <i>(first rated after this user's test cut: no model may recommend it)</i>"
        items.append(f'<li>{_e(r.title)} <span style="color:#666">(rating {r.rating:g}, {_e(r.date)})</span>'
                     f"{note}</li>")
    return f'<ul class="rs-ex-pos">{"".join(items)}</ul>'


def _top_table(ex: dict) -> str:
    models = ex["models"]
    cols = '<col style="width:2.6em">' + "".join("<col>" for _ in models)
    head = '<th class="rs-ex-num">#</th>' + "".join(
        f'<th title="{_e(role)}">{_e(m)} <span style="font-weight:normal;color:#555">(nDCG@10 '
        f'{ex["ndcg"][m]:.3f})</span></th>' for m, role in models)
    frames = [ex["tops"][m] for m, _ in models]
    n = max((len(f) for f in frames), default=0)
    body = []
    for i in range(n):
        cells = [_cell(str(i + 1), "rs-ex-num")]
        for f in frames:
            r = f.iloc[i]
            if pd.isna(r["title"]):
                cells.append(_cell("&mdash;", "rs-ex-pad", "padding: no other movie may be recommended"))
            elif r["hit"]:
                cells.append(_cell(f"{HIT_MARK} {_e(r['title'])}", "rs-ex-hit", f"hit: {r['title']}"))
            else:
                cells.append(_cell(_e(r["title"]), title=r["title"]))
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="rs-ex-table rs-ex-top"><colgroup>{cols}</colgroup><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def example_header(ex: dict) -> str:
    """``User 123 (light: 25 train ratings; 3 test positives)``."""
    n_pos = len(ex["positives"])
    return (f"User {ex['user']} ({ex['segment']}: {ex['train_ratings']:,} train ratings; "
            f"{n_pos} test positive{'s' if n_pos != 1 else ''})")


def example_html(examples: list[dict]) -> str:
    """Compact, self-contained HTML of `example_users`: per user a header line, their last ratings
    before the test period beside their test positives, then a table of each model's top 10 with the
    hits (a test positive) in bold on green and marked ✓. Fixed-layout tables that fill the page's
    width and cut long titles with an ellipsis (full title on hover): no horizontal overflow at
    1,280 px; no external resource; every title escaped."""
    if not examples:
        return '<div class="rs-examples"><p>No scored test users to show.</p></div>'
    roles = "; ".join(f"{_e(m)}: {_e(r)}" for m, r in examples[0]["models"])
    parts = [f"<style>{_CSS}</style>", '<div class="rs-examples">',
             f'<p class="rs-ex-label">Columns: {roles}. {HIT_MARK} and bold: a test positive of the user (a hit); '
             "&mdash;: an empty slot (no other movie was allowed).</p>"]
    for ex in examples:
        shown = len(ex["history"])
        parts.append(
            f'<section class="rs-ex-user" id="example-user-{_e(ex["user"])}">'
            f'<div class="rs-ex-head">{_e(example_header(ex))}</div><div class="rs-ex-row">'
            f'<div class="rs-ex-box"><div class="rs-ex-label">Last {shown} of {ex["n_history"]:,} ratings before '
            f'the test period, newest first</div>{_history_table(ex["history"])}</div>'
            f'<div class="rs-ex-box"><div class="rs-ex-label">Test positives (rated {POSITIVE_RATING:g} or more in '
            f'the test period)</div>{_positives_list(ex["positives"])}</div></div>'
            f'<div class="rs-ex-label">Top {len(next(iter(ex["tops"].values())))} of each model</div>'
            f"{_top_table(ex)}</section>")
    parts.append("</div>")
    return "".join(parts)
