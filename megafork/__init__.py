"""megafork: RLVR on Megatron-core that trains Qwen3 on forking tokens (arXiv 2506.01939)."""
import warnings

__version__ = "0.1.0"

# megatron-core warns at import time when transformer-engine/apex are missing. That is the normal
# state of megafork's CPU mode (local layer spec, torch norms), so the warning says nothing.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex|Apex) (are|is) not installed")
