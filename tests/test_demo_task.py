"""The demo's task, tokenizer, tiny Qwen3 and warm start: answers verify, the tokenizer is a real HF one."""
from __future__ import annotations

import random

import pytest

from megafork.demo.model import DemoModelConfig, create_demo_model
from megafork.demo.sft import SFTConfig, perturb_answer, sft_batch, warm_start
from megafork.demo.task import LEVELS, ArithmeticTask, Problem
from megafork.rewards import get_reward


@pytest.mark.parametrize("difficulty", sorted(LEVELS))
def test_answers_are_verified_by_the_reward(difficulty):
    task = ArithmeticTask(difficulty)
    dapo = get_reward("dapo")
    for p in task.sample(200, seed=difficulty):
        assert eval(p.expression) == int(p.answer) >= 0  # the expression is plain integer arithmetic
        operands, digits, ops = LEVELS[difficulty]
        assert p.expression.count("+") + p.expression.count("-") == operands - 1
        assert dapo(p.response, p.answer) == 1.0
        assert dapo(f"Answer: {int(p.answer) + 1}", p.answer) == -1.0
        assert dapo(p.prompt, p.answer) == -1.0  # the prompt holds no answer
    assert task.sample(5, seed=3) == task.sample(5, seed=3) != task.sample(5, seed=4)


def test_split_is_disjoint_and_errors():
    train, held = ArithmeticTask(2).split(2000, 100, seed=0)
    assert len(held) == 100 and len({p.expression for p in held}) == 100
    assert not {p.expression for p in train} & {p.expression for p in held}
    with pytest.raises(ValueError, match=r"ArithmeticTask.difficulty: expected one of \[1, 2, 3, 4, 5\], found 9"):
        ArithmeticTask(9)
    with pytest.raises(ValueError, match="fewer than 500 distinct problems"):
        ArithmeticTask(1).split(10, 500, seed=0)  # one-digit sums: only 100 exist


def test_perturbed_answers_are_wrong():
    rng = random.Random(0)
    dapo = get_reward("dapo")
    for p in ArithmeticTask(3).sample(200, seed=0):
        q = perturb_answer(p, rng)
        assert len(q.answer) == len(p.answer) and sum(a != b for a, b in zip(p.answer, q.answer)) == 1
        assert dapo(q.response, p.answer) == -1.0 and not (len(q.answer) > 1 and q.answer[0] == "0")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return create_demo_model(tmp_path_factory.mktemp("demo") / "hf", ArithmeticTask(2),
                             DemoModelConfig(hidden_size=32, intermediate_size=64, head_dim=8))


def test_model_dir_is_a_real_hf_checkpoint(hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.vocab_size == 64 >= len(tok)
    assert model.config.eos_token_id == tok.eos_token_id == tok.pad_token_id
    p = Problem("47+38", "85")
    ids = tok(p.prompt + p.response, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Compute 47+38.\nAnswer: 85"
    # Digits are single tokens, as in Qwen's tokenizer, and no merge spans prompt and response.
    assert [tok.decode([i]) for i in tok("Answer: 85", add_special_tokens=False)["input_ids"]][-2:] == ["8", "5"]
    assert ids == (tok(p.prompt, add_special_tokens=False)["input_ids"]
                   + tok(p.response, add_special_tokens=False)["input_ids"])
    chat = tok.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nCompute 47+38.\n<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="DemoModelConfig.num_attention_heads: expected a multiple of"):
        DemoModelConfig(num_attention_heads=3)
    with pytest.raises(ValueError, match="DemoModelConfig.vocab_size: the task tokenizer has"):
        create_demo_model(hf_dir.parent / "small", ArithmeticTask(2), DemoModelConfig(vocab_size=8))


def test_sft_batch_masks_the_prompt(hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids, mask, labels = sft_batch(tok, [Problem("1+2", "3"), Problem("47+38", "85")])
    for row in range(2):
        n = int(mask[row].sum())
        targets = labels[row][labels[row] != -100]
        assert tok.decode(targets[:-1]) == ["Answer: 3", "Answer: 85"][row] and targets[-1] == tok.eos_token_id
        assert (labels[row, n:] == -100).all() and (ids[row, n:] == tok.pad_token_id).all()


def test_warm_start_runs_and_saves(hf_dir, tmp_path):
    cfg = SFTConfig(steps=4, batch_size=8, train_problems=64, heldout_problems=8, check_every=2, threads=1)
    stats = warm_start(hf_dir, tmp_path / "sft", ArithmeticTask(2), cfg, log=lambda _: None)
    assert stats["steps"] == 4 and [c["step"] for c in stats["curve"]] == [2, 4]
    assert 0.0 <= stats["heldout_accuracy"] <= 1.0 and (tmp_path / "sft" / "model.safetensors").is_file()
    for bad, msg in [(dict(lr=0.0), "SFTConfig.lr"), (dict(answer_noise=1.0), "SFTConfig.answer_noise"),
                     (dict(steps=0), "SFTConfig.steps"), (dict(target_accuracy=2.0), "SFTConfig.target_accuracy")]:
        with pytest.raises(ValueError, match=msg):
            SFTConfig(**bad)


def test_task_rows_load_through_the_dataset(hf_dir, tmp_path):
    from megafork.data import PromptDataset, load_tokenizer
    from megafork.demo.prepare import write_jsonl

    problems = ArithmeticTask(2).sample(20, seed=5)
    path = write_jsonl(tmp_path / "train.jsonl", [p.as_row() for p in problems])
    tok = load_tokenizer(hf_dir)
    ds = PromptDataset(path, tok, max_prompt_len=32)
    assert [p.answer for p in ds.prompts] == [p.answer for p in problems]
    assert tok.decode(ds[3].prompt_ids) == problems[3].prompt
