#!/usr/bin/env bash
# Expert parallelism on a machine with several GPUs, in one run; results go to $OUT (default
# bench-out/ep/), one text file per check; record them in docs/benchmarks.md.
#
#   bash bench/ep_check.sh          # every GPU of this machine (nproc = GPU count)
#   bash bench/ep_check.sh --dry    # on CPU: 2 gloo processes, tiny sizes (checks the script itself)
#
# 1. exchange: bench/ep_exchange.py at finegrained-1b's per-layer message (16384 tokens x top-6 x
#    1024, bf16: 192 MiB per process), raw all-to-all GB/s next to moectl's exchange; and nccl-tests'
#    alltoall_perf at that size when it is on PATH (NCCL's own figure)
# 2. parity: finegrained-1b shrunk to 4 layers and 512 tokens, fp32, 5 steps, at EP = 2, 4, 8
#    (those that divide the GPU count) against FSDP with the same processes and global batch
# 3. speed: tokens/s per GPU, peak memory and the exchange's share of the step at EP = 1 (DDP), 2,
#    4, 8 for finegrained-1b in bf16, with its learned router and with exactly uniform routing
#    (bench/plugins/ep_uniform.py). With one GPU only EP = 1 runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY_OVERRIDE:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
OUT=${OUT:-bench-out/ep}
mkdir -p "$OUT/runs"
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
  tail -n 15 "$OUT/$name.txt"
  [ $rc -ne 0 ] && status=1
  return 0
}
if [ $DRY = 1 ]; then
  G=2
  export OMP_NUM_THREADS=1
  EXCHANGE=(--tokens 256 --d-model 64 --experts 8 --reps 3)
  MODEL=(model.d_model=64 model.n_layers=2 model.n_heads=4 model.ffn_hidden=128 model.seq_len=64
         model.vocab_size=512 model.moe.num_experts=8 model.moe.expert_hidden=32 train.batch_size=2)
  PARITY=("${MODEL[@]}" train.max_steps=3)
  SPEED=("${MODEL[@]}" train.max_steps=4)
  LIMIT=300
else
  G=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  EXCHANGE=()
  PARITY=(model.n_layers=4 model.seq_len=512 train.batch_size=2 train.precision=fp32 train.max_steps=5)
  SPEED=(train.max_steps=30 train.precision=bf16)
  LIMIT=600
fi
if [ "${G:-0}" -lt 1 ]; then
  echo "no GPU found: run with --dry on a CPU" >&2
  exit 2
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', \
torch.cuda.nccl.version() if torch.cuda.is_available() else None)"
  git rev-parse HEAD 2>/dev/null || true
  echo "processes: $G"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
RUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$G")
COMMON=(train.eval_every=null train.checkpoint_every=null train.log_every=1 train.grad_clip=1.0 train.warmup_steps=1)
export PYTHONPATH="$PWD/bench/plugins${PYTHONPATH:+:$PYTHONPATH}"
DEGREES=()
for d in 2 4 8; do
  if [ "$d" -le "$G" ] && [ $((G % d)) -eq 0 ]; then DEGREES+=("$d"); fi
done

# 1. the exchange
if [ "$G" -ge 2 ]; then
  step exchange "$LIMIT" "${RUN[@]}" bench/ep_exchange.py "${EXCHANGE[@]}"
  if command -v alltoall_perf > /dev/null; then
    step nccl-tests "$LIMIT" alltoall_perf -b 192M -e 192M -g "$G" -d bfloat16
  else
    echo "nccl-tests' alltoall_perf is not on PATH: NCCL's own figure is not measured" | tee "$OUT/nccl-tests.txt"
  fi
fi

# 2. parity against FSDP
if [ ${#DEGREES[@]} -gt 0 ]; then
  step parity-fsdp "$LIMIT" "${RUN[@]}" -m moectl train bench/finegrained-1b "${PARITY[@]}" "${COMMON[@]}" \
    train.parallel=fsdp --run-dir "$OUT/runs/parity-fsdp" --resume never -q
  runs=()
  for d in "${DEGREES[@]}"; do
    step "parity-ep$d" "$LIMIT" "${RUN[@]}" -m moectl train bench/finegrained-1b "${PARITY[@]}" "${COMMON[@]}" \
      train.expert_parallel="$d" --run-dir "$OUT/runs/parity-ep$d" --resume never -q
    runs+=("$OUT/runs/parity-ep$d")
  done
  step parity 60 "$PY" bench/ep_compare.py parity "$OUT/runs/parity-fsdp" "${runs[@]}"
fi

# 3. speed and memory at each degree, learned and uniform routing
runs=()
for d in 1 "${DEGREES[@]}"; do
  for routing in learned uniform; do
    extra=()
    [ "$routing" = uniform ] && extra=("plugins=[ep_uniform]" "model.moe.router={kind: uniform}")
    name="speed-ep$d-$routing"
    step "$name" "$LIMIT" "${RUN[@]}" -m moectl train bench/finegrained-1b "${SPEED[@]}" "${COMMON[@]}" \
      train.expert_parallel="$d" "${extra[@]}" --run-dir "$OUT/runs/$name" --resume never -q
    runs+=("$OUT/runs/$name")
  done
done
step speed 60 "$PY" bench/ep_compare.py speed "${runs[@]}"
echo "results in $OUT/ (exit $status)"
exit $status
