"""megafork.train.optim: megatron DDP + Adam + schedule under the per-token loss contract.

The gradients that `forward_backward_func` leaves in DDP's main_grad after `finalize_model_grads`
are compared with an unsharded float64 reference: d/dW [sum of every token loss of every rank and
micro-batch] / (global token count). Micro-batches have unequal token counts, so a per-micro-batch
or per-rank mean would fail the comparison.
"""
from __future__ import annotations

import math

import pytest
import torch

from megafork.testing.multirank import run_ranks

H, ROWS = 8, 6  # hidden size, output features (split over TP=2)


def _data(rank: int, mb: int):
    """(x [T, H], mask [T]) of micro-batch `mb` of DP rank `rank`; token counts differ."""
    g = torch.Generator().manual_seed(100 * rank + mb)
    t = 5 + 3 * mb + 2 * rank
    x = torch.randn(t, H, generator=g, dtype=torch.float64)
    mask = torch.rand(t, generator=g) < 0.7
    mask[0] = True
    return x, mask


def _weight() -> torch.Tensor:
    return torch.randn(ROWS, H, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _token_losses(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    y = x @ w.T
    return (y.pow(2).sum(-1) + y.sum(-1)).to(w.dtype)  # a sum over output features: TP-shardable


def _check_layout(groups, num_mb: int = 2) -> dict:
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megafork.train.config import OptimConfig
    from megafork.train.optim import build_optimizer, current_lr, enable_per_token_loss, wrap_ddp

    tp, dp = groups.tp_size, groups.dp_size
    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=tp, tensor_model_parallel_size=tp,
                               use_cpu_initialization=True)
    module = torch.nn.Module()
    module.config = config  # megatron's schedule reads config and model_type off the wrapped module
    module.model_type = ModelType.encoder_or_decoder
    module.set_input_tensor = lambda tensor: None  # one stage: nothing arrives from a previous stage
    module.lin = ColumnParallelLinear(H, ROWS, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                      gather_output=False, tp_group=groups.tp)
    module.norm = torch.nn.Parameter(torch.ones(H))  # 1-D: megatron puts it in the no-weight-decay group
    rows = slice(groups.tp_rank * ROWS // tp, (groups.tp_rank + 1) * ROWS // tp)
    w_full = _weight()
    with torch.no_grad():
        module.lin.weight.copy_(w_full[rows].float())

    errors = {}
    with pytest.raises(ValueError, match="calculate_per_token_loss=True"):
        wrap_ddp(module, groups)
    enable_per_token_loss(module)
    ddp = wrap_ddp(module, groups)
    with pytest.raises(ValueError, match=r"optim.warmup_steps: expected < train.steps=3"):
        build_optimizer(OptimConfig(lr=1e-2, warmup_steps=3), [ddp], total_steps=3, groups=groups)
    optim_cfg = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, schedule="cosine", weight_decay=0.1,
                            grad_clip=0.5)
    optimizer, scheduler = build_optimizer(optim_cfg, [ddp], total_steps=4, groups=groups)

    def forward_step(data_iterator, model):
        x, mask = next(data_iterator)
        y = model.module.lin(x.float() * model.module.norm)[0]  # [T, ROWS/tp]
        per_token = y.pow(2).sum(-1) + y.sum(-1)
        # Sum over output features is split across TP ranks: all-reduce it (with its gradient).
        if groups.tp is not None:
            from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

            per_token = reduce_from_tensor_model_parallel_region(per_token, group=groups.tp)

        def loss_func(output):
            m = mask.float()
            return (output * m).sum(), mask.sum().to(torch.int), {"tokens": mask.sum()}

        return per_token, loss_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    batches = iter([_data(groups.dp_rank, mb) for mb in range(num_mb)])
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=batches, model=[ddp],
                                num_microbatches=num_mb, seq_length=1, micro_batch_size=1, forward_only=False,
                                pg_collection=groups.pg_collection)

    # float64 reference over every rank's micro-batches.
    wr = w_full.clone().requires_grad_()
    total, n = torch.zeros((), dtype=torch.float64), 0
    for r in range(dp):
        for mb in range(num_mb):
            x, mask = _data(r, mb)
            total = total + (_token_losses(wr, x) * mask).sum()
            n += int(mask.sum())
    (total / n).backward()
    g_ref = wr.grad
    grad = module.lin.weight.main_grad.double()
    errors["grad"] = float((grad - g_ref[rows]).abs().max() / g_ref.abs().max())

    w_before = module.lin.weight.detach().clone().double()
    ok, grad_norm, _ = optimizer.step()
    # The norm param gets gradient too; add its float64 reference to the global norm.
    xr = [_data(r, mb) for r in range(dp) for mb in range(num_mb)]
    nr = torch.ones(H, dtype=torch.float64, requires_grad=True)
    total = sum((_token_losses(w_full, x * nr) * m).sum() for x, m in xr) / n
    total.backward()
    norm_ref = math.sqrt(float(g_ref.pow(2).sum() + nr.grad.pow(2).sum()))
    errors["grad_norm"] = abs(grad_norm - norm_ref) / norm_ref
    # Adam's first step moves every weight by lr * g_hat / (|g_hat| + eps) ~ lr * sign(g), plus decoupled wd.
    lr = optim_cfg.lr
    expected = w_before * (1 - lr * optim_cfg.weight_decay) - lr * torch.sign(g_ref[rows])
    errors["update"] = float((module.lin.weight.detach().double() - expected).abs().max() / lr)
    decays = sorted({g["weight_decay"] for g in optimizer.param_groups})

    lrs = [current_lr(optimizer)]
    for _ in range(4):
        scheduler.step(1)
        lrs.append(current_lr(optimizer))
    return {"ok": ok, "errors": errors, "lrs": lrs, "decays": decays, "config": {
        "finalize": ddp.config.finalize_model_grads_func is not None, "no_sync": ddp.config.no_sync_func == ddp.no_sync,
        "grad_scale": ddp.config.grad_scale_func}}


