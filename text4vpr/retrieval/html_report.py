"""Self-contained HTML evaluation report (`report.html`): the run's identity and training curves,
the accuracy table beside chance, charts, a map of hits and misses, and a gallery of the worst
queries with what was retrieved instead.

Everything is inline (SVG charts, base64 JPEG thumbnails, a few lines of script), so the file
opens from disk with no network. The page records script errors into `#js-errors` and sets
`data-js-ok` on <body> once its script ran, so a headless browser can check it.
"""

from __future__ import annotations

import datetime
import json
from html import escape
from pathlib import Path
from typing import Sequence

import numpy as np

from text4vpr.data.geo import ecef_to_geodetic
from text4vpr.retrieval import svg
from text4vpr.retrieval.curves import training_section
from text4vpr.retrieval.defaults import GALLERY, gallery_successes
from text4vpr.retrieval.ranking import Ranking
from text4vpr.retrieval.thumbnails import LocationCard, load_cards
from text4vpr.utils.atomic import atomic_write_text

HEADLINE_K, HEADLINE_R = 1, 5.0  # the map's hit/miss colouring and the gallery's failure rule
DIST_EDGES = (0, 5, 10, 15, 30, 100, 300, 1000, 3000, float("inf"))
TOP_SHOWN = 3  # retrieved locations per gallery card
MAX_MAP_POINTS = 20000

_CSS = """
body{font-family:sans-serif;margin:16px 24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table.acc{border-collapse:collapse}table.acc td,table.acc th{border:1px solid #ccc;padding:4px 10px;text-align:right}
.chance{color:#888;font-size:11px}.charts{display:flex;flex-wrap:wrap;gap:12px}
dl.id{display:grid;grid-template-columns:max-content auto;gap:2px 14px}dl.id dt{font-weight:bold}
.card{border:1px solid #ccc;border-radius:6px;padding:8px 12px;margin:10px 0}
.card.failure{border-left:6px solid #d62728}.card.result{border-left:6px solid #1f77b4}.card.success{border-left:6px solid #2ca02c}
.card h3{font-size:15px;margin:2px 0 6px}.descs{font-size:12px;margin:4px 0 8px;padding-left:22px}
.locs{display:flex;flex-wrap:wrap;gap:14px}.loc{font-size:12px}.loc .label{margin-bottom:2px}
.thumbs{display:flex;gap:2px}.thumbs img,.thumbs .none{width:96px;height:96px;object-fit:cover;background:#eee}
.none{display:flex;align-items:center;justify-content:center;color:#999;font-size:10px;text-align:center}
.flag{display:inline-block;background:#fff3cd;border:1px solid #e0c060;border-radius:3px;padding:0 4px;margin:0 4px 4px 0;font-size:11px}
.within{color:#2ca02c}.far{color:#d62728}#js-errors{display:none}
.filters button{margin-right:6px}.hidden{display:none}pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:11px}
"""

_HEAD_SCRIPT = """window.onerror=function(m,s,l,c){var e=document.getElementById('js-errors');
if(e){e.textContent+=m+' ('+l+':'+c+')\\n';}else{window.__early=(window.__early||'')+m;}};
window.addEventListener('unhandledrejection',function(ev){window.onerror(String(ev.reason),'',0,0);});"""

_BODY_SCRIPT = """(function(){var e=document.getElementById('js-errors');if(window.__early){e.textContent+=window.__early;}
var cards=document.querySelectorAll('.card');document.querySelectorAll('.filters button').forEach(function(b){
b.addEventListener('click',function(){var k=b.getAttribute('data-show');cards.forEach(function(c){
c.classList.toggle('hidden',k!=='all'&&c.getAttribute('data-kind')!==k);});});});
document.body.setAttribute('data-js-ok','1');})();"""


