#!/usr/bin/env bash
# Every GPU check of the expert backends and the training step, in one run that fits a short
# GPU lease (about 8 minutes on an H100/H200 after setup). Results go to $OUT (default bench-out/),
# one text file per check; record them in docs/benchmarks.md.
#
#   bash bench/gpu_check.sh          # on a CUDA machine with moectl and triton installed
#   bash bench/gpu_check.sh --dry    # on CPU with tiny sizes: checks the script itself
#
# 1. parity: the Triton kernels compiled for the GPU against the loop (fp32 and bf16, forward and
#    backward, empty experts, one expert taking all), grouped_mm on CUDA, the fused loss
# 2. layer table: bench/experts.py at its CUDA shapes, loop / grouped_mm / triton, bf16
# 3. MFU: moectl profile of recipes/bench/finegrained-1b (1.28B total) with grouped_mm and triton
# 4. peers: bench/vs_transformers.py (moectl vs transformers' Mixtral), bf16
set -uo pipefail
cd "$(dirname "$0")/.."
# The interpreter: $PY_OVERRIDE, else the project's .venv, else python on PATH.
PY=${PY_OVERRIDE:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
status=0
step() {   # step NAME TIMEOUT CMD...: run one check, keep its output, go on when it fails
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee "$OUT/$name.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
  tail -n 25 "$OUT/$name.txt"
  [ $rc -ne 0 ] && status=1
  return 0
}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton not installed"
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1
  step parity 600 "$PY" -m pytest -q -x tests/core/test_triton_experts.py tests/core/test_fast_paths.py
  step experts 300 "$PY" bench/experts.py --tokens 512 --d-model 64 --hidden 64 --experts 4 --top-k 2 --reps 2
  step profile 300 "$PY" -m moectl profile quickstart --steps 1 --warmup 0 --json "$OUT/profile.json"
  step peers 300 "$PY" bench/vs_transformers.py --d-model 64 --layers 1 --vocab 512 --seq 64 --batch 2 \
    --rounds 1 --steps 1 --warmup 0 --dtype fp32
else
  export MOECTL_TEST_TRITON_GPU=1
  step parity 150 "$PY" -m pytest -q tests/core/test_triton_experts.py tests/core/test_cuda.py \
    tests/core/test_experts.py tests/core/test_fast_paths.py
  step experts 150 "$PY" bench/experts.py --dtype bf16 --reps 10
  step profile-grouped 120 "$PY" -m moectl profile bench/finegrained-1b --steps 5 --warmup 3 --no-backends \
    --json "$OUT/profile-grouped.json"
  step profile-triton 120 "$PY" -m moectl profile bench/finegrained-1b model.moe.backend=triton --steps 5 \
    --warmup 3 --json "$OUT/profile-triton.json"
  step peers 120 "$PY" bench/vs_transformers.py --dtype bf16 --rounds 3
fi
echo "results in $OUT/ (exit $status)"
exit $status
