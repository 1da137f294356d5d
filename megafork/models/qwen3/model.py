"""Build Qwen3 as a megatron-core `GPTModel`, sharded over the groups it is given.

    groups = init_distributed(ParallelConfig(tp=2, pp=2))
    hf = read_hf_config(hf_dir)
    model = build_qwen3(hf, Qwen3BuildOptions(dtype="bf16"), groups)
    hidden = model(ids, pos, None, return_hidden=True)   # last stage: [s, b, h] after final norm
    logits = model(ids, pos, None)                        # last stage: [b, s, V_pad/tp]
    w = model.output_weight()                             # [V_pad/tp, h] shard (tied or not)

`Qwen3GPTModel` is GPTModel plus one output switch: with `return_hidden=True` the last stage
stops after the decoder's final RMSNorm and returns hidden states in megatron's [s, b, h]
layout, so a fused LM head (megafork.ops) can take them with `output_weight()` and never
materialise [T, V] logits. Everything else (PP stages, tied embeddings, sharded_state_dict for
dist_checkpointing) is GPTModel's own code.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from megafork.models.qwen3.config import (
    Qwen3BuildOptions,
    Qwen3HFConfig,
    padded_vocab_size,
    te_available,
    to_transformer_config,
)
from megafork.models.qwen3.packed import block_causal_mask, rope_at_positions, thd_params


class Qwen3GPTModel(GPTModel):
    """megatron-core GPTModel that can also return final hidden states on the last stage.

    Attributes:
        hf_config: the HF config the model was built from.
        vocab_size_unpadded: the HF vocab size (the rest of `vocab_size` is padding rows).
        packed_format: how packed rows reach attention: "thd" (TE spec) or "mask" (local spec).
    """

    hf_config: Qwen3HFConfig
    vocab_size_unpadded: int

    def forward(self, input_ids, position_ids, attention_mask, *args, return_hidden: bool = False,
                cu_seqlens: torch.Tensor | None = None, **kwargs):
        """GPTModel.forward; with `return_hidden=True` the last stage returns [s, b, h] hidden states.

        Args:
            input_ids: [b, s] token ids (first stage; ignored on later stages).
            position_ids: [b, s] positions.
            attention_mask: None for the causal mask megatron builds itself, or a bool
                [b, 1, s, s] mask where True marks positions that must NOT be attended.
            *args: passed to GPTModel.forward.
            return_hidden: on the last stage return the decoder output after the final RMSNorm
                ([s, b, h], sequence-parallel-scattered when SP is on) instead of logits.
            cu_seqlens: for a packed row ([1, s] with segments at these int32 offsets): each
                segment attends only within itself, with RoPE restarting per segment; THD
                `packed_seq_params` with the TE spec, a block-diagonal causal mask and RoPE at
                `position_ids` with the local spec (see `megafork.models.qwen3.packed`).
            **kwargs: passed to GPTModel.forward (labels, packed_seq_params, ...).
        """
        self._return_hidden = return_hidden
        if cu_seqlens is not None:
            if attention_mask is not None or kwargs.get("packed_seq_params") is not None:
                raise ValueError("Qwen3GPTModel.forward: expected cu_seqlens alone for a packed row, found it "
                                 "together with attention_mask or packed_seq_params")
            if input_ids is not None and input_ids.shape[0] != 1:
                raise ValueError(f"Qwen3GPTModel.forward: a packed row (cu_seqlens) expected input_ids of shape "
                                 f"[1, s], found {list(input_ids.shape)}")
            if getattr(self, "packed_format", "mask") == "thd":
                kwargs["packed_seq_params"] = thd_params(cu_seqlens)
            else:
                attention_mask = block_causal_mask(cu_seqlens, position_ids.shape[1], position_ids.device)
                self._rope_positions = position_ids
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self._return_hidden = False
            self._rope_positions = None

    def _preprocess(self, *args, **kwargs):
        out = super()._preprocess(*args, **kwargs)
        # Local spec, packed row: GPTModel's RoPE covers 0..s-1; take it at the restarting positions.
        positions = getattr(self, "_rope_positions", None)
        if positions is not None and out[1] is not None:
            out = (out[0], rope_at_positions(self.rotary_pos_emb, positions), *out[2:])
        return out

    def _postprocess(self, hidden_states, *args, **kwargs):
        # The decoder block of the last stage already applied final_layernorm.
        if getattr(self, "_return_hidden", False) and self.post_process:
            return hidden_states
        return super()._postprocess(hidden_states, *args, **kwargs)

    def output_weight(self) -> torch.Tensor | None:
        """The LM-head weight shard [V_pad/tp, h] on the last stage (the embedding when tied).

        Rows past `vocab_size_unpadded` (globally) are padding and must be masked by the head.
        Returns None on stages without the head.
        """
        if not self.post_process:
            return None
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


def layer_spec(hf: Qwen3HFConfig, opts: Qwen3BuildOptions):
    """The transformer-layer spec: TE's when transformer-engine imports (or spec='te'), else local.

    Args:
        hf: the HF config (unused today; dense Qwen3 layers are all alike).
        opts: build options; `opts.spec` forces "te" or "local".
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if _uses_te(opts):
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    return get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")


def _uses_te(opts: Qwen3BuildOptions) -> bool:
    if opts.spec == "te" and not te_available():
        raise ValueError("model.spec='te' but transformer-engine is not importable")
    return opts.spec == "te" or (opts.spec == "auto" and te_available())


def build_qwen3(hf: Qwen3HFConfig, opts: Qwen3BuildOptions, groups, vp_stage: int | None = None,
                padded_vocab: int | None = None, layer_spec_override=None) -> Qwen3GPTModel:
    """Build this rank's stage of Qwen3 as a megatron-core GPTModel.

    Args:
        hf: validated HF config (`read_hf_config`).
        opts: build options (dtype, recompute, SP, spec).
        groups: `megafork.distributed.ParallelGroups` of this rank.
        vp_stage: virtual pipeline stage (None without interleaving).
        padded_vocab: vocab rows including padding; default `padded_vocab_size(vocab, tp,
            opts.vocab_multiple)`. Checkpoints record theirs so any TP it divides can load them.
        layer_spec_override: a megatron layer ModuleSpec to use instead of `layer_spec(hf, opts)`
            (the CPU tests build a TE-named spec this way).

    Returns:
        The model on `groups.device`, in `opts.dtype`, with `hf_config` and
        `vocab_size_unpadded` attached.
    """
    tcfg = to_transformer_config(hf, opts, tp=groups.tp_size, pp=groups.pp_size, cp=groups.cp_size)
    if padded_vocab is None:
        padded_vocab = padded_vocab_size(hf.vocab_size, groups.tp_size, opts.vocab_multiple)
    if padded_vocab < hf.vocab_size or padded_vocab % groups.tp_size:
        raise ValueError(f"padded_vocab = {padded_vocab}: expected >= vocab_size {hf.vocab_size} and "
                         f"divisible by tensor-parallel size {groups.tp_size}")
    model = Qwen3GPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec_override or layer_spec(hf, opts),
        vocab_size=padded_vocab,
        max_sequence_length=hf.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=hf.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=hf.rope_theta,
        pg_collection=groups.pg_collection,
        vp_stage=vp_stage,
    )
    model.hf_config = hf
    model.vocab_size_unpadded = hf.vocab_size
    model.packed_format = "thd" if _uses_te(opts) else "mask"  # how a packed row reaches attention
    return model.to(device=groups.device)
