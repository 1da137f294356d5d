"""How the fused heads hand over the LM-head weight gradient: into megatron's main_grad, in fp32.

    grad_for_autograd = deliver_weight_grad(weight, dw, shard, scale=grad_output)

The fused ops accumulate the weight gradient in an fp32 [valid, H] buffer. Returned through
autograd it would arrive as `param.grad` in the weight's dtype (bf16), and megatron DDP's hook
would add that rounded copy into the fp32 `main_grad`. Instead the ops follow the contract of
megatron-core's own fused weight-gradient accumulation (0.16:
`LinearWithGradAccumulationAndAsyncCommunication.backward` with gradient_accumulation_fusion,
and the grad hook of `DistributedDataParallel`):

* a parameter wrapped by megatron DDP has `main_grad` (a view of its gradient bucket, fp32 with
  `grad_reduce_in_fp32`) and `grad_added_to_main_grad`;
* the layer adds its gradient into `main_grad` itself, in the backward, and sets
  `grad_added_to_main_grad = True`;
* it still returns a gradient tensor of the weight's shape and dtype (a "dummy"), so that
  autograd runs DDP's hook for the parameter on the backward thread (with
  `overlap_grad_reduce` the hook marks the parameter ready for its bucket's reduce); the hook
  then drops `param.grad` without adding it;
* when the weight is also used elsewhere on the same stage (tied embeddings at PP=1, where
  megatron sets `zero_out_wgrad`), the dummy is zeros and the hook adds it, summed with the
  embedding's gradient.

Megatron allocates the dummy with `torch.empty`; here it is a view over the bytes of the fp32
buffer just added into main_grad (2 bytes a weight element out of its 4), so the backward
allocates nothing. A weight without `main_grad` (plain autograd, tests, a user's own training
loop) gets the gradient as before: through autograd, in its own dtype.
"""
from __future__ import annotations

import torch

from megafork.ops.vocab_stats import VocabShard


def full_weight_grad(dw: torch.Tensor, shard: VocabShard, weight: torch.Tensor) -> torch.Tensor:
    """Pad the [valid, H] gradient back to the [V_local, H] shard (padding rows get zero), weight dtype."""
    if shard.valid == shard.local_size:
        return dw.to(weight.dtype)
    out = torch.zeros_like(weight)
    out[:shard.valid] = dw
    return out


def has_main_grad(weight: torch.Tensor) -> bool:
    """Whether `weight` is a parameter under megatron DDP's main_grad contract."""
    return getattr(weight, "main_grad", None) is not None and hasattr(weight, "grad_added_to_main_grad")


def deliver_weight_grad(weight: torch.Tensor, dw: torch.Tensor, shard: VocabShard,
                        scale: torch.Tensor | None = None) -> torch.Tensor:
    """Put scale * dw where the weight's gradient belongs; returns what autograd gets for `weight`.

    Args:
        weight: the [V_local, H] weight shard the op was called with (the parameter itself for
            the main_grad route).
        dw: [valid, H] gradient in the compute dtype; owned by the caller and consumed (scaled in
            place, then its memory may back the returned dummy).
        shard: the vocab shard (padding rows [valid, V_local) get no gradient).
        scale: optional 0-dim factor (the backward's grad_output), applied in the compute dtype.

    Returns:
        Under megatron DDP, the dummy gradient after adding into `weight.main_grad`; otherwise the
        gradient in the weight's dtype.

    Raises:
        ValueError: `weight.main_grad` does not have the weight's shape.
    """
    if scale is not None:
        dw.mul_(scale.to(dw.dtype))
    if not has_main_grad(weight):
        return full_weight_grad(dw, shard, weight)
    main = weight.main_grad
    if main.shape != weight.shape:
        raise ValueError(f"weight_shard.main_grad: expected shape {tuple(weight.shape)} (the weight's), "
                         f"found {tuple(main.shape)}")
    main[:shard.valid].add_(dw)  # fp32 += fp32 (a bf16 main_grad rounds once, here)
    weight.grad_added_to_main_grad = True
    return _dummy_grad(weight, dw)


def _dummy_grad(weight: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """A tensor shaped and typed like `weight` over `spare`'s memory when it is large enough.

    Its values are never read unless `weight.zero_out_wgrad` is set, and then it is zeroed.
    """
    nbytes = weight.numel() * weight.element_size()
    if (weight.is_contiguous() and spare.is_contiguous() and spare.device == weight.device
            and spare.numel() * spare.element_size() >= nbytes):
        dummy = spare.view(-1).view(torch.uint8)[:nbytes].view(weight.dtype).view(weight.shape)
    else:
        dummy = torch.empty_like(weight)
    if getattr(weight, "zero_out_wgrad", False):
        dummy.zero_()
    return dummy
