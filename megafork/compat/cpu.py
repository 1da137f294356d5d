"""CPU mode for megatron-core (0.16.1 .. 0.19).

megatron-core assumes CUDA in a handful of places: it allocates with
`device=torch.cuda.current_device()` or `device="cuda"`, calls `torch.cuda.synchronize()`, and
checks `param.grad.type() == "torch.cuda.FloatTensor"` before clipping. On a CPU-only torch
each of these raises. We fix them with two mechanisms, both applied only when
`torch.cuda.is_available()` is False, so a GPU run never sees them:

1. **Device redirect, module by module.** Each module listed in `CPU_DEVICE_MODULES` gets its
   `torch` global replaced by `_CpuTorch`, a view of torch in which `torch.cuda.current_device()`
   is `"cpu"`, `torch.cuda.synchronize()` is a no-op, and factory functions asked for
   `device="cuda"` allocate on the CPU. Every other module, and torch itself, is untouched.
2. **One function replaced:** `clip_grad_by_total_norm_fp32` (optimizer/clip_grads.py) asserts
   CUDA grads; the optimizer gets an equivalent that scales CPU grads in place.
3. **One method wrapped:** `LanguageModule.setup_embeddings_and_output_layer`
   (models/common/language_module/language_module.py) moves the tied embedding to CUDA with the
   tensor method `weight.data.cuda()` before all-reducing it over the embedding group (PP > 1
   with tied embeddings). While that method runs, `Tensor.cuda` returns the tensor unchanged.
4. **One method replaced:** `FileSystemWriterAsync.write_preloaded_data_multiproc`
   (dist_checkpointing/strategies/filesystem_async.py) forks one writer process per bucket even
   for a synchronous save. Forking a process that runs gloo's threads intermittently deadlocked
   the child here; the replacement writes the same buckets in-process, in order.

5. **One constructor wrapped:** `WrappedTorchNorm.__new__` (transformer/torch_norm.py) asserts
   `not config.sequence_parallel`; TE's norms, used on GPU, support SP. Under SP the wrapper builds
   the same `torch.nn.RMSNorm` and marks its weight `sequence_parallel = True`, which is what TE
   does: megatron's `finalize_model_grads` then all-reduces that gradient over TP (each rank saw
   only its slice of the sequence).

6. **Two functions replaced:** `_get_cuda_rng_state` / `_set_cuda_rng_state`
   (tensor_parallel/random.py) read and write the CUDA generator for activation recomputation
   (`CheckpointFunction`, `CheckpointWithoutOutput` save every RNG state and replay it in the
   backward). A CPU-only torch has no CUDA generator: the replacements return an empty state and
   restore nothing, while the CPU generator (the one dropout draws from here) is still saved and
   replayed by megatron's own code.

7. **One constructor wrapped:** `DistributedOptimizer.__init__` (optimizer/distrib_optimizer.py)
   sorts parameters by `param.type()` and accepts only the strings
   `torch.cuda.{Float,Half,BFloat16}Tensor`. While it runs, `Tensor.type()` (no arguments) names a
   CPU tensor's CUDA twin, so fp32 params take the same fp32 branch they take on GPU.

Avoided without a patch (see megafork.distributed): the CUDA RNG tracker (megatron's
inference tracker, whose fork() is a no-op, with dropout 0) and the causal mask built on
"cuda" (the redirect covers transformer/utils.py; callers may also pass an explicit mask).
"""
from __future__ import annotations

import functools
import importlib
import types

import torch

# module -> the megatron code it serves.
CPU_DEVICE_MODULES: dict[str, str] = {
    "megatron.core.tensor_parallel.mappings": "gather/reduce-scatter buffers on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.layers": "linear-layer buffers and weight allocation on the current device",
    "megatron.core.tensor_parallel.random": "RNG state lookups keyed by torch.cuda.current_device()",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "RoPE inv_freq placed on the current device",
    "megatron.core.models.gpt.gpt_model": "MTP/label buffers on the current device",
    "megatron.core.transformer.utils": "get_default_causal_mask built with device='cuda'",
    "megatron.core.transformer.attention": "KV buffers on the current device",
    "megatron.core.transformer.dot_product_attention": "attention-score buffers on the current device",
    "megatron.core.transformer.module": "Float16Module buffers on the current device",
    "megatron.core.transformer.transformer_layer": "offload/recompute buffers on the current device",
    "megatron.core.pipeline_parallel.p2p_communication": "shape exchange on the current device, torch.cuda.synchronize",
    "megatron.core.pipeline_parallel.schedules": "total_num_tokens counters created with device='cuda'",
    "megatron.core.distributed.param_and_grad_buffer": "param/grad buffers on the current device",
    "megatron.core.distributed.distributed_data_parallel": "torch.cuda.synchronize/empty_cache in buffer lifecycle",
    "megatron.core.optimizer.optimizer": "found_inf / scale tensors created with device='cuda'",
    "megatron.core.optimizer.clip_grads": "grad-norm accumulators created with device='cuda'",
    "megatron.core.optimizer.distrib_optimizer": "shard buffers on the current device",
    "megatron.core.utils": "param-hash and norm helpers created with device='cuda'",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "torch.cuda.synchronize before preloading tensors",
    "megatron.core.dist_checkpointing.strategies.async_utils": "liveness flags on the current device",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save-plan verification flags on device='cuda'",
}

