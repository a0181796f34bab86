"""Self-contained HTML page for `text4vpr localize --html`: the descriptions, the top-k
locations with their views' thumbnails, scores and positions, and the distances between them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from text4vpr.retrieval.html_report import descriptions_list, identity_section, location_block, page
from text4vpr.retrieval.thumbnails import LocationCard, load_cards
from text4vpr.utils.atomic import atomic_write_text


def distance_table(results: list[dict]) -> str:
    """Metres between every pair of candidates (ECEF, float64): how far apart the choices are."""
    xyz = np.array([r["ecef"] for r in results], dtype=np.float64)  # (k, 3)
    dist = np.linalg.norm(xyz[:, None, :] - xyz[None, :, :], axis=-1)  # (k, k)
    head = "".join(f"<th>#{r['rank']}</th>" for r in results)
    rows = "".join(f"<tr><th>#{r['rank']}</th>" + "".join(f'<td data-value="{float(d)!r}">{d:.1f}</td>' for d in dist[i])
                   + "</tr>" for i, r in enumerate(results))
    return f'<table class="acc" id="distances"><caption>metres between candidates</caption><tr><th></th>{head}</tr>{rows}</table>'


def _result_card(r: dict, card: LocationCard | None) -> str:
    label = (f"<b>#{r['rank']}: location {r['index']}</b>, score {r['score']:.4f}, "
             f"{r['lat']:.6f}, {r['lon']:.6f}")
    return (f'<article class="card result" data-kind="result" data-query="{r["index"]}">{location_block(label, card)}'
            f"{descriptions_list(card)}</article>")


def render_localize(texts: Sequence[str], results: list[dict], cards: dict[int, LocationCard], identity: dict) -> str:
    query = f'<section id="query"><h2>Descriptions (pos order)</h2>{descriptions_list(None, texts)}</section>'
    found = "".join(_result_card(r, cards.get(r["index"])) for r in results)
    return page("Text4VPR localisation", [query, f'<section id="results"><h2>Top {len(results)} locations</h2>{found}</section>',
                                          f'<section id="spread"><h2>Distances</h2>{distance_table(results)}</section>',
                                          identity_section(identity)])


def write_localize_html(path: str | Path, texts: Sequence[str], results: list[dict], shard_dirs: Sequence[str | Path],
                        identity: dict) -> Path:
    """Write the page; thumbnails come from `shard_dirs` (none given: the cards say so)."""
    cards = load_cards(shard_dirs, [r["index"] for r in results])
    path = Path(path)
    atomic_write_text(path, render_localize(texts, results, cards, identity))
    return path
