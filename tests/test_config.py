"""Run config: defaults are the paper's, YAML + overrides parse to field types, every error names its key."""
from __future__ import annotations

from pathlib import Path

import pytest

from megafork.distributed import ParallelConfig
from megafork.train.config import (
    SECTIONS,
    AlgoConfig,
    Config,
    ConfigError,
    ForkingConfig,
    OptimConfig,
    load_config,
    parse_override,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"


def test_defaults_are_the_papers_settings():
    c = Config()
    assert (c.algo.clip_low, c.algo.clip_high, c.algo.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert c.algo.normalizer == "all_tokens" and c.algo.n == 16
    assert (c.algo.overlong_buffer, c.algo.overlong_penalty, c.algo.max_sampling_rounds) == (4096, 1.0, 10)
    assert (c.forking.ratio, c.forking.mode, c.forking.scope) == (0.2, "top", "step")
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay, c.optim.grad_clip) == (1e-6, 10, 0.1, 1.0)
    assert (c.train.prompts_per_step, c.train.minibatch_prompts) == (512, 32)
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.max_response_len) == (1.0, 1.0, 20480)
    assert (c.eval.temperature, c.eval.top_p, c.eval.k) == (1.0, 0.7, 16)
    assert isinstance(c.parallel, ParallelConfig)


def test_yaml_and_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  n: 8\noptim:\n  lr: 1e-4\nforking:\n  mode: random\nparallel:\n  tp: 2\n")
    c = load_config(path, ["optim.lr=3e-5", "forking.ratio=0.5", "algo.dynamic_sampling=false", "train.steps=7",
                           "rollout.sglang_urls=http://h:1, http://h:2", "log.run_name=123", "optim.min_lr=0"])
    assert c.optim.lr == 3e-5 and isinstance(c.optim.lr, float)  # YAML reads "1e-4" as a string
    assert c.algo.n == 8 and c.forking.mode == "random" and c.forking.ratio == 0.5 and c.parallel.tp == 2
    assert c.algo.dynamic_sampling is False and c.train.steps == 7 and c.log.run_name == "123"
    assert c.rollout.sglang_urls == ["http://h:1", "http://h:2"] and c.optim.min_lr == 0.0
    assert parse_override("optim.lr = 1e-6") == ("optim", "lr", "1e-6")
    assert parse_override("data.train_path=a=b.jsonl") == ("data", "train_path", "a=b.jsonl")


