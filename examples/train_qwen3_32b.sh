#!/usr/bin/env bash
# DAPO on forking tokens (top-20% entropy) for Qwen3-32B with megatron-core, 2 node(s) x 8 GPUs.
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
exec "$(dirname "$0")/launch_train.sh" examples/configs/qwen3_32b.yaml 2 "$@"
