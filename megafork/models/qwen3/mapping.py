"""The one HF <-> megatron mapping for Qwen3: names, TP shards, PP layer offsets.

Conversion (`hf_io.load_hf_weights`), HF export and weight sync (`hf_io.export_hf_tensors`) all
read this table; nothing else knows a parameter name.

Each `Rule` names one megatron parameter of a stage (`{i}` = the layer index inside the stage)
and the HF tensors it is made of (`{g}` = the global layer index = PP offset + i), and how it is
split over tensor parallelism:

| kind      | TP split                                                                  |
|-----------|---------------------------------------------------------------------------|
| replicate | every TP rank holds the whole tensor (RMSNorm weights, q/k norm)          |
| row       | split along dim 1 (RowParallelLinear: o_proj, down_proj)                  |
| vocab     | split along dim 0 of the padded vocab; padding rows are zero and dropped   |
| qkv       | q/k/v interleaved per query group [q_g (heads/groups*d); k_g (d); v_g (d)] |
|           | for each KV group g, then split along dim 0 (whole groups per TP rank)     |
| fc1       | TP rank r holds [gate_r; up_r]: each of gate/up split along dim 0, stacked |

All functions are pure tensor code; communication lives in `hf_io`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megafork.models.qwen3.config import Qwen3HFConfig


@dataclass(frozen=True)
class Rule:
    """One megatron parameter <-> its HF tensors.

    Attributes:
        megatron: name in the stage's GPTModel state dict ("{i}" = local layer).
        hf: HF names ("{g}" = global layer), in the order the kind expects (q,k,v / gate,up).
        kind: "replicate", "row", "vocab", "qkv" or "fc1" (see module docstring).
        stage: "first", "last" or "layer" (which PP stages hold it).
        export: False for a copy that HF does not store (the tied LM head on the last stage).
    """

    megatron: str
    hf: tuple[str, ...]
    kind: str
    stage: str
    export: bool = True


_L = "model.layers.{g}."


def rules(hf: Qwen3HFConfig, te_names: bool = False) -> list[Rule]:
    """The mapping table for a Qwen3 config.

    Args:
        hf: the HF config (tied embeddings decide where lm_head comes from).
        te_names: use transformer-engine spec names, where the pre-attention/pre-MLP RMSNorm
            weights live inside the fused LayerNormLinear modules.
    """
    d = "decoder.layers.{i}."
    in_norm = d + ("self_attention.linear_qkv.layer_norm_weight" if te_names else "input_layernorm.weight")
    mlp_norm = d + ("mlp.linear_fc1.layer_norm_weight" if te_names else "pre_mlp_layernorm.weight")
    head = (Rule("output_layer.weight", ("model.embed_tokens.weight",), "vocab", "last", export=False)
            if hf.tie_word_embeddings else
            Rule("output_layer.weight", ("lm_head.weight",), "vocab", "last"))
    return [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", "first"),
        Rule(in_norm, (_L + "input_layernorm.weight",), "replicate", "layer"),
        Rule(d + "self_attention.linear_qkv.weight",
             (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
             "qkv", "layer"),
        Rule(d + "self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",), "replicate", "layer"),
        Rule(d + "self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",), "replicate", "layer"),
        Rule(d + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), "row", "layer"),
        Rule(mlp_norm, (_L + "post_attention_layernorm.weight",), "replicate", "layer"),
        Rule(d + "mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), "fc1", "layer"),
        Rule(d + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), "row", "layer"),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicate", "last"),
        head,
    ]


def hf_shapes(hf: Qwen3HFConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF Qwen3 checkpoint must contain, with its shape, in HF order."""
    h, d = hf.hidden_size, hf.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (hf.vocab_size, h)}
    for g in range(hf.num_hidden_layers):
        p = f"model.layers.{g}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (hf.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (hf.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (hf.num_key_value_heads * d, h),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "self_attn.o_proj.weight": (h, hf.num_attention_heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (hf.intermediate_size, h),
            p + "mlp.up_proj.weight": (hf.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, hf.intermediate_size),
        })
    out["model.norm.weight"] = (h,)
    if not hf.tie_word_embeddings:
        out["lm_head.weight"] = (hf.vocab_size, h)
    return out


def hf_names(rule: Rule, global_layer: int | None) -> list[str]:
    """The HF names of a rule, with the global layer filled in."""
    return [n.format(g=global_layer) for n in rule.hf]