def page(title: str, sections: list[str]) -> str:
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style><script>{_HEAD_SCRIPT}</script></head>"
            f"<body><h1>{escape(title)}</h1>{''.join(sections)}<pre id=\"js-errors\"></pre>"
            f"<script>{_BODY_SCRIPT}</script></body></html>")


def run_identity(model: str, shards: str, mode: str, config: dict | str | None = None, **extra) -> dict:
    """What produced a report: model, shards, mode, date (UTC), package version, config."""
    from text4vpr import __version__

    ident = {"model": str(model), "shards": str(shards), "mode": mode,
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
             "text4vpr": __version__, **{k: str(v) for k, v in extra.items()}}
    if config is not None:
        ident["config"] = config if isinstance(config, str) else json.dumps(config, indent=2, sort_keys=True, default=str)
    return ident


def identity_section(identity: dict) -> str:
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in identity.items() if k != "config")
    config = identity.get("config")
    cfg = f"<details><summary>config</summary><pre>{escape(config)}</pre></details>" if config else ""
    return f'<section id="identity"><h2>Run</h2><dl class="id">{rows}</dl>{cfg}</section>'


def accuracy_table(metrics: dict) -> str:
    """k by radius table in percent; each cell carries the exact fraction in `data-value`."""
    acc, chance = metrics["accuracy"], metrics.get("chance")
    radii = list(next(iter(acc.values())))
    head = "".join(f"<th>{escape(r)} m</th>" for r in radii)
    rows = []
    for k, row in acc.items():
        cells = []
        for r in radii:
            c = (f'<br><span class="chance" data-value="{float(chance[k][r])!r}">chance {100 * chance[k][r]:.1f} %</span>'
                 if chance else "")
            cells.append(f'<td data-k="{escape(k)}" data-r="{escape(r)}" data-value="{float(row[r])!r}">'
                         f'<span class="pct">{100 * row[r]:.1f} %</span>{c}</td>')
        rows.append(f"<tr><th>top-{escape(k)}</th>{''.join(cells)}</tr>")
    caption = (f"{metrics['mode']} similarity, {metrics['num_queries']} queries, "
               f"{metrics['num_database']} database locations")
    return (f'<table class="acc" id="accuracy"><caption>{escape(caption)}</caption>'
            f"<tr><th></th>{head}</tr>{''.join(rows)}</table>")


def accuracy_chart(metrics: dict) -> str:
    acc = metrics["accuracy"]
    radii = list(next(iter(acc.values())))
    series = {f"within {r} m": [(float(k), 100 * acc[k][r]) for k in acc] for r in radii}
    return svg.line_chart(series, "k (locations retrieved)", "accuracy (%)", cls="acc-vs-k")


def _metres(v: float) -> str:
    return f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"


def _distance_label(lo: float, hi: float) -> str:
    return f">{_metres(lo)}" if hi == float("inf") else f"{_metres(lo)}-{_metres(hi)}"


def distance_histogram(top1: np.ndarray) -> str:
    """Counts of queries by distance (m) from the true position to the first retrieved location."""
    bins = np.digitize(top1, np.array(DIST_EDGES[1:-1]), right=True)  # 0: [0, 5], 1: (5, 10], ...
    counts = np.bincount(bins, minlength=len(DIST_EDGES) - 1).tolist()
    labels = [_distance_label(lo, hi) for lo, hi in zip(DIST_EDGES[:-1], DIST_EDGES[1:])]
    colours = [svg.HIT if hi <= HEADLINE_R else svg.MISS for hi in DIST_EDGES[1:]]
    return svg.histogram(counts, labels, "distance to the first retrieved location (m)", "queries", colours)


