"""`text4vpr eval` writes per_query.jsonl and the identity of model and shards: the metrics
table recomputed from per_query.jsonl by a naive loop equals metrics.json's."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np

from text4vpr.cli import main


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _naive_table(records: list[dict], ks, radii) -> dict:
    """accuracy[k][r] = share of queries with one of the first k results within r metres."""
    table = {}
    for k in ks:
        table[str(k)] = {}
        for r in radii:
            hits = sum(1 for rec in records if any(d <= r for d in rec["distances_m"][:k]))
            table[str(k)][str(int(r)) if float(r).is_integer() else str(r)] = hits / len(records)
    return table


def _flagged_copy(shards, tmp_path) -> tuple:
    """A copy of the shards whose build report flags the first location's pos 2."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    first = int(manifest["shards"][0]["keys"][0].rsplit("-", 1)[1])
    manifest["report"]["flags"].append({"file": "t.xlsx", "row": 3, "index": first, "pos": 2, "flag": "short"})
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, first


def test_per_query_recomputes_metrics_json(model_dir, synth_shards, tmp_path):
    from text4vpr.models import Text4VPR
    from text4vpr.retrieval.provenance import weights_digest

    shards, flagged = _flagged_copy(synth_shards, tmp_path)
    out = tmp_path / "report"
    assert main(["eval", "--model", str(model_dir), "--shards", str(shards), "--num-workers", "0",
                 "--ks", "1", "2", "5", "--radii", "5", "12.5", "1000", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    records = _records(out / "per_query.jsonl")
    assert len(records) == metrics["num_queries"] == 6
    assert _naive_table(records, (1, 2, 5), (5, 12.5, 1000)) == metrics["accuracy"]
    for rec in records:
        assert len(rec["top_ids"]) == len(rec["scores"]) == len(rec["distances_m"]) == 5
        assert rec["scores"] == sorted(rec["scores"], reverse=True)
        own = [j for j, i in enumerate(rec["top_ids"]) if i == rec["query"]]
        assert rec["true_rank"] == (own[0] + 1 if own else None)
        assert rec["margin"] == (rec["scores"][0] - rec["scores"][own[0]] if own else None)
        assert rec["flags"] == (["pos 2: short"] if rec["query"] == flagged else [])
    ident = metrics["identity"]
    assert ident["model"] == str(model_dir) and ident["shards"] == str(shards)
    assert ident["weights_digest"] == weights_digest(Text4VPR.from_pretrained(model_dir))
    assert ident["shards_digest"] == hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert set(metrics["chance"]) == {"1", "2", "5"}


def test_eval_embeddings_keeps_the_chance_column(model_dir, synth_shards, index_dir, tmp_path):
    """eval-embeddings' metrics.json carries the same chance level as eval's, and its table prints it."""
    queries = tmp_path / "q.safetensors"
    assert main(["index", "queries", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0",
                 "--out", str(queries)]) == 0
    assert main(["eval-embeddings", "--queries", str(queries), "--database", str(index_dir),
                 "--out", str(tmp_path / "emb")]) == 0
    assert main(["eval", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0",
                 "--index", str(index_dir), "--out", str(tmp_path / "eval")]) == 0
    emb = json.loads((tmp_path / "emb" / "metrics.json").read_text())
    ev = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert emb["chance"] == ev["chance"] and emb["accuracy"] == ev["accuracy"]
    assert ev["identity"]["index"] == str(index_dir)
    assert "chance" in (tmp_path / "emb" / "report.md").read_text()
    assert np.isclose(ev["chance"]["1"]["5"], 1 / 6)  # 6 locations tens of metres apart: only itself within 5 m
