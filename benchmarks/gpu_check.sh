#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): GRPO steps over fp32 master weights on a 0.5B-class Qwen2 built
# from its config, in bf16 and in float32 compute, FSDP2-sharded over NCCL, and vLLM synced with the trainer
# and checked for greedy equality (where vLLM is installed); step times. Killed at 10 minutes; exits 2 at once
# without CUDA.
#   bash benchmarks/gpu_check.sh [--steps N] [--shape 0.5b|3b] [--no-vllm] [--out FILE.json]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec timeout 600 "$python" -m benchmarks.gpu_check "$@"
