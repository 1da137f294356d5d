"""Forking-token DAPO for an existing Megatron pipeline: a `forward_step` in Megatron's contract.

    from megafork.pipeline import PolicyLossConfig, policy_forward_step, logprob_forward_step

    config.calculate_per_token_loss = True        # before DDP is built: megatron then divides the
                                                  # gradients by the global token count itself
    step_fn = policy_forward_step(PolicyLossConfig(normalizer="all_tokens"), tp_group=tp,
                                  vocab_size=hf_vocab)
    losses = get_forward_backward_func()(forward_step_func=step_fn, data_iterator=iter(batches),
                                         model=ddp_chunks, num_microbatches=len(batches), ...)

Each item the data iterator yields is a `megafork.train.batch.MicroBatch` (or any object with
the same attribute names): `tokens`, `position_ids`, `labels`, `response_mask`,
`old_logprobs`, `advantages`, unless the scope is local `fork_mask` (e.g. from
`megafork.forking.select_forking_tokens` over the old pass's entropies) and, with a rollout
correction, `rollout_logprobs` (the engine's log-probs; `megafork.algo.rollout_correction`).
A packed micro-batch (`megafork.train.batch.pack_row`: several sequences in one `[1, S]` row,
no padding between them) also carries `cu_seqlens`, the int32 segment offsets; the forward
step then passes it to the model, which attends within each sequence only (THD with the TE
spec, a block-diagonal mask with the local spec) and restarts RoPE per sequence. The loss needs
nothing else: labels and masks are per token, so the packed row gives the unpacked log-probs,
loss and gradients.

The model must return the final hidden states on the last stage when called with
`return_hidden=True` and expose its LM-head weight shard as `output_weight()`;
`megafork.models.qwen3.Qwen3GPTModel` does both. The LM head then runs fused
(`megafork.ops.fused_head_policy_loss`): no [T, V] logits, and gradient GEMMs only for the
forking rows. Per micro-batch, the loss function returns Megatron's per-token triple
`(sum of token losses, token count, metrics)`. With `calculate_per_token_loss=True` the
schedule sums both over micro-batches and `finalize_model_grads` divides the gradients by the
count summed over DP ranks: the step's loss is Σ l / N_global with N the response tokens
(normalizer="all_tokens", the paper) or the selected tokens ("selected_tokens", the released
code), whatever the micro-batch and DP split.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megafork.algo.loss import check_clip
from megafork.algo.rollout_correction import check_correction, rollout_correction
from megafork.algo.segments import from_rows, to_rows
from megafork.forking import select_forking_tokens
from megafork.ops import fused_head_logprobs_entropy, fused_head_policy_loss

NORMALIZERS = ("all_tokens", "selected_tokens")


@dataclass
class PolicyLossConfig:
    """The loss knobs of one update.

    Attributes:
        clip_low, clip_high: DAPO clip-higher range of the ratio.
        clip_ratio_c: dual-clip bound for negative advantages (None: off).
        normalizer: "all_tokens" (Σ|o_i|, the paper) or "selected_tokens" (the released code).
        temperature: the rollout temperature; log-probs and entropy use logits / temperature.
        chunk_size: rows per fused-head logits chunk (None: automatic).
        local_ratio: when set, select in the training pass per micro-batch with `torch.topk`
            (scope "local", the released code); the batch's `fork_mask` is then not read.
        local_mode: "top" or "bottom" for the local selection.
        rollout_correction: "none", "token_tis", "seq_tis" or "seq_mask": weights the token
            losses by π_old/π_rollout (see `megafork.algo.rollout_correction`).
        rollout_is_cap: truncation of the correction weights.
        rollout_mask_low, rollout_mask_high: geometric-mean bounds of "seq_mask"; masked
            sequences leave the loss and its token count.
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_ratio_c: float | None = 10.0
    normalizer: str = "all_tokens"
    temperature: float = 1.0
    chunk_size: int | None = None
    local_ratio: float | None = None
    local_mode: str = "top"
    rollout_correction: str = "none"
    rollout_is_cap: float = 2.0
    rollout_mask_low: float = 0.999
    rollout_mask_high: float = 1.001

    def __post_init__(self):
        check_clip(self.clip_low, self.clip_high, self.clip_ratio_c)
        check_correction(self.rollout_correction, self.rollout_is_cap, self.rollout_mask_low, self.rollout_mask_high)
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"algo.normalizer: expected one of {NORMALIZERS}, found {self.normalizer!r}")
        if self.local_ratio is not None and not 0.0 < self.local_ratio <= 1.0:
            raise ValueError(f"forking.ratio: expected a value in (0, 1], found {self.local_ratio!r}")
        if self.local_mode not in ("top", "bottom"):
            raise ValueError(f"forking.mode with scope 'local': expected 'top' or 'bottom', found {self.local_mode!r}")


