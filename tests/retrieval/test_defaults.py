"""One source for the retrieval defaults (ks, radii, gallery size): the CLI flags, the run
config and the report writers all take them from `retrieval/defaults.py`."""

from __future__ import annotations

import argparse
import inspect

from text4vpr.retrieval.defaults import GALLERY, KS, RADII, gallery_successes


def _parsed(add_arguments, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_cli_config_and_reports_share_the_defaults():
    from text4vpr.cli import eval_embeddings, evaluate
    from text4vpr.retrieval.chance import chance_accuracy
    from text4vpr.retrieval.evaluate import evaluate as evaluate_fn, search_metrics
    from text4vpr.retrieval.html_report import write_html_report
    from text4vpr.retrieval.metrics import topk_within_radius
    from text4vpr.train.config import EvalConfig

    ev = _parsed(evaluate.add_arguments, ["--model", "m", "--shards", "s", "--out", "o"])
    emb = _parsed(eval_embeddings.add_arguments, ["--queries", "q", "--database", "d", "--out", "o"])
    cfg = EvalConfig()
    for ks, radii in ((ev.ks, ev.radii), (emb.ks, emb.radii), (cfg.ks, cfg.radii)):
        assert tuple(ks) == KS and tuple(radii) == RADII
    assert ev.gallery == cfg.gallery == GALLERY
    for fn in (chance_accuracy, evaluate_fn, search_metrics, topk_within_radius):
        params = inspect.signature(fn).parameters
        assert params["ks"].default == KS and params["radii"].default == RADII, fn.__name__
    params = inspect.signature(write_html_report).parameters
    assert params["failures"].default == GALLERY and params["successes"].default == gallery_successes(GALLERY)
    assert [gallery_successes(n) for n in (0, 3, 4, 40)] == [1, 1, 1, 10]
