"""report.html: gallery selection against a naive loop, and the real page in headless Chromium
(no script or console errors, nothing external, table = metrics.json, card counts)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from text4vpr.cli import main
from text4vpr.retrieval.html_report import DIST_EDGES, HEADLINE_R, distance_histogram, select_gallery
from text4vpr.retrieval.ranking import Ranking
from tests.browser import screenshot


def _random_ranking(q=50, n=30, k=5, seed=0) -> Ranking:
    g = torch.Generator().manual_seed(seed)
    db = torch.randint(0, 4, (n, 3), generator=g).double() * 4.0  # a coarse grid: many exact ties in distance
    picks = torch.randint(0, n, (q,), generator=g)
    qc = db[picks] + (torch.rand(q, 3, generator=g, dtype=torch.float64) < 0.5) * 3.0
    ids = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(q)])
    scores = torch.randint(0, 4, (q, k), generator=g).float().sort(1, descending=True).values  # tied margins too
    return Ranking(picks + 500, qc, torch.arange(n) + 500, db, scores, ids)  # a query's true location: its pick


def test_gallery_selection_matches_a_naive_loop():
    """Failures: the true location ranked farthest down first (not among the K: below all), then
    the largest score margin to it, the farthest first result, the lower location index."""
    for seed in range(3):
        r = _random_ranking(seed=seed)
        rows = []  # (-depth, -margin, -top-1 distance, location index, row), one query at a time, float64
        for q in range(len(r.query_index)):
            d = float(np.linalg.norm(r.db_coords[r.ids[q, 0]].numpy() - r.query_coords[q].numpy()))
            found = [j for j in range(r.ids.shape[1]) if int(r.db_index[r.ids[q, j]]) == int(r.query_index[q])]
            depth = found[0] + 1 if found else r.ids.shape[1] + 1
            margin = float(r.scores[q, 0]) - float(r.scores[q, found[0]]) if found else 0.0
            rows.append((-depth, -margin, -d, int(r.query_index[q]), q))
        misses = sorted(row for row in rows if -row[2] > HEADLINE_R)
        assert len({row[0] for row in misses}) > 2  # the rule is exercised: several depths among the misses
        hits = {row[4] for row in rows if -row[2] <= HEADLINE_R}
        picked = select_gallery(r, failures=7, successes=4, seed=seed)
        assert [q for q, kind in picked if kind == "failure"] == [row[4] for row in misses[:7]]
        succ = [q for q, kind in picked if kind == "success"]
        assert len(succ) == min(4, len(hits)) and set(succ) <= hits and succ == sorted(succ)
        assert picked == select_gallery(r, failures=7, successes=4, seed=seed)  # deterministic


def test_distance_histogram_counts_every_query_once():
    top1 = np.array([0.0, 5.0, 5.0001, 10.0, 29.9, 30.0, 99.0, 5000.0, 1e6])
    svg = distance_histogram(top1)
    counts = [int(c) for c in __import__("re").findall(r'data-count="(\d+)"', svg)]
    want = [sum(1 for d in top1 if (lo < d or (lo == 0 and d == 0)) and d <= hi) for lo, hi in zip(DIST_EDGES[:-1], DIST_EDGES[1:])]
    assert counts == want and sum(counts) == len(top1)


def test_eval_html_report_in_chromium(model_dir, synth_shards, tmp_path, report_page):
    out = tmp_path / "report"
    rc = main(["eval", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0",
               "--out", str(out), "--html", "--gallery", "4"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    fails, succ = report_page.expected_cards(metrics, 4, 1)
    assert fails + succ > 0
    dom = report_page.check(out / "report.html", metrics, fails, succ, thumbs_per_card=16)  # 4 views x (truth + top-3)
    per_query = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
    report_page.check_gallery_order(dom, per_query, 4)
    png = screenshot(out / "report.html", tmp_path / "shot.png", 1000, 1400)
    with Image.open(png) as im:
        assert im.size == (1000, 1400)
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something was drawn


def test_localize_html_in_chromium(model_dir, index_dir, synth_shards, tmp_path, capsys):
    from text4vpr.data.geo import ecef_to_geodetic
    from tests.browser import dump_dom, parse_dom

    page = tmp_path / "where.html"
    texts = ["a red car by the curb and a tall green tree", "a grey building with many windows"]
    args = ["localize", "--model", str(model_dir), "--index", str(index_dir), "--top-k", "4", "--json"]
    assert main(args + [f"--text={t}" for t in texts] + ["--html", str(page), "--shards", str(synth_shards)]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    raw, console = dump_dom(page)
    dom = parse_dom(raw)
    assert dom.select("body")[0].attrs.get("data-js-ok") == "1" and console == [] and not dom.by_id("js-errors").text
    cards = dom.select("article", cls="result")
    assert [int(c.attrs["data-query"]) for c in cards] == [r["index"] for r in results]
    assert len([e for e in dom.select("img") if e.attrs["src"].startswith("data:image/jpeg")]) == 4 * len(results)
    assert [li.text for li in dom.select("li")[: len(texts)]] == texts
    xyz = np.array([r["ecef"] for r in results])
    got = np.array([float(td.attrs["data-value"]) for td in dom.select("td", attr="data-value")]).reshape(4, 4)
    want = np.array([[np.sqrt(((a - b) ** 2).sum()) for b in xyz] for a in xyz])  # naive pairwise loop
    assert np.allclose(got, want, rtol=0, atol=1e-9) and np.allclose(np.diag(got), 0)
    assert np.allclose(ecef_to_geodetic(xyz)[:, 0], [r["lat"] for r in results])
    # without shards: the page still renders, each card saying where thumbnails would come from
    assert main(args + [f"--text={texts[0]}", "--html", str(tmp_path / "bare.html")]) == 0
    assert "not in the shards" in (tmp_path / "bare.html").read_text()


def test_wanted_samples_match_the_tarfile_reader(synth_shards):
    from text4vpr.data.shard_reader import iter_tar_samples, load_manifest
    from text4vpr.retrieval.thumbnails import _may_hold, _wanted_samples

    for s in load_manifest(synth_shards)["shards"]:
        path = synth_shards / s["name"]
        want = {json.loads(sample["json"])["index"]: sample for _, sample in iter_tar_samples(path)}
        assert dict(_wanted_samples(path, set(want))) == want
        first = min(want)
        assert dict(_wanted_samples(path, {first, 10**6})) == {first: want[first]}  # only what is asked for
        assert _may_hold(s, {first}) and not _may_hold(s, {10**6})  # the manifest's keys skip whole shards
        assert _may_hold({k: v for k, v in s.items() if k != "keys"}, {10**6})  # no key list: read it


def test_cards_carry_the_data_report_flags(synth_shards, tmp_path):
    """A refusal flagged at build time and a dropped view show on the location's card."""
    import shutil

    from text4vpr.data.shard_reader import iter_tar_samples, load_manifest
    from text4vpr.retrieval.html_report import location_block
    from text4vpr.retrieval.thumbnails import load_cards

    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    manifest = load_manifest(shards)
    _, sample = next(iter_tar_samples(shards / manifest["shards"][0]["name"]))
    first = json.loads(sample["json"])["index"]
    manifest["report"]["flags"].append({"file": "t.xlsx", "row": 3, "index": first, "pos": 2, "flag": "refusal",
                                        "detail": "I'm sorry, I can't assist with that."})
    manifest["report"]["dropped_views"].append({"file": "t.xlsx", "row": 4, "index": first, "pos": 3,
                                                "reason": "missing image"})
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cards = load_cards([shards], [first, 10**6])
    assert set(cards) == {first}  # a location not in the shards is absent, not an error
    assert cards[first].flags == ["pos 2: refusal", "pos 3: dropped (missing image)"]
    html = location_block("x", cards[first])
    assert html.count('class="flag"') == 2 and "pos 2: refusal" in html


