"""Trajectories and the micro-batches the megatron schedules consume.

A `Trajectory` is one response with everything RL attaches to it. `pack_microbatches` turns a
list of them into right-padded `[b, s]` tensors in Megatron's token order. Label position t
holds the token at t+1; `response_mask[t]` is True where that label is a response token, so
every per-token tensor (`old_logprobs`, `entropy`, `fork_mask`, `advantages`) lives on label
positions and lines up with the fused head's output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Trajectory:
    """One prompt + response.

    Attributes:
        prompt_ids: prompt token ids (int tensor or list; the trainer stores int32 tensors, which
            pickle compactly when rank 0 scatters the step, where Python lists cost ~36 B a token).
        response_ids: generated ids (stop token included).
        rollout_logprobs: the engine's log-prob of each response token (float32 tensor or list).
        reward: shaped reward (verifier score + overlong penalty).
        accuracy: 1.0 if the verifier accepted the answer, else 0.0.
        advantage: GRPO advantage, the same for every token of the response.
        group: index of the prompt group within the step.
        finish_reason: "stop", "length" or "abort".
    """

    prompt_ids: torch.Tensor | list[int]
    response_ids: torch.Tensor | list[int]
    rollout_logprobs: torch.Tensor | list[float]
    reward: float
    accuracy: float
    advantage: float = 0.0
    group: int = 0
    finish_reason: str = "stop"


@dataclass
class MicroBatch:
    """Right-padded tensors for one micro-batch; per-token fields are on label positions.

    The old pass fills `old_logprobs` and `entropy`; selection fills `fork_mask`.
    """

    tokens: torch.Tensor            # [b, s] int64 input ids
    position_ids: torch.Tensor      # [b, s]
    labels: torch.Tensor            # [b, s] next-token ids (0 past the end)
    response_mask: torch.Tensor     # [b, s] bool: label is a response token
    advantages: torch.Tensor        # [b, s] float32
    rollout_logprobs: torch.Tensor  # [b, s] float32
    old_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    fork_mask: torch.Tensor | None = None

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def to(self, device: torch.device) -> MicroBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


def pack_microbatches(trajs: list[Trajectory], micro_batch_size: int, pad_id: int = 0,
                      pad_multiple: int = 1) -> list[MicroBatch]:
    """Pack trajectories, in order, into micro-batches of `micro_batch_size` rows.

    Args:
        trajs: the trajectories (this rank's share).
        micro_batch_size: rows per micro-batch; the last one may be smaller.
        pad_id: id written into padding positions (never attended to by real tokens, never a label).
        pad_multiple: round each micro-batch's length up to a multiple of this. On GPU a few
            distinct shapes let the caching allocator reuse its blocks (`train.pad_multiple`).

    Raises:
        ValueError: a trajectory with no prompt or response tokens or mismatched log-probs (names its
            index).
    """
    if micro_batch_size < 1:
        raise ValueError(f"train.micro_batch_size: expected >= 1, found {micro_batch_size}")
    if pad_multiple < 1:
        raise ValueError(f"train.pad_multiple: expected >= 1 once resolved, found {pad_multiple}")
    out = []
    for start in range(0, len(trajs), micro_batch_size):
        chunk = trajs[start:start + micro_batch_size]
        for i, t in enumerate(chunk, start):
            if len(t.response_ids) == 0:
                raise ValueError(f"trajectory {i}: expected at least one response token, found none")
            if len(t.prompt_ids) == 0:  # label position p - 1 predicts response token 0: p must be >= 1
                raise ValueError(f"trajectory {i}: expected at least one prompt token, found none")
            if len(t.rollout_logprobs) != len(t.response_ids):
                raise ValueError(f"trajectory {i}: expected one rollout log-prob per response token "
                                 f"({len(t.response_ids)}), found {len(t.rollout_logprobs)}")
        seq = max(len(t.prompt_ids) + len(t.response_ids) for t in chunk)
        seq = -(-seq // pad_multiple) * pad_multiple
        b = len(chunk)
        tokens = torch.full((b, seq), pad_id, dtype=torch.long)
        labels = torch.zeros((b, seq), dtype=torch.long)
        resp = torch.zeros((b, seq), dtype=torch.bool)
        adv = torch.zeros((b, seq), dtype=torch.float32)
        rlp = torch.zeros((b, seq), dtype=torch.float32)
        for r, t in enumerate(chunk):
            ids = torch.cat([torch.as_tensor(t.prompt_ids, dtype=torch.long),
                             torch.as_tensor(t.response_ids, dtype=torch.long)])
            p, n = len(t.prompt_ids), len(t.response_ids)
            tokens[r, :len(ids)] = ids
            labels[r, :len(ids) - 1] = ids[1:]
            # Label position p-1+j predicts response token j.
            resp[r, p - 1:p - 1 + n] = True
            adv[r, p - 1:p - 1 + n] = t.advantage
            rlp[r, p - 1:p - 1 + n] = torch.as_tensor(t.rollout_logprobs, dtype=torch.float32)
        pos = torch.arange(seq).unsqueeze(0).expand(b, seq).contiguous()
        out.append(MicroBatch(tokens, pos, labels, resp, adv, rlp))
    return out