def megatron_name(rule: Rule, local_layer: int | None) -> str:
    return rule.megatron.format(i=local_layer)


# A reader returns rows [a, b) of dim `dim` of an HF tensor (b may exceed its size: caller pads).
Reader = Callable[[str, int, int, int], torch.Tensor]


def read_shard(rule: Rule, global_layer: int | None, hf: Qwen3HFConfig, tp_rank: int, tp_size: int,
               padded_vocab: int, read: Reader) -> torch.Tensor:
    """Build this TP rank's megatron shard of `rule` from HF tensors, reading only its slices.

    Args:
        rule: the mapping rule.
        global_layer: global layer index (None for non-layer rules).
        hf: the HF config.
        tp_rank: this rank's TP index.
        tp_size: TP size.
        padded_vocab: the model's padded vocab size.
        read: `read(name, dim, start, stop)` returns that slice of an HF tensor.

    Returns:
        The shard, shaped like the local megatron parameter.
    """
    names = hf_names(rule, global_layer)
    if rule.kind == "replicate":
        return read(names[0], 0, 0, None)
    if rule.kind == "row":
        full = hf_shapes(hf)[names[0]][1]
        n = full // tp_size
        return read(names[0], 1, tp_rank * n, (tp_rank + 1) * n)
    if rule.kind == "vocab":
        n = padded_vocab // tp_size
        start, stop = tp_rank * n, (tp_rank + 1) * n
        rows = read(names[0], 0, min(start, hf.vocab_size), min(stop, hf.vocab_size))
        if rows.shape[0] < n:
            pad = rows.new_zeros((n - rows.shape[0],) + tuple(rows.shape[1:]))
            rows = torch.cat([rows, pad], 0)
        return rows
    if rule.kind == "fc1":
        n = hf.intermediate_size // tp_size
        return torch.cat([read(name, 0, tp_rank * n, (tp_rank + 1) * n) for name in names], 0)
    if rule.kind == "qkv":
        d = hf.head_dim
        groups = hf.num_key_value_heads // tp_size
        per_group = hf.num_attention_heads // hf.num_key_value_heads
        g0 = tp_rank * groups
        q = read(names[0], 0, g0 * per_group * d, (g0 + groups) * per_group * d)
        k = read(names[1], 0, g0 * d, (g0 + groups) * d)
        v = read(names[2], 0, g0 * d, (g0 + groups) * d)
        h = q.shape[-1]
        qkv = torch.cat([q.view(groups, per_group * d, h), k.view(groups, d, h), v.view(groups, d, h)], 1)
        return qkv.reshape(groups * (per_group + 2) * d, h)
    raise ValueError(f"mapping rule {rule.megatron}: unknown kind {rule.kind!r}")


def merge_shards(rule: Rule, global_layer: int | None, hf: Qwen3HFConfig,
                 shards: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Turn all TP shards of one megatron parameter (in TP-rank order) into HF tensors.

    Args:
        rule: the mapping rule.
        global_layer: global layer index (None for non-layer rules).
        hf: the HF config.
        shards: the parameter's shard from every TP rank, in rank order.

    Returns:
        (hf_name, tensor) pairs in the order of `rule.hf`; contiguous tensors.
    """
    names = hf_names(rule, global_layer)
    if rule.kind == "replicate":
        return [(names[0], shards[0].contiguous())]
    if rule.kind == "row":
        return [(names[0], torch.cat(shards, 1))]
    if rule.kind == "vocab":
        return [(names[0], torch.cat(shards, 0)[: hf.vocab_size].contiguous())]
    if rule.kind == "fc1":
        halves = [s.chunk(2, 0) for s in shards]
        return [(names[0], torch.cat([a for a, _ in halves], 0)),
                (names[1], torch.cat([b for _, b in halves], 0))]
    if rule.kind == "qkv":
        d = hf.head_dim
        per_group = hf.num_attention_heads // hf.num_key_value_heads
        full = torch.cat(shards, 0)
        h = full.shape[-1]
        grouped = full.view(hf.num_key_value_heads, (per_group + 2) * d, h)
        q, k, v = grouped.split([per_group * d, d, d], 1)
        return [(names[0], q.reshape(-1, h).contiguous()), (names[1], k.reshape(-1, h).contiguous()),
                (names[2], v.reshape(-1, h).contiguous())]
    raise ValueError(f"mapping rule {rule.megatron}: unknown kind {rule.kind!r}")
