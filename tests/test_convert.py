"""HF <-> megatron conversion: bit-exact round trip, resharding on load, and one test per bad input.

    .venv/bin/python -m pytest tests/test_convert.py -q
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megafork.models.qwen3.cli import main as convert_main
from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3


def _load_dir(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(path / f)))
    assert set(out) == set(index["weight_map"])
    return out


def _convert_worker(rank, world, hf_dir, root):
    """On 4 ranks: HF -> megatron at TP=2/PP=2, back to HF at TP=2/PP=2, then load the same
    checkpoint at TP=1 (DP=4) and TP=1/PP=2 and compare logits with transformers."""
    import torch.distributed as dist

    codes = {}
    codes["hf_to_megatron"] = convert_main(["hf-to-megatron", "--hf-dir", hf_dir, "--out-dir", f"{root}/ckpt",
                                            "--tp", "2", "--pp", "2", "--dtype", "fp32"])
    codes["megatron_to_hf"] = convert_main(["megatron-to-hf", "--in-dir", f"{root}/ckpt", "--out-dir",
                                            f"{root}/hf2", "--tp", "2", "--pp", "2", "--max-shard-gb", "0.00004"])
    for tp, pp in ((1, 1), (1, 2), (2, 1)):
        codes[f"compare_tp{tp}_pp{pp}"] = convert_main([
            "compare", "--hf-dir", hf_dir, "--megatron-dir", f"{root}/ckpt", "--tp", str(tp), "--pp", str(pp),
            "--input-ids", "5,9,33,2,71,15,8,3", "--dump-logits", f"{root}/logits_tp{tp}_pp{pp}.pt"])
    dist.barrier()
    return codes


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("untied") / "hf", seed=3, num_hidden_layers=4,
                           tie_word_embeddings=False, vocab_size=120)


def test_roundtrip_bit_exact_and_reshard_on_load(untied, tmp_path):
    results = run_ranks(_convert_worker, 4, args=(str(untied), str(tmp_path)), init_process_group=False,
                        timeout=400)
    assert all(codes == results[0] for codes in results), results
    assert all(code == 0 for code in results[0].values()), results[0]
    # Bit-exact for every tensor; several shards because of the tiny shard size.
    src, out = load_file(str(untied / "model.safetensors")), _load_dir(tmp_path / "hf2")
    assert set(src) == set(out)
    for name in src:
        assert out[name].dtype == src[name].dtype and torch.equal(out[name], src[name]), name
    assert len(set(json.loads((tmp_path / "hf2" / "model.safetensors.index.json").read_text())
                   ["weight_map"].values())) > 1
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "hf2" / f).read_bytes() == (untied / f).read_bytes(), f
    assert json.loads((tmp_path / "hf2" / "config.json").read_text()) == json.loads((untied / "config.json").read_text())
    # The TP=2/PP=2 checkpoint loaded at TP=1, TP=1/PP=2 and TP=2 gives the same logits.
    dumps = {k: torch.load(tmp_path / f"logits_{k}.pt") for k in ("tp1_pp1", "tp1_pp2", "tp2_pp1")}
    assert dumps["tp1_pp1"].shape == (8, 120) and dumps["tp1_pp1"].dtype == torch.float32
    from transformers import Qwen3ForCausalLM

    ref = Qwen3ForCausalLM.from_pretrained(str(untied), dtype=torch.float64).eval()
    with torch.no_grad():
        want = ref(torch.tensor([[5, 9, 33, 2, 71, 15, 8, 3]])).logits[0]
    for k, got in dumps.items():
        assert (got.double() - want).abs().max() / want.abs().max() < 1e-4, k
    assert torch.allclose(dumps["tp1_pp2"], dumps["tp1_pp1"], rtol=0, atol=1e-5)


# ---- bad input: each is reported naming the file/field/tensor, before any process group exists ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "hf", seed=1)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _run(capsys, *argv):
    import torch.distributed as dist

    code = convert_main(list(argv))
    assert not dist.is_initialized(), "bad input must be rejected before torch.distributed starts"
    return code, capsys.readouterr().err


def test_missing_config(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path / "hf")
    (d / "config.json").unlink()
    code, err = _run(capsys, "hf-to-megatron", "--hf-dir", str(d), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "config.json" in err and "not found" in err


def test_unreadable_config(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path / "hf")
    (d / "config.json").write_text("{not json")
    code, err = _run(capsys, "hf-to-megatron", "--hf-dir", str(d), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "config.json" in err and "not a readable JSON" in err


def test_wrong_architecture(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, "hf-to-megatron", "--hf-dir", str(d), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "'architectures'" in err and "LlamaForCausalLM" in err and "Qwen3ForCausalLM" in err


@pytest.mark.parametrize("field,value,needle", [
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}, "rope_type"),
    ("rope_scaling", {"type": "yarn", "factor": 4.0}, "'rope_scaling'"),
    ("use_sliding_window", True, "'use_sliding_window'"),
    ("num_experts", 8, "'num_experts'"),
    ("some_new_field", 1, "some_new_field"),
])
def test_unsupported_config_fields(tiny, tmp_path, capsys, field, value, needle):
    d = _copy(tiny, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, "compare", "--hf-dir", str(d))
    assert code == 2 and needle in err and "config.json" in err


@pytest.mark.parametrize("tp,pp,field", [(4, 1, "'num_key_value_heads' = 2"), (3, 1, "'num_attention_heads' = 4"),
                                         (1, 3, "'num_hidden_layers' = 2")])
def test_layout_not_divisible(tiny, tmp_path, capsys, tp, pp, field):
    code, err = _run(capsys, "hf-to-megatron", "--hf-dir", str(tiny), "--out-dir", str(tmp_path / "o"),
                     "--tp", str(tp), "--pp", str(pp))
    assert code == 2 and field in err and "not divisible" in err


def test_missing_tensor(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path / "hf")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    code, err = _run(capsys, "hf-to-megatron", "--hf-dir", str(d), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "'model.layers.1.mlp.up_proj.weight' is missing" in err


def test_misshaped_tensor(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path / "hf")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    save_file(tensors, str(d / "model.safetensors"))
    code, err = _run(capsys, "hf-to-megatron", "--hf-dir", str(d), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "model.safetensors" in err and "'model.layers.0.self_attn.k_proj.weight'" in err
    assert "[48, 64]" in err and "[32, 64]" in err


def test_missing_shard_file_and_bad_input_ids(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path / "hf")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
    code, err = _run(capsys, "compare", "--hf-dir", str(d))
    assert code == 2 and "model-00002-of-00002.safetensors" in err and "missing" in err
    code, err = _run(capsys, "compare", "--hf-dir", str(tiny), "--input-ids", "1,500")
    assert code == 2 and "--input-ids" in err and "500" in err


def test_not_a_megatron_checkpoint(tiny, tmp_path, capsys):
    code, err = _run(capsys, "megatron-to-hf", "--in-dir", str(tiny), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "megafork_qwen3.json" in err
