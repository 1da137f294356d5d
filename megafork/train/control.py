"""The CPU control plane: how ranks wait for rank 0's rollout and receive their DP share.

    control = ControlPlane(groups, timeout_minutes=cfg.rollout.step_timeout_minutes)
    payload, my_share = control.distribute(payload, shares)    # shares: one entry per DP rank, on rank 0
    acc = control.broadcast(acc)                                # small objects from rank 0

While rank 0 generates (minutes to hours at 20k-token responses), every other rank waits here, on
gloo groups created with `rollout.step_timeout_minutes`, never inside an NCCL collective and its
timeout. Shares travel over CPU:

1. rank 0 pickles each DP rank's share once (tensors as numpy buffers, no per-tensor zip
   archives) and sends it, point to point, to that DP replica's *leader* (its lowest global
   rank; rank 0 leads replica 0);
2. each leader broadcasts the bytes over its replica's gloo group (its TP x PP x CP members).

So rank 0 sends one copy of the step's batch in all (not world x share copies), nothing is staged
on a GPU, and each replica member unpickles only its own share.
"""
from __future__ import annotations

import copyreg
import datetime
import io
import pickle

import numpy as np
import torch
import torch.distributed as dist


class ControlPlane:
    """gloo groups for the rollout wait and the share transfer (built on every rank, collectively).

    Args:
        groups: the run's `ParallelGroups` (`rank`, `dp_rank`).
        timeout_minutes: how long a rank may wait for rank 0 (`rollout.step_timeout_minutes`).
    """

    def __init__(self, groups, timeout_minutes: float):
        if not timeout_minutes > 0:
            raise ValueError(f"rollout.step_timeout_minutes: expected > 0, found {timeout_minutes!r}")
        self.rank = dist.get_rank()
        self.timeout = datetime.timedelta(minutes=timeout_minutes)
        self.world = dist.new_group(backend="gloo", timeout=self.timeout)
        dp_rank_of: list[int] = [0] * dist.get_world_size()
        dist.all_gather_object(dp_rank_of, groups.dp_rank, group=self.world)
        self.dp_size = max(dp_rank_of) + 1
        self.replicas = [[r for r, d in enumerate(dp_rank_of) if d == dp] for dp in range(self.dp_size)]
        self.leaders = [members[0] for members in self.replicas]
        self.dp_rank = dp_rank_of[self.rank]
        self.replica_group = None
        for members in self.replicas:  # new_group is collective over the world: every rank makes every group
            g = dist.new_group(members, backend="gloo", timeout=self.timeout) if len(members) > 1 else None
            if self.rank in members:
                self.replica_group = g
        if self.leaders[0] != 0:
            raise ValueError(f"ControlPlane: expected global rank 0 to be in DP replica 0, found replicas {self.replicas}")

    def distribute(self, payload, shares: list | None):
        """From rank 0, give every rank `payload` and its DP replica's entry of `shares`.

        Args:
            payload: small picklable state every rank gets (rollout stats, sampler state).
            shares: on rank 0, one entry per DP rank; ignored elsewhere.

        Returns:
            (payload, this rank's share) on every rank.
        """
        blob = None
        if self.rank == 0:
            if shares is None or len(shares) != self.dp_size:
                raise ValueError(f"ControlPlane.distribute: expected {self.dp_size} shares (one per DP rank), "
                                 f"found {None if shares is None else len(shares)}")
            works, keep = [], []
            for dp, leader in enumerate(self.leaders):
                data = encode((payload, shares[dp]))
                if leader == 0:
                    blob = data
                    continue
                size = torch.tensor([data.numel()], dtype=torch.int64)
                keep += [size, data]
                works += [dist.isend(size, dst=leader, group=self.world), dist.isend(data, dst=leader, group=self.world)]
            for w in works:
                w.wait()
        elif self.rank == self.leaders[self.dp_rank]:
            size = torch.zeros(1, dtype=torch.int64)
            dist.recv(size, src=0, group=self.world)
            blob = torch.empty(int(size.item()), dtype=torch.uint8)
            dist.recv(blob, src=0, group=self.world)
        blob = self._replica_broadcast(blob)
        return decode(blob)

    def broadcast(self, obj):
        """A small picklable object from rank 0 to every rank, over the gloo group."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.world)
        return box[0]

    def _replica_broadcast(self, blob: torch.Tensor | None) -> torch.Tensor:
        if self.replica_group is None:
            return blob
        members = self.replicas[self.dp_rank]
        size = torch.tensor([blob.numel() if blob is not None else 0], dtype=torch.int64)
        dist.broadcast(size, src=members[0], group=self.replica_group)
        if blob is None:
            blob = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(blob, src=members[0], group=self.replica_group)
        return blob

    def close(self) -> None:
        for g in {self.world, self.replica_group} - {None}:
            dist.destroy_process_group(g)


def _reduce_tensor(t: torch.Tensor):
    return torch.from_numpy, (t.detach().cpu().contiguous().numpy(),)


def encode(obj) -> torch.Tensor:
    """Pickle `obj` into a uint8 tensor; CPU tensors travel as numpy buffers (pickle protocol 5)."""
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=5)
    p.dispatch_table = copyreg.dispatch_table.copy()
    p.dispatch_table[torch.Tensor] = _reduce_tensor
    p.dump(obj)
    return torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)


def decode(blob: torch.Tensor):
    """Inverse of `encode`."""
    return pickle.loads(np.asarray(blob.numpy()).tobytes())
