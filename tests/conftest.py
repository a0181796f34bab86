"""Shared fixtures: everything is generated locally (tokenizer, data, models); no hub."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `tests.helpers` under plain `pytest` too
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def private_compile_caches(tmp_path_factory):
    """torch.compile's and Triton's on-disk caches for this session only (subprocesses inherit
    them): a cache shared with other runs on the machine can hand a half-written kernel `.so`
    to a concurrent reader ("file too short"). A cache dir set by the caller is kept."""
    for var, name in (("TORCHINDUCTOR_CACHE_DIR", "inductor_cache"), ("TRITON_CACHE_DIR", "triton_cache")):
        if var not in os.environ:
            os.environ[var] = str(tmp_path_factory.mktemp(name))


TOKENIZER_TEXTS = [
    "From left to right, the main features include: 1. a red car parked by the curb "
    "2. a tall green tree 3. a grey building with many windows 4. a blue street sign.",
    "From left to right, the features are: 1. a white lamp post 2. a yellow bus "
    "3. a brick building 4. an orange traffic cone on the sidewalk under a cloudy sky.",
    "I'm sorry, I can't assist with that.",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A tiny WordPiece tokenizer with T5 special ids, saved in Hugging Face layout."""
    from text4vpr.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TOKENIZER_TEXTS * 4, out, vocab_size=300)
    return out


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic Street360Loc in the real layout (text4vpr.data.synthetic, seed 0).

    40 locations at 64x64 px: `train_description.xlsx` (28 locations, index 1..28),
    `val_description.xlsx` (6, index 29..34), `test_description.xlsx` (6, index 35..40) and
    `Street360Loc_images/{index:06d}_{pos}.jpg`; four views each, no refusals. Read-only.
    """
    from text4vpr.data.synthetic import SynthConfig, write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, SynthConfig(locations=40, seed=0, image_size=64))
    return out


@pytest.fixture(scope="session")
def synth_shards(synth_root, tmp_path_factory):
    """WebDataset shards of `synth_root`'s test split (6 locations, 2 per shard -> 3 shards).

    Original 64 px JPEGs, with `manifest.json`; load with `text4vpr.data.loader` (e.g.
    `LoaderConfig(shards=str(synth_shards), image_size=56, ...)`). Read-only.
    """
    from text4vpr.data.shards import BuildOptions, build_shards

    out = tmp_path_factory.mktemp("synth_shards")
    build_shards(
        synth_root / "test_description.xlsx",
        synth_root / "Street360Loc_images",
        out,
        BuildOptions(max_count=2, workers=1),
        progress=False,
        log=None,
    )
    return out


class ReportPage:
    """Checks of a report.html in headless Chromium against the metrics it was written from."""

    @staticmethod
    def expected_cards(metrics: dict, failures: int, successes: int) -> tuple[int, int]:
        """Card counts from the metrics alone: misses at top-1 within 5 m are the failures."""
        q = metrics["num_queries"]
        misses = round((1 - metrics["accuracy"]["1"]["5"]) * q)
        return min(failures, misses), min(successes, q - misses)

    @staticmethod
    def check(html_path, metrics: dict, want_failures: int, want_successes: int, thumbs_per_card: int):
        """Open the report in Chromium; check what a reader would see against the numbers."""
        import base64
        import io

        from PIL import Image

        from tests.browser import dump_dom, parse_dom

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
        ReportPage.check_lead_and_map(dom, metrics)
        return dom

    @staticmethod
    def check_lead_and_map(dom, metrics: dict) -> None:
        """The run's identity leads (its digests those of metrics.json); the map draws every miss
        after every hit, as a ring, and its frame hugs the points on one axis at least."""
        sections = [e.attrs.get("id") for e in dom.select("section")]
        assert sections[0] == "identity" and sections.index("identity") < sections.index("table"), sections
        shown = dict(zip([e.text for e in dom.select("dt")], [e.text for e in dom.select("dd")]))
        assert set(metrics["identity"]) >= {"weights_digest", "shards_digest"}
        for name in ("weights_digest", "shards_digest"):
            assert shown[name] == metrics["identity"][name], name
        start = dom.elements.index(dom.select("svg", cls="map")[0])
        end = next(i for i in range(start + 1, len(dom.elements) + 1)
                   if i == len(dom.elements) or dom.elements[i].tag == "svg")
        inside = dom.elements[start + 1:end]
        frame = next(e for e in inside if e.tag == "rect")
        points = [e for e in inside if e.tag == "circle" and "point" in e.attrs.get("class", "")]
        miss = [e.attrs.get("fill") == "none" for e in points]
        assert miss == sorted(miss), "a hit is drawn over a miss"
        assert all(e.attrs["stroke"] == "#d62728" for e, m in zip(points, miss) if m)
        x0, y0 = float(frame.attrs["x"]), float(frame.attrs["y"])
        w, h = float(frame.attrs["width"]), float(frame.attrs["height"])
        xs = [float(e.attrs["cx"]) for e in points]
        ys = [float(e.attrs["cy"]) for e in points]
        assert x0 <= min(xs) and max(xs) <= x0 + w and y0 <= min(ys) and max(ys) <= y0 + h
        tight_x = min(xs) - x0 <= 0.06 * w and x0 + w - max(xs) <= 0.06 * w
        tight_y = min(ys) - y0 <= 0.06 * h and y0 + h - max(ys) <= 0.06 * h
        assert tight_x or tight_y, "the map is not zoomed to the data"

    @staticmethod
    def check_gallery_order(dom, per_query: list[dict], failures: int) -> None:
        """Failure cards in the order a naive loop over per_query.jsonl gives: the true location
        ranked farthest down first (not among the K results: below them), then the largest score
        margin, the farthest first result, the lower location index; each card says where."""
        rows = []
        for rec in per_query:
            if rec["distances_m"][0] > 5.0:
                depth = rec["true_rank"] or len(rec["top_ids"]) + 1
                rows.append((-depth, -(rec["margin"] or 0.0), -rec["distances_m"][0], rec["query"]))
        want = [row[3] for row in sorted(rows)[:failures]]
        cards = [c for c in dom.select("article", cls="card") if c.attrs["data-kind"] == "failure"]
        assert [int(c.attrs["data-query"]) for c in cards] == want
        titles = [e.text for e in dom.select("h3")]
        assert all("true location" in t for t in titles[: len(cards)])


@pytest.fixture
def report_page():
    return ReportPage


@pytest.fixture(scope="session")
def nginx(tmp_path_factory):
    """Debian's nginx on a free loopback port, config/pid/logs/temp under a tmp prefix:
    `nginx.serve(folder, name)` -> `http://127.0.0.1:PORT/name` serving that folder."""
    from tests.http_servers import Nginx

    server = Nginx(tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


@pytest.fixture
def fault_proxy(nginx):
    """`fault_proxy(schedule, stall_s)` -> a FaultProxy in front of `nginx` (stopped after the test)."""
    from tests.http_servers import FaultProxy

    proxies = []

    def make(schedule, stall_s: float = 5.0):
        proxies.append(FaultProxy(nginx.port, schedule, stall_s))
        return proxies[-1]

    yield make
    for p in proxies:
        p.stop()


@pytest.fixture
def http_faults():
    """The fault schedules of tests/http_servers.py (FailEachOnce, fail_always, FAULTS)."""
    import tests.http_servers

    return tests.http_servers
