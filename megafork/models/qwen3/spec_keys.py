"""Load a dist_checkpointing checkpoint written with one layer spec into a model of another.

megatron's local and transformer-engine specs name a few things differently:

* The pre-attention and pre-MLP RMSNorm weights: `input_layernorm.weight` and
  `pre_mlp_layernorm.weight` in the local spec, fused into TE's LayerNormLinear as
  `self_attention.linear_qkv.layer_norm_weight` and `mlp.linear_fc1.layer_norm_weight`.
  megatron-core's own local GPT spec already maps its norms onto TE's names in the sharded state
  dict (`sharded_state_dict_keys_map`), but a spec without that map writes the local names.
* `_extra_state`: TE modules serialise their FP8 metadata there, norms included; the local
  modules have none (or an empty one), so a TE model asks for objects a local checkpoint never
  wrote.

`match_checkpoint_keys` rewrites the model's sharded state dict against what the checkpoint
holds before `dist_checkpointing.load`: a tensor stored under the other spec's norm name is read
from there, and an `_extra_state` the checkpoint lacks is left at the module's fresh value (no
FP8 history: what a bf16 run starts with). Whatever else is missing is an error naming the keys.
In the other direction nothing is needed: dist_checkpointing ignores checkpoint entries the
model does not ask for (e.g. a TE checkpoint's `_extra_state` loaded into a local model).
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Layer-relative norm names: local spec <-> TE spec (both directions are tried).
NORM_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_BOTH_WAYS = {**NORM_ALIASES, **{v: k for k, v in NORM_ALIASES.items()}}
EXTRA_STATE = "_extra_state"


def alias_of(key: str) -> str | None:
    """The other spec's name for a sharded key (`decoder.layers.<suffix>`), or None."""
    for ours, theirs in _BOTH_WAYS.items():
        if key.endswith("." + ours):
            return key[:-len(ours)] + theirs
    return None


def stored_keys(ckpt_dir: str | Path) -> set[str]:
    """The sharded keys (tensors and objects) a dist_checkpointing checkpoint holds."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return {v.key for v in load_sharded_metadata(str(ckpt_dir)).values()}


def match_checkpoint_keys(sharded_state_dict: dict, stored: set[str], source: str) -> dict:
    """Rewrite `sharded_state_dict` in place so that every entry names something in `stored`.

    Args:
        sharded_state_dict: the model's `sharded_state_dict()` (nested dicts of ShardedTensor,
            ShardedObject and ShardedTensorFactory).
        stored: the checkpoint's keys (`stored_keys`).
        source: the checkpoint, for messages.

    Returns:
        The same dict, with norm keys renamed to the checkpoint's spelling and `_extra_state`
        objects the checkpoint lacks removed.

    Raises:
        ValueError: model entries that the checkpoint has under no known name.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    missing: list[str] = []
    renamed = dropped = 0

    def visit(d: dict) -> None:
        nonlocal renamed, dropped
        for name in list(d):
            v = d[name]
            if isinstance(v, dict):
                visit(v)
            elif isinstance(v, (ShardedTensor, ShardedObject, ShardedTensorFactory)) and v.key not in stored:
                alias = alias_of(v.key)
                if isinstance(v, ShardedTensor) and alias in stored:
                    v.key = alias
                    renamed += 1
                elif isinstance(v, ShardedObject) and v.key.endswith(EXTRA_STATE):
                    del d[name]  # the module keeps its freshly initialised extra state
                    dropped += 1
                else:
                    missing.append(v.key)

    visit(sharded_state_dict)
    if missing:
        raise ValueError(f"{source}: the checkpoint has no entry for {len(missing)} model key(s), e.g. "
                         f"{sorted(set(missing))[:6]}; it was written for another model or layout "
                         f"(norm names tried in both spellings: {sorted(NORM_ALIASES.items())})")
    if renamed or dropped:
        log.info("%s: read %d norm weight(s) under the other layer spec's names; %d _extra_state "
                 "object(s) absent from the checkpoint keep their initial value", source, renamed, dropped)
    return sharded_state_dict
