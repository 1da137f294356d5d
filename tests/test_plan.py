"""`megafork plan`: exact per-stage parameter counts, the JSON contract, exit codes and fixes.

    .venv/bin/python -m pytest tests/test_plan.py -q

Parameter counts: the planner builds each stage of Qwen3-8B/14B/32B (their released config.json
shapes, tests/fixtures/) on the meta device at the TP/PP of examples/configs/; they must equal
an independent count from the shapes (every megatron weight, TP-sharded or replicated, vocab padded
to 128·TP), whose TP=1/PP=1 total equals transformers' own Qwen3 built on the meta device.
The activation formulas are checked against autograd in tests/test_plan_activations.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megafork.models.qwen3 import read_hf_config
from megafork.models.qwen3.config import padded_vocab_size
from megafork.plan.cli import main
from megafork.plan.params import stage_param_counts
from megafork.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CONFIGS = ROOT / "examples" / "configs"
MODELS = {"qwen3_8b": "qwen3_8b", "qwen3_14b": "qwen3_14b", "qwen3_32b": "qwen3_32b", "qwen3_32b_29k": "qwen3_32b"}
GPUS = {"qwen3_8b": 32, "qwen3_14b": 64, "qwen3_32b": 128, "qwen3_32b_29k": 128}


def shape_count(hf, tp: int, pp: int, stage: int, vocab: int | None = None) -> int:
    """Parameters of one GPU of `stage`, counted from the shapes."""
    h, d, f = hf.hidden_size, hf.head_dim, hf.intermediate_size
    a, g = hf.num_attention_heads, hf.num_key_value_heads
    layer = ((a + 2 * g) * d * h + a * d * h + 3 * f * h) // tp + 2 * h + 2 * d  # linears / tp; norms, q/k norms
    v = padded_vocab_size(hf.vocab_size, tp) if vocab is None else vocab
    n = hf.num_hidden_layers // pp * layer
    if stage == 0:
        n += v // tp * h
    if stage == pp - 1:
        n += h + (0 if hf.tie_word_embeddings else v // tp * h)
    return n


@pytest.mark.parametrize("name", ["qwen3_8b", "qwen3_14b", "qwen3_32b"])
def test_shape_count_is_transformers_own_count(name):
    from transformers import AutoConfig, Qwen3ForCausalLM

    hf = read_hf_config(FIXTURES / name)
    with torch.device("meta"):
        ref = Qwen3ForCausalLM(AutoConfig.from_pretrained(FIXTURES / name))
    assert sum(p.numel() for p in ref.parameters()) == shape_count(hf, 1, 1, 0, vocab=hf.vocab_size)


@pytest.mark.parametrize("name", ["qwen3_8b", "qwen3_14b", "qwen3_32b"])
def test_planner_params_equal_the_meta_build_at_each_configs_layout(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    hf = read_hf_config(FIXTURES / name)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    counts = stage_param_counts(hf, tp, pp)
    assert counts == [shape_count(hf, tp, pp, s) for s in range(pp)], (name, counts)


def test_every_tp_rank_holds_the_same_count():
    hf = read_hf_config(FIXTURES / "qwen3_8b")
    assert stage_param_counts(hf, 4, 2, tp_ranks="all") == [shape_count(hf, 4, 2, s) for s in range(2)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shipped_gpu_configs_fit_85_percent_of_80gb(name, capsys):
    code = main(["--config", str(CONFIGS / f"{name}.yaml"), "--gpus", str(GPUS[name]), "--gpu-mem-gb", "80", "--json",
                 f"model.hf_path={FIXTURES / MODELS[name]}"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"] is True and out["gpu_mem_gib"] == 80.0
    assert len(out["stages"]) == load_config(CONFIGS / f"{name}.yaml").parallel.pp
    for s in out["stages"]:
        assert set(s) == {"stage", "params", "weights_gib", "grads_gib", "optimizer_gib", "activations_gib",
                          "other_gib", "total_gib"}
        assert s["total_gib"] <= 0.85 * 80
        parts = s["weights_gib"] + s["grads_gib"] + s["optimizer_gib"] + s["activations_gib"] + s["other_gib"]
        assert abs(parts - s["total_gib"]) < 0.01


def test_options_before_overrides_exit_1_and_the_cheapest_fix(capsys):
    # 32B at one replica, without the memory knobs: does not fit; the table names a knob.
    args = ["--config", str(CONFIGS / "qwen3_32b.yaml"), "--gpu-mem-gb", "80", f"model.hf_path={FIXTURES / 'qwen3_32b'}",
            "parallel.sequence_parallel=false", "model.recompute=none", "model.recompute_method=uniform",
            "model.recompute_num_layers=1"]
    assert main(args) == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "model.recompute=full" in text
    assert main(args[:4] + ["--json"] + args[4:]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["stages"][0]["params"] == 2_048_335_872
    # The distributed optimizer shards Adam over DP: 12 bytes/param -> 12/dp.
    assert main(args[:4] + ["--json", "--gpus", "128"] + args[4:] + ["optim.distributed_optimizer=true"]) in (0, 1)
    sharded = json.loads(capsys.readouterr().out)["stages"][0]["optimizer_gib"]
    assert abs(sharded * 8 - out["stages"][0]["optimizer_gib"]) < 0.01


def test_bad_input_exits_2_naming_it(tmp_path, capsys):
    cfg = str(CONFIGS / "qwen3_8b.yaml")
    with pytest.raises(SystemExit) as e:
        main(["--config", cfg, "model.recompute=sometimes"])
    assert e.value.code == 2 and "model.recompute: expected one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--config", cfg])  # model.hf_path is empty in the shipped config
    assert e.value.code == 2 and "model.hf_path" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--config", cfg, f"model.hf_path={tmp_path}"])
    assert e.value.code == 2 and "config.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--config", cfg, "--gpus", "6", f"model.hf_path={FIXTURES / 'qwen3_8b'}"])
    assert e.value.code == 2 and "--gpus: expected a multiple of parallel.tp*pp*cp = 4" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_workspace_formula_is_what_the_fused_head_allocates(dtype):
    """`head_workspace_bytes` against the peak bytes the trainer's head really holds (CPU, aten level).

    Shapes where every term is >= 9% of the total, every row selected (the worst case), the weight
    under megatron's main_grad contract. For a bf16 weight the CPU also holds fp32 copies of the
    weight and of a block's gradient operand (it has no mixed-dtype products; CUDA does not use
    them), added explicitly.
    """
    from megafork.ops import fused_head_policy_loss
    from megafork.plan.memory import head_workspace_bytes
    from megafork.testing.live_bytes import LiveBytes

    t, h_dim, v, chunk = 4096, 128, 2000, 128
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(t, h_dim, generator=g).to(dtype).requires_grad_()
    weight = torch.nn.Parameter((0.2 * torch.randn(v, h_dim, generator=g)).to(dtype))
    weight.main_grad, weight.grad_added_to_main_grad = torch.zeros(v, h_dim), False
    labels = torch.randint(0, v, (t,), generator=g)
    old, adv = torch.randn(t, generator=g) - 7.0, torch.randn(t, generator=g)
    with LiveBytes() as probe:
        loss, _ = fused_head_policy_loss(hidden, weight, labels, old, adv, torch.ones(t, dtype=torch.bool),
                                         normalizer=t, chunk_size=chunk)
        held = probe.live
        loss.backward()
    p = torch.finfo(dtype).bits // 8
    predicted = head_workspace_bytes(t, h_dim, v, chunk, p) + ((v * h_dim + chunk * v) * 4 if p < 4 else 0)
    assert abs(probe.peak - predicted) <= 0.05 * predicted, (probe.peak, predicted)
    # Held from forward to backward: the hidden gradient and the fp32 weight gradient (+ vectors).
    assert t * h_dim * p + v * h_dim * 4 <= held <= t * h_dim * p + v * h_dim * 4 + t * 32, held


def test_packing_and_cpu_offload_are_planned(capsys):
    """A packed micro-batch is one row of the token budget (or one longer sequence); cpu_offload
    puts the optimizer state on the host. Neither may be ignored by the plan."""
    base = ["--config", str(CONFIGS / "qwen3_8b.yaml"), "--json", "--gpus", "32",
            f"model.hf_path={FIXTURES / 'qwen3_8b'}"]

    def stage0(*overrides):
        main(base + list(overrides))
        return json.loads(capsys.readouterr().out)["stages"][0]

    ref = stage0()
    longest = 2048 + 20480  # the shipped config's max_prompt_len + max_response_len, micro_batch_size 1
    assert stage0(f"train.max_tokens_per_microbatch={longest // 2}") == ref  # a lone longer sequence
    packed = stage0(f"train.max_tokens_per_microbatch={2 * longest}")
    assert packed["activations_gib"] > 1.9 * ref["activations_gib"], (packed, ref)
    offload = stage0("optim.cpu_offload=true")
    assert ref["optimizer_gib"] > 0 and offload["optimizer_gib"] == 0
    assert offload["total_gib"] < ref["total_gib"] - ref["optimizer_gib"]
