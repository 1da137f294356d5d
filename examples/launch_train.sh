#!/usr/bin/env bash
# Shared launcher of examples/train_qwen3_{8b,14b,32b}.sh: torchrun on this node -> megafork train.
# Called as `launch_train.sh CONFIG NNODES_DEFAULT [key=value overrides...]`; see those scripts.
set -euo pipefail
CONFIG=$1; shift
NNODES_DEFAULT=$1; shift
: "${HF_DIR:?set HF_DIR to the HF Qwen3 directory}"
: "${DATA:?set DATA to the training prompts (jsonl or parquet, DAPO-Math-17k fields)}"
NNODES=${NNODES:-$NNODES_DEFAULT}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
SGLANG_URLS=${SGLANG_URLS:-http://127.0.0.1:30000}  # comma-separated
EXTRA=()
if [[ -n "${EVAL:-}" ]]; then EXTRA+=("eval.path=$EVAL"); fi
# Every micro-batch has its own length: with expandable segments the caching allocator grows one
# mapping instead of keeping a block per size, which stops fragmentation from eating the GPU over a
# long run (train.pad_multiple, 128 on GPU, rounds the lengths too). Set your own value to override.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    -m megafork train --config "$CONFIG" \
    model.hf_path="$HF_DIR" data.train_path="$DATA" rollout.sglang_urls="$SGLANG_URLS" \
    "${EXTRA[@]}" "$@"
