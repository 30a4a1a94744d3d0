#!/usr/bin/env bash
# Generate 1,000,000 digits as a Slurm array of 10 tasks running at once into one folder: task k writes
# every index i with i % 10 == k. Every PNG's name and bytes depend only on (model, seed, index), so the
# folder ends byte-identical to one process's output; the tasks take turns at its manifest.json under a
# POSIX lock on .gantk-lock. On a file system without working locks gantk warns ("cannot lock"): give
# each task its own folder there (--out "$OUT/shard-$k"); the union of the folders is the same output.
#SBATCH --job-name=gantk-generate
#SBATCH --array=0-9
#SBATCH --cpus-per-task=4
set -euo pipefail
k=${SLURM_ARRAY_TASK_ID}
gantk generate --model "${MODEL:?path to generator.onnx}" --count 1000000 --seed 0 \
    --shard "$k/10" --out "${OUT:-digits-1m}"
