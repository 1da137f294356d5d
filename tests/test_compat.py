"""megafork.compat.cpu: each CPU patch of megatron-core does what it says, and only on CPU.

    .venv/bin/python -m pytest tests/test_compat.py -q

The end-to-end proof is elsewhere: the schedules, DDP, optimizer, tied embeddings at PP=2 and
dist_checkpointing run on gloo in tests/test_qwen3_train.py and tests/test_convert.py.
"""
from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest
import torch

from megafork.compat import CPU_DEVICE_MODULES, apply_cpu_patches

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only patches")


@pytest.fixture(scope="module", autouse=True)
def patched():
    assert apply_cpu_patches() is True


@pytest.mark.parametrize("module_name", sorted(CPU_DEVICE_MODULES))
def test_device_redirect(module_name):
    module = importlib.import_module(module_name)
    source = inspect.getsource(module)
    # The patch is needed: the module really asks for CUDA.
    assert "cuda" in source, f"{module_name} never mentions cuda; drop it from CPU_DEVICE_MODULES"
    assert module.torch is not torch and module.torch.cuda.current_device() == "cpu"
    for factory in ("zeros", "empty", "ones", "arange"):
        t = getattr(module.torch, factory)(3, device="cuda")
        assert t.device.type == "cpu", (module_name, factory)
    assert module.torch.tensor([1.0], device=0).device.type == "cpu"
    assert module.torch.zeros(2, device="cpu", pin_memory=True).device.type == "cpu"
    module.torch.cuda.synchronize()  # a no-op instead of "Torch not compiled with CUDA"
    assert module.torch.float32 is torch.float32 and module.torch.Tensor is torch.Tensor


def test_causal_mask_on_cpu():
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.ones(4, 4).triu(1).bool())


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_replacement(max_norm):
    from megatron.core.optimizer import optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    ref = [p.grad.clone() for p in params]
    total = torch.sqrt(sum((g * g).sum() for g in ref)).item()
    optimizer.clip_grad_by_total_norm_fp32(params, max_norm, total)
    coeff = min(1.0, max_norm / (total + 1e-6))
    for p, g in zip(params, ref):
        assert torch.allclose(p.grad, g * coeff, rtol=1e-6, atol=0)
    # decoupled grads (megatron's FSDP path) are scaled the same way
    p = torch.nn.Parameter(torch.ones(2))
    p.decoupled_grad = torch.full((2,), 4.0)
    optimizer.clip_grad_by_total_norm_fp32([p], 1.0, 4.0, use_decoupled_grad=True)
    assert torch.allclose(p.decoupled_grad, torch.full((2,), 1.0), rtol=1e-5)


def test_tied_embedding_setup_keeps_tensor_on_cpu():
    from megatron.core.models.common.language_module.language_module import LanguageModule

    wrapped = LanguageModule.setup_embeddings_and_output_layer
    seen = {}

    def probe(self):
        t = torch.ones(2)
        seen["same"] = t.cuda() is t

    original_cuda = torch.Tensor.cuda
    assert hasattr(wrapped, "__wrapped__"), "LanguageModule.setup_embeddings_and_output_layer is not wrapped"
    from megafork.compat.cpu import _tensor_cuda_is_identity

    _tensor_cuda_is_identity(probe)(None)
    assert seen["same"] is True
    assert torch.Tensor.cuda is original_cuda, "Tensor.cuda must be restored after the call"


def test_checkpoint_writer_runs_in_process(tmp_path):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from megafork.compat.cpu import _write_buckets_in_process

    assert FileSystemWriterAsync.write_preloaded_data_multiproc is _write_buckets_in_process
    # One bucket with one tensor, through the real megatron writer function, in this process.
    import queue

    from torch.distributed.checkpoint.filesystem import _StorageWriterTransforms
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

    item = WriteItem(index=MetadataIndex("w"), type=WriteItemType.TENSOR)
    bucket = (str(tmp_path / "__0_0.distcp"), "__0_0.distcp", ([], [(item, torch.arange(6.0))]))
    results = queue.Queue()
    FileSystemWriterAsync.write_preloaded_data_multiproc([_StorageWriterTransforms()], False, 0, [bucket], results)
    out = results.get_nowait()
    assert not isinstance(out, Exception), out
    assert (tmp_path / "__0_0.distcp").stat().st_size > 0 and len(out[0]) == 1


def test_recompute_rng_state_twins():
    from megatron.core.tensor_parallel import random as mcore_random

    from megafork.compat.cpu import _no_cuda_rng_state, _restore_no_cuda_rng_state

    assert mcore_random._get_cuda_rng_state is _no_cuda_rng_state
    assert mcore_random._set_cuda_rng_state is _restore_no_cuda_rng_state
    # megatron's own save/replay of every RNG (what CheckpointFunction does) now runs, and still
    # replays the CPU generator: the same draw after restoring.
    states = mcore_random._get_all_rng_states()
    a = torch.rand(3)
    mcore_random._set_all_rng_states(*states)
    assert torch.equal(torch.rand(3), a)
    with pytest.raises(RuntimeError, match="CUDA RNG state reached a CPU-only process"):
        _restore_no_cuda_rng_state(torch.ones(4, dtype=torch.uint8))


def test_distributed_optimizer_sees_cuda_type_names():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megafork.compat.cpu import _tensor_type_names_cuda

    assert hasattr(DistributedOptimizer.__init__, "__wrapped__"), "DistributedOptimizer.__init__ is not wrapped"
    original = torch.Tensor.type
    seen = _tensor_type_names_cuda(lambda: (torch.ones(1).type(), torch.ones(1, dtype=torch.bfloat16).type(),
                                            torch.ones(1).type(torch.float64).dtype))()
    assert seen == ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", torch.float64)
    assert torch.Tensor.type is original and torch.ones(1).type() == "torch.FloatTensor"


def test_torch_norm_under_sequence_parallel_marks_its_weight():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                            tensor_model_parallel_size=1)
    cfg.sequence_parallel = True  # as with tp > 1 (the config's own check wants a TP group for it)
    norm = WrappedTorchNorm(cfg, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.weight.sequence_parallel is True
    assert cfg.sequence_parallel is True, "the shared config must be restored"
    cfg.sequence_parallel = False
    plain = WrappedTorchNorm(cfg, 8, eps=1e-6)
    assert not getattr(plain.weight, "sequence_parallel", False)


def test_nothing_is_patched_when_cuda_is_available():
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "from megafork.compat import apply_cpu_patches, cpu_patches_applied\n"
        "assert apply_cpu_patches() is False and not cpu_patches_applied()\n"
        "import megatron.core.tensor_parallel.mappings as m, megatron.core.optimizer.optimizer as o\n"
        "from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32 as c\n"
        "assert m.torch is torch and o.clip_grad_by_total_norm_fp32 is c\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
