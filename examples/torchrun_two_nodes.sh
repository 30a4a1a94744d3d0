#!/usr/bin/env bash
# Two machines, 8 GPUs each, meeting at a rendezvous endpoint. Run this on both, with NODE_RANK=0 on
# the first and 1 on the second; RDZV_HOST is the first machine's address. Rank 0 (on node 0) alone
# writes the run folder, so put --runs-dir on storage node 0 can write (shared storage for resume).
set -euo pipefail
: "${RDZV_HOST:?set RDZV_HOST to node 0's address}"
torchrun --nnodes 2 --node-rank "${NODE_RANK:?set NODE_RANK to 0 or 1}" --nproc-per-node "${NPROC:-8}" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:29400" --rdzv-id "${JOB_ID:-gantk}" \
    -m gantk -- train --data "${DATA:-mnist}" --epochs 30 --runs-dir "${RUNS:-/shared/runs}" --run two-nodes "$@"
