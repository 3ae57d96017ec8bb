"""The embedded synthetic data set: MovieLens-32M's files and columns, with planted structure.

``generate(preset, seed)`` writes ``ratings.csv``, ``movies.csv``, ``tags.csv``, ``links.csv``
(same headers and number formats as MovieLens: ``userId,movieId,rating,timestamp`` with ratings
printed ``4.0`` / ``3.5``, titles with commas quoted, ``imdbId`` zero-padded) plus a
``checksums.txt`` (md5sum format) and the verification marker of :mod:`recsys_lib.data`, into
``config.raw_dir("synthetic")`` (preset ``demo``), ``raw_dir("synthetic-tiny")`` (``tiny``) or
``raw_dir("synthetic-32m")`` (``32m``). The folder is written to a temporary sibling and renamed,
so a crash never leaves a half data set. Same preset and seed -> the same bytes.

Presets (``PRESETS``)
    ``tiny``  400 users, 300 movies, 25,000 ratings, 2,000 tags, 2015-2023 (unit tests).
    ``demo``  1,500 users, 1,500 movies, 100,000 ratings, 10,000 tags, 2015-2023: ml-100k's
              size, so that `make report` runs in minutes (until 2026-12-06: 3,000 users,
              2,000 movies, 300,000 ratings, 20,000 tags; docs/experiments.md).
    ``32m``   exactly 200,948 users, 87,585 movies, 32,000,204 ratings, 2,000,072 tags,
              1995-01-09 .. 2023-10-12, about 30% of ratings from 2018 on.

Planted structure (what a recommender can find)
    * Latent space. ``K = 16``-d unit vectors. Each of MovieLens's 19 genres has a random
      direction. Movies come in *clusters* (sub-genres: ~15 to ~90 movies each); a cluster has a
      genre set of 1-3 genres and a centre = normalise(direction of its genres + noise). A movie's
      vector = normalise(cluster centre + noise [+ direction of an extra genre]), so genres
      predict a movie's latent vector; its genres are the cluster's (an extra one sometimes, one
      dropped sometimes, ``(no genres listed)`` for ~1%).
    * Tags tied to the latent space. A vocabulary of two-word phrases (adjective + noun), each
      word with a latent vector; each cluster owns the 6 phrases closest to its centre
      (neighbouring clusters share phrases). A tag row is a phrase of the movie's cluster (60%), a
      word tied to one of its genres (30%, e.g. Horror -> "scary") or a generic tag (10%).
    * Long-tail popularity. Movie weights are Zipf-like (``rank^-0.9`` over a random order);
      sampling inside a cluster follows them, and a cluster's prior is its total weight.
    * Release-year effects. Every movie has a release date (its title's year); a rating at time
      ``t`` only picks movies already released (the earliest one of the cluster if none is), and
      25% of picks come from movies released in the last two years (recency preference).
    * User taste. A user's vector = normalise(sum of 1-3 "home" cluster centres + noise); the
      choice of cluster is ``softmax(beta * <taste, centre> + 0.5 log weight)`` (``beta`` lower
      for very active users, whose tastes are broader).
    * Taste drift. Each user also has a late taste (the early one pulled toward another cluster);
      a rating at fraction ``f`` of the user's active span uses the late taste with probability
      ``f``.
    * Sequential correlation. A user's ratings come in sessions (mean length 6, minutes apart;
      sessions spread over the user's active span). The first rating of a session picks a
      cluster from the user's taste; each later one stays in that cluster with probability 0.65
      (so the next movie is often a latent neighbour of the last ones), else picks afresh.
    * Ratings. score = 2 <taste at t, movie> + movie quality + user bias + noise, mapped by
      quantiles onto MovieLens-32M's half-star distribution: about half of the rows are >= 4.0 and
      better-matched movies get higher ratings.
    * Activity. Ratings per user are long-tailed (lognormal, >= 15 in tiny/demo, >= 20 in 32m);
      timestamps increase within a user (rows sorted by userId, then timestamp, like MovieLens).
      A user rates a movie at most once (duplicates are dropped, counts are then made exact).
"""
from __future__ import annotations

import csv
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from .. import config
from ..errors import DataError
from .verify import MARKER, md5_file, read_marker, write_marker

GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western"]
NO_GENRES = "(no genres listed)"
# Rough prevalence of each genre in MovieLens's movie list (drives cluster genre sets).
_GENRE_WEIGHT = np.array([9, 5, 3, 3, 16, 6, 4, 22, 4, 0.5, 6, 0.5, 1.5, 3, 8, 4, 9, 2, 1.5])
# MovieLens-32M's share of each half-star rating 0.5, 1.0, ..., 5.0.
_RATING_SHARE = np.array([1.6, 3.0, 1.6, 6.6, 5.1, 19.1, 12.7, 26.6, 8.8, 14.9])
_RATING_TEXT = ["0.5", "1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0", "4.5", "5.0"]
K = 16  # latent dimension

_ADJ = ["dark", "quirky", "epic", "slow", "gritty", "witty", "surreal", "cozy", "brutal", "tender",
        "bleak", "stylish", "campy", "lyrical", "tense", "absurd", "moody", "heartfelt", "bizarre",
        "clever", "violent", "gentle", "haunting", "playful", "cynical", "hopeful", "bittersweet",
        "nostalgic", "chaotic", "cerebral", "sweeping", "intimate", "eerie", "raunchy", "stark",
        "whimsical", "grim", "lush", "frantic", "quiet", "noir", "psychedelic", "rousing",
        "melancholic", "offbeat", "gory", "charming", "twisty", "sprawling", "minimalist"]
_NOUN = ["heist", "road trip", "revenge", "romance", "space", "robots", "family", "friendship",
         "war", "survival", "time travel", "small town", "coming of age", "conspiracy", "magic",
         "monsters", "courtroom", "sports", "music", "politics", "zombies", "detectives", "aliens",
         "dystopia", "high school", "prison", "ocean", "desert", "mafia", "spies", "vampires",
         "dragons", "cowboys", "pirates", "samurai", "art", "cooking", "journalism", "dance",
         "hackers", "ghosts", "superheroes", "wilderness", "marriage", "aging", "addiction",
         "nature", "history", "cult", "siblings"]
_GENRE_TAGS = {
    "Action": ["action", "explosions", "fight scenes"], "Adventure": ["adventure", "quest", "journey"],
    "Animation": ["animation", "pixar", "anime"], "Children": ["kids", "family friendly", "disney"],
    "Comedy": ["funny", "hilarious", "comedy"], "Crime": ["crime", "gangsters", "murder"],
    "Documentary": ["documentary", "true story", "informative"],
    "Drama": ["drama", "emotional", "great acting"], "Fantasy": ["fantasy", "magical", "fairy tale"],
    "Film-Noir": ["film noir", "femme fatale", "black and white"],
    "Horror": ["scary", "creepy", "horror"], "IMAX": ["imax", "visually stunning", "3d"],
    "Musical": ["musical", "songs", "broadway"], "Mystery": ["mystery", "whodunit", "twist ending"],
    "Romance": ["romantic", "love story", "chick flick"], "Sci-Fi": ["sci-fi", "futuristic", "space opera"],
    "Thriller": ["suspense", "thriller", "tense"], "War": ["war", "wwii", "military"],
    "Western": ["western", "gunfights", "frontier"],
}
_GENERIC_TAGS = ["seen it", "dvd", "netflix", "own it", "classic", "overrated", "boring",
                 "atmospheric", "cliché", "mise en scène", "based on a book", "visually appealing",
                 "thought-provoking", "must see", "remake", "sequel", "Oscar (Best Picture)"]
_TITLE_WORDS = ["Night", "Shadow", "River", "Star", "Heart", "Storm", "City", "Dream", "Fire",
                "Ghost", "Road", "King", "Queen", "Garden", "Mirror", "Winter", "Summer", "Island",
                "Stranger", "Secret", "Promise", "Silence", "Empire", "Echo", "Harbor", "Thunder",
                "Angel", "Wolf", "Diamond", "Journey", "Paradise", "Machine", "Circus", "Letter",
                "Bridge", "Forest", "Kingdom", "Hunter", "Lullaby", "Voyage", "Café", "Señor",
                "Mountain", "Detective", "Soldier", "Widow", "Orchard", "Lighthouse", "Tide", "Crown"]
_TITLE_ADJ = ["Last", "Silent", "Crimson", "Lost", "Golden", "Broken", "Hidden", "Wild", "Dark",
              "Endless", "Little", "Great", "Burning", "Frozen", "Distant", "Sweet", "Bitter",
              "Electric", "Midnight", "Forgotten", "Secret", "Blue", "Iron", "Velvet", "Naked"]
_NAMES = ["Johnny", "Amélie", "Rosa", "Max", "Elena", "Frank", "Lucy", "Omar", "Greta", "Hugo",
          "Nina", "Walter", "Zoe", "Igor", "Mabel", "Oscar", "Chloé", "Raj", "Ingrid", "Pablo"]