def test_save_resolved_roundtrip(tmp_path):
    c = load_config(None, ["forking.scope=local", "algo.normalizer=selected_tokens", "parallel.pp=2"])
    out = c.save_resolved(tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert again == c and again.to_dict() == c.to_dict()
    assert set(again.to_dict()) == set(SECTIONS)


ERRORS = [
    # unknown keys and sections
    (["algo.clip_lo=0.1"], r"algo.clip_lo: unknown key \(did you mean 'clip_low'\?\); known keys in 'algo': \["),
    (["forkng.ratio=0.1"], r"unknown section 'forkng' \(did you mean 'forking'\?\)"),
    # bad types
    (["optim.lr=fast"], r"optim.lr: expected a float, found 'fast' \(str\)"),
    (["train.steps=2.5"], r"train.steps: expected an integer, found '2.5' \(str\)"),
    (["algo.dynamic_sampling=maybe"], r"algo.dynamic_sampling: expected a bool \(true/false\), found 'maybe'"),
    (["parallel.tp=two"], r"parallel.tp: expected an integer, found 'two'"),
    # bad enum values
    (["forking.mode=middle"], r"forking.mode: expected one of \['top', 'bottom', 'random', 'all'\], found 'middle'"),
    (["forking.scope=global"], r"forking.scope: expected one of \['step', 'minibatch', 'microbatch', 'local'\]"),
    (["algo.normalizer=tokens"], r"algo.normalizer: expected one of \['all_tokens', 'selected_tokens'\], found 'tokens'"),
    (["data.on_bad_row=ignore"], r"data.on_bad_row: expected one of \['error', 'skip'\], found 'ignore'"),
    (["train.resume="], r"train.resume: expected 'auto', 'none' or a checkpoint path, found ''"),
    # out of range
    (["forking.ratio=0"], r"forking.ratio: expected a float in \(0, 1\], found 0.0"),
    (["forking.ratio=1.5"], r"forking.ratio: expected a float in \(0, 1\], found 1.5"),
    (["algo.n=1"], r"algo.n: expected an integer >= 2 \(GRPO needs a group\), found 1"),
    (["algo.clip_ratio_c=1"], r"algo.clip_ratio_c: expected a float > 1, found 1.0"),
    (["optim.lr=-1"], r"optim.lr: expected > 0, found -1.0"),
    (["optim.adam_beta2=1"], r"optim.adam_beta2: expected a float in \[0, 1\), found 1.0"),
    (["optim.min_lr=1"], r"optim.min_lr: expected <= optim.lr=1e-06, found 1.0"),
    (["parallel.tp=0"], r"parallel.tp: expected an integer >= 1, found 0"),
    (["parallel.backend=mpi"], r"parallel.backend: expected 'auto', 'gloo' or 'nccl', found 'mpi'"),
    (["rollout.top_p=0"], r"rollout.top_p: expected a float in \(0, 1\], found 0.0"),
    (["rollout.engine=sglang"], r"rollout.sglang_urls: expected at least one URL when rollout.engine='sglang', found \[\]"),
    (["rollout.sglang_urls=localhost:3000"], r"rollout.sglang_urls\[0\]: expected an http\(s\):// URL, found 'localhost:3000'"),
    (["train.prompts_per_step=100"], r"train.prompts_per_step: expected a multiple of train.minibatch_prompts=32, found 100"),
    (["rollout.max_response_len=1024"], r"algo.overlong_buffer: expected < rollout.max_response_len=1024, found 4096"),
    (["log.run_name=a/b"], r"log.run_name: expected a non-empty name without '/', found 'a/b'"),
    # memory knobs: a combination megatron would reject, or a knob the chosen mode would not read
    (["parallel.sequence_parallel=true"], r"parallel.sequence_parallel: expected false with parallel.tp=1"),
    (["model.recompute=partial"], r"model.recompute: expected one of \['none', 'selective', 'full'\]"),
    (["model.recompute_num_layers=2"], r"model.recompute_num_layers: expected to be left unset \(it is read only "
                                       r"with model.recompute='full', this config has 'none'\), found 2"),
    (["model.recompute=selective", "model.recompute_method=block"], r"model.recompute_method: expected to be left unset"),
    (["model.recompute=full", "model.recompute_modules=mlp"], r"model.recompute_modules: expected to be left unset "
                                                             r"\(it is read only with model.recompute='selective'"),
    (["model.recompute=full", "model.recompute_num_layers=0"], r"model.recompute_num_layers: expected > 0, found 0"),
    (["model.recompute=selective", "model.recompute_modules="], r"model.recompute_modules: expected at least one of"),
    (["model.recompute=selective", "model.recompute_modules=attn"], r"model.recompute_modules\[0\]: expected one of "
                                                                   r"\['core_attn', 'mlp', 'layernorm'\], found 'attn'"),
    (["model.recompute=selective", "model.recompute_modules=mlp,mlp"], r"model.recompute_modules: expected no repeated"),
    (["model.recompute=selective", "model.recompute_modules=layernorm"],
     r"model.recompute_modules: expected no 'layernorm' with model.transformer_impl='local'"),
    (["model.recompute_method=diagonal"], r"model.recompute_method: expected one of \['uniform', 'block'\]"),
    (["model.head_chunk_tokens=-1"], r"model.head_chunk_tokens: expected >= 0, found -1"),
    (["optim.overlap_param_gather=true"], r"optim.overlap_param_gather: expected false unless "
                                          r"optim.distributed_optimizer=true"),
    (["optim.overlap_param_gather=true", "optim.distributed_optimizer=true"],
     r"optim.overlap_param_gather: expected false unless optim.overlap_grad_reduce=true"),
    (["optim.cpu_offload=true"], r"optim.cpu_offload: expected false unless optim.distributed_optimizer=true"),
    (["optim.grad_reduce_in_fp32=false", "model.dtype=float32"],
     r"optim.grad_reduce_in_fp32: expected true with model.dtype='float32'"),
    (["optim.distributed_optimizer=sometimes"], r"optim.distributed_optimizer: expected a bool"),
    # bad override syntax
    (["optim.lr"], r"override 'optim.lr': expected section.key=value \(e.g. optim.lr=1e-6\), found no '='"),
    (["lr=1e-6"], r"override 'lr=1e-6': expected a key of the form section.key .* found 'lr'"),
    (["a.b.c=1"], r"override 'a.b.c=1': expected a key of the form section.key .* found 'a.b.c'"),
    (["optim.=1"], r"found 'optim.'"),
]


@pytest.mark.parametrize("overrides,message", ERRORS)
def test_every_error_names_key_expected_and_found(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml': expected an existing YAML file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("algo: [1, 2\n", r"expected valid YAML, found a parse error"),
        ("- 1\n- 2\n", r"expected a mapping of sections, found list"),
        ("algo: 3\n", r"algo: expected a mapping of fields, found 3 \(int\)"),
        ("algo:\n  clip_high: [0.2]\n", r"algo.clip_high: expected a float, found \[0.2\] \(list\)"),
        ("train:\n  steps: true\n", r"train.steps: expected an integer, found True \(bool\)"),
        ("model:\n  dtype: fp8\n", r"model.dtype: expected one of \['float32', 'bfloat16', 'float16'\], found 'fp8'"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(bad)


def test_post_init_validates_direct_construction():
    with pytest.raises(ConfigError, match=r"forking.mode: expected one of .* found 'x'"):
        ForkingConfig(mode="x")
    with pytest.raises(ConfigError, match=r"algo.clip_low: expected a float, found '0.2' \(str\)"):
        AlgoConfig(clip_low="0.2")
    with pytest.raises(ValueError, match=r"parallel.tp: expected an integer >= 1, found 2.0"):
        Config(parallel=ParallelConfig(tp=2.0))  # ParallelConfig's own check
    with pytest.raises(ConfigError, match=r"parallel.seed: expected an integer, found 'x' \(str\)"):
        Config(parallel=ParallelConfig(seed="x"))  # a field ParallelConfig leaves unchecked
    assert OptimConfig(lr=1).lr == 1.0 and isinstance(OptimConfig(lr=1).lr, float)


def test_memory_knobs_load_and_reach_the_build_options():
    c = load_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true", "model.recompute=full",
                           "model.recompute_method=block", "model.recompute_num_layers=3",
                           "optim.distributed_optimizer=true", "optim.overlap_grad_reduce=true",
                           "optim.overlap_param_gather=true", "optim.grad_reduce_in_fp32=false"])
    assert c.parallel.sequence_parallel and c.optim.overlap_param_gather and not c.optim.grad_reduce_in_fp32
    assert c.model.build_options() == {"recompute_granularity": "full", "recompute_method": "block",
                                       "recompute_num_layers": 3}
    sel = load_config(None, ["model.recompute=selective", "model.recompute_modules=core_attn,mlp"])
    assert sel.model.build_options() == {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]}
    assert load_config(None).model.build_options() == {} and load_config(None).model.head_chunk_tokens == 0


