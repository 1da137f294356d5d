"""`optim.distributed_optimizer`: megatron's DistributedOptimizer at DP=2 through the trainer's update.

    .venv/bin/python -m pytest tests/test_train_distopt.py -q

On two gloo ranks (DP=2, megafork's Qwen3, fp32):
- one update with the distributed optimizer (Adam state sharded over DP, grads reduce-scattered,
  params all-gathered) leaves the same parameters and grad norm as the plain optimizer;
- its state is really sharded: each rank holds about half of the fp32 main params;
- resume is bit-exact: save after step 1, run step 2; a fresh model + optimizer loaded from the
  checkpoint runs step 2 to the same bits;
- a checkpoint saved with the distributed optimizer refuses to load its optimizer state into a
  plain optimizer, naming `optim.distributed_optimizer`;
- `overlap_grad_reduce` + `overlap_param_gather` give the same step as no overlap, and the params
  are current after `train_minibatches` (what the weight export reads).
"""
from __future__ import annotations

import pytest
import torch

from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3


def _share(groups, seed):
    from megafork.testing.update_step import trajectories

    trajs = trajectories(n_traj=8, seed=seed)
    return trajs[groups.dp_rank::groups.dp_size]


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, world, hf_dir, ckpt_root):
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.testing.update_step import build_policy, update_once
    from megafork.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from megafork.train.config import ModelConfig, OptimConfig

    groups = init_distributed(ParallelConfig(tp=1))
    base = dict(lr=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=1e6)
    out = {}
    for name, kw in {"plain": {}, "distributed": {"distributed_optimizer": True},
                     "overlap": {"distributed_optimizer": True, "overlap_grad_reduce": True,
                                 "overlap_param_gather": True}}.items():
        policy = build_policy(hf_dir, groups, ModelConfig(), OptimConfig(**base, **kw))
        sums = update_once(policy, groups, _share(groups, seed=1))
        inner = getattr(policy.optimizer, "chained_optimizers", None) or [policy.optimizer]
        out[name] = {"params": _params(policy.model), "grad_norm": sums["grad_norm"],
                     "type": {type(o).__name__ for o in inner}}
        if name == "distributed":
            mine = sum(p.numel() for o in inner for g in o.shard_fp32_from_float16_groups + o.shard_fp32_groups
                       for p in g)
            out["shard_numel"] = mine
            out["total_numel"] = sum(p.numel() for p in policy.model.parameters())
            # Resume: save after step 1, then step 2 straight through.
            save_checkpoint(ckpt_root, 1, policy.chunks, policy.optimizer, policy.scheduler, groups)
            policy.scheduler.step(1)
            update_once(policy, groups, _share(groups, seed=2))
            out["straight"] = _params(policy.model)

    resumed = build_policy(hf_dir, groups, ModelConfig(), OptimConfig(**base, distributed_optimizer=True))
    load_checkpoint(f"{ckpt_root}/step_0000001", resumed.chunks, resumed.optimizer, resumed.scheduler, groups)
    resumed.scheduler.step(1)
    update_once(resumed, groups, _share(groups, seed=2))
    out["resumed"] = _params(resumed.model)

    plain = build_policy(hf_dir, groups, ModelConfig(), OptimConfig(**base))
    with pytest.raises(CheckpointError, match=r"optim.distributed_optimizer=true.*this run has "
                                              r"optim.distributed_optimizer=false"):
        load_checkpoint(f"{ckpt_root}/step_0000001", plain.chunks, plain.optimizer, plain.scheduler, groups)
    out["cross_error"] = True
    return out


def test_distributed_optimizer_matches_plain_and_resumes_bit_exact(tmp_path):
    hf_dir = str(make_tiny_qwen3(tmp_path / "hf", seed=4, tie_word_embeddings=True))
    ranks = run_ranks(_worker, 2, args=(hf_dir, str(tmp_path / "ckpt")), timeout=400)
    for r in ranks:
        assert "DistributedOptimizer" not in r["plain"]["type"] and r["distributed"]["type"] == {"DistributedOptimizer"}
        # Sharded: each of the 2 DP ranks owns about half the fp32 main params.
        assert abs(r["shard_numel"] - r["total_numel"] / 2) <= 0.02 * r["total_numel"], r["shard_numel"]
        for name in ("distributed", "overlap"):
            assert abs(r[name]["grad_norm"] - r["plain"]["grad_norm"]) <= 1e-6 * r["plain"]["grad_norm"], name
            for n, p in r["plain"]["params"].items():
                torch.testing.assert_close(r[name]["params"][n], p, rtol=1e-6, atol=1e-7, msg=f"{name}: {n}")
        moved = max(float((r["distributed"]["params"][n] - r["straight"][n]).abs().max()) for n in r["straight"])
        assert moved > 0, "step 2 must change the parameters"
        for n, p in r["straight"].items():
            assert torch.equal(r["resumed"][n], p), f"resume is not bit-exact for {n}"
        assert r["cross_error"]
    # DP replicas agree.
    for n, p in ranks[0]["resumed"].items():
        assert torch.equal(ranks[1]["resumed"][n], p), n


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error")
def test_cpu_offload_is_a_clear_not_available_error_on_cpu():
    from megafork.train.optim import _check_cpu_offload_available

    with pytest.raises(ValueError, match=r"optim.cpu_offload: not available on a CPU-only torch"):
        _check_cpu_offload_available()
