"""The trainer side of a step: old pass, forking selection, and the mini-batch updates.

All three run through megatron-core's `forward_backward_func`, so the PP schedules (1F1B)
and DDP apply unchanged. Per-token results live on the last pipeline stage; the selection
group is `dp_cp` of that stage (see `megafork.forking` for the scopes).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megafork.forking import select_forking_tokens
from megafork.ops import deferred_checks
from megafork.pipeline import PolicyLossConfig, logprob_forward_step, policy_forward_step
from megafork.train.batch import MicroBatch
from megafork.train.optim import finish_param_sync

log = logging.getLogger(__name__)


def to_device_one_at_a_time(microbatches: list[MicroBatch], device: torch.device) -> Iterator[MicroBatch]:
    """The schedule's data iterator: each micro-batch moves to `device` only when it is consumed.

    The step's micro-batches stay on the host (about 42 bytes a token); only the one in flight
    (plus its per-token results, which the old pass keeps on the device for the selection) is
    on the accelerator, so device memory does not grow with the step's token count.
    """
    for mb in microbatches:
        yield mb.to(device)


def run_schedule(model_chunks, forward_step, microbatches: list[MicroBatch], forward_only: bool, groups):
    """One call of megatron's forward_backward_func over `microbatches` (moved to the device lazily).

    Label checks in the ops are deferred to the end of the call on CUDA (one host sync per call,
    not several per micro-batch); a bad label still raises a ValueError naming it.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func(pp_size=groups.pp_size)
    seq = max(mb.tokens.shape[1] for mb in microbatches)
    kwargs = {}
    if groups.pp_size > 1:  # with explicit groups, the pipelined schedules want their p2p communicator too
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
        from megatron.core.utils import get_model_config

        kwargs["p2p_communicator"] = P2PCommunicator(groups.pg_collection.pp, get_model_config(model_chunks[0]))
    with deferred_checks():
        return fb(forward_step_func=forward_step, data_iterator=to_device_one_at_a_time(microbatches, groups.device),
                  model=model_chunks, num_microbatches=len(microbatches), seq_length=seq,
                  micro_batch_size=microbatches[0].tokens.shape[0], forward_only=forward_only,
                  pg_collection=groups.pg_collection, **kwargs)


def old_pass(model_chunks, microbatches: list[MicroBatch], groups, vocab_size: int, temperature: float,
             chunk_size: int | None) -> None:
    """Fill `old_logprobs` and `entropy` of every micro-batch (last stage) with a no-grad pass."""
    for chunk in model_chunks:
        chunk.eval()
    with torch.no_grad():
        out = run_schedule(model_chunks, logprob_forward_step(groups.tp, vocab_size, temperature, chunk_size),
                           microbatches, forward_only=True, groups=groups)
    for chunk in model_chunks:
        chunk.train()
    if groups.is_last_stage:
        for mb, res in zip(microbatches, out, strict=True):
            mb.old_logprobs, mb.entropy = res["logprobs"], res["entropy"]


def select(microbatches: list[MicroBatch], forking_cfg, minibatches: list[list[int]], groups, seed: int) -> float:
    """Set `fork_mask` on every micro-batch for the configured scope; return the threshold used.

    Args:
        microbatches: this rank's micro-batches, with entropies from the old pass.
        forking_cfg: `forking` config section (ratio, mode, scope).
        minibatches: micro-batch indices of each optimizer mini-batch.
        groups: this rank's groups; the selection group is `groups.dp_cp`.
        seed: seeds `mode="random"`.

    Returns:
        The entropy threshold of the step scope (NaN for other scopes: they have several).
    """
    if not groups.is_last_stage:
        return float("nan")
    scope, ratio, mode = forking_cfg.scope, forking_cfg.ratio, forking_cfg.mode
    device = microbatches[0].entropy.device if microbatches else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed) if mode == "random" else None
    if scope == "local":
        return float("nan")  # selected in the training pass (PolicyLossConfig.local_ratio)
    spans = {"step": [list(range(len(microbatches)))], "minibatch": minibatches,
             "microbatch": [[i] for i in range(len(microbatches))]}[scope]
    for span in spans:
        ent = torch.cat([microbatches[i].entropy.reshape(-1) for i in span])
        # The entropies are on the device (old-pass output); the host masks join them there.
        resp = torch.cat([microbatches[i].response_mask.reshape(-1) for i in span]).to(ent.device)
        sel = select_forking_tokens(ent, resp, ratio, mode=mode, group=groups.dp_cp, generator=gen)
        offset = 0
        for i in span:
            n = microbatches[i].entropy.numel()
            microbatches[i].fork_mask = sel[offset:offset + n].view_as(microbatches[i].entropy)
            offset += n
    if scope == "step" and mode == "top":
        return _min_selected(ent, sel, groups.dp_cp)
    return float("nan")


def _min_selected(entropy: torch.Tensor, selected: torch.Tensor, group) -> float:
    """The smallest selected entropy over the group: the top-mode threshold τ (ties are kept)."""
    local = entropy[selected].min() if bool(selected.any()) else torch.tensor(math.inf, device=entropy.device)
    t = local.reshape(1).to(torch.float32)
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return float(t)


def train_minibatches(model_chunks, optimizer, microbatches: list[MicroBatch],
                      minibatches: list[list[int]], loss_cfg: PolicyLossConfig, groups, vocab_size: int) -> dict:
    """One optimizer step per mini-batch; returns summed loss statistics and the last grad norm."""
    totals: dict[str, float] = {}
    grad_norms = []
    for span in minibatches:
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        out = run_schedule(model_chunks, policy_forward_step(loss_cfg, groups.tp, vocab_size),
                           [microbatches[i] for i in span], forward_only=False, groups=groups)
        ok, grad_norm, _ = optimizer.step()
        if not ok:  # only fp16's dynamic loss scaler skips: it found inf/nan and lowered the scale
            totals["skipped_updates"] = totals.get("skipped_updates", 0.0) + 1.0
            log.warning("optimizer step skipped: the fp16 loss scaler found a non-finite gradient")
        grad_norms.append(float(grad_norm) if grad_norm is not None else float("nan"))
        for res in out if groups.is_last_stage else []:
            for k, v in res.items():
                totals[k] = totals.get(k, 0.0) + float(v)
    finish_param_sync(model_chunks)  # overlap_param_gather: export and checkpoints read the params next
    # One norm per optimizer step (mini-batch): report their mean and max.
    totals["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    totals["grad_norm_max"] = max(grad_norms) if grad_norms else float("nan")
    return totals


def reduce_sums(values: dict[str, float], group, device: torch.device | None = None) -> dict[str, float]:
    """Sum a dict of floats over `group` (identity for None); `device` is the backend's (CUDA for NCCL)."""
    if group is None or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return dict(zip(keys, t.tolist(), strict=True))
