"""The CPU control plane: how ranks wait for rank 0's rollout and receive their DP share.

    control = ControlPlane(groups, timeout_minutes=cfg.rollout.step_timeout_minutes)
    payload, my_share = control.distribute(payload, shares)    # shares: one entry per DP rank, on rank 0
    acc = control.broadcast(acc)                                # small objects from rank 0

While rank 0 generates (minutes to hours at 20k-token responses), every other rank waits here, on
gloo groups created with `rollout.step_timeout_minutes`, never inside an NCCL collective and its
timeout. Shares travel over CPU in the columnar wire form of `megafork.train.wire`:

1. rank 0 sends each other DP replica's share, point to point, to that replica's *leader* (its
   lowest global rank): a header of numpy arrays (no per-sample Python objects), then the token
   columns in chunks of at most `chunk_bytes`, built and sent one at a time;
2. each leader forwards every piece over its replica's gloo group (its TP x PP x CP members) as
   it arrives.

So rank 0 holds its trajectories (8 B per generated token) plus one chunk, never a pickled copy
of a share; it sends one copy of the step's batch in all (not world x share copies); nothing is
staged on a GPU; and rank 0's own share is returned as it is (no copy at all at world size 1).
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from megafork.train import wire


class ControlPlane:
    """gloo groups for the rollout wait and the share transfer (built on every rank, collectively).

    Args:
        groups: the run's `ParallelGroups` (`rank`, `dp_rank`).
        timeout_minutes: how long a rank may wait for rank 0 (`rollout.step_timeout_minutes`).
        chunk_bytes: the largest token chunk rank 0 builds while sending a share.
    """

    def __init__(self, groups, timeout_minutes: float, chunk_bytes: int = wire.CHUNK_BYTES):
        if not timeout_minutes > 0:
            raise ValueError(f"rollout.step_timeout_minutes: expected > 0, found {timeout_minutes!r}")
        self.rank = dist.get_rank()
        self.chunk_bytes = chunk_bytes
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
            shares: on rank 0, one entry per DP rank (a list of mini-batches of `Trajectory`);
                ignored elsewhere.

        Returns:
            (payload, this rank's share) on every rank; on rank 0 the share is `shares[0]` itself.
        """
        if self.rank == 0:
            if shares is None or len(shares) != self.dp_size:
                raise ValueError(f"ControlPlane.distribute: expected {self.dp_size} shares (one per DP rank), "
                                 f"found {None if shares is None else len(shares)}")
            for dp, leader in enumerate(self.leaders):
                if leader != 0:
                    self._send(shares[dp], payload, lambda t, dst=leader: dist.send(t, dst=dst, group=self.world))
            if self.replica_group is not None:
                self._send(shares[0], payload, self._forward)
            return payload, shares[0]
        if self.rank == self.leaders[self.dp_rank]:
            def take(t: torch.Tensor) -> None:
                dist.recv(t, src=0, group=self.world)
                if self.replica_group is not None:
                    self._forward(t)
        else:
            take = self._forward
        size = torch.zeros(1, dtype=torch.int64)
        take(size)
        raw = torch.empty(int(size.item()), dtype=torch.uint8)
        take(raw)
        meta = wire.header_of(raw.numpy().tobytes())
        del raw
        columns = wire.empty_columns(meta)
        for name, _, _, lo, hi in wire.chunk_plan(meta):
            take(columns[name][lo:hi])
        return wire.decode(meta, columns)

    def _send(self, share, payload, put) -> None:
        """Rank 0: the header, then the chunks, each built only when the previous one is gone."""
        meta = wire.build_header(share, payload, self.chunk_bytes)
        header = torch.frombuffer(bytearray(meta.to_bytes()), dtype=torch.uint8)
        put(torch.tensor([header.numel()], dtype=torch.int64))
        put(header)
        del header
        for _, chunk in wire.send_chunks(share, meta):
            put(chunk)
            del chunk

    def _forward(self, t: torch.Tensor) -> None:
        """Broadcast `t` from this replica's leader to its members (in place on the members)."""
        dist.broadcast(t, src=self.replicas[self.dp_rank][0], group=self.replica_group)

    def broadcast(self, obj):
        """A small picklable object from rank 0 to every rank, over the gloo group."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.world)
        return box[0]

    def close(self) -> None:
        for g in {self.world, self.replica_group} - {None}:
            dist.destroy_process_group(g)
