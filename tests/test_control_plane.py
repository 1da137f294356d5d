"""The CPU control plane: shares over gloo to each DP replica, waits longer than the default timeout.

    .venv/bin/python -m pytest tests/test_control_plane.py -q
"""
from __future__ import annotations

import datetime
import time
from types import SimpleNamespace

import pytest
import torch

from megafork.testing import run_ranks
from megafork.train.batch import Trajectory
from megafork.train.control import decode, encode


def _traj(k: int) -> Trajectory:
    return Trajectory(prompt_ids=torch.arange(3, dtype=torch.int32) + k, response_ids=torch.arange(k + 1, dtype=torch.int32),
                      rollout_logprobs=-torch.rand(k + 1), reward=float(k), accuracy=1.0, advantage=0.5, group=k,
                      finish_reason="stop")


def _distribute(rank, world, tp, sleep_s, default_timeout_s):
    import torch.distributed as dist

    from megafork.train.control import ControlPlane

    if default_timeout_s:
        # The default group's timeout is short: a wait inside it would fail. The control plane's is long.
        dist.destroy_process_group()
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=default_timeout_s))
    dp_rank = rank // tp
    control = ControlPlane(SimpleNamespace(rank=rank, dp_rank=dp_rank), timeout_minutes=1.0)
    shares = None
    if rank == 0:
        time.sleep(sleep_s)  # rank 0 "generates" for longer than the default timeout
        shares = [[_traj(10 * d + j) for j in range(d + 1)] for d in range(control.dp_size)]
    payload, mine = control.distribute({"step": 7}, shares)
    acc = control.broadcast(0.25 if rank == 0 else None)
    dist.barrier()  # the default group still works afterwards
    control.close()
    return payload, [(t.group, t.response_ids.tolist(), t.response_ids.dtype, t.rollout_logprobs.dtype) for t in mine], \
        acc, control.replicas


# (4, 2): rank 0 sleeps 24 s under a 15 s default-group timeout (margins for a loaded 2-core CI box).
@pytest.mark.parametrize("world,tp,sleep_s,default_timeout_s", [(2, 1, 0.0, 0), (4, 2, 24.0, 15)])
def test_each_replica_gets_its_share_after_a_wait_longer_than_the_default_timeout(world, tp, sleep_s,
                                                                                   default_timeout_s):
    out = run_ranks(_distribute, world_size=world, args=(tp, sleep_s, default_timeout_s), timeout=240)
    dp = world // tp
    for rank, (payload, mine, acc, replicas) in enumerate(out):
        d = rank // tp
        assert payload == {"step": 7} and acc == 0.25
        assert replicas == [list(range(r * tp, (r + 1) * tp)) for r in range(dp)]
        assert [g for g, *_ in mine] == [10 * d + j for j in range(d + 1)]
        assert all(ids == list(range(g + 1)) and it == torch.int32 and ft == torch.float32 for g, ids, it, ft in mine)


def test_encode_round_trips_tensors_compactly():
    trajs = [_traj(2000) for _ in range(4)]
    blob = encode(trajs)
    assert blob.dtype == torch.uint8
    # 4 x (2001 ids + 2001 log-probs + 3 prompt ids) x 4 bytes, plus a little framing.
    assert blob.numel() < 4 * 4005 * 4 + 4000
    back = decode(blob)
    for a, b in zip(trajs, back):
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.rollout_logprobs, b.rollout_logprobs)
        assert b.response_ids.dtype == torch.int32


def test_step_timeout_must_be_positive():
    from megafork.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rollout.step_timeout_minutes: expected > 0"):
        load_config(None, ["rollout.step_timeout_minutes=0"])
