"""Test-only helpers (also used by benchmarks): tensor equality up to summation order, torchrun workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (inf when expected is 0 and actual is not)."""
    diff = (actual.double() - expected.double()).norm().item()
    ref = expected.double().norm().item()
    return diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))


def assert_close_by_norm(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, floor: float = 1e-7, name: str = "") -> None:
    """Norm-relative closeness: ‖a − e‖ ≤ rel·‖e‖ + floor·sqrt(numel). Element-wise rtol is
    too strict for near-zero entries of a gradient; the floor covers tensors that stay ~0."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).norm().item()
    bound = rel * expected.double().norm().item() + floor * expected.numel() ** 0.5
    assert err <= bound, f"{name}: ‖diff‖ = {err:.3e} > {bound:.3e} (rel {relative_error(actual, expected):.2e})"


def run_torchrun(worker: Path, out_dir: Path, nproc: int = 2, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone` of `worker out_dir` on `nproc` CPU ranks
    (one thread each), with this checkout first on PYTHONPATH; run in `out_dir`."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(worker), str(out_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or HANG_GUARD_S, env=env, cwd=out_dir)


def unexplained_id_differences(ids: torch.Tensor, ref_ids: torch.Tensor, ref_scores: torch.Tensor, tol: float) -> int:
    """How many top-k ids (Q, k) differ from the reference where the reference's score is not
    within `tol` of a neighbour's: two paths that sum in different orders may swap near-ties only."""
    same = ids == ref_ids
    gaps = (ref_scores[:, 1:] - ref_scores[:, :-1]).abs() <= tol  # (Q, k-1)
    near_tie = torch.zeros_like(same)
    near_tie[:, 1:] |= gaps
    near_tie[:, :-1] |= gaps
    return int((~same & ~near_tie).sum())


# Seconds a test waits for a subprocess before calling it hung: a guard against deadlocks
# (a stuck collective), far above any run time on a loaded machine, never a measurement.
HANG_GUARD_S = 3600


def free_port() -> int:
    """A TCP port free on localhost now, for a launcher's rendezvous (fixed ports collide when
    two test runs share a machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rewrite_first_shard(folder, edit_member) -> list[str]:
    """Tests: rewrite the first shard of a shard folder with each member of sample i replaced
    by `edit_member(i, suffix, raw_bytes) -> bytes`, and re-hash the manifest (a crafted folder
    whose checksums all agree). Returns the shard's sample keys."""
    import hashlib
    import io
    import json
    import tarfile
    from pathlib import Path

    from text4vpr.data.shard_reader import iter_tar_samples, load_manifest, sample_ranges

    folder = Path(folder)
    manifest = load_manifest(folder)
    entry = manifest["shards"][0]
    samples = list(iter_tar_samples(folder / entry["name"]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (key, sample) in enumerate(samples):
            for suffix, data in sample.items():
                data = edit_member(i, suffix, data)
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / entry["name"]).write_bytes(buf.getvalue())
    entry.update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    if "samples" in entry:  # the per-sample byte ranges re-indexed too
        entry["samples"] = [[o, n, d] for _, o, n, d in sample_ranges(folder / entry["name"])]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return [key for key, _ in samples]
