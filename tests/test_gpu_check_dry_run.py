"""benchmarks/gpu_check.sh --dry-run: the whole GPU script on CPU at tiny sizes, before GPU time is spent.

The dry run has no time budget and no step timeouts, so it runs every step however loaded
the machine is; it runs this interpreter (PYTHON), not whatever `python3` is on PATH.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
DRY_RUN_SKIPS = {"install", "deepspeed_zero2"}  # no wheels to install; the DeepSpeed step needs CUDA
KEYS = ("train_pairs_per_s", "train_mfu", "train_cached_pairs_per_s", "upstream_loop_pairs_per_s",
        "plain_batched_pairs_per_s", "search_fused_tflops", "search_torch_tflops", "gemm_tflops",
        "loss_tiled_extra_gb_128k", "eval_speedup_vs_upstream")


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    env.pop("BUDGET_S", None)
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "gpu_summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert {n for n, s in status.items() if s != "ok"} == DRY_RUN_SKIPS, summary["steps"]  # nothing cut by time
    assert all(status[n] == "skipped" for n in DRY_RUN_SKIPS), summary["steps"]
    assert set(KEYS) <= set(summary)
    assert summary["dry_run"] is True
    assert summary["train_pairs_per_s"] > 0 and summary["eval_speedup_vs_upstream"] > 0
    assert summary["train_pairs_per_s_eager"] > 0 and summary["train_pairs_per_s_compiled"] > 0
    assert summary["plain_compiled_pairs_per_s"] > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.log", "gpu_results.json", "gpu_summary.json"]
    results = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    assert set(KEYS) <= set(results)  # what gets committed as benchmarks/results/<card>_<date>.json
    raw = results["benchmarks"]
    assert {"bench_train", "bench_train_compiled", "bench_model", "bench_search", "bench_loss", "bench_eval"} <= set(raw)
    assert raw["bench_train"]["results"]["phases"]["sum_s"] > 0
    assert raw["bench_train"]["results"]["ops"]["top"]  # the profiler's op table
    assert raw["bench_train"]["results"]["loader_cached"]["capacity_over_demand"] > 0  # cached epochs' loader
    assert status["train_tiny"] == status["train_tiny_cached"] == "ok"
    log = (tmp_path / "out" / "gpu_check.log").read_text().rstrip().splitlines()
    assert log[-1].startswith("gpu_check: ") and "all steps ok or skipped" in log[-1]  # tee wrote the end
