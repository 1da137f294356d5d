"""The step's wire form (rank 0 -> every rank): `to_wire`/`from_wire` and `scatter_step` on 1 and 2 ranks.

    .venv/bin/python -m pytest tests/test_train_wire.py -q
"""
from __future__ import annotations

import dataclasses

import torch

from megafork.testing import run_ranks
from megafork.train.batch import Trajectory
from megafork.train.wire import from_wire, to_wire


def _share(seed: int, sizes=(3, 0, 2)) -> list[list[Trajectory]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        mini = []
        for i in range(size):
            p, n = 2 + i, 1 + (i + seed) % 4
            mini.append(Trajectory(
                prompt_ids=torch.randint(0, 50, (p,), generator=g, dtype=torch.int32),
                response_ids=torch.randint(0, 50, (n,), generator=g, dtype=torch.int32),
                rollout_logprobs=-torch.rand(n, generator=g), reward=float(i % 2) * 2 - 1, accuracy=float(i % 2),
                advantage=0.1 * i - 0.05, group=i // 2, finish_reason=("stop", "length", "abort")[i % 3]))
        out.append(mini)
    return out


def _same(a: list[list[Trajectory]], b: list[list[Trajectory]]) -> None:
    assert [len(m) for m in a] == [len(m) for m in b]
    for ta, tb in zip((t for m in a for t in m), (t for m in b for t in m), strict=True):
        for f in dataclasses.fields(Trajectory):
            va, vb = getattr(ta, f.name), getattr(tb, f.name)
            if isinstance(va, torch.Tensor):
                assert isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and torch.equal(va, vb), f.name
            else:
                assert type(va) is type(vb) and va == vb, f.name


def test_wire_round_trip_is_exact_and_flat():
    share = _share(0)
    wire = to_wire(share)
    _same(share, from_wire(wire))
    # A step is one tensor per tensor field, whatever the trajectory count.
    cols = wire["columns"]
    assert {k for k, c in cols.items() if c[0] == "cat"} == {"prompt_ids", "response_ids", "rollout_logprobs"}
    assert cols["response_ids"][1].numel() == sum(len(t.response_ids) for m in share for t in m)


def test_wire_keeps_list_fields_and_empty_shares():
    # Python lists (as tests and older callers build them) travel as lists, not converted tensors.
    share = [[Trajectory(prompt_ids=[1, 2], response_ids=[3], rollout_logprobs=[-0.1], reward=1.0, accuracy=1.0)]]
    back = from_wire(to_wire(share))
    assert back[0][0].prompt_ids == [1, 2] and back[0][0].rollout_logprobs == [-0.1]
    assert from_wire(to_wire([])) == [] and from_wire(to_wire([[], []])) == [[], []]


def _scatter_worker(rank, world_size):
    from megafork.train.shard import scatter_step

    shares = [_share(r) for r in range(world_size)] if rank == 0 else None
    # Global rank r trains as DP rank (r + 1) % world: each rank must get its DP rank's share.
    dp_rank_of = [(r + 1) % world_size for r in range(world_size)]
    payload, mine = scatter_step({"step": 7}, shares, dp_rank_of)
    _same(mine, _share(dp_rank_of[rank]))
    return payload


def test_scatter_step_sends_each_rank_its_share_on_two_ranks():
    assert run_ranks(_scatter_worker, 2, timeout=120) == [{"step": 7}, {"step": 7}]


def test_scatter_step_on_one_rank_returns_the_share():
    assert run_ranks(_scatter_worker, 1, timeout=120) == [{"step": 7}]
