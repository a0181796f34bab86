"""Triton kernel: interpreted on CPU against the torch path (in a subprocess, so that
TRITON_INTERPRET=1 never leaks into other tests), and an offline compile for sm_90."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_interpreted_kernel_matches_torch_path():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    script = Path(__file__).with_name("triton_interp_check.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failures" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode", [0, 2])
def test_kernel_compiles_for_hopper(mode):
    """Lowers the kernel to a sm_90 cubin with no GPU present (catches compile-only breakage)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from text4vpr.kernels.group_topk_triton import _SENTINEL, _group_topk_kernel

    sig = {n: "*bf16" for n in ("q_ptr", "d_ptr")}
    sig.update({"qbits_ptr": "*i32", "dbits_ptr": "*i32", "out_s_ptr": "*fp32", "out_i_ptr": "*i32"})
    sig.update({n: "i32" for n in ("Q", "N", "K_DIM", "K", "tiles_per_split", "stride_qr", "stride_qq", "stride_dn")})
    const = dict(MODE=mode, V=4, BQ=64, BN=64, BK=64, KP=16, PRECISION="tf32", SENTINEL=_SENTINEL, EVEN_K=True)
    sig.update({c: "constexpr" for c in const})
    src = ASTSource(_group_topk_kernel, sig, constexprs={(list(sig).index(c),): v for c, v in const.items()})
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": 8, "num_stages": 4})
    except RuntimeError as e:  # no ptxas usable on this machine
        pytest.skip(f"offline compile unavailable: {e}")
    assert kernel.asm["cubin"] and "wgmma" in kernel.asm["ptx"]