_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
              "empty_like", "zeros_like", "ones_like", "full_like", "as_tensor")
_applied = False


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if str(device).startswith("cuda"):
        return "cpu"
    return device


class _CpuCuda(types.ModuleType):
    """torch.cuda as megatron should see it on a CPU-only machine."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(device=None):
        return None

    @staticmethod
    def empty_cache():
        return None


class _CpuTorch(types.ModuleType):
    """torch, with CUDA device requests redirected to the CPU. Everything else is torch."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _redirect(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _redirect(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    factory.__doc__ = f"torch.{fn.__name__} with device='cuda' redirected to the CPU (megafork.compat)."
    return factory


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU twin of megatron's clip_grad_by_total_norm_fp32: scale grads by max_norm/total_norm."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


def _with_tensor_method(method, name: str, make_replacement):
    """Wrap `method` so that `torch.Tensor.<name>` is `make_replacement(original)` while it runs."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        original = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, make_replacement(original))
        try:
            return method(*args, **kwargs)
        finally:
            setattr(torch.Tensor, name, original)

    return wrapped


def _tensor_cuda_is_identity(method):
    """Wrap `method` so that `Tensor.cuda()` inside it keeps the tensor where it is."""
    return _with_tensor_method(method, "cuda", lambda original: lambda self, *a, **k: self)


def _tensor_type_names_cuda(method):
    """Wrap `method` so that `Tensor.type()` inside it reports CPU tensors as their CUDA type."""

    def make_type(original):
        def type_(self, dtype=None, non_blocking=False, **kw):
            if dtype is None and not kw:
                name = original(self)
                if self.device.type == "cpu" and not name.startswith("torch.cuda."):
                    return "torch.cuda." + name.removeprefix("torch.")
                return name
            return original(self, dtype, non_blocking, **kw)

        return type_

    return _with_tensor_method(method, "type", make_type)


def _write_buckets_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue):
    """In-process twin of FileSystemWriterAsync.write_preloaded_data_multiproc (no fork)."""
    import queue

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results: dict | Exception = {}
    for i, bucket in enumerate(write_buckets):
        local_results, count = queue.Queue(), queue.Queue()
        count.put(i)
        kwargs = {"use_msc": use_msc} if use_msc else {}
        FileSystemWriterAsync.write_preloaded_data(transform_list, i, bucket, local_results, count, True, **kwargs)
        _, out = local_results.get_nowait()
        if isinstance(out, Exception):
            results = out
            break
        results[i] = out
    global_results_queue.put(results)


def _norm_allowing_sequence_parallel(original_new):
    """Wrap WrappedTorchNorm.__new__: under SP build the plain norm and mark its params as SP."""

    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        config.sequence_parallel = False  # the shared config, restored below; the build is single-threaded
        try:
            norm = original_new(cls, config, hidden_size, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    __new__.__wrapped__ = original_new
    return staticmethod(__new__)


def _no_cuda_rng_state(*args, **kwargs) -> torch.Tensor:
    """CPU twin of megatron's _get_cuda_rng_state: there is no CUDA generator to save."""
    return torch.empty(0, dtype=torch.uint8)


def _restore_no_cuda_rng_state(new_state, *args, **kwargs) -> None:
    """CPU twin of megatron's _set_cuda_rng_state: nothing to restore without CUDA."""
    if new_state.numel():
        raise RuntimeError("megafork.compat: a CUDA RNG state reached a CPU-only process")


def apply_cpu_patches() -> bool:
    """Make megatron-core runnable on a CPU-only torch. Idempotent.

    Returns:
        True if the patches are (now) applied, False when CUDA is available and nothing was done.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    cpu_torch = _CpuTorch()
    for module_name in CPU_DEVICE_MODULES:
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(f"megafork.compat: {module_name} has no 'torch' global to redirect; "
                               "this megatron-core version is not supported (expected >=0.16.1,<0.20)")
        module.torch = cpu_torch
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    if not hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
        raise RuntimeError("megafork.compat: megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32 "
                           "not found; this megatron-core version is not supported")
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    language_module = importlib.import_module("megatron.core.models.common.language_module.language_module")
    cls = language_module.LanguageModule
    cls.setup_embeddings_and_output_layer = _tensor_cuda_is_identity(cls.setup_embeddings_and_output_layer)
    fs_async = importlib.import_module("megatron.core.dist_checkpointing.strategies.filesystem_async")
    fs_async.FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(_write_buckets_in_process)
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    distrib.DistributedOptimizer.__init__ = _tensor_type_names_cuda(distrib.DistributedOptimizer.__init__)
    mcore_random = importlib.import_module("megatron.core.tensor_parallel.random")
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        if not hasattr(mcore_random, name):
            raise RuntimeError(f"megafork.compat: megatron.core.tensor_parallel.random.{name} not found; this "
                               "megatron-core version is not supported")
    mcore_random._get_cuda_rng_state = _no_cuda_rng_state
    mcore_random._set_cuda_rng_state = _restore_no_cuda_rng_state
    torch_norm = importlib.import_module("megatron.core.transformer.torch_norm")
    torch_norm.WrappedTorchNorm.__new__ = _norm_allowing_sequence_parallel(torch_norm.WrappedTorchNorm.__new__)
    _applied = True
    return True


def cpu_patches_applied() -> bool:
    """True once `apply_cpu_patches` has patched this process."""
    return _applied
