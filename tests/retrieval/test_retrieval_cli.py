"""End to end on the synthetic test split with a tiny model: index build, eval (with and
without index), eval-embeddings, localize, and each bad input's clear error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from text4vpr.cli import main
from text4vpr.data.loader import LoaderConfig, build_loader
from text4vpr.data.tokenizer import load_tokenizer
from text4vpr.models import Text4VPR, tiny_config
from text4vpr.retrieval.evaluate import encode_split, evaluate
from text4vpr.retrieval.metrics import key
from tests.helpers import HANG_GUARD_S


def _loader(model_dir, synth_shards, batch_size=4):
    cfg = LoaderConfig(shards=str(synth_shards), tokenizer=str(model_dir), batch_size=batch_size,
                       image_size=56, num_workers=0)
    return build_loader(cfg, "eval")


def spec_loop(enc, ks, radii):
    """The metric (docs/method.md), float64, one query at a time (queries and database = the same locations)."""
    text = (enc["queries"] * enc["query_mask"][..., None]).double().flatten(1).numpy()
    images = (enc["database"] * enc["db_mask"][..., None]).double().flatten(1).numpy()
    xyz = enc["coords"].numpy()
    out = {key(k): {key(r): 0.0 for r in radii} for k in ks}
    for q in range(len(text)):
        order = np.lexsort((np.arange(len(images)), -(images @ text[q])))
        dist = np.linalg.norm(xyz[order] - xyz[q], axis=1)
        for k in ks:
            for r in radii:
                out[key(k)][key(r)] += float(np.any(dist[:k] <= r)) / len(text)
    return out


def test_index_layout(index_dir):
    header = json.loads((index_dir / "header.json").read_text())
    assert header["count"] == 6 and header["views"] == 4 and header["embed_dim"] == 64
    part = load_file(str(index_dir / "part-00000.safetensors"))
    assert part["embeddings"].shape == (6, 4, 64) and part["coords"].dtype == torch.float64
    assert part["index"].dtype == torch.int64 and part["view_mask"].dtype == torch.bool


def test_load_index_rows_reads_a_slice_across_parts(tmp_path):
    from text4vpr.retrieval.index import RetrievalIndexError, load_index, rank_rows, write_header, write_part

    g = torch.Generator().manual_seed(7)
    counts, parts = [5, 0, 4], []
    for r, n in enumerate(counts):  # three parts, the middle one empty (a rank that got no location)
        parts.append({"embeddings": torch.randn(n, 4, 8, generator=g), "view_mask": torch.rand(n, 4, generator=g) > 0.2,
                      "coords": torch.randn(n, 3, generator=g, dtype=torch.float64), "index": torch.arange(n) + 10 * r})
        write_part(tmp_path, r, parts[-1], "h")
    write_header(tmp_path, "h", 8, 4, "float32", counts)
    full = load_index(tmp_path, "h", 8)
    assert len(full) == 9 and full.rows == (0, 9)
    for rows in [(3, 7), (0, 5), (5, 9), (2, 2), rank_rows(9, 1, 2), (0, 9)]:
        part = load_index(tmp_path, "h", 8, rows=rows)
        lo, hi = rows
        assert part.rows == rows and len(part) == 9
        assert torch.equal(part.embeddings, full.embeddings[lo:hi]) and torch.equal(part.view_mask, full.view_mask[lo:hi])
        assert torch.equal(part.coords, full.coords) and torch.equal(part.index, full.index)
    with pytest.raises(RetrievalIndexError, match="outside"):
        load_index(tmp_path, "h", 8, rows=(4, 10))


def test_evaluate_matches_spec_loop(model_dir, synth_shards):
    model = Text4VPR.from_pretrained(model_dir)
    ks, radii = (1, 2, 5), (5, 10, 15, 30, 1000)
    metrics = evaluate(model, _loader(model_dir, synth_shards, batch_size=4), ks, radii).metrics  # batches of 4 + 2
    enc = encode_split(model, _loader(model_dir, synth_shards))
    want = spec_loop(enc, ks, radii)
    assert metrics["num_queries"] == 6 and metrics["num_database"] == 6  # no drop_last: every location counts
    for k in want:
        for r in want[k]:
            assert metrics["accuracy"][k][r] == pytest.approx(want[k][r], abs=1e-12)
    assert metrics["accuracy"]["5"]["1000"] == 1.0


def test_eval_cli_writes_report(model_dir, synth_shards, index_dir, tmp_path, capsys):
    args = ["eval", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--index", str(index_dir), "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert set(a["accuracy"]) == {"1", "5", "10"} and set(a["accuracy"]["1"]) == {"5", "10", "15", "30"}
    assert a["num_queries"] == 6 and a["num_database"] == 6 and a["mode"] == "upstream"
    assert a["accuracy"] == b["accuracy"]
    assert "Top-k accuracy" in (tmp_path / "a" / "report.md").read_text()
    assert (tmp_path / "a" / "accuracy_vs_radius.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 1 |" in capsys.readouterr().out


def test_eval_embeddings_cli(model_dir, synth_shards, tmp_path):
    model = Text4VPR.from_pretrained(model_dir)
    enc = encode_split(model, _loader(model_dir, synth_shards))
    q = {"embeddings": enc["queries"], "view_mask": enc["query_mask"], "coords": enc["coords"], "index": enc["index"]}
    d = {"embeddings": enc["database"], "view_mask": enc["db_mask"], "coords": enc["coords"], "index": enc["index"]}
    save_file(q, str(tmp_path / "q.safetensors"))
    save_file(d, str(tmp_path / "d.safetensors"))
    for mode in ("upstream", "cosine", "any-heading"):
        rc = main(["eval-embeddings", "--queries", str(tmp_path / "q.safetensors"), "--database",
                   str(tmp_path / "d.safetensors"), "--mode", mode, "--out", str(tmp_path / mode)])
        assert rc == 0
        got = json.loads((tmp_path / mode / "metrics.json").read_text())
        assert got["mode"] == mode
    want = spec_loop(enc, (1, 5, 10), (5, 10, 15, 30))
    got = json.loads((tmp_path / "upstream" / "metrics.json").read_text())["accuracy"]
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12)


def test_localize_terminal_and_json(model_dir, index_dir, capsys):
    base = ["localize", "--model", str(model_dir), "--index", str(index_dir)]
    texts = ["--text", "a red car parked by the curb", "--text", "a tall green tree"]
    assert main(base + texts + ["--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "latitude" in out and len(out.strip().splitlines()) == 4
    assert main(base + texts + ["--json", "--mode", "any-heading"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert [r["rank"] for r in res] == [1, 2, 3, 4, 5]
    assert all(len(r["ecef"]) == 3 and -90 <= r["lat"] <= 90 and -180 <= r["lon"] <= 180 for r in res)
    assert res == sorted(res, key=lambda r: (-r["score"], r["row"]))


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def _rehash_parts(index) -> None:
    """Record each part's current sha256 in header.json (what a crafted index would do)."""
    import hashlib

    header = json.loads((index / "header.json").read_text())
    for part in header["parts"]:
        part["sha256"] = hashlib.sha256((index / part["name"]).read_bytes()).hexdigest()
    (index / "header.json").write_text(json.dumps(header))


