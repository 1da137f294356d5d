"""Fused policy-gradient LM head: DAPO loss, with the LM-head gradients computed in the forward.

    loss, metrics = fused_head_policy_loss(hidden, weight, labels, old_logprobs, advantages,
                                           fork_mask, tp_group=tp, normalizer=n_global)
    loss.backward()          # scales the stored gradients by grad_output and hands them over

Per chunk of rows, the forward pass computes the logits (one GEMM), the exact vocab-parallel
statistics, the per-token log-prob and entropy, and dL/dlogprob from
`megafork.algo.loss.dapo_token_loss`. For the rows with a non-zero gradient (a subset of
`loss_mask`: the forking tokens, minus tokens whose ratio is clipped), it gathers those rows
and runs the gradient GEMMs, dh = dz W and dW += dz^T h. So the LM head costs one logits GEMM
plus about 2*rho gradient GEMMs (3*rho for a bf16 weight, whose dW takes two products to keep
fp32 precision), against three (four with recompute) for autograd, and no chunk's logits
outlive the chunk.

Gradients, and how they reach Megatron:
* dh is all-reduced (SUM) over the TP group in the forward, so `hidden` gets the full gradient
  (ColumnParallelLinear's input-gradient semantics). With sequence parallelism, gather the
  hidden states with `gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)`
  so the backward splits instead of reduce-scattering an already-summed gradient.
* dW, local to the TP rank's vocab shard, is accumulated over the chunks in an fp32 [valid, H]
  buffer (`megafork.ops.head_gemm`: fp32 logits, and a two-term bf16 split of dz, so a bf16
  weight's gradient keeps ~2e-6 relative precision instead of bf16's 2e-3).
* The forward cannot scale by the backward's grad_output (Megatron's schedule multiplies the
  loss by 1/num_microbatches or the fp16 loss scale after this op), so the buffers are held until
  the backward, which scales them in place: dh, returned for `hidden`, and dW, handed over by
  `megafork.ops.weight_grad.deliver_weight_grad`. When the weight is a parameter under megatron
  DDP (it has `main_grad`), dW is added straight into the fp32 `main_grad` and autograd gets
  megatron's dummy gradient (a view over dW's own memory; zeros for tied embeddings at PP=1), as
  megatron's fused weight-gradient layers do; otherwise dW is returned through autograd in the
  weight's dtype. `model.output_weight()` is that parameter (`output_layer.weight`, or the shared
  embedding weight when tied), and micro-batches accumulate in `main_grad`.
* Held from forward to backward: dh [T, H] (weight dtype) and dW [valid, H] (fp32); Megatron's
  schedules run the last stage's backward right after its forward, so one micro-batch's worth at
  a time. Recomputing the selected rows' logits in the backward instead would free the dW buffer
  (4 bytes a weight element: 0.36-0.73 GiB per GPU at the shipped GPU configs) but adds a
  rho-sized logits GEMM and a second pass of exponentials over rho*T*V: at rho = 0.2, 1.6 -> 1.8
  logits-GEMMs of products and +20% of the elementwise work, on every micro-batch. Every shipped
  config fits with room to spare, so the buffer stays; `megafork plan` counts it.

Wiring into megatron-core's `forward_backward_func` (megatron-core 0.16):

    def forward_step(data_iterator, model):            # model: megafork.models.qwen3.Qwen3GPTModel
        batch = next(data_iterator)
        hidden = model(batch.ids, batch.pos, None, return_hidden=True)   # last stage: [s, b, h]
        hidden = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])    # token order of [b, s]
        loss, metrics = fused_head_policy_loss(
            hidden, model.output_weight(), batch.labels.reshape(-1), batch.old_logprobs.reshape(-1),
            batch.advantages.reshape(-1), batch.fork_mask.reshape(-1), tp_group=groups.tp,
            vocab_size=vocab_size, clip_ratio_c=10.0, normalizer=global_token_count)
        return loss, partial(loss_func, metrics)

    def loss_func(metrics, loss):          # called by the schedule on the last stage
        return loss, {"lm loss": loss.detach(), **scalar_metrics(metrics)}

`model.output_weight()` is `output_layer.weight`, or the shared embedding weight when the
embeddings are tied: in both cases the parameter itself, so its DDP hook fires. The final
hidden states are the decoder output after the final RMSNorm, the tensor GPTModel would feed
its `output_layer` (`return_hidden=True` skips the output layer). Megatron's schedule divides the
returned loss by the number of micro-batches unless `calculate_per_token_loss` is set (then it
expects `(loss, num_tokens, metrics)` and scales by the token count itself); choose the
normaliser to match, so that the micro-batch losses add up to the step's objective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megafork.algo.loss import (
    check_clip,
    check_token_tensors,
    dapo_metrics,
    dapo_token_loss,
    resolve_normalizer,
)
from megafork.ops.fused_head import check_head_inputs
from megafork.ops.head_gemm import HeadGemms
from megafork.ops.vocab_stats import (
    Workspace,
    all_reduce,
    chunk_stats,
    compute_dtype,
    default_chunk,
    logits_grad,
    rows_by_chunk,
)
from megafork.ops.weight_grad import deliver_weight_grad


class _LossWithStoredGrads(torch.autograd.Function):
    """Identity on the loss value; its backward hands out gradients computed in the forward."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, dh, dw, shard):
        ctx.grads, ctx.weight, ctx.shard = (dh, dw), weight, shard
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_head_policy_loss: backward ran twice through the same loss; its "
                               "stored gradients were already handed out (recompute the loss instead)")
        dh, dw = ctx.grads
        weight, ctx.grads, ctx.weight = ctx.weight, None, None
        # Scaled in place: the stored buffers belong to this node alone.
        if dh is not None:
            dh.mul_(grad_output.to(dh.dtype))
        if dw is not None:
            dw = deliver_weight_grad(weight, dw, ctx.shard, scale=grad_output)
        return None, dh, dw, None, None, None