@dataclass(frozen=True)
class Preset:
    n_users: int
    n_items: int
    n_ratings: int
    n_tags: int
    start: str            # first timestamp (UTC date)
    end: str              # last timestamp (UTC date)
    min_ratings: int      # fewest ratings of a user
    items_per_cluster: int
    late_share: float     # share of users whose activity starts after 2018-01-01 (None: uniform)
    first_year: int       # oldest release year
    beta: float           # taste concentration (inverse temperature over clusters)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(400, 300, 25_000, 2_000, "2015-01-01", "2023-12-31", 15, 15, -1.0, 1960, 9.0),
    "demo": Preset(1_500, 1_500, 100_000, 10_000, "2015-01-01", "2023-12-31", 15, 25, -1.0, 1950, 9.0),
    "32m": Preset(200_948, 87_585, 32_000_204, 2_000_072, "1995-01-09", "2023-10-12", 20, 90, 0.30,
                  1900, 9.0),
}
DATASET_OF_PRESET = {"demo": "synthetic", "tiny": "synthetic-tiny", "32m": "synthetic-32m"}
FILES = ["links.csv", "movies.csv", "ratings.csv", "tags.csv"]
_CHUNK_ROWS = 2_500_000  # ratings generated per user chunk (bounds memory on 32m)