def _unwrap(model):
    """The Qwen3GPTModel inside megatron's DDP / Float16Module wrappers."""
    while not hasattr(model, "output_weight") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "output_weight"):
        raise TypeError(f"{type(model).__name__}: expected a model with output_weight() and return_hidden=True "
                        "(megafork.models.qwen3.Qwen3GPTModel)")
    return model


def _flat_hidden(hidden: torch.Tensor, model, tp_group) -> torch.Tensor:
    """[s, b, h] decoder output -> [b*s, h] in the token order of [b, s] batch tensors.

    Under sequence parallelism the decoder returns this rank's [s/tp, b, h] slice; it is gathered
    with `tensor_parallel_output_grad=False`: the fused head already sums the hidden gradient over
    TP, so the backward keeps this rank's slice instead of reduce-scattering a summed gradient.
    """
    if getattr(getattr(model, "config", None), "sequence_parallel", False):
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=tp_group)
    return hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])


def _forward(batch, model):
    cu = getattr(batch, "cu_seqlens", None)
    if cu is None:  # padded rows: megatron's own causal mask
        return model(batch.tokens, batch.position_ids, None, return_hidden=True)
    return model(batch.tokens, batch.position_ids, None, return_hidden=True, cu_seqlens=cu)


def policy_forward_step(cfg: PolicyLossConfig, tp_group: dist.ProcessGroup | None, vocab_size: int):
    """A Megatron `forward_step_func` for the DAPO update over forking tokens.

    Args:
        cfg: loss settings.
        tp_group: tensor-parallel group (None on one process).
        vocab_size: the true vocabulary (the padded rows of the LM head are excluded).

    Returns:
        `forward_step(data_iterator, model) -> (output, loss_func)`; on the last stage
        `loss_func(hidden)` returns `(Σ token loss, token count, metrics)`.
    """

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        inner = _unwrap(model)  # before the forward: a model without the contract fails with a clear message
        return _forward(batch, model), partial(policy_loss_func, cfg, tp_group, vocab_size, batch, inner)

    return forward_step


