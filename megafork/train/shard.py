"""Split a step's trajectories over DP ranks and mini-batches, and pack them into micro-batches."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megafork.train.batch import MicroBatch, Trajectory, pack_microbatches
from megafork.train.wire import from_wire, to_wire


def broadcast_from(obj, src: int):
    """Send a picklable object from global rank `src` to every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def split_for_dp(trajs: list[Trajectory], n: int, minibatch_prompts: int, dp_size: int) -> list[list[list[Trajectory]]]:
    """Per DP rank, per optimizer mini-batch, the trajectories that rank trains on.

    Groups (n consecutive trajectories) are cut into mini-batches of `minibatch_prompts`
    groups; each DP rank takes a contiguous 1/dp of every mini-batch. When dynamic sampling came
    up short, the group count is rounded down to a multiple of `dp_size` so every rank runs
    the same number of micro-batches (the collectives need it); with fewer than `dp_size`
    groups every rank gets nothing and the step trains on nothing.
    """
    if len(trajs) % n:
        raise ValueError(f"split_for_dp: expected whole groups of algo.n={n} trajectories, found {len(trajs)} "
                         f"({len(trajs) % n} left over)")
    groups = [trajs[i:i + n] for i in range(0, len(trajs), n)]
    groups = groups[:len(groups) - len(groups) % dp_size]
    out: list[list[list[Trajectory]]] = [[] for _ in range(dp_size)]
    for start in range(0, len(groups), minibatch_prompts):
        mini = groups[start:start + minibatch_prompts]
        per_rank = len(mini) // dp_size
        for r in range(dp_size):
            out[r].append([t for g in mini[r * per_rank:(r + 1) * per_rank] for t in g])
    return out


def scatter_step(payload, shares: list | None, dp_rank_of: list[int]):
    """From rank 0, give every rank `payload` plus its DP rank's entry of `shares`.

    Each rank receives only its own share (not the whole step), so the traffic out of rank 0
    is one copy of the batch per model-parallel replica member, not one per world rank.

    Args:
        payload: small picklable state every rank gets (rollout stats, sampler state).
        shares: on rank 0, one entry per DP rank; ignored elsewhere.
        dp_rank_of: the DP rank of every global rank.
    """
    world = dist.get_world_size()
    if world == 1:  # nothing to send: skip the pickling round trip
        return payload, shares[0]
    # Columnar wire form: pickling a few flat tensors instead of ~3 small tensors per trajectory.
    wires = [to_wire(s) for s in shares] if dist.get_rank() == 0 else None
    outgoing = [(payload, wires[dp_rank_of[r]]) for r in range(world)] if dist.get_rank() == 0 else None
    box = [None]
    dist.scatter_object_list(box, outgoing, src=0)
    payload, wire = box[0]
    return payload, from_wire(wire)


def pack_minibatches(minis: list[list[Trajectory]], micro_batch_size: int, pad_id: int, pad_multiple: int = 1
                     ) -> tuple[list[MicroBatch], list[list[int]]]:
    """Pack each mini-batch's trajectories into micro-batches (lengths rounded up to `pad_multiple`).

    Returns:
        (all micro-batches, the indices of each mini-batch's micro-batches).
    """
    microbatches: list[MicroBatch] = []
    spans: list[list[int]] = []
    for mine in minis:
        packed = pack_microbatches(mine, micro_batch_size, pad_id, pad_multiple) if mine else []
        spans.append(list(range(len(microbatches), len(microbatches) + len(packed))))
        microbatches += packed
    return microbatches, [s for s in spans if s]


def response_tokens(microbatches: list[MicroBatch], field: str) -> torch.Tensor:
    """The flattened values of `field` over every response token of `microbatches`."""
    if not microbatches:
        return torch.zeros(0)
    return torch.cat([getattr(mb, field)[mb.response_mask] for mb in microbatches])