@pytest.mark.parametrize("name", ["tiny_cpu", "qwen3_8b", "qwen3_14b", "qwen3_32b", "qwen3_32b_29k"])
def test_example_configs_load(name):
    c = load_config(EXAMPLES / f"{name}.yaml")
    assert c.forking.ratio == 0.2 and c.forking.mode == "top"
    if name != "tiny_cpu":
        # The paper's released settings.
        assert (c.algo.n, c.train.prompts_per_step, c.train.minibatch_prompts) == (16, 512, 32)
        assert (c.optim.lr, c.optim.weight_decay) == (1e-6, 0.1)
        assert c.rollout.max_response_len == (29696 if name.endswith("29k") else 20480)
        assert c.parallel.sequence_parallel and c.optim.distributed_optimizer  # what makes them fit (megafork plan)
        assert c.eval.top_p == 0.7 and c.model.transformer_impl == "transformer_engine"


@pytest.mark.parametrize("override", ["optim.lr=inf", "algo.oversample=inf", "optim.min_lr=nan",
                                      "algo.clip_high=-inf", "rollout.temperature=1e999"])
def test_non_finite_floats_are_rejected(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: expected a finite number, found -?(inf|nan)$"):
        load_config(None, [override])


def test_a_field_may_document_inf():
    import dataclasses

    from megafork.train.config_types import _check_types

    @dataclasses.dataclass
    class Section:
        cap: float = dataclasses.field(default=float("inf"), metadata={"allow_inf": True})
        lr: float = 1.0

    _check_types(Section(), "s")  # inf where documented is fine
    with pytest.raises(ConfigError, match=r"s.cap: expected a finite number, found nan"):
        _check_types(Section(cap=float("nan")), "s")
    with pytest.raises(ConfigError, match=r"s.lr: expected a finite number, found inf"):
        _check_types(Section(lr=float("inf")), "s")


def test_train_cli_preflight_names_key_and_how_to_launch(tmp_path, capsys, monkeypatch):
    from megafork.testing.tiny_qwen3 import make_tiny_qwen3
    from megafork.train.cli import main

    hf = make_tiny_qwen3(tmp_path / "hf")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def fails(*overrides) -> str:
        with pytest.raises(SystemExit) as info:
            main(["--config", str(EXAMPLES / "tiny_cpu.yaml"), f"log.dir={tmp_path / 'runs'}", *overrides])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "--model" not in err, err  # a serve flag means nothing to train
        return err

    assert "model.hf_path: expected an HF model directory" in fails("model.hf_path=", f"data.train_path={data}")
    assert "found an empty path" in fails("model.hf_path=", f"data.train_path={data}")
    assert "data.train_path: expected a .jsonl or .parquet file of prompts, found an empty path" in fails(
        f"model.hf_path={hf}", "data.train_path=")
    (hf / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    err = fails(f"model.hf_path={hf}", f"data.train_path={data}")
    assert f"model.hf_path: expected a tokenizer in {hf} ({hf / 'tokenizer.json'})" in err, err
    (tmp_path / "tokenizer.json").rename(hf / "tokenizer.json")
    (hf / "config.json").unlink()
    assert f"model.hf_path: expected {hf / 'config.json'}, found no such file" in fails(
        f"model.hf_path={hf}", f"data.train_path={data}")
    hf = make_tiny_qwen3(tmp_path / "hf2")
    err = fails(f"model.hf_path={hf}", f"data.train_path={data}", "eval.path=", "parallel.tp=2", "parallel.pp=2")
    assert "parallel.tp=2 x parallel.pp=2 x parallel.cp=1: expected at least 4 processes, found 1" in err, err
    assert f"torchrun --nproc_per_node=4 -m megafork train --config {EXAMPLES / 'tiny_cpu.yaml'}" in err, err
