"""Trajectories and the micro-batches the megatron schedules consume.

A `Trajectory` is one response with everything RL attaches to it. Two layouts of a micro-batch:

* padded (`pack_microbatches`): `[b, s]` right-padded rows, one sequence per row;
* packed (`pack_row`): one `[1, S]` row holding several sequences back to back, with
  `cu_seqlens` marking where each starts, position ids restarting at 0 for each, and any
  padding (to a multiple of TP for sequence parallelism) only at the end of the row, as a
  segment of its own. The model attends within each segment only (see
  `megafork.models.qwen3.packed`).

Label position t holds the token at t+1 of the same sequence; `response_mask[t]` is True where
that label is a response token, so every per-token tensor (`old_logprobs`, `entropy`,
`fork_mask`, `advantages`) lives on label positions and lines up with the fused head's output.
The last position of each sequence has no label (it would be the next sequence's first token).
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
        weight_version: the engine's weight version the response was sampled with (as the
            engine reports it; `megafork.train.rollout_ahead` turns it into a step count).
    """

    prompt_ids: torch.Tensor | list[int]
    response_ids: torch.Tensor | list[int]
    rollout_logprobs: torch.Tensor | list[float]
    reward: float
    accuracy: float
    advantage: float = 0.0
    group: int = 0
    finish_reason: str = "stop"
    weight_version: int | str | None = None


@dataclass
class MicroBatch:
    """The tensors of one micro-batch; per-token fields are on label positions.

    The old pass fills `old_logprobs` and `entropy`; selection fills `fork_mask`.
    `cu_seqlens` is None for the padded layout; for a packed row it is the int32 [n + 1]
    offsets of its n segments (the sequences, then the end padding if any). `real_tokens` counts
    the sequences' tokens (the rest of `tokens` is padding).
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
    cu_seqlens: torch.Tensor | None = None
    real_tokens: int = 0

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def response_ids(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, column, sequence index) of every response label, in token order.

        The sequence index counts this micro-batch's sequences in order (one per row when padded,
        one per segment when packed), so per-response statistics work in both layouts.
        """
        rows, cols = self.response_mask.nonzero(as_tuple=True)
        if self.cu_seqlens is None:
            return rows, cols, rows
        seq = torch.bucketize(cols, self.cu_seqlens[1:].to(cols.device, torch.long), right=True)
        return rows, cols, seq

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
            check_trajectory(t, i)
        seq = max(seq_len(t) for t in chunk)
        seq = -(-seq // pad_multiple) * pad_multiple
        mb = _empty_tensors(len(chunk), seq, pad_id)
        for r, t in enumerate(chunk):
            _fill(mb, r, 0, t)
        mb.position_ids = torch.arange(seq).unsqueeze(0).expand(len(chunk), seq).contiguous()
        mb.real_tokens = sum(seq_len(t) for t in chunk)
        out.append(mb)
    return out


def pack_row(trajs: list[Trajectory], pad_id: int = 0, multiple: int = 1) -> MicroBatch:
    """Pack trajectories back to back into one `[1, S]` row (the packed layout).

    Args:
        trajs: the sequences of this micro-batch, in row order (may be empty: an empty
            micro-batch of `multiple` padding tokens, no labels, zero loss and zero tokens).
        pad_id: id written into the end padding.
        multiple: S is rounded up to a multiple of this (the TP size under sequence parallelism);
            the padding is one segment at the end of the row, attending only to itself.

    Raises:
        ValueError: a malformed trajectory (names its index in `trajs`), or `multiple` < 1.
    """
    if multiple < 1:
        raise ValueError(f"pack_row: expected a padding multiple >= 1, found {multiple}")
    for i, t in enumerate(trajs):
        check_trajectory(t, i)
    lens = [seq_len(t) for t in trajs]
    real = sum(lens)
    total = max(multiple, -(-real // multiple) * multiple)
    mb = _empty_tensors(1, total, pad_id)
    bounds = [0]
    for t, n in zip(trajs, lens, strict=True):
        _fill(mb, 0, bounds[-1], t)
        bounds.append(bounds[-1] + n)
    if total > real:
        bounds.append(total)
    pos = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:], strict=False)])
    mb.position_ids = pos.unsqueeze(0)
    mb.cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    mb.real_tokens = real
    return mb


def seq_len(t: Trajectory) -> int:
    """Tokens a trajectory occupies in a micro-batch (prompt + response)."""
    return len(t.prompt_ids) + len(t.response_ids)


def check_trajectory(t: Trajectory, index: int) -> None:
    """Raise ValueError naming `index` if `t` cannot be trained on."""
    if len(t.response_ids) == 0:
        raise ValueError(f"trajectory {index}: expected at least one response token, found none")
    if len(t.prompt_ids) == 0:  # label position p - 1 predicts response token 0: p must be >= 1
        raise ValueError(f"trajectory {index}: expected at least one prompt token, found none")
    if len(t.rollout_logprobs) != len(t.response_ids):
        raise ValueError(f"trajectory {index}: expected one rollout log-prob per response token "
                         f"({len(t.response_ids)}), found {len(t.rollout_logprobs)}")


def _empty_tensors(b: int, s: int, pad_id: int) -> MicroBatch:
    z = torch.zeros((b, s), dtype=torch.float32)
    return MicroBatch(tokens=torch.full((b, s), pad_id, dtype=torch.long), position_ids=None,
                      labels=torch.zeros((b, s), dtype=torch.long), response_mask=torch.zeros((b, s), dtype=torch.bool),
                      advantages=z, rollout_logprobs=z.clone())


def _fill(mb: MicroBatch, row: int, start: int, t: Trajectory) -> None:
    """Write trajectory `t` into `mb` at (row, start): tokens, labels and the response fields."""
    ids = torch.cat([torch.as_tensor(t.prompt_ids, dtype=torch.long),
                     torch.as_tensor(t.response_ids, dtype=torch.long)])
    p, n = len(t.prompt_ids), len(t.response_ids)
    mb.tokens[row, start:start + len(ids)] = ids
    mb.labels[row, start:start + len(ids) - 1] = ids[1:]
    # Label position p-1+j predicts response token j.
    r = slice(start + p - 1, start + p - 1 + n)
    mb.response_mask[row, r] = True
    mb.advantages[row, r] = t.advantage
    mb.rollout_logprobs[row, r] = torch.as_tensor(t.rollout_logprobs, dtype=torch.float32)