def _ts(date: str) -> int:
    return int(datetime.fromisoformat(date).replace(tzinfo=timezone.utc).timestamp())


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _split_exact(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers >= 0 proportional to ``weights`` that sum exactly to ``total`` (largest remainder)."""
    raw = total * weights / weights.sum()
    out = np.floor(raw).astype(np.int64)
    rest = total - int(out.sum())
    if rest > 0:
        order = np.argsort(-(raw - out), kind="stable")[:rest]
        out[order] += 1
    return out


# ------------------------------------------------------------------ catalogue
@dataclass
class _World:
    movie_ids: np.ndarray     # (I,) int32 sparse MovieLens-like ids
    item_vec: np.ndarray      # (I, K) float32 unit vectors
    item_cluster: np.ndarray  # (I,) int32
    item_weight: np.ndarray   # (I,) float64 Zipf popularity, sums to 1
    item_quality: np.ndarray  # (I,) float32
    release_day: np.ndarray   # (I,) float64 days since 1850-01-01
    centers: np.ndarray       # (C, K)
    order: np.ndarray         # items sorted by (cluster, release_day)
    key: np.ndarray           # cluster * 1e6 + release_day, in `order`
    cum_w: np.ndarray         # (I+1,) cumulative weights in `order`
    cl_start: np.ndarray      # (C+1,) first position of each cluster in `order`
    cluster_logw: np.ndarray  # (C,) log total weight
    item_genres: list         # list of genre-name lists
    cluster_phrases: np.ndarray  # (C, 6) indices into phrases
    phrases: list


_DAY0 = _ts("1850-01-01")


def _build_world(p: Preset, seed: int) -> _World:
    rng = _rng(seed, 1)
    n_items = p.n_items
    n_clusters = max(8, n_items // p.items_per_cluster)
    genre_dir = _normalise(rng.standard_normal((len(GENRES), K)))
    gw = _GENRE_WEIGHT / _GENRE_WEIGHT.sum()
    # cluster genre sets and centres
    n_gen = rng.choice([1, 2, 3], size=n_clusters, p=[0.35, 0.4, 0.25])
    cl_genres = [np.sort(rng.choice(len(GENRES), size=k, replace=False, p=gw)) for k in n_gen]
    gsum = np.stack([genre_dir[g].sum(0) for g in cl_genres])
    centers = _normalise(0.8 * _normalise(gsum) + 0.6 * _normalise(rng.standard_normal((n_clusters, K))))
    # items: cluster sizes vary
    cl_share = rng.gamma(2.0, 1.0, n_clusters)
    sizes = 1 + _split_exact(n_items - n_clusters, cl_share)
    item_cluster = np.repeat(np.arange(n_clusters, dtype=np.int32), sizes)
    item_cluster = item_cluster[rng.permutation(n_items)]
    vec = centers[item_cluster] + 0.35 * rng.standard_normal((n_items, K)) / np.sqrt(K) * 2
    extra = rng.random(n_items) < 0.2
    extra_g = rng.choice(len(GENRES), size=n_items, p=gw)
    vec[extra] += 0.3 * genre_dir[extra_g[extra]]
    item_vec = _normalise(vec).astype(np.float32)
    drop = rng.random(n_items) < 0.1
    nogen = rng.random(n_items) < 0.01
    item_genres = []
    for i in range(n_items):
        if nogen[i]:
            item_genres.append([])
            continue
        gs = set(cl_genres[item_cluster[i]].tolist())
        if extra[i]:
            gs.add(int(extra_g[i]))
        if drop[i] and len(gs) > 1:
            gs.discard(min(gs))
        item_genres.append([GENRES[g] for g in sorted(gs)])
    # popularity: Zipf over a random order
    ranks = rng.permutation(n_items) + 1
    w = ranks.astype(np.float64) ** -0.9
    w /= w.sum()
    quality = (0.5 * rng.standard_normal(n_items) + 0.15 * (np.log(w) - np.log(w).mean())
               / np.log(w).std()).astype(np.float32)
    # release dates: more movies in recent years, none after the period's end
    end_year = int(p.end[:4])
    years = np.arange(p.first_year, end_year + 1)
    yw = np.exp(0.035 * (years - years[-1]))
    item_year = rng.choice(years, size=n_items, p=yw / yw.sum())
    release = (item_year - 1850) * 365.25 + rng.random(n_items) * 365.0
    release = np.minimum(release, (_ts(p.end) - _DAY0) / 86400.0 - 1)
    order = np.lexsort((release, item_cluster))
    key = item_cluster[order].astype(np.float64) * 1e6 + release[order]
    cum_w = np.concatenate([[0.0], np.cumsum(w[order])])
    cl_start = np.concatenate([[0], np.cumsum(np.bincount(item_cluster, minlength=n_clusters))])
    cluster_logw = np.log(np.bincount(item_cluster, weights=w, minlength=n_clusters))
    # tag phrases tied to the latent space
    adj_vec = _normalise(rng.standard_normal((len(_ADJ), K)))
    noun_vec = _normalise(rng.standard_normal((len(_NOUN), K)))
    phrases = [f"{a} {n}" for a in _ADJ for n in _NOUN]
    ph_vec = _normalise((adj_vec[:, None, :] + noun_vec[None, :, :]).reshape(-1, K))
    sims = centers @ ph_vec.T
    cluster_phrases = np.argsort(-sims, axis=1, kind="stable")[:, :6]
    movie_ids = np.sort(rng.choice(np.arange(1, 3 * n_items + 2), size=n_items, replace=False))
    return _World(movie_ids.astype(np.int32), item_vec, item_cluster, w, quality, release, centers,
                  order, key, cum_w, cl_start, cluster_logw, item_genres, cluster_phrases, phrases)


def _titles(rng: np.random.Generator, n: int, years: np.ndarray) -> list[str]:
    W, A, N = _TITLE_WORDS, _TITLE_ADJ, _NAMES
    pat = rng.choice(7, size=n, p=[0.25, 0.2, 0.12, 0.1, 0.1, 0.13, 0.1])
    a = rng.integers(0, 1 << 30, size=(n, 3))
    out = []
    for i in range(n):
        w1, w2, w3 = W[a[i, 0] % len(W)], W[a[i, 1] % len(W)], A[a[i, 2] % len(A)]
        k = pat[i]
        if k == 0:
            t = f"{w3} {w1}"
        elif k == 1:
            t = f"{w1} of the {w3} {w2}"
        elif k == 2:
            t = f"{w3} {w1}, The"                      # MovieLens article suffix: quoted in CSV
        elif k == 3:
            t = f"{N[a[i, 1] % len(N)]}'s {w1}"
        elif k == 4:
            t = f"{w1}, {w2} and the {w3} {W[a[i, 2] % len(W)]}"  # comma inside: quoted
        elif k == 5:
            t = f"{w1}"
        else:
            t = f"{w3} {w1} {1 + a[i, 2] % 4}"
        out.append(f"{t} ({years[i]})" if years[i] > 0 else t)
    return out


# ------------------------------------------------------------------ users and ratings
def _user_plan(p: Preset, seed: int, world: _World):
    rng = _rng(seed, 2)
    U = p.n_users
    raw = rng.lognormal(0.0, 1.25, U)
    extra_total = p.n_ratings - U * p.min_ratings
    cap = max(p.min_ratings + 1, int(0.4 * p.n_items))
    n_u = p.min_ratings + _split_exact(extra_total, raw)
    for _ in range(50):  # cap very heavy users, give the excess to the others
        over = n_u - cap
        excess = int(over[over > 0].sum())
        if excess == 0:
            break
        n_u = np.minimum(n_u, cap)
        room = (cap - n_u).astype(np.float64) * raw
        n_u = n_u + _split_exact(excess, room)
    assert n_u.sum() == p.n_ratings
    t0, t1 = _ts(p.start), _ts(p.end) + 86399
    # activity span: a third of users rate within a day, the rest over weeks to years
    short = rng.random(U) < 0.33
    span = np.where(short, rng.uniform(600, 86400, U), rng.lognormal(np.log(200 * 86400), 1.3, U))
    span = np.minimum(span, (t1 - t0) * 0.9)
    if p.late_share > 0:
        cut = _ts("2018-01-01")
        late = rng.random(U) < p.late_share
        start = np.where(late, rng.uniform(cut, t1, U), rng.uniform(t0, cut, U))
    else:
        start = rng.uniform(t0, t1, U)
    start = np.minimum(start, t1 - span)
    start = np.maximum(start, t0)
    span = np.minimum(span, t1 - start)
    # tastes: 1-3 home clusters, broader for very active users; late taste pulled elsewhere
    C = len(world.centers)
    home_p = np.exp(world.cluster_logw * 0.5)
    home_p /= home_p.sum()
    n_home = rng.choice([1, 2, 3], size=U, p=[0.4, 0.4, 0.2])
    homes = rng.choice(C, size=(U, 3), p=home_p)
    mask = np.arange(3)[None, :] < n_home[:, None]
    taste = (world.centers[homes] * mask[..., None]).sum(1)
    taste = _normalise(taste + 0.35 * rng.standard_normal((U, K)))
    other = world.centers[rng.choice(C, size=U, p=home_p)]
    late_taste = _normalise(taste + 0.8 * other)
    beta = p.beta / (1.0 + 0.5 * np.log1p(np.maximum(n_u / np.median(n_u) - 1, 0)))
    bias = 0.4 * rng.standard_normal(U)
    return dict(n_u=n_u, start=start, span=span, taste=taste.astype(np.float32),
                late=late_taste.astype(np.float32), beta=beta, bias=bias)


def _cluster_cdf(tastes: np.ndarray, beta: np.ndarray, world: _World) -> np.ndarray:
    """(n, C) row-wise CDFs of the cluster choice, offset by the row index so they can be
    searched as one sorted array."""
    logits = beta[:, None] * (tastes @ world.centers.T.astype(np.float32)) + 0.5 * world.cluster_logw
    logits -= logits.max(1, keepdims=True)
    pr = np.exp(logits)
    cdf = np.cumsum(pr, axis=1)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0
    return (cdf + np.arange(len(cdf))[:, None]).ravel()


def _sample_rows(users: np.ndarray, m_u: np.ndarray, plan: dict, world: _World, t1: float,
                 rng: np.random.Generator, temper: float = 1.0):
    """Raw (possibly duplicated) rows for ``users`` (global indices) with ``m_u`` rows each.

    ``temper`` < 1 flattens the taste and the within-cluster popularity (used only to top up
    users who ran out of distinct movies)."""
    n_local = len(users)
    total = int(m_u.sum())
    loc = np.repeat(np.arange(n_local), m_u)
    first = np.concatenate([[0], np.cumsum(m_u)[:-1]])
    pos = np.arange(total) - first[loc]
    # sessions: a new one with probability 1/6, always at a user's first row
    new = (rng.random(total) < 1 / 6) | (pos == 0)
    sess = np.cumsum(new) - 1
    n_sess = int(sess[-1]) + 1
    sess_user = loc[new]
    # session start times: sorted uniforms over each user's span (cumulated exponential gaps)
    gaps = rng.exponential(1.0, n_sess + n_local)
    # one extra gap per user so the last session is not pinned at the span's end
    sess_count = np.bincount(sess_user, minlength=n_local)
    slot_user = np.repeat(np.arange(n_local), sess_count + 1)
    cs = np.cumsum(gaps)
    slot_first = np.concatenate([[0], np.cumsum(sess_count + 1)[:-1]])
    base = np.concatenate([[0.0], cs])[slot_first]
    frac_all = (cs - base[slot_user]) / (cs[slot_first + sess_count] - base)[slot_user]
    is_last = np.zeros(len(cs), bool)
    is_last[slot_first + sess_count] = True
    frac_sess = frac_all[~is_last]
    g = users[sess_user]
    sess_t = plan["start"][g] + frac_sess * plan["span"][g]
    # row times: session start + a few minutes per row
    step = rng.uniform(30, 600, total)
    within = np.cumsum(step)
    sess_first_row = np.flatnonzero(new)
    within = within - within[sess_first_row][sess]
    t = np.minimum(sess_t[sess] + within, t1)
    ts = np.floor(t).astype(np.int64)
    frac_user = np.clip((t - plan["start"][users[loc]]) / np.maximum(plan["span"][users[loc]], 1.0), 0, 1)
    use_late = rng.random(total) < frac_user
    # cluster choice: early/late taste CDFs
    gl = users
    cdf_e = _cluster_cdf(plan["taste"][gl], plan["beta"][gl] * temper, world)
    cdf_l = _cluster_cdf(plan["late"][gl], plan["beta"][gl] * temper, world)
    C = len(world.centers)
    r = loc + rng.random(total) * (1 - 1e-12)
    fresh = np.where(use_late, np.searchsorted(cdf_l, r, side="right"),
                     np.searchsorted(cdf_e, r, side="right")) - loc * C
    del cdf_e, cdf_l
    fresh = np.clip(fresh, 0, C - 1)
    stay = (~new) & (rng.random(total) < 0.65)
    cluster = np.where(stay, fresh[sess_first_row][sess], fresh)
    # movie inside the cluster: released by t (popularity-weighted), 25% among the last 2 years
    day = (t - _DAY0) / 86400.0
    k = cluster.astype(np.float64) * 1e6
    lo = world.cl_start[cluster]
    hi = np.searchsorted(world.key, k + day, side="right")
    recent = rng.random(total) < 0.25
    lo_recent = np.searchsorted(world.key, k + day - 730.0, side="left")
    lo = np.where(recent & (lo_recent < hi), lo_recent, lo)
    hi = np.maximum(hi, world.cl_start[cluster] + 1)
    lo = np.minimum(lo, hi - 1)
    cw = world.cum_w
    x = cw[lo] + rng.random(total) * (cw[hi] - cw[lo])
    posi = np.clip(np.searchsorted(cw, x, side="right") - 1, lo, hi - 1)
    if temper < 1.0:   # mix in uniform picks inside the cluster
        flat = rng.random(total) < (1.0 - temper)
        posi = np.where(flat, lo + np.floor(rng.random(total) * (hi - lo)).astype(np.int64), posi)
    item = world.order[posi].astype(np.int32)
    # rating score with the taste of the moment
    tv = np.where(use_late[:, None], plan["late"][users[loc]], plan["taste"][users[loc]])
    score = 2.0 * np.einsum("ij,ij->i", tv, world.item_vec[item]) + world.item_quality[item] \
        + plan["bias"][users[loc]] + 0.6 * rng.standard_normal(total)
    return loc, item, ts, score.astype(np.float32)


def _ratings_chunk(users: np.ndarray, plan: dict, world: _World, p: Preset, seed: int, chunk: int):
    rng = _rng(seed, 3, chunk)
    n_u = plan["n_u"][users]
    t1 = float(_ts(p.end) + 86399)
    f = np.minimum(1.3 + 3.0 * n_u / p.n_items, 4.0)
    m_u = np.ceil(n_u * f).astype(np.int64)
    loc, item, ts, score = _sample_rows(users, m_u, plan, world, t1, rng)
    for attempt in range(10):
        # first occurrence of each (user, movie)
        key = loc.astype(np.int64) * p.n_items + item
        _, first_idx = np.unique(key, return_index=True)
        keep = np.zeros(len(key), bool)
        keep[first_idx] = True
        uniq = np.bincount(loc[keep], minlength=len(users))
        target = np.minimum(n_u, uniq)
        deficit = int(n_u.sum() - target.sum())
        surplus = uniq - target
        short_min = bool((uniq < np.minimum(n_u, p.min_ratings)).any())
        if deficit <= surplus.sum() and not short_min:
            if deficit:
                target = target + _fill(deficit, surplus)
            break
        # not enough distinct rows (in total, or a user below the preset's minimum): draw more
        # for the short users, with a flatter taste, and merge
        more = np.where(uniq < n_u, 3 * (n_u - uniq) + 10, 0)
        l2, i2, t2, s2 = _sample_rows(users, more, plan, world, t1, _rng(seed, 4, chunk, attempt),
                                      temper=0.5 ** (attempt + 1))
        loc, item, ts, score = (np.concatenate([loc, l2]), np.concatenate([item, i2]),
                                np.concatenate([ts, t2]), np.concatenate([score, s2]))
    else:  # pragma: no cover
        raise DataError(f"synthetic preset could not reach {n_u.sum()} distinct ratings in chunk {chunk}")
    # keep a random subset of `target` distinct rows per user, spread over the user's span
    idx = np.flatnonzero(keep)
    rk = rng.random(len(idx))
    o = np.lexsort((rk, loc[idx]))
    idx = idx[o]
    grp_first = np.concatenate([[0], np.cumsum(uniq)[:-1]])
    rank = np.arange(len(idx)) - grp_first[loc[idx]]
    idx = idx[rank < target[loc[idx]]]
    o = np.lexsort((item[idx], ts[idx], loc[idx]))
    idx = idx[o]
    loc, item, ts, score = loc[idx], item[idx], ts[idx], score[idx]
    # quantile map onto the half-star distribution
    cuts = np.quantile(score, np.cumsum(_RATING_SHARE)[:-1] / _RATING_SHARE.sum())
    code = np.searchsorted(cuts, score, side="right").astype(np.int8)
    return users[loc].astype(np.int32), item, ts, code


def _fill(deficit: int, surplus: np.ndarray) -> np.ndarray:
    add = np.minimum(_split_exact(deficit, surplus.astype(np.float64) + 1e-12), surplus)
    left = deficit - int(add.sum())
    while left > 0:
        room = surplus - add
        give = np.flatnonzero(room > 0)[:left]
        add[give] += 1
        left -= len(give)
    return add


def _user_chunks(n_u: np.ndarray) -> list[np.ndarray]:
    cs = np.cumsum(n_u)
    bounds = np.searchsorted(cs, np.arange(_CHUNK_ROWS, cs[-1], _CHUNK_ROWS))
    edges = np.unique(np.concatenate([[0], bounds, [len(n_u)]]))
    return [np.arange(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _tags_chunk(uid, item, ts, code, n_tags, tag_w, world: _World, seed: int, chunk: int):
    """``n_tags`` distinct (user, movie, tag) rows drawn from the chunk's ratings."""
    rng = _rng(seed, 5, chunk)
    if n_tags == 0:
        return (np.zeros(0, np.int32),) * 2 + (np.zeros(0, np.int64), np.zeros(0, np.int32))
    w = tag_w[uid] * np.where(code >= 7, 2.0, 1.0)
    cw = np.cumsum(w)
    n_vocab = len(world.phrases)
    genre_tag = {g: i for i, g in enumerate(GENRES)}
    out = None
    for attempt in range(10):
        m = int(n_tags * 1.2) + 20
        rows = np.searchsorted(cw, rng.random(m) * cw[-1], side="right")
        rows = np.minimum(rows, len(uid) - 1)
        it = item[rows]
        kind = rng.random(m)
        ph = world.cluster_phrases[world.item_cluster[it], np.minimum(rng.zipf(1.6, m) - 1, 5)]
        # genre word: one of the movie's genres
        gi = np.array([genre_tag[g[0]] if g else -1 for g in world.item_genres], dtype=np.int64)
        gsel = gi[it] * 3 + rng.integers(0, 3, m)
        gen = rng.integers(0, len(_GENERIC_TAGS), m)
        tag = np.where(kind < 0.6, ph, np.where((kind < 0.9) & (gi[it] >= 0), n_vocab + gsel,
                                                n_vocab + 3 * len(GENRES) + gen))
        tts = ts[rows] + rng.integers(0, 3600, m)
        new = (uid[rows], it, tts, tag.astype(np.int32))
        out = new if out is None else tuple(np.concatenate([a, b]) for a, b in zip(out, new))
        key = (out[0].astype(np.int64) * (1 << 20) + out[1]) * (1 << 14) + out[3]
        _, first = np.unique(key, return_index=True)
        if len(first) >= n_tags:
            pick = np.sort(rng.choice(first, size=n_tags, replace=False))
            out = tuple(a[pick] for a in out)
            o = np.lexsort((out[3], out[1], out[2], out[0]))
            return tuple(a[o] for a in out)
    raise DataError(f"synthetic tags: could not draw {n_tags} distinct tags")  # pragma: no cover


def _tag_vocab(world: _World) -> np.ndarray:
    words = list(world.phrases) + [t for g in GENRES for t in _GENRE_TAGS[g]] + _GENERIC_TAGS
    for w_ in words:
        assert not any(c in w_ for c in ',"\n\r'), w_
    return np.array(words, dtype=object)


# ------------------------------------------------------------------ writing
def _write_table(f, cols: dict) -> None:
    table = pa.table(cols)
    pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False, quoting_style="none"))