def policy_loss_func(cfg: PolicyLossConfig, tp_group, vocab_size: int, batch, model, hidden: torch.Tensor):
    """Megatron loss function: DAPO over the forking tokens of one micro-batch (last stage).

    Args:
        cfg: loss settings.
        tp_group: tensor-parallel group.
        vocab_size: the true vocabulary.
        batch: the micro-batch (see module docstring).
        model: the unwrapped model (for `output_weight()`).
        hidden: [s, b, h] final hidden states from the forward.

    Returns:
        (summed loss, token count as an int tensor, detached scalar metrics).
    """
    h = _flat_hidden(hidden, model, tp_group)
    weight = model.output_weight()
    labels = batch.labels.reshape(-1)
    weights, response = correction_for(cfg, batch)
    if cfg.local_ratio is not None:
        with torch.no_grad():
            _, ent = fused_head_logprobs_entropy(h.detach(), weight.detach(), labels, tp_group=tp_group,
                                                 temperature=cfg.temperature, vocab_size=vocab_size,
                                                 chunk_size=cfg.chunk_size)
        fork = select_forking_tokens(ent, response, cfg.local_ratio, mode=cfg.local_mode, group=None, ties="topk")
    else:
        if batch.fork_mask is None:
            raise ValueError("micro-batch.fork_mask: expected the forking-token mask from the selection step "
                             "(or PolicyLossConfig.local_ratio for in-pass selection), found None")
        fork = batch.fork_mask.reshape(-1) & response
    loss, m = fused_head_policy_loss(
        h, weight, labels, batch.old_logprobs.reshape(-1), batch.advantages.reshape(-1), fork,
        tp_group=tp_group, temperature=cfg.temperature, vocab_size=vocab_size, chunk_size=cfg.chunk_size,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_ratio_c=cfg.clip_ratio_c, normalizer=1.0,
        response_mask=response, is_weights=weights)
    count = response.sum() if cfg.normalizer == "all_tokens" else fork.sum()
    n_sel = fork.sum().to(torch.float32)
    metrics = {
        # Sums, so that the caller can aggregate over micro-batches and ranks exactly.
        "loss_sum": loss.detach().to(torch.float32),
        "normalizer": count.to(torch.float32),
        "selected": n_sel,
        "response_tokens": batch.response_mask.sum().to(torch.float32),
        "clipfrac_low_sum": m["clipfrac_low"] * n_sel,
        "clipfrac_high_sum": m["clipfrac_high"] * n_sel,
        "approx_kl_sum": m["approx_kl"] * n_sel,
    }
    return loss, count.to(torch.int), metrics


def correction_for(cfg: PolicyLossConfig, batch) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(flat per-token correction weights or None, flat response mask of the kept sequences).

    Rows of the micro-batch are sequences (the segments of a packed row, by `cu_seqlens`);
    "seq_mask" drops rejected sequences from the response mask, so they leave both the loss and
    the token count the gradients are divided by.
    """
    if cfg.rollout_correction == "none":
        return None, batch.response_mask.reshape(-1)
    if getattr(batch, "rollout_logprobs", None) is None or batch.old_logprobs is None:
        raise ValueError(f"micro-batch.rollout_logprobs: rollout_correction={cfg.rollout_correction!r} needs the "
                         "engine's log-probs and the old pass's old_logprobs, found None")
    cu = getattr(batch, "cu_seqlens", None)
    old, rollout, response = batch.old_logprobs, batch.rollout_logprobs, batch.response_mask
    if cu is not None:  # a packed row: one row per sequence for the sequence-level modes
        old, rollout, response = (to_rows(t, cu) for t in (old, rollout, response))
    corr = rollout_correction(old, rollout, response, cfg.rollout_correction,
                              cfg.rollout_is_cap, cfg.rollout_mask_low, cfg.rollout_mask_high)
    weights, keep = corr.weights, corr.keep
    if cu is not None:
        weights, keep = from_rows(weights, cu, batch.response_mask), from_rows(keep, cu, batch.response_mask)
    return weights.reshape(-1), keep.reshape(-1)


def logprob_forward_step(tp_group: dist.ProcessGroup | None, vocab_size: int, temperature: float = 1.0,
                         chunk_size: int | None = None):
    """A Megatron `forward_step_func` for the no-grad old pass (use with `forward_only=True`).

    On the last stage each micro-batch's result in the schedule's return list is
    `{"logprobs": [b, s], "entropy": [b, s]}` (fp32, label positions) from the fused head.
    """

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        inner = _unwrap(model)
        return _forward(batch, model), partial(_logprob_loss_func, tp_group, vocab_size, temperature,
                                               chunk_size, batch, inner)

    return forward_step


def _logprob_loss_func(tp_group, vocab_size, temperature, chunk_size, batch, model, hidden):
    lp, ent = fused_head_logprobs_entropy(_flat_hidden(hidden, model, tp_group), model.output_weight(), batch.labels.reshape(-1),
                                          tp_group=tp_group, temperature=temperature, vocab_size=vocab_size,
                                          chunk_size=chunk_size)
    shape = batch.labels.shape
    zero = torch.zeros((), dtype=torch.float32, device=lp.device)
    return zero, torch.zeros((), dtype=torch.int, device=lp.device), {"logprobs": lp.view(shape).detach(),
                                                    "entropy": ent.view(shape).detach()}
