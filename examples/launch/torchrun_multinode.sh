#!/usr/bin/env bash
# Multi-node pretraining with torchrun: run this same script on every node.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 bash examples/launch/torchrun_multinode.sh \
#       examples/configs/mistral_7b.yaml --data.path 1.0 /data/web_text_document
#
# Ranks are laid out as Megatron does (tensor fastest, pipeline slowest), so with 8 GPUs per node
# a tensor-parallel group of <= 8 never leaves a node. Everything after the config file is passed
# on as --section.field overrides.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [--section.field value ...]}
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # keeps TP comm ahead of compute
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_lite.pretrain --config "$CONFIG" "$@"
