#!/usr/bin/env bash
# DAPO on forking tokens (top-20% entropy) for Qwen3-32B with megatron-core.
#
# Run it on every node (it calls torchrun itself with --node_rank):
#   HF_DIR=/ckpt/Qwen3-32B DATA=/data/dapo-math-17k.parquet EVAL=/data/aime24.parquet \
#   SGLANG_URLS=http://10.0.0.5:30000,http://10.0.0.6:30000 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 \
#       bash examples/train_qwen3_32b.sh [key=value overrides...]
#
# Start the SGLang servers first (one per inference node), e.g.
#   python -m sglang.launch_server --model-path $HF_DIR --tp 8 --port 30000
# The trainer syncs its weights into them after every step (update_weights_from_distributed).
# Layout and the paper's hyper-parameters are in examples/configs/qwen3_32b.yaml.
set -euo pipefail
: "${HF_DIR:?set HF_DIR to the HF Qwen3-32B directory}"
: "${DATA:?set DATA to the training prompts (jsonl or parquet, DAPO-Math-17k fields)}"
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
SGLANG_URLS=${SGLANG_URLS:-http://127.0.0.1:30000}  # comma-separated
EXTRA=()
if [[ -n "${EVAL:-}" ]]; then EXTRA+=("eval.path=$EVAL"); fi

exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node=8 \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    -m megafork train --config examples/configs/qwen3_32b.yaml \
    model.hf_path="$HF_DIR" data.train_path="$DATA" rollout.sglang_urls="$SGLANG_URLS" \
    "${EXTRA[@]}" "$@"
