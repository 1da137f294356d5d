"""Split a step's trajectories over DP ranks and mini-batches, and pack them into micro-batches."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megafork.train.batch import MicroBatch, Trajectory, pack_microbatches


def broadcast_from(obj, src: int):
    """Send a picklable object from global rank `src` to every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_step(trajs: list[Trajectory], n: int, minibatch_prompts: int, micro_batch_size: int, dp_rank: int,
               dp_size: int, pad_id: int) -> tuple[list[MicroBatch], list[list[int]]]:
    """This DP rank's micro-batches and, per optimizer mini-batch, the indices of its micro-batches.

    Groups (n consecutive trajectories) are cut into mini-batches of `minibatch_prompts`
    groups; each DP rank takes a contiguous 1/dp of every mini-batch. When dynamic sampling came
    up short, the group count is rounded down to a multiple of `dp_size` so every rank runs
    the same number of micro-batches (the collectives need it).

    Returns:
        (micro-batches, mini-batch spans); both empty when fewer than `dp_size` groups exist.
    """
    groups = [trajs[i:i + n] for i in range(0, len(trajs), n)]
    groups = groups[:len(groups) - len(groups) % dp_size]
    microbatches: list[MicroBatch] = []
    spans: list[list[int]] = []
    for start in range(0, len(groups), minibatch_prompts):
        mini = groups[start:start + minibatch_prompts]
        per_rank = len(mini) // dp_size
        mine = [t for g in mini[dp_rank * per_rank:(dp_rank + 1) * per_rank] for t in g]
        packed = pack_microbatches(mine, micro_batch_size, pad_id)
        spans.append(list(range(len(microbatches), len(microbatches) + len(packed))))
        microbatches += packed
    return microbatches, spans


def response_tokens(microbatches: list[MicroBatch], field: str) -> torch.Tensor:
    """The flattened values of `field` over every response token of `microbatches`."""
    if not microbatches:
        return torch.zeros(0)
    return torch.cat([getattr(mb, field)[mb.response_mask] for mb in microbatches])
