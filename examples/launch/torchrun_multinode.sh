#!/usr/bin/env bash
# Multi-node pretraining with torchrun: run this same script on every node.
#
#   NNODES=4 MASTER_ADDR=node0 bash examples/launch/torchrun_multinode.sh \
#       examples/configs/mistral_7b.yaml --data.path 1.0 /data/web_text_document
#
# Ranks are laid out as Megatron does (tensor fastest, pipeline slowest), so with 8 GPUs per node
# a tensor-parallel group of <= 8 never leaves a node. Everything after the config file is passed
# on as --section.field overrides. The c10d rendezvous (hosted on MASTER_ADDR) numbers the nodes
# and survives restarts; RDZV_ID must be the same on every node and new for every job.
#
# Reliability (README "Reliability"):
#   MAX_RESTARTS=N    torchrun restarts all workers up to N times when one dies; with
#                     --training.save = --training.load they resume from the latest checkpoint.
#   SHUTDOWN_TIMEOUT  seconds torchrun waits after forwarding SIGTERM before it SIGKILLs the
#                     workers (torch's default is 30 s); must exceed one iteration plus one save.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [--section.field value ...]}
shift
NNODES=${NNODES:-1}
RDZV_ID=${RDZV_ID:-megatron_lite}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-600}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # keeps TP comm ahead of compute
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Restarted workers cannot reconnect through the store torchrun shares with its rendezvous
# (torch 2.13, pytorch issue 135712); read by torchrun itself, so it must be set here.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
  --max-restarts "$MAX_RESTARTS" --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
  -m megatron_lite.pretrain --config "$CONFIG" "$@"
