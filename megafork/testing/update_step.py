"""One trainer update on a tiny Qwen3, wired exactly as `megafork.train.setup.build_run` wires it.

    policy = build_policy(hf_dir, groups, ModelConfig(recompute="full"), OptimConfig(lr=1e-2))
    sums = update_once(policy, groups, trajectories())     # old pass, selection, one Adam step

For tests of the memory knobs (recompute, sequence parallelism, distributed optimizer): they
compare main_grad, parameters and loss sums of the same update under different settings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Policy:
    """A built policy: the unwrapped model, its DDP chunks, optimizer, scheduler and vocab size."""

    model: object
    chunks: list
    optimizer: object
    scheduler: object
    vocab_size: int


def trajectories(n_traj: int = 8, seed: int = 3, vocab: int = 120):
    """Prompt+response trajectories of uneven lengths with advantages of both signs."""
    from megafork.train.batch import Trajectory

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_traj):
        p, n = 3 + i % 3, 4 + (5 * i) % 9
        ids = torch.randint(3, vocab, (p + n,), generator=g).tolist()
        out.append(Trajectory(prompt_ids=ids[:p], response_ids=ids[p:], rollout_logprobs=[-1.0] * n, reward=0.0,
                              accuracy=0.0, advantage=(1.0 if i % 2 else -1.0) * (0.5 + 0.25 * i), group=i // 2))
    return out


def build_policy(hf_dir, groups, model_cfg, optim_cfg, sequence_parallel: bool = False, dtype: str = "fp32",
                 total_steps: int = 10, optimizer: bool = True) -> Policy:
    """Build, load and wrap the model and its optimizer as the trainer does.

    Args:
        hf_dir: tiny HF Qwen3 directory.
        groups: this rank's `ParallelGroups`.
        model_cfg: `megafork.train.config.ModelConfig` (its recompute fields are used).
        optim_cfg: `megafork.train.config.OptimConfig`.
        sequence_parallel: megatron sequence parallelism.
        dtype: "fp32", "bf16" or "fp16".
        total_steps: length of the LR schedule.
        optimizer: build megatron's optimizer (a bf16/fp16 one needs CUDA); without it, only the
            schedule is configured, for gradient-only tests (`optimizer`/`scheduler` are None).
    """
    from megafork.models.qwen3 import Qwen3BuildOptions, build_qwen3, load_hf_weights, read_hf_config
    from megafork.train.optim import build_optimizer, configure_schedule, enable_per_token_loss, wrap_ddp

    hf = read_hf_config(hf_dir)
    opts = Qwen3BuildOptions(dtype=dtype, sequence_parallel=sequence_parallel, **model_cfg.build_options())
    model = build_qwen3(hf, opts, groups)
    load_hf_weights(model, hf_dir, groups)
    enable_per_token_loss(model)
    chunks = [wrap_ddp(model, groups, optim_cfg)]
    if not optimizer:
        configure_schedule(chunks, None, groups)
        return Policy(model, chunks, None, None, hf.vocab_size)
    opt, scheduler = build_optimizer(optim_cfg, chunks, total_steps=total_steps, groups=groups)
    return Policy(model, chunks, opt, scheduler, hf.vocab_size)


def update_once(policy: Policy, groups, trajs, ratio: float = 0.5, micro_batch_size: int = 2,
                pad_multiple: int = 1, microbatches_out: list | None = None) -> dict:
    """Old pass, step-scope top-ρ selection and one mini-batch update over `trajs` (this rank's share).

    Args:
        microbatches_out: if given, the micro-batches used (with old log-probs and fork masks) are
            appended to it.

    Returns:
        The loss sums of `megafork.train.update.train_minibatches`; DDP's main_grad keeps the
        step's gradients until the next update.
    """
    from megafork.pipeline import PolicyLossConfig
    from megafork.train.batch import pack_microbatches
    from megafork.train.config import ForkingConfig
    from megafork.train.update import old_pass, select, train_minibatches

    mbs = pack_microbatches(trajs, micro_batch_size=micro_batch_size, pad_id=0, pad_multiple=pad_multiple)
    mbs = [mb.to(groups.device) for mb in mbs]
    span = [list(range(len(mbs)))]
    old_pass(policy.chunks, mbs, groups, policy.vocab_size, temperature=1.0, chunk_size=None)
    select(mbs, ForkingConfig(ratio=ratio), span, groups, seed=0)
    if microbatches_out is not None:
        microbatches_out.extend(mbs)
    return train_minibatches(policy.chunks, policy.optimizer, mbs, span, PolicyLossConfig(), groups,
                             policy.vocab_size)
