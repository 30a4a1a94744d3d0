#!/usr/bin/env bash
# Generate 1,000,000 digits as a Slurm array of 10 tasks running at once: task k writes every index i
# with i % 10 == k. Every PNG's name and bytes depend only on (model, seed, index), so the union of the
# 10 folders is byte-identical to one process's output. Each task gets its own folder because a
# folder's manifest.json has one writer at a time (torchrun generation merges them for you).
#SBATCH --job-name=gantk-generate
#SBATCH --array=0-9
#SBATCH --cpus-per-task=4
set -euo pipefail
k=${SLURM_ARRAY_TASK_ID}
gantk generate --model "${MODEL:?path to generator.onnx}" --count 1000000 --seed 0 \
    --shard "$k/10" --out "${OUT:-digits-1m}/shard-$k"
