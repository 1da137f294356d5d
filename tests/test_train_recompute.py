"""`model.recompute`: selective and full recomputation give bitwise the gradients of no recompute.

    .venv/bin/python -m pytest tests/test_train_recompute.py -q

On two gloo ranks at TP=2, megafork's Qwen3 (local spec, fp32) goes through the trainer's old pass,
selection and `train_minibatches` (megatron DDP + Adam) once per recompute setting. Every
gradient in DDP's main_grad, the loss sums and the parameters after the Adam step must equal
those of `recompute=none` bit for bit: recomputation replays the same kernels on the same inputs.
That the setting reaches megatron is checked on the built layers (their checkpoint flags).
"""
from __future__ import annotations

import torch

from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3

SETTINGS = {
    "none": {},
    "selective core_attn": {"recompute": "selective", "recompute_modules": ["core_attn"]},
    "selective core_attn+mlp": {"recompute": "selective", "recompute_modules": ["core_attn", "mlp"]},
    "full uniform 1": {"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full uniform 2": {"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 2},
    "full block 1": {"recompute": "full", "recompute_method": "block", "recompute_num_layers": 1},
}


def _worker(rank, world, hf_dir):
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.testing.update_step import build_policy, trajectories, update_once
    from megafork.train.config import ModelConfig, OptimConfig

    groups = init_distributed(ParallelConfig(tp=2))
    optim = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=1e6)
    out = {}
    for name, kw in SETTINGS.items():
        policy = build_policy(hf_dir, groups, ModelConfig(**kw), optim)
        sums = update_once(policy, groups, trajectories())
        model = policy.model
        layer = model.decoder.layers[0]
        flags = {"granularity": model.config.recompute_granularity, "method": model.config.recompute_method,
                 "core_attn": layer.self_attention.checkpoint_core_attention,
                 "mlp": layer.recompute_mlp, "layernorm": layer.recompute_input_layernorm}
        out[name] = {"grads": {n: p.main_grad.clone() for n, p in model.named_parameters()},
                     "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                     "loss_sum": sums["loss_sum"], "flags": flags}
    return out


def test_recompute_gives_bitwise_equal_gradients(tmp_path):
    hf_dir = str(make_tiny_qwen3(tmp_path / "hf", seed=11, tie_word_embeddings=False))
    ranks = run_ranks(_worker, 2, args=(hf_dir,), timeout=300)
    for r in ranks:
        base = r["none"]
        assert any(g.abs().sum() > 0 for g in base["grads"].values())
        for name in SETTINGS:
            got = r[name]
            assert got["loss_sum"] == base["loss_sum"], name
            for n, g in base["grads"].items():
                assert torch.equal(got["grads"][n], g), f"{name}: main_grad of {n} differs from recompute=none"
                assert torch.equal(got["params"][n], base["params"][n]), f"{name}: {n} after the step differs"
        f = {name: r[name]["flags"] for name in SETTINGS}
        assert f["none"] == {"granularity": None, "method": None, "core_attn": False, "mlp": False,
                             "layernorm": False}
        assert f["selective core_attn"]["core_attn"] and not f["selective core_attn"]["mlp"]
        assert f["selective core_attn+mlp"]["mlp"] and f["selective core_attn+mlp"]["core_attn"]
        assert f["full uniform 1"]["granularity"] == "full" and f["full uniform 1"]["method"] == "uniform"
        assert f["full block 1"]["method"] == "block"
