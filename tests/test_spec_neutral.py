"""`model.megatron_path` checkpoints move between layer specs (local <-> TE-named).

    .venv/bin/python -m pytest tests/test_spec_neutral.py -q

TE cannot run on CPU, so the TE side is `megafork.testing.te_named`: megatron's local layers
re-plumbed to TE's parameter names (norms fused into linear_qkv / linear_fc1 as
`layer_norm_weight`, `_extra_state` on the q/k norms, no key map). Each direction must load and
then compute the same logits as the model that wrote the checkpoint. On TP=2 gloo ranks, so the
sharded (TP-split) keys are exercised too.
"""
from __future__ import annotations

import pytest

from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3


def _worker(rank, world, hf_dir, root):
    import torch
    from megatron.core import dist_checkpointing

    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import load_hf_weights
    from megafork.models.qwen3.checkpoint import load_megatron_checkpoint, save_megatron_checkpoint
    from megafork.models.qwen3.config import Qwen3BuildOptions, read_hf_config
    from megafork.models.qwen3.model import build_qwen3
    from megafork.models.qwen3.spec_keys import stored_keys
    from megafork.testing.te_named import raw_local_layer_spec, te_named_layer_spec

    groups = init_distributed(ParallelConfig(tp=2))
    hf = read_hf_config(hf_dir)
    opts = Qwen3BuildOptions(dtype="fp32", spec="local")
    specs = {"local": None, "te_named": te_named_layer_spec(), "raw_local": raw_local_layer_spec()}
    ids = torch.tensor([[5, 9, 33, 2, 71, 15, 8, 3]])
    pos = torch.arange(ids.shape[1])[None]

    def build(kind):
        torch.manual_seed(100 + len(kind))  # every fresh model starts from different random weights
        return build_qwen3(hf, opts, groups, layer_spec_override=specs[kind])

    def logits(model):
        with torch.no_grad():
            return model(ids, pos, None).clone()

    out = {"keys": {}, "max_diff": {}}
    written = {}
    for kind in specs:
        model = build(kind)
        load_hf_weights(model, hf_dir, groups)
        written[kind] = logits(model)
        save_megatron_checkpoint(model, f"{root}/{kind}", groups, opts)
        out["keys"][kind] = sorted(stored_keys(f"{root}/{kind}"))
    # The defect, without the remap: dist_checkpointing refuses a local checkpoint in a TE-named model.
    try:
        dist_checkpointing.load(build("te_named").sharded_state_dict(), f"{root}/raw_local")
        out["plain_load_error"] = ""
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        out["plain_load_error"] = str(exc)
    for src in specs:
        for dst in specs:
            model = build(dst)
            before = logits(model)
            load_megatron_checkpoint(model, f"{root}/{src}")
            after = logits(model)
            out["max_diff"][f"{src}->{dst}"] = (float((after - written[src]).abs().max()),
                                                float((before - written[src]).abs().max()))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    hf_dir = make_tiny_qwen3(root / "hf", seed=4, tie_word_embeddings=False, vocab_size=120)
    return run_ranks(_worker, 2, args=(str(hf_dir), str(root)), init_process_group=False, timeout=400)


def test_checkpoints_name_norms_and_extra_state_per_spec(results):
    keys = results[0]["keys"]
    fused = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    assert fused in keys["local"] and fused in keys["te_named"]  # megatron's local spec maps its norms
    assert "decoder.layers.input_layernorm.weight" in keys["raw_local"] and fused not in keys["raw_local"]
    assert "decoder.layers.self_attention.q_layernorm._extra_state" in keys["te_named"]
    assert "decoder.layers.self_attention.q_layernorm._extra_state" not in keys["local"]
    # The defect without the remap: the TE-named model asks for a key the local checkpoint lacks.
    assert "linear_qkv.layer_norm_weight" in results[0]["plain_load_error"]


def test_every_spec_loads_every_other_specs_checkpoint_with_the_same_logits(results):
    for rank in results:
        assert len(rank["max_diff"]) == 9
        for pair, (after, before) in rank["max_diff"].items():
            assert before > 1e-3, f"{pair}: the fresh model already matched (the test would prove nothing)"
            assert after < 1e-5, f"{pair}: logits differ by {after} after loading"


def test_a_key_missing_under_both_names_is_an_error():
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from megafork.models.qwen3.spec_keys import alias_of, match_checkpoint_keys

    assert alias_of("decoder.layers.input_layernorm.weight") == "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    assert alias_of("decoder.layers.mlp.linear_fc1.layer_norm_weight") == "decoder.layers.pre_mlp_layernorm.weight"
    assert alias_of("decoder.layers.mlp.linear_fc1.weight") is None
    import torch

    t = ShardedTensor.from_rank_offsets("decoder.layers.mlp.linear_fc1.layer_norm_weight", torch.ones(4))
    w = ShardedTensor.from_rank_offsets("decoder.layers.mlp.linear_fc2.weight", torch.ones(4))
    obj = ShardedObject("decoder.layers.mlp.linear_fc1._extra_state", None, (1,), (0,))
    sd = {"a": t, "nested": {"b": obj, "c": w}}
    out = match_checkpoint_keys(sd, {"decoder.layers.pre_mlp_layernorm.weight", "decoder.layers.mlp.linear_fc2.weight"},
                                "ckpt")
    assert out["a"].key == "decoder.layers.pre_mlp_layernorm.weight" and set(out["nested"]) == {"c"}
    with pytest.raises(ValueError, match=r"ckpt: the checkpoint has no entry for 1 model key\(s\), e\.g\. "
                                         r"\['decoder.layers.mlp.linear_fc2.weight'\]"):
        match_checkpoint_keys({"c": w}, set(), "ckpt")
