#!/usr/bin/env bash
# All GPU work of the GPU issue in one go, within ~8 minutes of GPU time (BUDGET_S):
# installs the wheels carried in .whl/ (benchmarks/fetch_gpu_wheels.sh), prints versions and
# nvidia-smi, runs the GPU-only tests (Triton kernel compiled for real vs the torch path), the
# benchmarks at GPU sizes, a short bf16 training run and DeepSpeed ZeRO-2 single-GPU steps, then
# the compiled trainer step, and ends with ONE summary table (benchmarks/summarize_gpu.py).
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine (repo root or anywhere)
#   bash benchmarks/gpu_check.sh --dry-run   # CPU, tiny sizes, CUDA-only steps skipped (~3 min on 2 cores)
#
# Env: OUT (default bench_out) gets three files (the device tool brings back at most 8):
# gpu_check.log, gpu_summary.json (headline figures, targets, step table) and gpu_results.json
# (every benchmark's own JSON, by name).
# WORK (default a fresh /tmp folder) holds synthetic data, run folders and the step log.
# BUDGET_S (GPU run only, default 540): a step that would start past it is skipped, and
# each step's timeout is cut to what is left. The dry run has no budget and no timeouts: it
# runs every step to the end however loaded the machine is (its outcome must not depend on
# time). LOSS_SIZES (default 32768,131072: the tiled loss at 128k pairs is the target, plain
# where it fits is the time reference). PYTHON (default python3; tests pass sys.executable).
# The exit status is 0 when every step passed or was skipped with a reason, 1 otherwise.
set -uo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK"
PY=${PYTHON:-python3}
STEPS="$WORK/steps.tsv"
: >"$STEPS"
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
finish() {  # exit after tee has written the last lines (the summary table) to the log
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$1"
}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$SECONDS
FAILED=0
if ((DRY)); then BUDGET_S=none; DEV=cpu; else BUDGET_S=${BUDGET_S:-540}; DEV=cuda; fi
CACHE="data.synthetic.cache_dir=$WORK/cache"

record() {  # name status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"
}

skip() {  # name reason
  echo "=== $1: skipped ($2)"
  record "$1" skipped 0 "$2"
}

step() {  # name timeout_s min_s command...: on the GPU with a timeout cut to the budget left; rc 0 when ok or skipped
  local name=$1 limit=$2 min=$3 left rc t0 status run
  shift 3
  if ((DRY)); then  # no budget, no timeout: every step runs to the end
    run=("$@")
    echo "=== $name (dry run: no time limit, $((SECONDS - START))s elapsed): $*"
  else
    left=$((BUDGET_S - (SECONDS - START)))
    if ((left < min)); then skip "$name" "needs ${min}s, ${left}s of the ${BUDGET_S}s budget left"; return 0; fi
    ((limit > left)) && limit=$left
    run=(timeout -k 10 "$limit" "$@")
    echo "=== $name (timeout ${limit}s, $((SECONDS - START))s elapsed): $*"
  fi
  t0=$SECONDS
  "${run[@]}"
  rc=$?
  case $rc in
    0) status=ok ;;
    5) status=ok ;;  # pytest: no test selected here
    124 | 137) status=TIMEOUT; FAILED=1 ;;
    *) status="FAILED (rc $rc)"; FAILED=1 ;;
  esac
  echo "=== $name: $status in $((SECONDS - t0))s"
  record "$name" "$status" $((SECONDS - t0)) ""
  [[ $status == ok ]]
}

