"""What megatron-core needs to run on a CPU-only torch. Applied only when CUDA is unavailable."""
from megafork.compat.cpu import CPU_DEVICE_MODULES, apply_cpu_patches, cpu_patches_applied

__all__ = ["CPU_DEVICE_MODULES", "apply_cpu_patches", "cpu_patches_applied"]
