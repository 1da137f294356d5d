"""Compare megafork's Qwen3 logits with transformers.Qwen3ForCausalLM; exits 1 above tolerance.

    torchrun --nproc_per_node=2 tools/compare_with_hf.py --hf-dir HF [--megatron-dir CKPT] --tp 2 --pp 1 [--input-ids 1,2,3] [--dump-logits PATH]

A plain `python tools/compare_with_hf.py ...` runs one process. The work lives in megafork.models.qwen3.
"""
import sys

from megafork.models.qwen3.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