# ---------------------------------------------------------------------------- environment
echo "gpu_check: dry_run=$DRY device=$DEV OUT=$OUT WORK=$WORK budget=$( ((DRY)) && echo none || echo "${BUDGET_S}s") $(date -u +%FT%TZ)"
if ! ls .whl/*.whl >/dev/null 2>&1; then
  if ((!DRY)); then  # webdataset and openpyxl are missing on the GPU image: nearly every step would fail
    echo "no .whl/ folder: run benchmarks/fetch_gpu_wheels.sh here and carry .whl" >&2
    finish 2
  fi
  skip install "no .whl/ folder (run benchmarks/fetch_gpu_wheels.sh here and carry .whl)"
elif ((DRY)); then
  skip install "dry run: this environment's packages are used"
else
  t0=$SECONDS
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    record install ok $((SECONDS - t0)) "$(ls .whl | tr '\n' ' ')"
    # Accelerate imports deepspeed whenever it is installed (unwrap_model): a broken one would
    # take every training step down with it, so it goes, and only the DeepSpeed step is skipped
    if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
      echo "deepspeed not importable: removed from /tmp/site"
      rm -rf /tmp/site/deepspeed /tmp/site/deepspeed-*.dist-info
    fi
  else
    record install "FAILED" $((SECONDS - t0)) ""; FAILED=1
  fi
fi
"$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "accelerate", "deepspeed", "webdataset", "openpyxl", "tokenizers"):
    try:
        print(f"{name:13s}", getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(f"{name:13s} not importable ({type(e).__name__}: {str(e)[:80]})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not here"
if ((!DRY)) && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device here: run with --dry-run" >&2
  finish 2
fi

# ---------------------------------------------------------------------------- sizes
# One set of command lines below; only these sizes differ between the GPU run and the dry run,
# so the dry run checks the very commands the GPU will run (dotted overrides always come last).
if ((DRY)); then
  KCHECK=(env TRITON_INTERPRET=1 "$PY" benchmarks/gpu_kernel_check.py --device cpu --queries 8 --database 256 --dim 32 --ks 10)
  TRAIN_CFG=(--device cpu)  # bench_train's tiny default config
  TRAIN_RUN=(--steps 2 --warmup 1 --upstream-steps 1 --loader-batches 3)
  TRAIN_DATA=()
  COMPILED_RUN=(--steps 2 --warmup 2)
  T640_RUN=(--steps 2 --warmup 1 --loader-batches 3)
  T640_DATA=(data.synthetic.image_size=64)
  SEARCH_ARGS=(--device cpu --sizes 64x512 --ks 10 --repeats 1 --skip faiss)
  EVAL_ARGS=(--device cpu --locations 24 --upstream-sample 8 --workers 0)
  LOSS_ARGS=(--sizes 256,512 --repeats 1)
  MODEL_ARGS=(--config tiny --batch 4 --steps 1 --warmup 1)
else
  KCHECK=("$PY" benchmarks/gpu_kernel_check.py)
  TRAIN_CFG=(--config configs/street360loc.yaml --device cuda)
  TRAIN_RUN=(--steps 10 --warmup 3 --upstream-locations 16)
  TRAIN_DATA=(data.synthetic.image_size=252 data.synthetic.locations=1200)
  COMPILED_RUN=(--steps 10 --warmup 4)
  T640_RUN=(--steps 6 --warmup 2 --loader-batches 8)
  T640_DATA=(data.synthetic.image_size=640 data.synthetic.locations=800)
  SEARCH_ARGS=(--device cuda --sizes 16384x1048576 --ks 10 100 --repeats 3)
  EVAL_ARGS=(--device cuda --locations 1000 --upstream-sample 50)
  LOSS_ARGS=(--sizes "${LOSS_SIZES:-32768,131072}" --repeats 2)
  MODEL_ARGS=(--config paper --text-length 64 --steps 5 --warmup 3 --no-upstream)  # bench_train times upstream
fi

# ---------------------------------------------------------------------------- GPU-only tests
step pytest_cuda 150 60 "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/models tests/test_losses.py \
  tests/train/test_frozen_cache.py -k "cuda or gpu"
step kernel_check 120 60 "${KCHECK[@]}"

# ---------------------------------------------------------------------------- training runs
# A short bf16 training run and DeepSpeed ZeRO-2 steps, after the benchmarks that give the
# issue's required figures (a step past the budget is skipped and listed, never silently).
training_runs() {
  if ((DRY)); then PREC=(train.cpu=true "train.mixed_precision='no'"); else PREC=(train.cpu=false train.mixed_precision=bf16); fi
  step train_tiny 90 40 "$PY" train.py --config configs/tiny_test.yaml "${PREC[@]}" train.max_steps=6 \
    "train.output_dir=$WORK/runs/tiny" "$CACHE"
  # gradient caching + the frozen cache in page-locked host memory, 2 epochs (the second all hits)
  step train_tiny_cached 90 40 "$PY" train.py --config configs/tiny_test.yaml "${PREC[@]}" train.epochs=2 \
    train.micro_batches=2 train.frozen_cache=true train.frozen_cache_device=cpu eval.final=false \
    "train.output_dir=$WORK/runs/tiny_cached" "$CACHE"
  if ((DRY)); then
    skip deepspeed_zero2 "CUDA step; on CPU see tests/train/test_deepspeed_train.py (slow)"
  elif ! reason=$("$PY" -c "import deepspeed" 2>&1 | tail -1); then
    skip deepspeed_zero2 "deepspeed not importable (${reason:-?}); carry a built wheel, see fetch_gpu_wheels.sh"
  else
    step deepspeed_zero2 120 60 "$PY" -m accelerate.commands.launch --config_file launch/accelerate_deepspeed_zero2.yaml \
      --num_processes 1 --main_process_port 29571 train.py --config configs/tiny_test.yaml train.cpu=false \
      train.mixed_precision=bf16 train.max_steps=3 eval.final=false "train.output_dir=$WORK/runs/ds" "$CACHE"
  fi
}

# ---------------------------------------------------------------------------- benchmarks
# Each benchmark writes its JSON under $RAW; the summary folds them into $OUT/gpu_results.json.
# Order: the benchmarks that give the issue's required figures first (the eager trainer step
# with cached epochs and both profiles, search, eval, loss, the plain-step baselines), then the
# training runs, then the compiled trainer step (its compile time is the least predictable;
# it times only (a) and (b)) and the 640 px shards.
RAW="$WORK/json"
mkdir -p "$RAW"
COMPILED_SKIP=(--skip cached upstream loader phases)
step bench_train 200 120 "$PY" benchmarks/bench_train.py "${TRAIN_CFG[@]}" "${TRAIN_RUN[@]}" --out "$RAW/bench_train.json" \
  "$CACHE" "${TRAIN_DATA[@]}"
step bench_search 100 60 "$PY" benchmarks/bench_search.py "${SEARCH_ARGS[@]}" --out "$RAW/bench_search.json"
step bench_eval 120 60 "$PY" benchmarks/bench_eval.py "${EVAL_ARGS[@]}" --workdir "$WORK/cache" --out "$RAW/bench_eval.json"
step bench_loss 100 50 "$PY" benchmarks/bench_loss.py "${LOSS_ARGS[@]}" --out "$RAW/bench_loss.json"
step bench_model 150 90 "$PY" benchmarks/bench_model.py "${MODEL_ARGS[@]}" --out "$RAW/bench_model.json"
training_runs
step bench_train_compiled 180 100 "$PY" benchmarks/bench_train.py "${TRAIN_CFG[@]}" "${COMPILED_RUN[@]}" "${COMPILED_SKIP[@]}" \
  --out "$RAW/bench_train_compiled.json" "$CACHE" "${TRAIN_DATA[@]}" train.compile=true
step bench_train_640 120 60 "$PY" benchmarks/bench_train.py "${TRAIN_CFG[@]}" "${T640_RUN[@]}" \
  --skip model cached upstream phases ops --out "$RAW/bench_train_640.json" "$CACHE" "${T640_DATA[@]}"

# ---------------------------------------------------------------------------- summary
echo "=== summary ($((SECONDS - START))s elapsed)"
DRYFLAG=()
((DRY)) && DRYFLAG=(--dry-run)
"$PY" benchmarks/summarize_gpu.py "$RAW" --out "$OUT" --steps "$STEPS" "${DRYFLAG[@]}" || FAILED=1
echo "gpu_check: $((SECONDS - START))s, $([ $FAILED = 0 ] && echo 'all steps ok or skipped' || echo 'SOME STEPS FAILED')"
finish $FAILED