def test_evaluate_ranking_matches_a_naive_search(model_dir, synth_shards):
    """The evaluation's ranking: the same metrics, and per query the ids, scores and location ids a
    float64 loop over the database gives (higher score first, then lower row)."""
    from text4vpr.data.loader import LoaderConfig, build_loader
    from text4vpr.models import Text4VPR
    from text4vpr.retrieval.evaluate import encode_split, evaluate

    model = Text4VPR.from_pretrained(model_dir)
    cfg = LoaderConfig(shards=str(synth_shards), tokenizer=str(model_dir), batch_size=4, image_size=56, num_workers=0)
    plain = evaluate(model, build_loader(cfg, "eval")).metrics
    result = evaluate(model, build_loader(cfg, "eval"))
    metrics, ranking = result.metrics, result.ranking
    assert metrics == plain
    enc = encode_split(model, build_loader(cfg, "eval"))
    text = (enc["queries"] * enc["query_mask"][..., None]).double().flatten(1).numpy()
    images = (enc["database"] * enc["db_mask"][..., None]).double().flatten(1).numpy()
    assert ranking.query_index.tolist() == ranking.db_index.tolist() == enc["index"].tolist()
    for q in range(len(text)):
        scores = images @ text[q]
        order = np.lexsort((np.arange(len(images)), -scores))[: ranking.ids.shape[1]]
        assert ranking.ids[q].tolist() == order.tolist()
        assert np.allclose(ranking.scores[q].numpy(), scores[order], rtol=1e-5, atol=1e-5)
    want = np.linalg.norm(enc["coords"].numpy()[order] - enc["coords"].numpy()[q], axis=-1)
    assert np.array_equal(ranking.distances()[q], want)
