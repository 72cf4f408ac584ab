#!/usr/bin/env bash
# The GPU checks in one run (about 8 minutes on an H100) for a machine with a CUDA GPU and CuPy:
#   1. the kernels against their PyTorch reference (tests marked gpu),
#   2. the MoE routing metadata / dispatch / combine benchmark, forward and backward, kernels vs.
#      the torch reference, copy bandwidth in the same run, and its verdict on the default path,
#   3. training throughput, GPT-2 124M at nanoGPT's bench settings (scripts/bench/train_throughput.py),
#   4. generation with the KV cache.
# Everything is also written to out/gpu_check.log.
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p out
LOG=out/gpu_check.log
exec > >(tee "$LOG") 2>&1
status=0
step() {  # run one check with a time limit; a failure is reported and the next check still runs
  local limit=$1; shift
  echo "=== $* (limit ${limit}s) $(date -u +%H:%M:%S)"
  timeout "$limit" "$@" || { echo "=== FAILED ($?): $*"; status=1; }
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)" || true
step 150 python -m pytest -q -m gpu tests/
step 120 python scripts/bench/moe_dispatch.py
step 180 python scripts/bench/train_throughput.py
step 60 python scripts/bench/generate.py --preset tiny-llama --batch 32 --prompt-len 128 --new 128
echo "=== done, status $status; log in $LOG"
exit $status