def _write_all(p: Preset, seed: int, folder: Path) -> dict[str, str]:
    world = _build_world(p, seed)
    plan = _user_plan(p, seed, world)
    rng = _rng(seed, 6)
    # movies.csv and links.csv
    years = np.floor(world.release_day / 365.25).astype(int) + 1850
    years = np.where(rng.random(p.n_items) < 0.003, 0, years)   # a few titles without a year
    titles = _titles(rng, p.n_items, years)
    with open(folder / "movies.csv", "w", encoding="utf-8", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(["movieId", "title", "genres"])
        for mid, title, gs in zip(world.movie_ids.tolist(), titles, world.item_genres):
            wr.writerow([mid, title, "|".join(gs) if gs else NO_GENRES])
    imdb = np.sort(rng.choice(np.arange(1, 10_000_000), size=p.n_items, replace=False))
    tmdb = rng.choice(np.arange(2, 1_300_000), size=p.n_items, replace=False)
    no_tmdb = rng.random(p.n_items) < 0.002
    with open(folder / "links.csv", "w", encoding="utf-8", newline="") as f:
        f.write("movieId,imdbId,tmdbId\n")
        f.writelines(f"{m},{i:07d},{'' if nt else t}\n" for m, i, t, nt in
                     zip(world.movie_ids.tolist(), imdb.tolist(), tmdb.tolist(), no_tmdb.tolist()))
    # ratings.csv and tags.csv, chunk by chunk of users
    chunks = _user_chunks(plan["n_u"])
    chunk_rows = np.array([plan["n_u"][c].sum() for c in chunks], dtype=np.float64)
    tags_per_chunk = _split_exact(p.n_tags, chunk_rows)
    trng = _rng(seed, 7)
    tag_w = np.where(trng.random(p.n_users) < 0.2, trng.pareto(1.2, p.n_users) + 0.05, 0.002)
    vocab = _tag_vocab(world)
    rating_text = pa.array(_RATING_TEXT)
    with open(folder / "ratings.csv", "wb") as fr, open(folder / "tags.csv", "wb") as ft:
        fr.write(b"userId,movieId,rating,timestamp\n")
        ft.write(b"userId,movieId,tag,timestamp\n")
        for ci, users in enumerate(chunks):
            uid, item, ts, code = _ratings_chunk(users, plan, world, p, seed, ci)
            _write_table(fr, {"userId": pa.array(uid + 1), "movieId": pa.array(world.movie_ids[item]),
                              "rating": rating_text.take(pa.array(code)), "timestamp": pa.array(ts)})
            tu, ti, tt, tg = _tags_chunk(uid, item, ts, code, int(tags_per_chunk[ci]), tag_w, world,
                                         seed, ci)
            if len(tu):
                _write_table(ft, {"userId": pa.array(tu + 1), "movieId": pa.array(world.movie_ids[ti]),
                                  "tag": pa.array(vocab[tg].tolist(), pa.string()),
                                  "timestamp": pa.array(tt)})
            del uid, item, ts, code
    sums = {name: md5_file(folder / name) for name in FILES}
    (folder / "checksums.txt").write_text("".join(f"{sums[n]}  {n}\n" for n in FILES))
    return sums


def generate(preset: str = "demo", seed: int = 0, out_dir: Path | None = None,
             force: bool = False) -> Path:
    """Write the synthetic data set of ``preset`` (tiny | demo | 32m) with ``seed``.

    The target is ``out_dir`` if given, else ``config.raw_dir(<dataset of the preset>)``. An
    existing, verified target is returned untouched unless ``force``; with ``force`` it is
    replaced atomically. Returns the folder.
    """
    if preset not in PRESETS:
        raise DataError(f"unknown synthetic preset {preset!r}; valid presets: {sorted(PRESETS)}")
    target = Path(out_dir) if out_dir is not None else config.raw_dir(DATASET_OF_PRESET[preset])
    if target.exists() and not force:
        marker = read_marker(target)
        if marker and marker.get("preset") == preset and marker.get("seed") == seed:
            if marker.get("sizes") == asdict(PRESETS[preset]):
                return target
            # Ours, but written by another definition of the preset (the demo shrank on 2026-12-06):
            # generated data, so it is rewritten rather than silently kept at the old size.
            print(f"[data] {target} holds an older definition of the synthetic {preset!r} preset; "
                  f"writing it again")
            force = True
        else:
            raise DataError(f"{target} exists but is not the synthetic {preset!r} set with seed {seed} "
                            f"(no or different {MARKER}); pass force=True (--force) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        sums = _write_all(PRESETS[preset], seed, tmp)
        write_marker(tmp, {"name": target.name, "source": f"synthetic preset={preset} seed={seed}",
                           "preset": preset, "seed": seed, "sizes": asdict(PRESETS[preset]),
                           "verified_against": "generated",
                           "checksums": sums})
        config.replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


