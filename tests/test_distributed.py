"""megafork.distributed groups at TP/PP/DP on 2 and 4 gloo ranks, and run_ranks' failure reporting.

    .venv/bin/python -m pytest tests/test_distributed.py -q
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from megafork.testing import run_ranks
from megafork.testing.multirank import RankFailure


def _groups_worker(rank, world, layouts):
    import torch.distributed as dist

    from megafork.distributed import ParallelConfig, init_distributed

    out = {}
    for tp, pp in layouts:
        g = init_distributed(ParallelConfig(tp=tp, pp=pp))
        members = {k: dist.get_process_group_ranks(getattr(g, k)) for k in ("tp", "pp", "dp")}
        # A real collective on each group: the sum of global ranks of its members.
        sums = {}
        for k in ("tp", "pp", "dp"):
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=getattr(g, k))
            sums[k] = t.item()
        out[(tp, pp)] = dict(members=members, sums=sums, tp_rank=g.tp_rank, pp_rank=g.pp_rank,
                             dp_rank=g.dp_rank, dp_size=g.dp_size, first=g.is_first_stage, last=g.is_last_stage)
    try:
        init_distributed(ParallelConfig(tp=3))
        out["bad"] = None
    except ValueError as exc:
        out["bad"] = str(exc)
    return out


@pytest.mark.parametrize("world,layouts", [(2, [(1, 1), (2, 1), (1, 2)]), (4, [(2, 2), (1, 4)])])
def test_groups_match_megatron_rank_order(world, layouts):
    results = run_ranks(_groups_worker, world, args=(layouts,), timeout=240)
    for rank, res in enumerate(results):
        assert "not divisible by tp*pp*cp" in res["bad"] and f"world size {world}" in res["bad"]
        for tp, pp in layouts:
            dp = world // (tp * pp)
            # megatron's default order tp-cp-ep-dp-pp: TP fastest, then DP, then PP.
            tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
            r = res[(tp, pp)]
            assert (r["tp_rank"], r["dp_rank"], r["pp_rank"], r["dp_size"]) == (tp_rank, dp_rank, pp_rank, dp)
            base = rank - tp_rank
            assert r["members"]["tp"] == list(range(base, base + tp))
            assert r["members"]["pp"] == [tp_rank + tp * dp_rank + tp * dp * s for s in range(pp)]
            assert r["members"]["dp"] == [tp_rank + tp * d + tp * dp * pp_rank for d in range(dp)]
            for k in ("tp", "pp", "dp"):
                assert r["sums"][k] == sum(r["members"][k]), (rank, tp, pp, k)
            assert r["first"] == (pp_rank == 0) and r["last"] == (pp_rank == pp - 1)


def _raise_on_rank1(rank, world):
    if rank == 1:
        raise ValueError("boom from rank one")
    import torch.distributed as dist

    dist.barrier()  # blocked on the dead peer: the helper must still report promptly


def _hang_on_rank1(rank, world):
    if rank == 1:
        time.sleep(600)
    return rank


def _die_on_rank0(rank, world):
    if rank == 0:
        os._exit(3)
    time.sleep(600)


def test_failure_names_rank_and_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_raise_on_rank1, 2, timeout=120)
    msg = str(info.value)
    assert "rank 1" in msg and "ValueError: boom from rank one" in msg and "_raise_on_rank1" in msg
    assert time.monotonic() - t0 < 60


def test_hang_fails_at_timeout_and_kills_ranks():
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        # 30 s: on a loaded 2-core machine starting two ranks alone can take more than 10 s.
        run_ranks(_hang_on_rank1, 2, timeout=30)
    assert "ranks [1] still running after 30s" in str(info.value)
    assert time.monotonic() - t0 < 75


def test_rank_dying_silently_is_reported():
    with pytest.raises(RankFailure) as info:
        run_ranks(_die_on_rank0, 2, timeout=120)
    assert "died without reporting" in str(info.value) and "0: 3" in str(info.value)


def _report_device_env(rank, world):
    import torch

    return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ["LOCAL_RANK"], torch.cuda.is_available()


def test_ranks_run_on_cpu_even_where_cuda_is_visible(monkeypatch):
    # The harness hides the GPUs from its ranks: on a 1-GPU machine LOCAL_RANK=1 must never reach
    # torch.cuda.set_device, and the ranks must not share cuda:0 behind gloo's back.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    got = run_ranks(_report_device_env, 2, init_process_group=False, timeout=120)
    assert got == [("", "0", False), ("", "1", False)]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0", "the parent's environment must be restored"


def test_local_rank_beyond_visible_gpus_is_a_clear_error():
    from megafork.distributed import local_cuda_device

    assert local_cuda_device("1", 2) == 1
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1: expected a CUDA device ordinal in \[0, 1\).*nproc_per_node"):
        local_cuda_device("1", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK: expected an integer, found 'x'"):
        local_cuda_device("x", 1)
    with pytest.raises(ValueError, match=r"in \[0, 0\)"):
        local_cuda_device("0", 0)
