"""One training step of megafork's Qwen3 through megatron-core's schedules, DDP and optimizer.

    .venv/bin/python -m pytest tests/test_qwen3_train.py -q

At TP=1 (as DP=2), TP=2 and PP=2 (1F1B, 2 micro-batches) the loss, every gradient (exported
under HF names) and the parameters after an SGD step with clip_grad > 0 must match a float64
transformers reference, and each other.
"""
from __future__ import annotations

import torch

from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
LR, CLIP = 0.5, 0.05


def _batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 128, (1, 10), generator=g) for _ in range(2)]


def _train_worker(rank, world, hf_dir):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import (
        Qwen3BuildOptions,
        build_qwen3,
        export_hf_tensors,
        load_hf_weights,
        read_hf_config,
    )
    from megafork.models.qwen3.forward import position_ids_for

    out = {}
    for tp, pp in LAYOUTS:
        groups = init_distributed(ParallelConfig(tp=tp, pp=pp))
        model = build_qwen3(read_hf_config(hf_dir), Qwen3BuildOptions(dtype="fp32"), groups)
        load_hf_weights(model, hf_dir, groups)
        cfg = model.config
        cfg.finalize_model_grads_func = finalize_model_grads
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model,
                                      pg_collection=groups.pg_collection)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=LR, sgd_momentum=0.0, weight_decay=0.0,
                                                     clip_grad=CLIP), [ddp])
        ddp.train()
        ddp.zero_grad_buffer()
        opt.zero_grad()

        def step(data_iterator, m, tp_rank=groups.tp_rank, vocab=model.vocab_size_unpadded):
            ids = next(data_iterator)
            labels = torch.roll(ids, -1, 1)
            out = m(ids, position_ids_for(ids), None)  # last stage: [b, s, V_pad/tp] logits

            def loss_func(logits):
                # Vocab padding columns must not enter the softmax (GPTModel's labels= loss
                # would count them: their logits are 0, not -inf).
                shard = logits.shape[-1]
                cols = torch.arange(shard) + tp_rank * shard
                logits = logits.masked_fill(cols >= vocab, -1e30)
                per_token = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), labels.t())
                loss = per_token[:-1].mean()  # the rolled last label is not a real target
                return loss, {"loss": loss.detach().clone()}

            return out, loss_func

        batches = _batches()
        losses = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(batches), model=[ddp], num_microbatches=len(batches),
            seq_length=batches[0].shape[1], micro_batch_size=1, forward_only=False,
        )
        grads = dict(export_hf_tensors(model, groups, source=lambda p: p.main_grad))
        ok, grad_norm, _ = opt.step()
        params = dict(export_hf_tensors(model, groups))
        loss = sum(d["loss"].item() for d in losses) / len(batches) if groups.is_last_stage else None
        out[(tp, pp)] = {"loss": loss, "grads": grads, "params": params, "grad_norm": grad_norm, "ok": ok}
    return out


def _reference(hf_dir):
    from transformers import Qwen3ForCausalLM

    ref = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    ref.train()
    total = 0.0
    for ids in _batches():
        logits = ref(ids).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:]) / 2
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    norm = torch.sqrt(sum((g * g).sum() for g in grads.values())).item()
    coeff = min(1.0, CLIP / (norm + 1e-6))
    params = {n: (p.detach() - LR * coeff * p.grad) for n, p in ref.named_parameters()}
    return total, grads, norm, params


def test_training_step_matches_reference_at_tp2_and_pp2(tmp_path):
    hf_dir = str(make_tiny_qwen3(tmp_path / "hf", seed=5, tie_word_embeddings=True))
    want_loss, want_grads, want_norm, want_params = _reference(hf_dir)
    assert want_norm > 5 * CLIP, "the reference must actually clip"
    ranks = run_ranks(_train_worker, 2, args=(hf_dir,), timeout=300)
    for tp, pp in LAYOUTS:
        r0 = ranks[0][(tp, pp)]
        loss = next(r[(tp, pp)]["loss"] for r in ranks if r[(tp, pp)]["loss"] is not None)
        assert abs(loss - want_loss) / want_loss < 1e-5, (tp, pp, loss, want_loss)
        assert r0["ok"] and abs(r0["grad_norm"] - want_norm) / want_norm < 1e-4, (tp, pp, r0["grad_norm"], want_norm)
        assert set(r0["grads"]) == set(want_grads) - {"lm_head.weight"}, (tp, pp)
        for name, want in want_grads.items():
            if name == "lm_head.weight":  # tied: HF reports the same tensor under both names
                continue
            got = r0["grads"][name].double()
            err = (got - want).abs().max() / want.abs().max()
            assert err < 1e-4, f"tp={tp} pp={pp}: grad {name} relative error {err:.2e}"
            moved = (r0["params"][name].double() - want_params[name]).abs().max() / want.abs().max()
            assert moved < 1e-4 * LR, f"tp={tp} pp={pp}: parameter {name} after the clipped SGD step is off"
        # Sharded layouts agree with TP=1 too.
        base = ranks[0][(1, 1)]["grads"]
        for name, g in r0["grads"].items():
            assert torch.allclose(g, base[name], rtol=1e-4, atol=1e-6), (tp, pp, name)
