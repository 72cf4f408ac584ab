#!/usr/bin/env bash
# The GPU checks, in one short run for a machine with a CUDA GPU (and CuPy): the kernels against
# their PyTorch reference (tests marked gpu), then the MoE dispatch/combine benchmark at the
# reference size (T=65536, d=2048, E=64, top-2, cf 1.25, bf16), then generation on the GPU.
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m pytest -q -m gpu tests/
python scripts/bench/moe_dispatch.py
python scripts/bench/generate.py --preset tiny-llama --batch 32 --prompt-len 128 --new 128
