"""Qwen3 on megatron-core: config translation, builder, the HF mapping, conversion and checkpoints.

    from megafork.models.qwen3 import read_hf_config, Qwen3BuildOptions, build_qwen3, load_hf_weights
"""
from megafork.models.qwen3.config import (
    Qwen3BuildOptions,
    Qwen3HFConfig,
    check_parallel_layout,
    padded_vocab_size,
    read_hf_config,
    to_transformer_config,
)
from megafork.models.qwen3.hf_io import HFCheckpoint, export_hf_tensors, load_hf_weights
from megafork.models.qwen3.model import Qwen3GPTModel, build_qwen3

__all__ = [
    "HFCheckpoint", "Qwen3BuildOptions", "Qwen3GPTModel", "Qwen3HFConfig", "build_qwen3",
    "check_parallel_layout", "export_hf_tensors", "load_hf_weights", "padded_vocab_size",
    "read_hf_config", "to_transformer_config",
]
