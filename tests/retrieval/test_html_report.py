"""report.html: gallery selection against a naive loop, and the real page in headless Chromium
(no script or console errors, nothing external, table = metrics.json, card counts)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from text4vpr.cli import main
from text4vpr.data.tokenizer import load_tokenizer
from text4vpr.models import Text4VPR, tiny_config
from text4vpr.retrieval.html_report import DIST_EDGES, HEADLINE_R, distance_histogram, select_gallery
from text4vpr.retrieval.ranking import Ranking
from text4vpr.utils.browser import dump_dom, parse_dom, screenshot


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_model_html")
    Text4VPR(tiny_config(vocab_size=300)).save_pretrained(out, tokenizer=load_tokenizer(tokenizer_dir))
    return out


def _random_ranking(q=50, n=30, k=5, seed=0) -> Ranking:
    g = torch.Generator().manual_seed(seed)
    db = torch.randint(0, 4, (n, 3), generator=g).double() * 4.0  # a coarse grid: many exact ties in distance
    picks = torch.randint(0, n, (q,), generator=g)
    qc = db[picks] + (torch.rand(q, 3, generator=g, dtype=torch.float64) < 0.5) * 3.0
    ids = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(q)])
    return Ranking(torch.randperm(1000, generator=g)[:q], qc, torch.arange(n) + 500, db,
                   torch.rand(q, k, generator=g).sort(1, descending=True).values, ids)


def test_gallery_selection_matches_a_naive_loop():
    for seed in range(3):
        r = _random_ranking(seed=seed)
        rows = []  # (top-1 distance, location index, row), one query at a time, float64
        for q in range(len(r.query_index)):
            d = float(np.linalg.norm(r.db_coords[r.ids[q, 0]].numpy() - r.query_coords[q].numpy()))
            rows.append((d, int(r.query_index[q]), q))
        misses = sorted((row for row in rows if row[0] > HEADLINE_R), key=lambda t: (-t[0], t[1]))
        hits = {row[2] for row in rows if row[0] <= HEADLINE_R}
        picked = select_gallery(r, failures=7, successes=4, seed=seed)
        assert [q for q, kind in picked if kind == "failure"] == [row[2] for row in misses[:7]]
        succ = [q for q, kind in picked if kind == "success"]
        assert len(succ) == min(4, len(hits)) and set(succ) <= hits and succ == sorted(succ)
        assert picked == select_gallery(r, failures=7, successes=4, seed=seed)  # deterministic


def test_distance_histogram_counts_every_query_once():
    top1 = np.array([0.0, 5.0, 5.0001, 10.0, 29.9, 30.0, 99.0, 5000.0, 1e6])
    svg = distance_histogram(top1)
    counts = [int(c) for c in __import__("re").findall(r'data-count="(\d+)"', svg)]
    want = [sum(1 for d in top1 if (lo < d or (lo == 0 and d == 0)) and d <= hi) for lo, hi in zip(DIST_EDGES[:-1], DIST_EDGES[1:])]
    assert counts == want and sum(counts) == len(top1)


def check_report_page(html_path, metrics: dict, want_failures: int, want_successes: int, thumbs_per_card: int):
    """Open the report in Chromium and check what a reader would see against the numbers."""
    raw, console = dump_dom(html_path)
    dom = parse_dom(raw)
    body = dom.select("body")[0]
    assert body.attrs.get("data-js-ok") == "1", "the page's script did not run to its end"
    assert dom.by_id("js-errors").text.strip() == "" and console == [], (dom.by_id("js-errors").text, console)
    for el in dom.elements:  # self-contained: no external script, image, font or style
        for a in ("src", "href"):
            v = el.attrs.get(a)
            assert v is None or v.startswith(("data:", "#")), f"external reference {a}={v!r}"
    assert not dom.select("link") and all("src" not in e.attrs for e in dom.select("script"))
    cells = dom.select("td", attr="data-value")
    acc = metrics["accuracy"]
    assert len(cells) == sum(len(row) for row in acc.values())
    for td in cells:
        want = acc[td.attrs["data-k"]][td.attrs["data-r"]]
        assert float(td.attrs["data-value"]) == want
    shown = [e.text for e in dom.select("span", cls="pct")]
    assert shown == [f"{100 * v:.1f} %" for row in acc.values() for v in row.values()]
    if "chance" in metrics:
        got = [float(e.attrs["data-value"]) for e in dom.select("span", cls="chance")]
        assert got == [v for row in metrics["chance"].values() for v in row.values()]
    cards = dom.select("article", cls="card")
    assert sum(c.attrs["data-kind"] == "failure" for c in cards) == want_failures
    assert sum(c.attrs["data-kind"] == "success" for c in cards) == want_successes
    images = [e for e in dom.select("img") if e.attrs.get("src", "").startswith("data:image/jpeg;base64,")]
    assert len(images) == thumbs_per_card * len(cards)
    for img in images[:8]:
        w, h = Image.open(io.BytesIO(base64.b64decode(img.attrs["src"].split(",", 1)[1]))).size
        assert max(w, h) <= 96
    assert len(dom.select("svg", cls="map")[0].attrs) and len(dom.select("circle")) >= metrics["num_queries"]
    return dom


def expected_cards(metrics: dict, failures: int, successes: int) -> tuple[int, int]:
    """Card counts from the metrics alone: misses at top-1 within 5 m are the failures."""
    q = metrics["num_queries"]
    misses = round((1 - metrics["accuracy"]["1"]["5"]) * q)
    return min(failures, misses), min(successes, q - misses)


def test_eval_html_report_in_chromium(model_dir, synth_shards, tmp_path):
    out = tmp_path / "report"
    rc = main(["eval", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0",
               "--out", str(out), "--html", "--gallery", "4"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    fails, succ = expected_cards(metrics, 4, 1)
    assert fails + succ > 0
    check_report_page(out / "report.html", metrics, fails, succ, thumbs_per_card=16)  # 4 views x (truth + top-3)
    png = screenshot(out / "report.html", tmp_path / "shot.png", 1000, 1400)
    with Image.open(png) as im:
        assert im.size == (1000, 1400)
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something was drawn
