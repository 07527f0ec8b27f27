#!/usr/bin/env bash
# The one prepared GPU check (under 10 minutes on one GPU): profile and plan the built-in examples
# on CUDA (node times from CUDA events), then train on CUDA with the local executor.
# Usage (on a machine with a GPU):  OUT=benchmarks/results bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
  | tee "$OUT/gpu_device.txt"
for model in mlp resnet transformer; do
  for gpus in 2 4; do
    pipeoptim partition "$model" --gpus "$gpus" --device cuda --profile-dir "$OUT/.gpu-profiles" \
      --json > "$OUT/gpu_partition_${model}_${gpus}.json"
  done
  pipeoptim partition "$model" --gpus 4 --device cuda --profile-dir "$OUT/.gpu-profiles" \
    | tee "$OUT/gpu_partition_${model}.txt"
done
python benchmarks/gpu_train.py --out "$OUT"