def query_map(ranking: Ranking, top1: np.ndarray) -> str:
    """Query positions (lat/lon from ECEF), framed to their extent: green dots where the top-1 is
    within HEADLINE_R, red rings for misses, drawn last (on top, the dots beneath still visible)."""
    n = len(top1)
    keep = np.arange(n) if n <= MAX_MAP_POINTS else np.linspace(0, n - 1, MAX_MAP_POINTS).astype(int)
    keep = keep[np.argsort(top1[keep] > HEADLINE_R, kind="stable")]  # misses drawn last, on top
    llh = ecef_to_geodetic(ranking.query_coords.numpy()[keep])
    ids = ranking.query_index.numpy()[keep]
    miss = (top1[keep] > HEADLINE_R).tolist()
    colours = [svg.MISS if m else svg.HIT for m in miss]
    titles = [f"location {i}: top-1 {d:.1f} m away" for i, d in zip(ids.tolist(), top1[keep].tolist())]
    legend = ((svg.HIT, f"● top-{HEADLINE_K} within {HEADLINE_R:g} m"), (svg.MISS, "○ miss"))
    return svg.scatter_map(llh[:, 1], llh[:, 0], colours, titles, legend, hollow=miss)


def select_gallery(ranking: Ranking, failures: int, successes: int, seed: int = 0) -> list[tuple[int, str]]:
    """(query row, 'failure' | 'success'): the `failures` worst misses at (1, 5 m), then a seeded
    random sample of `successes` hits. Worst: the true location ranked farthest down (not among
    the K results first), then the largest score margin to it, then the farthest first result,
    then the lower location index."""
    top1 = ranking.distances()[:, 0]
    ids = ranking.query_index.numpy()
    k = ranking.ids.shape[1]
    ranks = ranking.true_ranks()
    depth = np.where(ranks > 0, ranks, k + 1)  # not among the K results: below all of them
    margin = np.nan_to_num(ranking.true_margins(), nan=0.0)  # unknown beyond K: equal, distance decides
    miss = np.flatnonzero(top1 > HEADLINE_R)
    worst = miss[np.lexsort((ids[miss], -top1[miss], -margin[miss], -depth[miss]))][:failures]
    hit = np.flatnonzero(top1 <= HEADLINE_R)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(hit, size=min(successes, len(hit)), replace=False)) if len(hit) else hit
    return [(int(q), "failure") for q in worst] + [(int(q), "success") for q in sample]


def _thumbs(card: LocationCard | None) -> str:
    if card is None:
        return '<div class="thumbs"><div class="none">not in the shards</div></div>'
    cells = [f'<img src="{card.thumbnails[p]}" alt="pos {p}" title="pos {p}">' if p in card.thumbnails
             else f'<div class="none">pos {p}: no view</div>' for p in range(1, 5)]
    return f'<div class="thumbs">{"".join(cells)}</div>'


def _flags(card: LocationCard | None) -> str:
    return "".join(f'<span class="flag">{escape(f)}</span>' for f in card.flags) if card else ""


def location_block(label: str, card: LocationCard | None) -> str:
    return f'<div class="loc"><div class="label">{label}</div>{_flags(card)}{_thumbs(card)}</div>'


def descriptions_list(card: LocationCard | None, texts: Sequence[str] | None = None) -> str:
    items = list(enumerate(texts, 1)) if texts is not None else sorted(card.descriptions.items()) if card else []
    return '<ol class="descs">' + "".join(f'<li value="{p}">{escape(t)}</li>' for p, t in items) + "</ol>"


def _dist_span(d: float) -> str:
    return f'<span class="{"within" if d <= HEADLINE_R else "far"}">{d:.1f} m</span>'


def true_rank_text(rank: int, margin: float, k: int) -> str:
    """Where the true location ranked, and by how much it trailed the first result."""
    if rank == 0:
        return f"true location not in the top {k}"
    if rank == 1:
        return "true location ranked first"
    return f"true location at rank {rank}, {margin:.4g} below the first result's score"


