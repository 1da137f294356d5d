"""The weight-update process group between trainer rank 0 and rollout engines, built SGLang's way.

Both sides run the same three steps as `sglang.srt.utils.common.init_custom_process_group`:
TCP store at `master_address:master_port` -> `PrefixStore(group_name, store)` ->
`_new_process_group_helper(world_size, rank, [], backend, store, group_name=...)`. The default
process group (the trainer's own, if any) is left untouched, so a megafork trainer can feed a real
SGLang server and an SGLang-style trainer (verl, slime) can feed `megafork serve`.
"""
from __future__ import annotations

import datetime

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def init_weight_update_group(
    master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
    backend: str = "gloo", timeout_s: float = 600.0,
) -> dist.ProcessGroup:
    """Join (or create, as rank 0) a standalone process group; blocks until all ranks joined.

    Args:
        master_address: host of the TCP store (trainer rank 0's address).
        master_port: port of the TCP store; rank 0 listens on it.
        rank: this process's rank in the group (trainer 0; engines `rank_offset + tp_rank`).
        world_size: 1 + the total number of engine ranks.
        group_name: unique name; also the store prefix.
        backend: "gloo" or "nccl".
        timeout_s: rendezvous and collective timeout.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', found {backend!r}")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank_offset: rank {rank} is outside the group of world_size {world_size}")
    if not group_name:
        raise ValueError("group_name: must be a non-empty string")
    timeout = datetime.timedelta(seconds=timeout_s)
    # The store `c10d.rendezvous("tcp://...")` would make, built directly: inside a torchrun worker
    # (TORCHELASTIC_USE_AGENT_STORE=True) rendezvous makes every rank a client of the elastic agent's
    # store, so trainer rank 0 would never host this group's store and both sides would wait forever.
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout,
                          multi_tenant=True)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), store,
        group_name=group_name, backend_options=None, timeout=timeout,
    )
    # Group rank == "global" rank inside this standalone group, so `src=0` means the trainer.
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_weight_update_group(pg: dist.ProcessGroup) -> None:
    """Tear down a group made by `init_weight_update_group` (the default group is untouched)."""
    dist.destroy_process_group(pg)
