"""Convert an HF Qwen3 checkpoint (safetensors + config.json) into a megatron-core dist_checkpointing checkpoint.

    torchrun --nproc_per_node=4 tools/convert_hf_to_megatron.py --hf-dir HF --out-dir CKPT --tp 2 --pp 2 [--dtype bf16|fp32]

A plain `python tools/convert_hf_to_megatron.py ...` runs one process. The work lives in megafork.models.qwen3.
"""
import sys

from megafork.models.qwen3.cli import main

if __name__ == "__main__":
    sys.exit(main(["hf-to-megatron", *sys.argv[1:]]))
