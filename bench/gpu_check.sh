#!/usr/bin/env bash
# GPU check: the gpu preset trained for 60 s (tokens/s, MFU, peak memory, val_bpb), then the
# optimizer step of Muon against DeepNested on the same model. Prints a markdown table and the
# bench's key: value lines. Needs prepared data for the gpu preset in AUTORESEARCH_CACHE; a GPU
# machine without network can use a cache prepared elsewhere with
#   AUTORESEARCH_PRESET=gpu python prepare.py --source builtin
# Usage: bash bench/gpu_check.sh [seconds]   (exits non-zero, saying why, when anything fails)
set -euo pipefail
cd "$(dirname "$0")/.."
export AUTORESEARCH_PRESET=gpu
export AUTORESEARCH_TIME_BUDGET="${1:-60}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device here.')"
python -c "import prepare; prepare.load_manifest()" 2>/dev/null || {
  echo "gpu_check: no prepared data for the gpu preset; run AUTORESEARCH_PRESET=gpu python prepare.py first." >&2
  exit 1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

AUTORESEARCH_RUN_DIR="$out/run" python train.py > "$out/train.log" 2>&1 || {
  echo "gpu_check: train.py failed; the end of its log:" >&2
  tail -n 30 "$out/train.log" >&2
  exit 1
}
echo
echo "| metric | value |"
echo "| --- | --- |"
for key in val_bpb training_seconds total_seconds startup_seconds num_steps tokens_per_second mfu_percent \
           peak_memory_mb num_params_M depth device data_fingerprint; do
  value=$(grep -E "^${key}:" "$out/train.log" | tail -n 1 | awk '{print $2}')
  echo "| ${key} | ${value} |"
done
echo
python -m bench.optimizer_step
