#!/usr/bin/env bash
# Offline GPU check: trains a random all-MiniLM-L6-v2-shaped classifier on synthetic batches in
# CPU fp32, CUDA fp32, CUDA fp16 (GradScaler) and CUDA bf16, and reports examples/s and losses.
# Installs and downloads nothing. Writes ${OUT:-.}/gpu_check.json.
# Usage: [PYTHON=python3] [OUT=dir] bash scripts/gpu_check.sh [gpu_check.py options]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

# Nothing may reach the network, and the Rust tokenizers' threads are not needed here.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
else
    echo "nvidia-smi not found"
fi

exec "$python" "$here/gpu_check.py" --out "${OUT:-.}" "$@"
