#!/usr/bin/env bash
# Download, here (where pip reaches the index), the wheels the GPU image lacks into .whl/, for
# its Python 3.12 on manylinux x86_64 (device README). Carry them with `carry: [".whl"]`;
# benchmarks/gpu_check.sh installs them with pip --no-index --target /tmp/site.
#
#   bash benchmarks/fetch_gpu_wheels.sh              # webdataset, braceexpand, openpyxl, et-xmlfile
#   bash benchmarks/fetch_gpu_wheels.sh --deepspeed  # + a locally built DeepSpeed wheel and its deps
#
# The GPU image has torch, triton, transformers, accelerate, tokenizers, safetensors, pandas,
# pillow, matplotlib, tensorboard, pyyaml, numpy, tqdm, einops, ninja, psutil, py-cpuinfo,
# msgpack. It lacks webdataset (+ braceexpand) for the shard loader, openpyxl (+ et-xmlfile)
# for the synthetic/real .xlsx files, and deepspeed.
# DeepSpeed is published as an sdist only, so it cannot be carried as a downloaded wheel:
# --deepspeed builds a pure-Python one here (`pip wheel --no-deps`, no ops pre-built; they
# JIT-compile on first use, and ZeRO-2 with the torch AdamW needs none) and fetches its pure
# dependencies missing there (hjson, pydantic, pydantic-core, annotated-types,
# typing-inspection). Without it gpu_check.sh skips the DeepSpeed step with its reason.
# .whl/ is never committed: it is listed in .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."

grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl

PKGS=(webdataset==1.0.2 braceexpand==0.1.7 openpyxl==3.1.5 et-xmlfile==2.0.0)
DS_VERSION=0.19.8
DS_DEPS=(hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2)
if [[ "${1:-}" == "--deepspeed" ]]; then PKGS+=("${DS_DEPS[@]}"); fi

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PKGS[@]}"

if [[ "${1:-}" == "--deepspeed" ]]; then
  # setup.py imports torch: build without isolation against this machine's torch (ops not pre-built)
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$DS_VERSION"
fi

echo "wheels in .whl/ ($(du -sh .whl | cut -f1); the device tool carries at most 64 MiB with the tree):"
ls -1 .whl
