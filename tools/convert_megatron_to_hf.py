"""Convert a megafork megatron checkpoint back to HF safetensors shards + index, config.json and tokenizer files.

    torchrun --nproc_per_node=2 tools/convert_megatron_to_hf.py --in-dir CKPT --out-dir HF2 [--tp 2 --pp 1]

A plain `python tools/convert_megatron_to_hf.py ...` runs one process. The work lives in megafork.models.qwen3.
"""
import sys

from megafork.models.qwen3.cli import main

if __name__ == "__main__":
    sys.exit(main(["megatron-to-hf", *sys.argv[1:]]))
