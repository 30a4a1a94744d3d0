#!/usr/bin/env bash
# Train on every GPU of one machine (DDP over NCCL). On a CPU-only machine it runs one process unless
# NPROC says more (Gloo; torchrun gives each process 1 intra-op thread).
# --batch-size is per process: 4 GPUs x 32 = 128 images per step. The `--` keeps torchrun's own
# option parser away from gantk's flags (it would read --run as --run-path, --start as --start-method).
set -euo pipefail
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
torchrun --standalone --nproc-per-node "$NPROC" -m gantk -- \
    train --data "${DATA:-mnist}" --epochs 30 --run "ddp-$NPROC" "$@"
