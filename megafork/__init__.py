"""megafork: RLVR on Megatron-core that trains Qwen3 on forking tokens (arXiv 2506.01939)."""
__version__ = "0.1.0"
