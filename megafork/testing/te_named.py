"""A GPT layer spec whose checkpoint keys follow transformer-engine's, built without TE.

    from megafork.testing.te_named import te_named_layer_spec
    model = build_qwen3(hf, opts, groups, layer_spec=te_named_layer_spec())

TE (GPU only) cannot run on CPU, but its spec's *names* can: this spec fuses the pre-attention
and pre-MLP RMSNorm into the following column-parallel linear as a `layer_norm_weight`
parameter (TE's LayerNormLinear), adds no `sharded_state_dict_keys_map`, and gives the q/k norms
an `_extra_state` (TE's norm modules serialise one). Its maths is the local spec's, so a model
built with it computes what the local model computes, and the CPU tests can check that a
checkpoint moves between the two spellings. It is a test double for naming only: the real TE
spec is exercised on a GPU (tests/test_gpu.py).
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    """RMSNorm then ColumnParallelLinear, with the norm weight named like TE's LayerNormLinear."""

    def __init__(self, input_size: int, output_size: int, *args, **kwargs):
        super().__init__(input_size, output_size, *args, **kwargs)
        self.eps = kwargs["config"].layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(
            torch.ones(input_size, dtype=kwargs["config"].params_dtype))

    def forward(self, input_, *args, **kwargs):
        normed = torch.nn.functional.rms_norm(input_, (input_.shape[-1],), self.layer_norm_weight, self.eps)
        return super().forward(normed, *args, **kwargs)


class RMSNormWithExtraState(torch.nn.Module):
    """An RMSNorm that, like TE's norm modules, carries an `_extra_state` in its state dict."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))

    def forward(self, x):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def get_extra_state(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.uint8)  # TE stores FP8 metadata; empty without FP8

    def set_extra_state(self, state) -> None:
        if state is not None and not isinstance(state, torch.Tensor):
            raise TypeError(f"_extra_state: expected a tensor or None, found {type(state).__name__}")


def te_named_layer_spec():
    """megatron's local GPT layer spec (qk-norm, RMSNorm) re-plumbed to TE's parameter names."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp

    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = IdentityOp
    sub.pre_mlp_layernorm = IdentityOp
    sub.sharded_state_dict_keys_map = {}
    attn = sub.self_attention.submodules
    attn.linear_qkv = LayerNormColumnParallelLinear
    attn.q_layernorm = RMSNormWithExtraState
    attn.k_layernorm = RMSNormWithExtraState
    sub.mlp.submodules.linear_fc1 = LayerNormColumnParallelLinear
    return spec


def raw_local_layer_spec():
    """The local spec without megatron's key map: it writes `input_layernorm.weight` etc."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    spec.submodules.sharded_state_dict_keys_map = {}
    return spec
