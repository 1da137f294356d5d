"""The CPU control plane: columnar shares over gloo to each DP replica, rank 0's memory while it
sends, and waits longer than the default timeout.

    .venv/bin/python -m pytest tests/test_control_plane.py -q

Every rank rebuilds the step from the same seed (the unsharded reference) and checks that what it
received is exactly its DP replica's share, field for field and bit for bit.
"""
from __future__ import annotations

import dataclasses
import datetime
import time
import tracemalloc
from types import SimpleNamespace

import pytest
import torch

from megafork.testing import run_ranks
from megafork.train import wire
from megafork.train.batch import Trajectory

N = 4  # responses per group


def _step(seed: int, groups: int, max_len: int = 40, big: int = 0) -> list[Trajectory]:
    """A step's trajectories as `collect_rollouts` builds them: one prompt tensor per group, int32
    ids, float32 log-probs, Python scalars, int weight versions. `big`: the first response's length."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(groups):
        prompt = torch.randint(0, 1000, (int(torch.randint(1, 9, (), generator=g)),), generator=g, dtype=torch.int32)
        for j in range(N):
            n = big if (k, j) == (0, 0) and big else int(torch.randint(1, max_len, (), generator=g))
            out.append(Trajectory(
                prompt_ids=prompt, response_ids=torch.randint(0, 151936, (n,), generator=g, dtype=torch.int32),
                rollout_logprobs=-torch.rand(n, generator=g) * 5, reward=float(torch.randn((), generator=g)),
                accuracy=float(j % 2), advantage=float(torch.randn((), generator=g, dtype=torch.float64)), group=k,
                finish_reason=("stop", "length", "abort")[(k + j) % 3], weight_version=None if k == 1 else 7 + k % 2))
    return out


def _shares(seed: int, dp: int, groups: int = 6, minibatch_prompts: int = 2, **kw) -> list:
    from megafork.train.shard import split_for_dp

    return split_for_dp(_step(seed, groups, **kw), N, minibatch_prompts, dp)


def _same(a: list[list[Trajectory]], b: list[list[Trajectory]]) -> None:
    assert [len(m) for m in a] == [len(m) for m in b]
    for ta, tb in zip((t for m in a for t in m), (t for m in b for t in m), strict=True):
        for f in dataclasses.fields(Trajectory):
            va, vb = getattr(ta, f.name), getattr(tb, f.name)
            if isinstance(va, torch.Tensor):
                assert isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and torch.equal(va, vb), f.name
            else:
                assert type(va) is type(vb) and va == vb, f.name


def _tokens(share) -> int:
    return sum(t.response_ids.numel() for m in share for t in m)


# --------------------------------------------------------------------------- the codec alone

def _through_wire(share, payload=None, chunk_bytes: int = wire.CHUNK_BYTES):
    meta = wire.build_header(share, payload, chunk_bytes)
    back = wire.header_of(meta.to_bytes())
    cols = wire.empty_columns(back)
    chunks = list(wire.send_chunks(share, meta))
    plan = wire.chunk_plan(back)
    assert [name for name, _ in chunks] == [p[0] for p in plan]
    for (name, chunk), (_, _, _, lo, hi) in zip(chunks, plan, strict=True):
        cols[name][lo:hi] = chunk
    return wire.decode(back, cols), chunks


def test_wire_round_trip_is_exact_with_chunks_of_whole_items():
    share = _shares(0, 1, groups=5, big=300)[0]
    (payload, back), chunks = _through_wire(share, {"step": 3}, chunk_bytes=256)
    assert payload == {"step": 3}
    _same(share, back)
    # A group's n trajectories share one prompt tensor, on both sides: prompts travel once.
    assert back[0][0].prompt_ids.data_ptr() == back[0][1].prompt_ids.data_ptr()
    unique = {id(t.prompt_ids): len(t.prompt_ids) for m in share for t in m}
    assert len(unique) == 5 and sum(c.numel() for n, c in chunks if n == "prompt_ids") == sum(unique.values())
    # Chunks hold whole items, at most chunk_bytes unless one item alone is larger (sent as is, no copy).
    for name, c in chunks:
        assert c.numel() * c.element_size() <= 256 or any(c.data_ptr() == getattr(t, name).data_ptr()
                                                           for m in share for t in m)
    assert share[0][0].response_ids.numel() == 300
    assert any(c.data_ptr() == share[0][0].response_ids.data_ptr() for _, c in chunks)


def test_wire_empty_share_empty_items_and_bad_trajectories():
    (_, back), chunks = _through_wire([[], []])
    assert back == [[], []] and chunks == []
    share = _shares(3, 1, groups=2)[0]
    empty = dataclasses.replace(share[0][1], response_ids=share[0][1].response_ids[:0],
                                rollout_logprobs=share[0][1].rollout_logprobs[:0])
    share[0][1] = empty
    (_, back), chunks = _through_wire(share, chunk_bytes=4)  # one item per chunk: no empty chunk
    _same(share, back)
    assert all(c.numel() > 0 for _, c in chunks)
    t = _step(0, 1)[0]
    with pytest.raises(ValueError, match=r"trajectory 0: response_ids: expected a 1-D CPU tensor, found list"):
        wire.build_header([[dataclasses.replace(t, response_ids=[1, 2])]], None)
    with pytest.raises(ValueError, match=r"trajectory 1: rollout_logprobs: expected torch.float32 like trajectory 0, "
                                         r"found torch.float64"):
        wire.build_header([[t, dataclasses.replace(t, rollout_logprobs=t.rollout_logprobs.double())]], None)
    with pytest.raises(ValueError, match=r"trajectory 0: weight_version: expected an int step count or None, found 'v3'"):
        wire.build_header([[dataclasses.replace(t, weight_version="v3")]], None)


# --------------------------------------------------------------------------- over gloo

def _distribute(rank, world, tp, sleep_s, default_timeout_s, chunk_bytes):
    import torch.distributed as dist

    from megafork.train.control import ControlPlane

    if default_timeout_s:
        # The default group's timeout is short: a wait inside it would fail. The control plane's is long.
        dist.destroy_process_group()
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=default_timeout_s))
    dp = world // tp
    control = ControlPlane(SimpleNamespace(rank=rank, dp_rank=rank // tp), timeout_minutes=1.0,
                           chunk_bytes=chunk_bytes)
    shares = None
    if rank == 0:
        time.sleep(sleep_s)  # rank 0 "generates" for longer than the default timeout
        shares = _shares(11, dp, groups=2 * dp + 2, minibatch_prompts=dp, big=500)
    payload, mine = control.distribute({"step": 7}, shares)
    _same(mine, _shares(11, dp, groups=2 * dp + 2, minibatch_prompts=dp, big=500)[rank // tp])  # the unsharded reference's share
    if rank == 0:
        assert mine is shares[0]  # rank 0 keeps its own share as it is
    acc = control.broadcast(0.25 if rank == 0 else None)
    dist.barrier()  # the default group still works afterwards
    control.close()
    return payload, acc, control.replicas, sum(len(m) for m in mine)


# (4, 2): rank 0 sleeps 24 s under a 15 s default-group timeout (margins for a loaded 2-core CI box).
@pytest.mark.parametrize("world,tp,sleep_s,default_timeout_s", [(2, 1, 0.0, 0), (4, 1, 0.0, 0), (4, 2, 24.0, 15)])
def test_each_replica_gets_exactly_its_share_after_a_wait_longer_than_the_default_timeout(world, tp, sleep_s,
                                                                                           default_timeout_s):
    out = run_ranks(_distribute, world_size=world, args=(tp, sleep_s, default_timeout_s, 512), timeout=240)
    dp = world // tp
    for payload, acc, replicas, count in out:
        assert payload == {"step": 7} and acc == 0.25 and count > 0
        assert replicas == [list(range(r * tp, (r + 1) * tp)) for r in range(dp)]


def _rank0_memory(rank, world, chunk_bytes):
    """Rank 0's bytes per generated token while it sends: the trajectories + what tracemalloc sees
    allocated during `distribute` (every wire buffer rank 0 builds is a numpy array)."""
    from megafork.train.control import ControlPlane

    control = ControlPlane(SimpleNamespace(rank=rank, dp_rank=rank), timeout_minutes=1.0, chunk_bytes=chunk_bytes)
    shares = _shares(5, world, groups=8 * world, minibatch_prompts=4, max_len=4000) if rank == 0 else None
    out = {}
    if rank == 0:
        stored = sum(t.response_ids.nbytes + t.rollout_logprobs.nbytes for s in shares for m in s for t in m)
        stored += sum({id(t.prompt_ids): t.prompt_ids.nbytes for s in shares for m in s for t in m}.values())
        tokens = sum(_tokens(s) for s in shares)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        _, mine = control.distribute({"step": 1}, shares)
        transient = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
        out = {"tokens": tokens, "samples": sum(len(m) for s in shares for m in s), "stored": stored,
               "transient": transient, "same": mine is shares[0]}
    else:
        _, mine = control.distribute(None, None)
        _same(mine, _shares(5, world, groups=8 * world, minibatch_prompts=4, max_len=4000)[rank])
    control.close()
    return out


@pytest.mark.parametrize("world,chunk_bytes", [(1, wire.CHUNK_BYTES), (2, 64 << 10), (2, wire.CHUNK_BYTES)])
def test_rank0_holds_at_most_16_bytes_per_generated_token_while_sending(world, chunk_bytes):
    r = run_ranks(_rank0_memory, world_size=world, args=(chunk_bytes,), timeout=240)[0]
    per_token = (r["stored"] + r["transient"]) / r["tokens"]
    print(f"world {world}, chunk {chunk_bytes} B: {r['tokens']} tokens, stored {r['stored'] / r['tokens']:.2f} B/token, "
          f"transient {r['transient']} B -> {per_token:.2f} B/token on rank 0")
    assert r["same"] and per_token <= 16.0
    if world == 1:
        assert r["transient"] < 4096  # nothing is encoded: the share is returned as it is
    else:
        # One chunk at a time (an int32 or float32 column of the other share at most), plus the
        # header (~60 B per sample, held as bytes and as the sent buffer), never a share's copy.
        bound = min(chunk_bytes, 4 * r["tokens"]) + 3 * 64 * r["samples"] + 16384
        assert r["transient"] <= bound, (r, bound)


def test_step_timeout_must_be_positive():
    from megafork.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rollout.step_timeout_minutes: expected > 0"):
        load_config(None, ["rollout.step_timeout_minutes=0"])
