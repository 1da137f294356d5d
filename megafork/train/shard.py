"""Split a step's trajectories over DP ranks and mini-batches (packing: `megafork.train.packing`)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megafork.train.balance import balance_partition, sequence_cost
from megafork.train.batch import MicroBatch, Trajectory, seq_len


def broadcast_from(obj, src: int):
    """Send a picklable object from global rank `src` to every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def split_for_dp(trajs: list[Trajectory], n: int, minibatch_prompts: int, dp_size: int,
                 balance: str = "off", quadratic: float = 0.0) -> list[list[list[Trajectory]]]:
    """Per DP rank, per optimizer mini-batch, the trajectories that rank trains on.

    Groups (n consecutive trajectories) are cut into mini-batches of `minibatch_prompts`
    groups. With `balance="off"` each DP rank takes a contiguous 1/dp of every mini-batch's
    groups; with "kk" or "lpt" the mini-batch's sequences are spread over the ranks to balance
    their estimated cost L + quadratic·L² (`megafork.train.balance`), a group's responses possibly
    on several ranks (advantages are already computed). When dynamic sampling came up short, the
    group count is rounded down to a multiple of `dp_size`; with fewer than `dp_size` groups every
    rank gets nothing and the step trains on nothing.

    Args:
        trajs: the step's trajectories, group by group.
        n: responses per group.
        minibatch_prompts: groups per optimizer mini-batch.
        dp_size: data-parallel ranks.
        balance: "off", "kk" (Karmarkar–Karp) or "lpt".
        quadratic: the L² weight of the cost (0: tokens).
    """
    if len(trajs) % n:
        raise ValueError(f"split_for_dp: expected whole groups of algo.n={n} trajectories, found {len(trajs)} "
                         f"({len(trajs) % n} left over)")
    groups = [trajs[i:i + n] for i in range(0, len(trajs), n)]
    groups = groups[:len(groups) - len(groups) % dp_size]
    out: list[list[list[Trajectory]]] = [[] for _ in range(dp_size)]
    for start in range(0, len(groups), minibatch_prompts):
        mini = groups[start:start + minibatch_prompts]
        if balance != "off":
            flat = [t for g in mini for t in g]
            parts = balance_partition([sequence_cost(seq_len(t), quadratic) for t in flat], dp_size, balance)
            for r, part in enumerate(parts):
                out[r].append([flat[i] for i in part])
            continue
        per_rank = len(mini) // dp_size
        for r in range(dp_size):
            out[r].append([t for g in mini[r * per_rank:(r + 1) * per_rank] for t in g])
    return out


def response_tokens(microbatches: list[MicroBatch], field: str) -> torch.Tensor:
    """The flattened values of `field` over every response token of `microbatches`."""
    if not microbatches:
        return torch.zeros(0)
    return torch.cat([getattr(mb, field)[mb.response_mask] for mb in microbatches])
