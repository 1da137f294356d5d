"""Model inputs for packed rows: several sequences in one row, attending only within themselves.

A packed row is `[1, S]` tokens with `cu_seqlens` (int32 [n + 1]) marking its n segments.
megatron-core takes it two ways, and `Qwen3GPTModel.forward(..., cu_seqlens=cu)` picks the one
its layer spec supports:

* TE spec: the THD layout, `PackedSeqParams(qkv_format="thd", cu_seqlens_q/kv, max_seqlen_q/kv)`.
  TE's fused attention masks per segment (megatron switches causal to padding_causal for THD)
  and megatron's RoPE restarts per segment from `cu_seqlens`.
* local spec (`DotProductAttention`, which refuses `packed_seq_params`): an explicit
  block-diagonal causal mask `[1, 1, S, S]` (True = not attended; megatron fills those scores
  with -10000 before the softmax, as for its own causal mask), and RoPE taken at the row's
  position ids, which restart at 0 per segment. GPTModel's own RoPE for "rope" ignores
  `position_ids` (it uses 0..S-1), so the model swaps in `rope_at_positions`.
"""
from __future__ import annotations

import torch


def block_causal_mask(cu_seqlens: torch.Tensor, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """[1, 1, S, S] bool mask, True where query i must not attend key j (other segment or j > i).

    Args:
        cu_seqlens: int [n + 1] segment offsets, 0 first and `seq_len` last.
        seq_len: S, the row length.
        device: where to build the mask.

    Raises:
        ValueError: offsets that do not start at 0, end at S and increase.
    """
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != seq_len or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens: expected increasing offsets from 0 to the row length {seq_len}, "
                         f"found {cu_seqlens.tolist()}")
    idx = torch.arange(seq_len, device=device)
    seg = torch.bucketize(idx, cu[1:], right=True)
    same = seg.unsqueeze(0) == seg.unsqueeze(1)
    causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # [query, key]: key at or before the query
    return ~(same & causal).view(1, 1, seq_len, seq_len)


def thd_params(cu_seqlens: torch.Tensor):
    """megatron's `PackedSeqParams` for the THD layout of one packed row (TE spec)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def rope_at_positions(rotary, position_ids: torch.Tensor) -> torch.Tensor:
    """RoPE frequencies at each token's position id, shaped [S, b, 1, d] for megatron's attention.

    Args:
        rotary: the model's `RotaryEmbedding` (called with a length, returns [L, 1, 1, d]).
        position_ids: [b, S] positions.
    """
    table = rotary(int(position_ids.max()) + 1)  # [L, 1, 1, d]
    return table[:, 0, 0][position_ids.t().to(table.device, torch.long)].unsqueeze(2)