def fused_head_policy_loss(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_ratio_c: float | None = None,
    normalizer: float | torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO loss from hidden states and the LM-head weight shard, gradients formed in the forward.

    The value and gradients equal `dapo_policy_loss(log_softmax(hidden @ W.T / temperature)
    [labels], ...)` under autograd, for any mask, at any TP size.

    Args:
        hidden: [T, H] (or [..., H]) final hidden states, replicated over the TP group.
        weight_shard: [V_local, H] this rank's slice of the output-layer weight.
        labels: [T] (or [...]) global ids of the sampled tokens.
        old_logprobs: [T] log-probs of the old/rollout policy.
        advantages: [T] per-token advantages.
        loss_mask: [T] bool (or 0/1): the tokens that carry loss (forking tokens).
        tp_group: the tensor-parallel group; None on one process.
        temperature: softmax over logits / temperature.
        vocab_size: the true vocabulary when V_local * tp size includes padding.
        chunk_size: rows per logits chunk; None picks about 2**25 / V_local rows.
        clip_low, clip_high, clip_ratio_c: DAPO clip settings (see `dapo_policy_loss`).
        normalizer: the global token count the summed loss is divided by; None means the local
            loss_mask count (single process only).
        response_mask: optional [T] mask of all response tokens, for the `entropy_all` metric.
        is_weights: optional [T] detached per-token weights multiplying the token losses and
            their gradients (rollout correction, `megafork.algo.rollout_correction`); a zero
            weight also skips the row's gradient GEMMs.

    Returns:
        (loss, metrics): the scalar loss (differentiable w.r.t. hidden and weight_shard when they
        require grad and grad mode is on; otherwise no gradient work is done), and the metrics of
        `dapo_policy_loss` plus detached per-token `logprobs` and `entropy` shaped like labels.

    Raises:
        ValueError: any input of the wrong shape, dtype, device or range (the message names it).
    """
    shard, temperature, h2d, labels1d = check_head_inputs(
        hidden, weight_shard, labels, tp_group, vocab_size, temperature, chunk_size)
    masks = {"loss_mask": loss_mask}
    if response_mask is not None:
        masks["response_mask"] = response_mask
    floats = {"old_logprobs": old_logprobs, "advantages": advantages}
    if is_weights is not None:
        floats["is_weights"] = is_weights
    masks = check_token_tensors(labels.shape, hidden.device, floats, masks)
    mask, response = masks["loss_mask"].reshape(-1), masks.get("response_mask")
    check_clip(clip_low, clip_high, clip_ratio_c)
    norm = resolve_normalizer(normalizer, mask)
    old1d, adv1d = old_logprobs.reshape(-1), advantages.reshape(-1)
    w1d = None if is_weights is None else is_weights.detach().reshape(-1)

    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight_shard.requires_grad
    t, cd = h2d.shape[0], compute_dtype(h2d.dtype)
    chunk = default_chunk(max(t, 1), shard.local_size, chunk_size)
    mm = HeadGemms(weight_shard.detach()[:shard.valid], cd)
    h_all = h2d.detach()
    logprob, entropy = h_all.new_empty(t, dtype=cd), h_all.new_empty(t, dtype=cd)
    dh = torch.zeros_like(h_all) if need_h else None
    dw = h_all.new_zeros(shard.valid, h_all.shape[1], dtype=cd) if need_w else None
    scale = 1.0 / norm
    ws = Workspace(min(chunk, t), shard.valid, cd, h_all.device)
    # Gradient rows are the masked ones with a non-zero weight (a clipped ratio only zeroes some of
    # them): planned once for the call, one host sync, instead of a nonzero per chunk.
    active = mask if w1d is None else mask & (w1d != 0)
    plan = rows_by_chunk(active, chunk) if (need_h or need_w) and t else []

    with torch.no_grad():
        for a in range(0, t, chunk):
            b = min(t, a + chunk)
            h = h_all[a:b]
            z = mm.logits(h, ws.z)
            e, st = chunk_stats(z, labels1d[a:b], shard, temperature, tp_group, ws.e)
            logprob[a:b], entropy[a:b] = st.logprob, st.entropy
            if not (need_h or need_w):
                continue
            _, dl = dapo_token_loss(st.logprob, old1d[a:b].to(cd), adv1d[a:b].to(cd),
                                    clip_low, clip_high, clip_ratio_c)
            if w1d is not None:
                dl = dl * w1d[a:b].to(cd)
            g = torch.where(mask[a:b], dl, torch.zeros_like(dl)) * scale
            rows = plan[a // chunk]
            if rows is not None and rows.numel() == 0:
                continue
            if rows is not None:
                # s - m is not needed (no entropy gradient), so its buffer takes the gathered rows.
                e = torch.index_select(e, 0, rows, out=ws.z[:rows.numel()])
                h = h.index_select(0, rows)
            sel = slice(None) if rows is None else rows
            dz = logits_grad(e, None, labels1d[a:b][sel], shard, temperature,
                             st.sum_exp[sel], st.mean_shifted[sel], g[sel], None)
            mm.add_grads(dz, h, rows, None if dh is None else dh[a:b], dw)
        if dh is not None:
            all_reduce(dh, dist.ReduceOp.SUM, tp_group)

    lp, ent = logprob.view(labels.shape), entropy.view(labels.shape)
    token_loss, _ = dapo_token_loss(lp, old_logprobs.to(cd), advantages.to(cd), clip_low, clip_high, clip_ratio_c)
    if is_weights is not None:
        token_loss = token_loss * is_weights.detach().to(cd)
    loss = torch.where(mask.view(labels.shape), token_loss, torch.zeros_like(token_loss)).sum() / norm
    metrics = dapo_metrics(lp, old_logprobs, advantages, mask.view(labels.shape), clip_low, clip_high,
                           clip_ratio_c, ent, response)
    metrics["logprobs"], metrics["entropy"] = lp, ent
    if need_h or need_w:
        dh_out = None if dh is None else dh.view(hidden.shape)
        loss = _LossWithStoredGrads.apply(loss, hidden, weight_shard, dh_out, dw, shard)
    return loss, metrics
