"""Full-vocabulary logits of a sharded Qwen3, through megatron-core's pipeline schedules.

    logits = forward_logits(model, groups, input_ids)   # [b, s, V] fp32 on the last stage, else None

For scoring, analysis and parity checks. Training never calls this: it takes hidden states
(`model(..., return_hidden=True)`) into the fused head, so [T, V] logits never exist there.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def gather_vocab(shard: torch.Tensor, groups, vocab_size: int) -> torch.Tensor:
    """All-gather the last dim over TP and drop the vocab padding columns.

    Args:
        shard: [..., V_pad/tp] local logits.
        groups: this rank's `ParallelGroups`.
        vocab_size: the unpadded vocab size.
    """
    if groups.tp_size > 1:
        parts = [torch.empty_like(shard) for _ in range(groups.tp_size)]
        dist.all_gather(parts, shard.contiguous(), group=groups.tp)
        shard = torch.cat(parts, -1)
    return shard[..., :vocab_size]


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    """Positions 0..s-1 for every row of a [b, s] batch."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)


@torch.no_grad()
def forward_logits(model, groups, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Run one forward pass through `get_forward_backward_func()` and return fp32 logits.

    Args:
        model: this rank's `Qwen3GPTModel` stage.
        groups: this rank's `ParallelGroups`.
        input_ids: [b, s] token ids (the same on every rank).

    Returns:
        [b, s, vocab] float32 logits, gathered over TP and without padding columns, on every
        rank of the last stage; None on other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    input_ids = input_ids.to(groups.device)
    b, s = input_ids.shape
    model.eval()

    def step(data_iterator, m):
        ids = next(data_iterator)
        out = m(ids, position_ids_for(ids), None)

        def collect(output, non_loss_data=True):
            return output

        return out, collect

    outputs = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([input_ids]), model=[model], num_microbatches=1,
        seq_length=s, micro_batch_size=b, forward_only=True, collect_non_loss_data=True,
    )
    if not groups.is_last_stage:
        return None
    return gather_vocab(outputs[0].float(), groups, model.vocab_size_unpadded)
