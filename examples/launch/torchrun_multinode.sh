#!/usr/bin/env bash
# Multi-node pretraining with torchrun: run this same script on every node.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 bash examples/launch/torchrun_multinode.sh \
#       examples/configs/mistral_7b.yaml --data.path 1.0 /data/web_text_document
#
# Ranks are laid out as Megatron does (tensor fastest, pipeline slowest), so with 8 GPUs per node
# a tensor-parallel group of <= 8 never leaves a node. Everything after the config file is passed
# on as --section.field overrides.
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
NODE_RANK=${NODE_RANK:-0}
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

exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  --max-restarts "$MAX_RESTARTS" --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
  -m megatron_lite.pretrain --config "$CONFIG" "$@"
