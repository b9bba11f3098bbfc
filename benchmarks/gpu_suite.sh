#!/usr/bin/env bash
# The GPU benchmarks in one go, meant to finish in under 5 minutes on one GPU:
#   1. `mixprec bench step --device cuda`: whole training steps of the five model families,
#      every mode, fp16 and bf16, timed side by side (no peak memory: one process per mode
#      and dtype would take most of the budget);
#   2. the same on two families (resnet, gpt) with peak memory (torch.cuda.max_memory_allocated,
#      a fresh process per mode);
#   3. `mixprec bench gpu`: GPT-2-small-like and ResNet-50-like throughput and peak memory;
#   4. `mixprec bench optimizer --device cuda`: one AdamW step, mixprec's modes beside torch's
#      fused and foreach AdamW, 1M to 64M parameters (ms, bytes per parameter, GB/s).
# Each writes its table and JSON line under $OUT (default benchmarks/gpu-results/).
# Run from the repository root: bash benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/gpu-results}"
mkdir -p "$out"
{ date -u; uptime; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true; \
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  > "$out/machine.txt" 2>&1
run() {  # seconds allowed, name, then the command's arguments (a timeout skips to the next)
  local limit=$1 name=$2; shift 2
  echo "== $name: python -m mixprec $*"
  timeout "$limit" python -m mixprec "$@" --json 2>&1 | tee "$out/$name.txt" \
    || echo "!! $name failed or ran past ${limit}s"
}
run 80 step bench step --device cuda --repeats 15 --no-memory
run 120 step_memory bench step --device cuda --models resnet gpt --repeats 3 --warmup 1
run 90 gpu bench gpu --steps 10
run 60 optimizer bench optimizer --device cuda --repeats 15
echo "results in $out"
