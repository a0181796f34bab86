"""What a training run leaves for people: the same scalars in metrics.jsonl, an offline MLflow
store and TensorBoard (read back), and a report.html whose numbers equal final_metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from text4vpr.train import resolve_config
from text4vpr.train.logs import read_metrics
from text4vpr.train.trackers import PROJECT, TRACKERS_DIR, scalars
from text4vpr.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tracked_run(train_cache, tmp_path_factory):
    """A tiny run with MLflow (local file store) and TensorBoard, validation every 2 steps."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path_factory.mktemp("tracked") / "run"
    args = [f"data.synthetic.cache_dir={train_cache}", f"train.output_dir={run}", "train.max_steps=4",
            "eval.every_steps=2", "train.log_with=[mlflow]", "train.tensorboard=true", "eval.gallery=3"]
    try:
        Trainer(resolve_config(str(REPO / "configs" / "tiny_test.yaml"), args)).train()
    finally:
        mp.undo()
    return run


def _jsonl_scalars(run: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for e in read_metrics(run / "metrics.jsonl"):
        values = {k: v for k, v in e.items() if k not in ("kind", "step")}
        for key, v in scalars(e["kind"], values).items():
            out.setdefault(key, {})[e["step"]] = float(v)
    return out


def test_mlflow_and_tensorboard_hold_the_jsonl_scalars(tracked_run):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    want = _jsonl_scalars(tracked_run)
    assert {"train/loss", "train/lr", "val/accuracy/1/5"} <= set(want) and len(want["train/loss"]) == 4
    client = MlflowClient((tracked_run / TRACKERS_DIR / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name(PROJECT).experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == tracked_run.name
    assert runs[0].data.params["optim/lr"] == "0.001"  # the config as hyper-parameters
    got = {k: {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, k)} for k in runs[0].data.metrics}
    assert got == want  # every key, every step, exact
    acc = EventAccumulator(str(tracked_run / TRACKERS_DIR / PROJECT))
    acc.Reload()
    tb = {k: {s.step: s.value for s in acc.Scalars(k)} for k in acc.Tags()["scalars"]}
    assert set(tb) == set(want)
    for key in want:  # TensorBoard stores float32
        assert tb[key] == pytest.approx(want[key], rel=1e-6, abs=1e-30), key


def test_run_report_html_in_chromium(tracked_run, report_page):
    final = json.loads((tracked_run / "final_metrics.json").read_text())
    fails, succ = report_page.expected_cards(final, 3, 1)
    dom = report_page.check(tracked_run / "report.html", final, fails, succ, thumbs_per_card=16)
    per_query = [json.loads(line) for line in (tracked_run / "per_query.jsonl").read_text().splitlines()]
    report_page.check_gallery_order(dom, per_query, 3)
    sections = [e.attrs.get("id") for e in dom.select("section")]
    assert sections[:3] == ["identity", "training", "table"], sections  # identity and curves lead
    events = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    loss = [e for e in events if e["kind"] == "train"]
    start = dom.elements.index(dom.select("svg", cls="loss")[0])
    line = next(e for e in dom.elements[start:] if e.tag == "polyline")
    assert len(line.attrs["points"].split()) == len(loss) > 1  # every logged loss is on the curve
    assert dom.select("svg", cls="val-accuracy")
    md = (tracked_run / "report.md").read_text()
    assert md.startswith("# Text4VPR training report") and "![loss](loss.png)" in md
    for name in ("accuracy_vs_radius.png", "loss.png", "val_accuracy.png"):
        assert (tracked_run / name).read_bytes()[:4] == b"\x89PNG", name


def test_tracker_names_refuse_unknown_and_missing(monkeypatch):
    import accelerate.tracking

    from text4vpr.config import ConfigError
    from text4vpr.train.trackers import tracker_names

    assert tracker_names([], True) == ["tensorboard"] and tracker_names(["tensorboard"], True) == ["tensorboard"]
    assert tracker_names([], False) == []
    with pytest.raises(ConfigError, match="unknown tracker 'mlfow'"):
        tracker_names(["mlfow"], False)
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])  # nothing installed
    with pytest.raises(ConfigError, match=r"mlflow is not installed; pip install \"text4vpr\[trackers\]\""):
        tracker_names(["mlflow"], False)


def test_final_evaluation_records_its_identity_and_per_query(tracked_run):
    """final_metrics.json names the evaluated folder with its weights digest and the test shards'
    manifest digest; the table recomputed from per_query.jsonl by a naive loop equals it."""
    import hashlib

    from text4vpr.models import Text4VPR
    from text4vpr.retrieval.provenance import weights_digest

    final = json.loads((tracked_run / "final_metrics.json").read_text())
    ident = final["identity"]
    assert Path(ident["model"]).parent == tracked_run and Path(ident["model"]).name in ("best_model", "model")
    assert ident["weights_digest"] == weights_digest(Text4VPR.from_pretrained(ident["model"]))
    assert ident["shards_digest"] == hashlib.sha256((Path(ident["shards"]) / "manifest.json").read_bytes()).hexdigest()
    records = [json.loads(line) for line in (tracked_run / "per_query.jsonl").read_text().splitlines()]
    assert len(records) == final["num_queries"]
    for k, row in final["accuracy"].items():
        for r, value in row.items():
            assert value == sum(any(d <= float(r) for d in rec["distances_m"][: int(k)]) for rec in records) / len(records)