def _rank_fn(rank: int, world: int, layouts: list[int]) -> tuple[list[dict], list[float]]:
    from megafork.distributed import ParallelConfig, init_distributed

    out = []
    for tp in layouts:
        out.append(_check_layout(init_distributed(ParallelConfig(tp=tp))))
    return out, _warmup_and_errors(init_distributed(ParallelConfig()))


def _check_results(per_rank: list[tuple[list[dict], list[float]]]) -> None:
    lr, lo = 1e-2, 1e-3
    cosine = [lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    for results, warmup_lrs in per_rank:
        # Step s trains at lr * s / warmup during warm-up, then decays linearly to min_lr at train.steps.
        assert warmup_lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 0.875, 0.75, 0.625, 0.5, 0.5])
        for res in results:
            assert res["ok"]
            assert res["errors"]["grad"] < 1e-6, res["errors"]
            assert res["errors"]["grad_norm"] < 1e-6, res["errors"]
            assert res["errors"]["update"] < 1e-3, res["errors"]
            assert res["lrs"] == pytest.approx(cosine, rel=1e-12)
            assert res["decays"] == [0.0, 0.1]
            assert res["config"] == {"finalize": True, "no_sync": True, "grad_scale": None}


def test_per_token_contract_dp2_and_tp2():
    """2 ranks, one spawn: DP=2 (TP=1), then TP=2 (DP=1); then warm-up schedule and errors."""
    _check_results(run_ranks(_rank_fn, 2, args=([1, 2],), timeout=180))


def _warmup_and_errors(groups) -> list[float]:
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megafork.train.config import OptimConfig
    from megafork.train.optim import build_optimizer, current_lr, enable_per_token_loss, wrap_ddp

    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=1, use_cpu_initialization=True,
                               params_dtype=torch.bfloat16, bf16=True)
    module = ColumnParallelLinear(H, ROWS, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                  gather_output=False)
    enable_per_token_loss(module)
    ddp = wrap_ddp(module, groups)
    with pytest.raises(ValueError, match="model.dtype: megatron's mixed-precision optimizer needs CUDA"):
        build_optimizer(OptimConfig(), [ddp], total_steps=20, groups=groups)
    with pytest.raises(ValueError, match="expected a non-empty list of DDP-wrapped chunks"):
        build_optimizer(OptimConfig(), [module], total_steps=20, groups=groups)
    config.params_dtype, config.bf16 = torch.float32, False
    module = ColumnParallelLinear(H, ROWS, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                  gather_output=False)
    ddp = wrap_ddp(module, groups)
    optimizer, scheduler = build_optimizer(OptimConfig(lr=1.0, warmup_steps=4, schedule="linear", min_lr=0.5),
                                           [ddp], total_steps=8, groups=groups)
    lrs = [current_lr(optimizer)]
    for _ in range(9):
        scheduler.step(1)
        lrs.append(current_lr(optimizer))
    return lrs

