"""Bytes of activations a micro-batch leaves saved for the backward, per pipeline stage and TP rank.

The structure follows Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv 2205.05198, Sec. 4): per layer, every tensor autograd keeps until the
backward, divided by TP inside attention/MLP and, with sequence parallelism, by TP along the
sequence everywhere else. Their 34·sbh + 5·as²b counts a GPT layer (4h MLP, MHA, LayerNorm,
dropout masks); the terms below are the ones megatron-core 0.16 actually saves for a Qwen3 layer
(RMSNorm, q/k-norm, RoPE, GQA, SwiGLU, no dropout), read off its layer code and checked against
`torch.autograd.graph.saved_tensors_hooks` on a tiny Qwen3 (tests/test_plan.py):

local spec (`transformer/dot_product_attention.py`, unfused softmax, torch's composite RMSNorm), T = b·s
tokens, t = TP, q = t with SP else 1, A = heads/t, G = kv heads/t, d = head dim, f = ffn size:
    input RMSNorm                 input and normalized input 2·T·h/q·p + rstd T/q·4
    linear_qkv (Column)           its input, the norm output, un-gathered under SP: T·h/q·p
    q/k RMSNorm                   the qkv output (k is a view of it) T·(A+2G)·d·p, q reshaped into a
                                  copy T·A·d·p, normalized q and k T·(A+G)·d·p, rstd T·(A+G)·4
    RoPE                          cos and sin, for q and for k: 4·s·d·4 (fp32)
    core attention                q T·A·d·p; k and v repeated to A heads (GQA) 2·T·A·d·p; softmax
                                  output b·A·s²·4 (fp32) plus the probabilities cast back to p for
                                  the second bmm when p < 4; the causal mask s² (bool)
    linear_proj (Row)             the attention context: T·A·d·p
    pre-MLP RMSNorm               2·T·h/q·p + rstd T/q·4
    linear_fc1 (Column)           the norm output T·h/q·p
    SwiGLU + linear_fc2           fc1 output T·2f/t·p, gate/up halves and their product 3·T·f/t·p
once per stage: the token ids b·s·8 on the first, the final RMSNorm on the last (2·T·h/q·p + rstd).

TE / flash-attention variant (`transformer_engine` spec): fused norms keep only their input and
rstd; flash attention keeps q, k (G heads), its output (also linear_proj's input) and the fp32
softmax statistics T·A·4: no s² term and no GQA repeat. (Not measurable on this CPU machine; it
is the local formula with those modules replaced.)

Recompute (megatron's `recompute_granularity`):
    selective core_attn   the attention core keeps only its inputs: q T·A·d·p, k T·G·d·p (v is a view)
    selective mlp         the MLP keeps only its input (the norm output, already counted)
    full uniform N        each chunk of N layers keeps its input T·h/q·p
    full block N          the first N layers of the stage keep their input; the rest keep everything
The recomputation itself needs one unit's full activations during its backward:
`recompute_workspace_bytes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    """What the activation terms depend on.

    Attributes:
        hidden: h.
        ffn: f (intermediate size).
        heads, kv_heads: attention and key/value heads (global).
        head_dim: d.
        tp: tensor-parallel size.
        sequence_parallel: megatron SP.
        act_bytes: bytes per activation element (2 for bf16, 4 for fp32).
        flash: the TE / flash-attention variant instead of the local spec.
    """

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    tp: int
    sequence_parallel: bool
    act_bytes: int
    flash: bool = False


def _attention_core(ls: LayerShape, b: int, s: int) -> float:
    """q, k, v as the core attention keeps them, its scores, and its output (linear_proj's input)."""
    t, p, d = ls.tp, ls.act_bytes, ls.head_dim
    a, g = ls.heads / t, ls.kv_heads / t
    tok = b * s
    if ls.flash:  # q, k (G heads), out (= linear_proj's input), lse; v is a view of qkv
        return tok * a * d * p + tok * g * d * p + tok * a * d * p + tok * a * 4
    qkv = tok * a * d * p * (3 if g < a else 2)  # q, repeated k and v (v is a view of qkv without GQA)
    softmax = b * a * s * s * (4 + (p if p < 4 else 0)) + s * s
    return qkv + softmax + tok * a * d * p


def _mlp(ls: LayerShape, tok: int) -> float:
    return tok * ls.ffn / ls.tp * ls.act_bytes * 5  # fc1 out (2f), gate/up halves and their product (3f)


def _norm(ls: LayerShape, tok: int) -> float:
    q = ls.tp if ls.sequence_parallel else 1
    kept = 1 if ls.flash else 2  # TE's fused norm keeps its input; torch's composite one also x·rstd
    return kept * tok * ls.hidden / q * ls.act_bytes + tok / q * 4


def layer_bytes(ls: LayerShape, b: int, s: int, recompute: str = "none", modules: tuple[str, ...] = ()) -> float:
    """Bytes one transformer layer keeps for the backward, on one TP rank (no full recompute).

    Args:
        ls: the layer's shape and layout.
        b: micro-batch rows.
        s: sequence length (a multiple of tp under SP).
        recompute: "none" or "selective" (full recompute is per stage: `stage_bytes`).
        modules: the selective modules ("core_attn", "mlp", "layernorm").
    """
    t, p, d, h = ls.tp, ls.act_bytes, ls.head_dim, ls.hidden
    q = t if ls.sequence_parallel else 1
    a, g = ls.heads / t, ls.kv_heads / t
    tok = b * s
    norms = 2 * _norm(ls, tok) + 2 * tok * h / q * p     # both RMSNorms + their outputs (the linears' inputs)
    qk_norm = tok * (a + 2 * g) * d * p + tok * (a + g) * 4
    if not ls.flash:
        qk_norm += tok * a * d * p + tok * (a + g) * d * p  # q's reshaped copy, normalized q and k
    rope = 4 * s * d * 4
    sel = recompute == "selective"
    if sel and "core_attn" in modules:
        # The checkpoint keeps q and k after RoPE (v is a view of qkv) and the context it returns.
        core = tok * a * d * p + tok * g * d * p + tok * a * d * p
    else:
        core = _attention_core(ls, b, s)
    mlp = 0.0 if sel and "mlp" in modules else _mlp(ls, tok)
    return norms + qk_norm + rope + core + mlp


def stage_bytes(ls: LayerShape, b: int, s: int, layers: int, first_stage: bool, last_stage: bool, recompute: str = "none",
                method: str = "uniform", num_layers: int = 1, modules: tuple[str, ...] = ()) -> float:
    """Bytes one micro-batch leaves saved on one TP rank of a pipeline stage.

    Args:
        ls: layer shape and layout.
        b, s: micro-batch rows and (padded) length.
        layers: transformer layers on this stage.
        first_stage: adds the token ids.
        last_stage: adds the final RMSNorm.
        recompute: "none", "selective" or "full".
        method, num_layers: the full-recompute method and its N.
        modules: the selective modules.
    """
    q = ls.tp if ls.sequence_parallel else 1
    tok = b * s
    layer_in = tok * ls.hidden / q * ls.act_bytes
    if recompute == "full" and method == "uniform":
        body = math.ceil(layers / num_layers) * layer_in
    elif recompute == "full":  # block: the first N layers keep their input only
        kept = min(num_layers, layers)
        body = kept * layer_in + (layers - kept) * layer_bytes(ls, b, s)
    else:
        body = layers * layer_bytes(ls, b, s, recompute, modules)
    once = s * ls.head_dim * 4 if recompute == "full" else 0.0  # RoPE frequencies, an input of each checkpoint
    if first_stage:
        once += tok * 8                                   # token ids, kept by the embedding lookup
    if last_stage:
        once += _norm(ls, tok)                            # final RMSNorm
    return body + once


def recompute_workspace_bytes(ls: LayerShape, b: int, s: int, layers: int, recompute: str, method: str = "uniform",
                              num_layers: int = 1, modules: tuple[str, ...] = ()) -> float:
    """Extra bytes while one recompute unit replays its forward in the backward (one at a time)."""
    if recompute == "full":  # a uniform chunk replays N layers; block replays one layer at a time
        return (min(num_layers, layers) if method == "uniform" else 1) * layer_bytes(ls, b, s)
    if recompute == "selective":
        return layer_bytes(ls, b, s) - layer_bytes(ls, b, s, "selective", modules)
    return 0.0