def gallery_card(q: int, kind: str, ranking: Ranking, dist: np.ndarray, cards: dict[int, LocationCard],
                 rank: int, margin: float) -> str:
    """One query: where its true location ranked (`Ranking.true_ranks`, `true_margins`), its
    descriptions, the true location's views, the top results' views."""
    index = int(ranking.query_index[q])
    card = cards.get(index)
    blocks = [location_block(f"<b>true location {index}</b>", card)]
    for j in range(min(TOP_SHOWN, ranking.ids.shape[1])):
        row = int(ranking.ids[q, j])
        other = int(ranking.db_index[row])
        same = " (the true location)" if other == index else ""
        blocks.append(location_block(f"top-{j + 1}: location {other}{same}, score {float(ranking.scores[q, j]):.4f}, "
                                      f"{_dist_span(float(dist[q, j]))}", cards.get(other)))
    verdict = "miss" if kind == "failure" else "hit"
    return (f'<article class="card {kind}" data-kind="{kind}" data-query="{index}" id="q{index}" '
            f'data-true-rank="{rank}" data-margin="{margin!r}">'
            f"<h3>location {index}: top-1 {dist[q, 0]:.1f} m away ({verdict} at top-{HEADLINE_K} within "
            f"{HEADLINE_R:g} m); {true_rank_text(rank, margin, ranking.ids.shape[1])}</h3>"
            f"{_flags(card)}{descriptions_list(card)}<div class=\"locs\">{''.join(blocks)}</div></article>")


def _gallery_section(picked, ranking: Ranking, dist: np.ndarray, cards) -> str:
    n_fail = sum(1 for _, k in picked if k == "failure")
    misses = int((dist[:, 0] > HEADLINE_R).sum())
    buttons = ('<div class="filters"><button data-show="all">all</button><button data-show="failure">failures</button>'
               '<button data-show="success">successes</button></div>')
    ranks, margins = ranking.true_ranks(), ranking.true_margins()
    body = "".join(gallery_card(q, kind, ranking, dist, cards, int(ranks[q]), float(margins[q])) for q, kind in picked)
    return (f'<section id="gallery"><h2>Gallery: the {n_fail} worst of {misses} misses at top-{HEADLINE_K} within '
            f"{HEADLINE_R:g} m (the true location ranked farthest down first), and {len(picked) - n_fail} random "
            f"successes</h2>{buttons}{body}</section>")


def render_report(metrics: dict, ranking: Ranking, cards: dict[int, LocationCard], identity: dict,
                  picked: list[tuple[int, str]], events: Sequence[dict] = ()) -> str:
    """The whole page as a string (see `write_html_report`): the run's identity and training
    curves first, then the table, the charts and the gallery."""
    dist = ranking.distances()
    top1 = dist[:, 0]
    charts = (f'<section id="charts"><h2>Accuracy, map and distances</h2><div class="charts">{accuracy_chart(metrics)}'
              f"{query_map(ranking, top1)}{distance_histogram(top1)}</div></section>")
    table = f'<section id="table"><h2>Top-k accuracy within r metres</h2>{accuracy_table(metrics)}</section>'
    return page("Text4VPR evaluation report", [identity_section(identity), training_section(list(events)), table,
                                                 charts, _gallery_section(picked, ranking, dist, cards)])


def write_html_report(path: str | Path, metrics: dict, ranking: Ranking, shard_dirs: Sequence[str | Path],
                      identity: dict, failures: int = GALLERY, successes: int = gallery_successes(GALLERY), seed: int = 0,
                      events: Sequence[dict] = ()) -> Path:
    """Write `report.html` for an evaluation; thumbnails come from `shard_dirs` (queries and
    database), training curves from `events` (a run's metrics.jsonl). About 60 KB per gallery
    card with 96 px thumbnails."""
    picked = select_gallery(ranking, failures, successes, seed)
    wanted = set()
    for q, _ in picked:
        wanted.add(int(ranking.query_index[q]))
        wanted.update(int(ranking.db_index[r]) for r in ranking.ids[q, :TOP_SHOWN].tolist())
    cards = load_cards(shard_dirs, wanted)
    path = Path(path)
    atomic_write_text(path, render_report(metrics, ranking, cards, identity, picked, events))
    return path