def test_localize_errors(model_dir, index_dir, tmp_path, tokenizer_dir, capsys):
    base = ["localize", "--model", str(model_dir), "--index", str(index_dir)]
    assert "no description" in _err(capsys, base)
    assert "at most 4" in _err(capsys, base + ["--text", "a"] * 5)
    assert "no description" in _err(capsys, base + ["--text", "   "])

    other = tmp_path / "other_model"  # same dimension, another config
    Text4VPR(tiny_config(vocab_size=300, image_size=70)).save_pretrained(other, tokenizer=load_tokenizer(tokenizer_dir))
    assert "another model" in _err(capsys, ["localize", "--model", str(other), "--index", str(index_dir), "--text", "a"])

    wide = tiny_config(vocab_size=300)
    wide.aggregation.cluster_dim = 8
    wide.embed_dim = 32
    Text4VPR(wide).save_pretrained(tmp_path / "wide", tokenizer=load_tokenizer(tokenizer_dir))
    assert "dimension" in _err(capsys, ["localize", "--model", str(tmp_path / "wide"), "--index", str(index_dir), "--text", "a"])

    broken = tmp_path / "broken"
    shutil.copytree(index_dir, broken)
    (broken / "part-00000.safetensors").unlink()
    assert "missing" in _err(capsys, ["localize", "--model", str(model_dir), "--index", str(broken), "--text", "a"])

    nan_index = tmp_path / "nan_index"
    shutil.copytree(index_dir, nan_index)
    part = load_file(str(nan_index / "part-00000.safetensors"))
    part["embeddings"][2, 1, 5] = float("nan")
    save_file(part, str(nan_index / "part-00000.safetensors"))
    _rehash_parts(nan_index)  # a crafted index whose checksums agree: the finiteness check still refuses it
    assert "non-finite" in _err(capsys, ["localize", "--model", str(model_dir), "--index", str(nan_index), "--text", "a"])

    nan_model = tmp_path / "nan_model"
    shutil.copytree(model_dir, nan_model)
    from safetensors import safe_open

    with safe_open(str(nan_model / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    weights = load_file(str(nan_model / "model.safetensors"))
    for name, t in weights.items():
        if name.startswith("text") and t.is_floating_point():
            t.fill_(float("nan"))
    save_file(weights, str(nan_model / "model.safetensors"), metadata=metadata)
    assert "non-finite" in _err(capsys, ["localize", "--model", str(nan_model), "--index", str(index_dir), "--text", "a"])


@pytest.mark.slow
def test_two_rank_evaluate_and_index_equal_single_process(model_dir, synth_shards, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from text4vpr.retrieval.index import load_index

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    worker = Path(__file__).with_name("dist_eval_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
         str(model_dir), str(synth_shards), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = json.loads((tmp_path / "metrics.json").read_text())
    model = Text4VPR.from_pretrained(model_dir)
    for mode, metrics in got["metrics"].items():
        want = evaluate(model, _loader(model_dir, synth_shards), (1, 2, 5), (5, 10, 30, 1000), mode).metrics
        assert metrics == want, mode
    assert got["from_index"] == got["metrics"]["upstream"]  # each rank read only its rows of the index
    header = got["header"]
    assert header["count"] == 6 and len(header["parts"]) == 2 and header["parts"][1]["count"] > 0
    index = load_index(tmp_path / "index", model.config_hash(), model.embed_dim)
    enc = encode_split(model, _loader(model_dir, synth_shards))
    order = torch.argsort(index.index)
    want_order = torch.argsort(enc["index"])
    assert torch.equal(index.index[order], enc["index"][want_order])
    torch.testing.assert_close(index.embeddings[order], enc["database"][want_order])


def test_precision_and_progress_options(model_dir, synth_shards, tmp_path, capsys):
    from text4vpr.cli._retrieval_common import precision_context

    with precision_context("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    with precision_context("auto", "cpu"):  # auto: bf16 only on CUDA
        assert not torch.is_autocast_enabled("cpu")
    args = ["eval", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert "encode" in capsys.readouterr().err  # the bar, on the main rank
    assert main(args + ["--precision", "bf16", "--no-progress", "--out", str(tmp_path / "b")]) == 0
    assert "encode" not in capsys.readouterr().err
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["num_queries"] == b["num_queries"] == 6  # bf16 encodes the same split (scores may round apart)
    assert main(["index", "build", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0",
                 "--out", str(tmp_path / "idx")]) == 0
    assert "index" in capsys.readouterr().err


# ---------------------------------------------------------------- index bound to its model and shards
def _same_config_other_weights(tmp_path, tokenizer_dir):
    torch.manual_seed(1)  # the fixture model used seed 0: same config (same config hash), other weights
    out = tmp_path / "other_weights"
    Text4VPR(tiny_config(vocab_size=300)).save_pretrained(out, tokenizer=load_tokenizer(tokenizer_dir))
    return out


def _reference_digest(model) -> str:
    """sha256 over (name, dtype, shape, bytes) of the state dict in sorted name order (a naive loop)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(model.state_dict()):
        t = model.state_dict()[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(bytes(t.reshape(-1).view(torch.uint8).tolist()))
    return h.hexdigest()


def test_weights_digest_follows_the_weights_not_the_loading(model_dir):
    from text4vpr.retrieval.provenance import weights_digest

    model = Text4VPR.from_pretrained(model_dir)
    assert weights_digest(model) == _reference_digest(model)
    assert weights_digest(Text4VPR.from_pretrained(model_dir)) == weights_digest(model)  # loaded twice: same
    name, p = next((n, p) for n, p in model.named_parameters() if p.numel() > 3)
    with torch.no_grad():
        p.view(-1)[3] = torch.nextafter(p.view(-1)[3], torch.tensor(float("inf")))  # one ulp of one weight
    assert weights_digest(model) != weights_digest(Text4VPR.from_pretrained(model_dir)), name


def test_index_records_weights_and_shards_digests(model_dir, synth_shards, index_dir):
    import hashlib

    from safetensors import safe_open

    from text4vpr.retrieval.provenance import weights_digest

    header = json.loads((index_dir / "header.json").read_text())
    assert header["weights_digest"] == weights_digest(Text4VPR.from_pretrained(model_dir))
    assert header["shards_digest"] == hashlib.sha256((synth_shards / "manifest.json").read_bytes()).hexdigest()
    with safe_open(str(index_dir / "part-00000.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["weights_digest"] == header["weights_digest"] and meta["shards_digest"] == header["shards_digest"]


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith(("warning", "  warnings.warn"))]
    assert len(lines) == 1, err
    return lines[0]


def test_index_of_other_weights_same_config_is_refused(model_dir, synth_shards, index_dir, tmp_path, tokenizer_dir, capsys):
    other = _same_config_other_weights(tmp_path, tokenizer_dir)
    assert Text4VPR.from_pretrained(other).config_hash() == Text4VPR.from_pretrained(model_dir).config_hash()
    loc = ["localize", "--model", str(other), "--index", str(index_dir), "--text", "a red car"]
    line = _one_line(_err(capsys, loc))
    assert "another model" in line and "weights" in line and "--allow-index-mismatch" in line
    ev = ["eval", "--model", str(other), "--shards", str(synth_shards), "--num-workers", "0", "--index", str(index_dir)]
    line = _one_line(_err(capsys, ev + ["--out", str(tmp_path / "e")]))
    assert "another model" in line and not (tmp_path / "e" / "metrics.json").exists()
    with pytest.warns(UserWarning, match="index mismatch allowed: .*another model"):
        assert main(loc + ["--allow-index-mismatch"]) == 0  # the user takes the risk, told so (stderr)


@pytest.fixture(scope="module")
def val_shards(synth_root, tmp_path_factory):
    from text4vpr.data.shards import BuildOptions, build_shards

    out = tmp_path_factory.mktemp("val_shards")
    build_shards(synth_root / "val_description.xlsx", synth_root / "Street360Loc_images", out,
                 BuildOptions(max_count=3, workers=1), progress=False, log=None)
    return out


def test_index_of_other_shards_and_disjoint_queries_are_refused(model_dir, synth_shards, val_shards, tmp_path, capsys):
    val_index = tmp_path / "val_idx"
    assert main(["index", "build", "--model", str(model_dir), "--shards", str(val_shards), "--out", str(val_index),
                 "--num-workers", "0", "--no-progress"]) == 0
    ev = ["eval", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0", "--no-progress",
          "--index", str(val_index), "--out", str(tmp_path / "e")]
    line = _one_line(_err(capsys, ev))
    assert "other shards" in line and "manifest digest" in line and "--allow-index-mismatch" in line
    with pytest.warns(UserWarning, match="other shards"):
        line = _one_line(_err(capsys, ev + ["--allow-index-mismatch"]))
    assert "6 of 6 query locations" in line and "--allow-disjoint" in line
    assert not (tmp_path / "e" / "metrics.json").exists()
    with pytest.warns(UserWarning, match="other shards"):
        assert main(ev + ["--allow-index-mismatch", "--allow-disjoint"]) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["num_database"] == 6


def test_disjoint_check_in_the_library(model_dir, synth_shards, index_dir):
    from text4vpr.retrieval.evaluate import DisjointQueriesError
    from text4vpr.retrieval.index import load_index

    model = Text4VPR.from_pretrained(model_dir)
    index = load_index(index_dir, model.config_hash(), model.embed_dim)
    index.index = index.index + 1000  # every database location renamed: none of the queries is there
    with pytest.raises(DisjointQueriesError, match="6 of 6 query locations"):
        evaluate(model, _loader(model_dir, synth_shards), index=index)
    index.index[:4] -= 1000  # four back: two queries still missing
    with pytest.raises(DisjointQueriesError, match="2 of 6"):
        evaluate(model, _loader(model_dir, synth_shards), index=index)
    assert evaluate(model, _loader(model_dir, synth_shards), index=index, allow_disjoint=True).metrics["num_queries"] == 6


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_coordinates_name_the_part(model_dir, index_dir, tmp_path, capsys, bad):
    damaged = tmp_path / "coords"
    shutil.copytree(index_dir, damaged)
    from safetensors import safe_open

    part_file = damaged / "part-00000.safetensors"
    with safe_open(str(part_file), framework="pt") as f:
        meta = f.metadata()
    part = load_file(str(part_file))
    part["coords"][4, 1] = bad
    save_file(part, str(part_file), metadata=meta)
    _rehash_parts(damaged)  # a crafted index whose checksums agree: the finiteness check still refuses it
    line = _one_line(_err(capsys, ["localize", "--model", str(model_dir), "--index", str(damaged), "--text", "a"]))
    assert "part-00000.safetensors" in line and "non-finite coordinates" in line and "row 4" in line


def test_truncated_part_is_one_line_naming_the_file(model_dir, synth_shards, index_dir, tmp_path, capsys):
    damaged = tmp_path / "trunc"
    shutil.copytree(index_dir, damaged)
    part_file = damaged / "part-00000.safetensors"
    data = part_file.read_bytes()
    for cut in (len(data) - 100, 40, 5):
        part_file.write_bytes(data[:cut])
        line = _one_line(_err(capsys, ["localize", "--model", str(model_dir), "--index", str(damaged), "--text", "a"]))
        assert str(part_file) in line and "rebuild" in line, cut
    line = _one_line(_err(capsys, ["eval", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0",
                                   "--no-progress", "--index", str(damaged), "--out", str(tmp_path / "e")]))
    assert str(part_file) in line


def test_eval_embeddings_refuses_disjoint_queries(model_dir, synth_shards, tmp_path, capsys):
    model = Text4VPR.from_pretrained(model_dir)
    enc = encode_split(model, _loader(model_dir, synth_shards))
    q = {"embeddings": enc["queries"], "view_mask": enc["query_mask"], "coords": enc["coords"], "index": enc["index"]}
    d = {"embeddings": enc["database"], "view_mask": enc["db_mask"], "coords": enc["coords"], "index": enc["index"] + 1000}
    save_file(q, str(tmp_path / "q.safetensors"))
    save_file(d, str(tmp_path / "d.safetensors"))
    args = ["eval-embeddings", "--queries", str(tmp_path / "q.safetensors"), "--database", str(tmp_path / "d.safetensors"),
            "--out", str(tmp_path / "r")]
    assert "6 of 6 query locations" in _one_line(_err(capsys, args))
    assert main(args + ["--allow-disjoint"]) == 0



def test_index_queries_feeds_eval_embeddings(model_dir, synth_shards, index_dir, tmp_path):
    """`index queries` + `eval-embeddings` against the index = `eval --index` on the same split."""
    q = tmp_path / "q.safetensors"
    assert main(["index", "queries", "--model", str(model_dir), "--shards", str(synth_shards), "--out", str(q),
                 "--num-workers", "0", "--batch-size", "4"]) == 0
    saved = load_file(str(q))
    enc = encode_split(Text4VPR.from_pretrained(model_dir), _loader(model_dir, synth_shards), images=False)
    order = torch.argsort(enc["index"])
    assert torch.equal(saved["index"], enc["index"][order]) and saved["coords"].dtype == torch.float64
    assert torch.equal(saved["embeddings"], enc["queries"][order])
    assert torch.equal(saved["view_mask"], enc["query_mask"][order])
    assert main(["eval-embeddings", "--queries", str(q), "--database", str(index_dir), "--out", str(tmp_path / "e")]) == 0
    assert main(["eval", "--model", str(model_dir), "--shards", str(synth_shards), "--num-workers", "0",
                 "--index", str(index_dir), "--out", str(tmp_path / "r")]) == 0
    a = json.loads((tmp_path / "e" / "metrics.json").read_text())["accuracy"]
    b = json.loads((tmp_path / "r" / "metrics.json").read_text())["accuracy"]
    assert a == b


def test_eval_embeddings_refuses_queries_of_another_model(model_dir, synth_shards, index_dir, tmp_path, tokenizer_dir, capsys):
    """A query file records its model's weights digest; against an index of other weights
    (same config) `eval-embeddings` stops, unless told the risk."""
    from safetensors import safe_open

    from text4vpr.retrieval.provenance import weights_digest

    other = _same_config_other_weights(tmp_path, tokenizer_dir)
    q = tmp_path / "q_other.safetensors"
    assert main(["index", "queries", "--model", str(other), "--shards", str(synth_shards), "--out", str(q),
                 "--num-workers", "0", "--batch-size", "4"]) == 0
    with safe_open(str(q), framework="pt") as f:
        assert f.metadata()["weights_digest"] == weights_digest(Text4VPR.from_pretrained(other))
    capsys.readouterr()
    argv = ["eval-embeddings", "--queries", str(q), "--database", str(index_dir), "--out", str(tmp_path / "e")]
    err = _err(capsys, argv)
    assert "another model" in err and not (tmp_path / "e" / "metrics.json").exists()
    with pytest.warns(UserWarning, match="another model"):
        assert main(argv + ["--allow-index-mismatch"]) == 0
