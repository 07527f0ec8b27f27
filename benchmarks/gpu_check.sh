#!/usr/bin/env bash
# The one prepared GPU check (under 10 minutes on one GPU): profile and plan the built-in examples
# on CUDA (node times from CUDA events), then train on CUDA with the local executor; with 2+ GPUs
# also the throughput ratios of benchmarks/throughput.py (one GPU per rank).
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
# Throughput ratios (issue 13) with one GPU per rank, where there are enough GPUs (NCCL cannot
# put two ranks on one GPU): 2 stages from 2 GPUs, 2 and 4 stages from 4.
count=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$count" -ge 4 ]; then
  python benchmarks/throughput.py --device cuda --stages 2 4 --out "$OUT/gpu-throughput"
elif [ "$count" -ge 2 ]; then
  python benchmarks/throughput.py --device cuda --stages 2 --out "$OUT/gpu-throughput"
else
  echo "throughput ratios: $count GPU(s); they need one GPU per stage (2 or more)" | tee "$OUT/gpu_throughput.txt"
fi
