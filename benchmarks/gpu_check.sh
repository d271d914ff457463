#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): bf16-compute GRPO steps over fp32 master weights on a 0.5B-class
# Qwen2 built from its config, vLLM synced with the trainer and checked for greedy equality, step times.
# Under 10 minutes on one GPU (killed at 10); exits 2 at once without CUDA or vLLM.
#   bash benchmarks/gpu_check.sh [--steps N] [--out FILE.json]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec timeout 600 "$python" -m benchmarks.gpu_check "$@"
