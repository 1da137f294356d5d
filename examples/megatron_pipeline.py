"""Forking-token DAPO inside an existing megatron-core training script, without the rest of megafork.

    torchrun --nproc_per_node=2 examples/megatron_pipeline.py        # DP=2 (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node=2 examples/megatron_pipeline.py --tp 2 # TP=2
    python examples/megatron_pipeline.py                             # one process
    torchrun --nproc_per_node=2 examples/megatron_pipeline.py --packed  # packed rows, no padding

Your script keeps its model builder, data, DDP, optimizer and `get_forward_backward_func`. It adds:
  1. a model whose last stage returns the final hidden states for `return_hidden=True` and
     exposes its LM-head weight shard as `output_weight()` (here: megatron's GPTModel built
     directly, with `megafork.models.qwen3.Qwen3GPTModel` as the class, which adds just that);
  2. `config.calculate_per_token_loss = True` before DDP is built;
  3. a no-grad old pass with `logprob_forward_step` (fused head: old log-probs and entropies);
  4. `select_forking_tokens` over the DP group (the exact top-20% entropy threshold);
  5. `policy_forward_step` as the forward_step of the update (DAPO on the selected tokens,
     divided by all response tokens of the step on every DP rank).
With `--packed` each micro-batch is one packed row (`megafork.train.batch.pack_row`: the
sequences back to back, `cu_seqlens` marking them, position ids restarting per sequence); both
forward steps pass `cu_seqlens` to the model, which attends within each sequence only, so the
numbers are those of the padded layout without computing the padding.
"""
from __future__ import annotations

import argparse
import functools
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from megafork.distributed import ParallelConfig, init_distributed
from megafork.forking import select_forking_tokens
from megafork.models.qwen3 import Qwen3GPTModel
from megafork.pipeline import PolicyLossConfig, logprob_forward_step, policy_forward_step
from megafork.train.batch import Trajectory, pack_row

VOCAB = 100  # the true vocabulary; the LM head is padded to a multiple of 8 * tp rows


def build_model(tp: int, device) -> Qwen3GPTModel:
    """Your model builder: a tiny Qwen3-shaped GPTModel (RMSNorm, QK-norm, GQA, SwiGLU, RoPE)."""
    cfg = TransformerConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        kv_channels=16, normalization="RMSNorm", qk_layernorm=True, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, params_dtype=torch.float32, use_cpu_initialization=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        calculate_per_token_loss=True)  # (2): megatron divides the grads by the global token count
    model = Qwen3GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=True,
                                                                                      normalization="RMSNorm"),
                          vocab_size=-(-VOCAB // (8 * tp)) * 8 * tp, max_sequence_length=64,
                          position_embedding_type="rope", rotary_base=1_000_000)
    return model.to(device)


def microbatch(rows: list[tuple[list[int], list[int], float]], device) -> SimpleNamespace:
    """Your data as one micro-batch: (prompt ids, response ids, advantage) rows, right-padded.

    Per-token fields live on label positions: position t predicts token t+1, so response token
    j of a row with a p-token prompt sits at position p-1+j.
    """
    seq = max(len(p) + len(r) for p, r, _ in rows)
    tokens = torch.zeros(len(rows), seq, dtype=torch.long)
    labels, adv = torch.zeros_like(tokens), torch.zeros(len(rows), seq)
    response = torch.zeros(len(rows), seq, dtype=torch.bool)
    for i, (p, r, a) in enumerate(rows):
        ids = torch.tensor(p + r)
        tokens[i, :len(ids)], labels[i, :len(ids) - 1] = ids, ids[1:]
        response[i, len(p) - 1:len(p) - 1 + len(r)] = True
        adv[i, len(p) - 1:len(p) - 1 + len(r)] = a
    pos = torch.arange(seq).expand(len(rows), seq)
    return SimpleNamespace(tokens=tokens.to(device), position_ids=pos.to(device), labels=labels.to(device),
                           response_mask=response.to(device), advantages=adv.to(device))


def packed_microbatch(rows: list[tuple[list[int], list[int], float]], device):
    """The same rows as one packed `[1, S]` row with `cu_seqlens` (megafork's `pack_row`)."""
    trajs = [Trajectory(prompt_ids=p, response_ids=r, rollout_logprobs=[0.0] * len(r), reward=0.0, accuracy=0.0,
                        advantage=a) for p, r, a in rows]
    return pack_row(trajs).to(device)


def my_batches(step: int, dp_rank: int, device, packed: bool = False) -> list:
    """Stand-in for your rollouts: 2 micro-batches of 2 responses each, advantages of both signs."""
    g = torch.Generator().manual_seed(1000 * step + dp_rank)

    def row(i):
        p, r = torch.randint(1, VOCAB, (4,), generator=g), torch.randint(1, VOCAB, (3 + 2 * i,), generator=g)
        return p.tolist(), r.tolist(), (-1.0) ** i
    make = packed_microbatch if packed else microbatch
    return [make([row(0), row(1)], device), make([row(2), row(3)], device)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--packed", action="store_true", help="one packed row per micro-batch, no padding")
    args = parser.parse_args()
    groups = init_distributed(ParallelConfig(tp=args.tp))  # stands in for your initialize_megatron()
    model = build_model(args.tp, groups.device)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model,
                                  pg_collection=groups.pg_collection)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0), [ddp],
                                       pg_collection=groups.pg_collection, use_gloo_process_groups=False)
    model.config.finalize_model_grads_func = functools.partial(finalize_model_grads,
                                                               pg_collection=groups.pg_collection)
    model.config.no_sync_func = ddp.no_sync
    forward_backward = get_forward_backward_func()

    for step in range(args.steps):
        batches = my_batches(step, groups.dp_rank, groups.device, args.packed)
        run = functools.partial(forward_backward, model=[ddp], num_microbatches=len(batches),
                                seq_length=max(b.tokens.shape[1] for b in batches),
                                micro_batch_size=batches[0].tokens.shape[0])
        # (3) Old pass: log-probs and entropies per label position, no [T, V] logits.
        ddp.eval()
        with torch.no_grad():
            old = run(forward_step_func=logprob_forward_step(groups.tp, VOCAB), data_iterator=iter(batches),
                      forward_only=True)
        ddp.train()
        for b, o in zip(batches, old):
            b.old_logprobs, b.entropy = o["logprobs"], o["entropy"]
        # (4) One exact threshold over every response token of the step on all DP ranks.
        entropy = torch.cat([b.entropy.reshape(-1) for b in batches])
        response = torch.cat([b.response_mask.reshape(-1) for b in batches])
        fork = select_forking_tokens(entropy, response, ratio=0.2, mode="top", group=groups.dp_cp)
        for b, f in zip(batches, fork.split([b.entropy.numel() for b in batches])):
            b.fork_mask = f.view_as(b.entropy)
        # (5) The update: megatron sums (loss, count) over micro-batches and DP ranks and scales the grads.
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = run(forward_step_func=policy_forward_step(PolicyLossConfig(normalizer="all_tokens"), groups.tp, VOCAB),
                  data_iterator=iter(batches), forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        stats = torch.tensor([sum(float(o[k]) for o in out) for k in ("loss_sum", "normalizer", "selected")])
        if groups.dp_cp is not None:
            dist.all_reduce(stats, group=groups.dp_cp)
        if groups.rank == 0:
            loss, n, sel = stats.tolist()
            print(f"step {step}: loss={loss / n:.6f} selected={int(sel)}/{int(n)} tokens "
                  f"grad_norm={grad_norm:.4f} update_ok={ok}", flush=True)


if __name__ == "__main__":
    main()
