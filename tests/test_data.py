"""Prompt datasets: both row shapes from jsonl and parquet, chat templates, bad rows, the sampler."""
from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megafork.data import BadRowError, PromptDataset, PromptSampler, encode_prompt, load_tokenizer
from megafork.demo.task import ArithmeticTask
from megafork.demo.tokenizer import build_task_tokenizer
from megafork.train.config import DataConfig


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = ArithmeticTask(4).corpus(500) + ["Solve this problem carefully"]
    build_task_tokenizer(corpus, vocab_size=80).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def tok_no_template(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_plain")
    build_task_tokenizer(ArithmeticTask(2).corpus(200), chat_template=False).save_pretrained(d)
    return load_tokenizer(d)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


MSGS = [{"role": "user", "content": "Compute 1+2."}]
DAPO_ROW = {"data_source": "math_dapo", "prompt": MSGS, "ability": "MATH",
            "reward_model": {"ground_truth": "3", "style": "rule"}, "extra_info": {"index": "a"}}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_both_shapes_from_jsonl_and_parquet(tmp_path, tok, fmt):
    rows = [{"prompt": "Compute 12+7.\n", "answer": "19"}, {"prompt": MSGS, "answer": 3}, DAPO_ROW]
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    else:
        # A real DAPO-Math-17k parquet holds only the DAPO shape; a mixed file needs one schema.
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist([DAPO_ROW, {**DAPO_ROW, "reward_model": {"ground_truth": "-4",
                                                                                     "style": "rule"}}]), path)
    ds = PromptDataset(path, tok)
    if fmt == "jsonl":
        assert len(ds) == 3 and [p.answer for p in ds.prompts] == ["19", "3", "3"]
        assert ds[0].prompt_ids == tok("Compute 12+7.\n", add_special_tokens=False)["input_ids"]
        assert ds[0].where.endswith("d.jsonl:line 1")
    else:
        assert [p.answer for p in ds.prompts] == ["3", "-4"] and ds[1].where.endswith("d.parquet:row 2")
    chat = tok.decode(ds[-1].prompt_ids if fmt == "jsonl" else ds[0].prompt_ids)
    assert chat == "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"


def test_messages_without_chat_template_is_a_clear_error(tmp_path, tok_no_template):
    path = write_jsonl(tmp_path / "d.jsonl", [DAPO_ROW])
    with pytest.raises(ValueError, match=r"d.jsonl:line 1: .*chat messages.*chat template.*found none"):
        PromptDataset(path, tok_no_template)
    # Plain strings need no template.
    assert encode_prompt(tok_no_template, "Compute 1+2.\n") == tok_no_template("Compute 1+2.\n")["input_ids"]


BAD_ROWS = [
    ("{not json", r"line 2: expected a JSON object, found invalid JSON"),
    ({"question": "x", "answer": "1"}, r"line 2: expected a 'prompt' field, found keys \['answer', 'question'\]"),
    ({"prompt": "Compute 1+1.", "reward_model": {"style": "rule"}}, r"line 2: expected 'answer' or 'reward_model"),
    ({"prompt": 5, "answer": "1"}, r"line 2: expected 'prompt' to be a string or a list of chat messages, found int"),
    ({"prompt": [{"role": "bot", "content": "x"}], "answer": "1"}, r"line 2: expected prompt\[0\] to be"),
    ({"prompt": [], "answer": "1"}, r"line 2: .*at least one chat message"),
    ({"prompt": "Compute 1+1.", "answer": None, "reward_model": {"ground_truth": True}}, r"line 2: expected 'reward_model.ground_truth' to be a string"),
    ({"prompt": "Compute 1+1.", "answer": "2", "reward_model": {"ground_truth": "3"}}, r"line 2: .*disagree"),
    ({"prompt": "Compute 1+1.", "answer": "  "}, r"line 2: expected 'answer' to be a non-empty answer"),
    ({"prompt": "Compute " + "1+" * 30 + "1.", "answer": "31"}, r"line 2: expected a prompt of at most data.max_prompt_len=32 tokens, found \d+"),
    ([1, 2], r"line 2: expected an object .* found list"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_bad_row_error_names_file_and_line(tmp_path, tok, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Compute 1+1.", "answer": "2"}, bad])
    with pytest.raises(BadRowError, match=message) as info:
        PromptDataset(path, tok, max_prompt_len=32)
    assert str(info.value).startswith(str(path) + ":line 2: ")


def test_bad_rows_skipped_are_counted_and_logged(tmp_path, tok, caplog):
    good = [{"prompt": f"Compute {i}+1.", "answer": str(i + 1)} for i in range(3)]
    rows = [good[0], "{oops", good[1], {"prompt": "Compute 1+1."}, "", good[2], {"prompt": 1, "answer": "1"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="megafork.data"):
        ds = PromptDataset.from_config(DataConfig(train_path=str(path), on_bad_row="skip", max_prompt_len=64), tok)
    assert [p.answer for p in ds.prompts] == ["1", "2", "3"]
    assert ds.skipped == 3
    assert [r.split(": ")[0].rsplit(":", 1)[1] for r in ds.skip_reasons] == ["line 2", "line 4", "line 7"]
    assert "skipped 3 bad row(s) of 6" in caplog.text and "mixed.jsonl:line 2" in caplog.text
    with pytest.raises(BadRowError, match="mixed.jsonl:line 2"):
        PromptDataset(path, tok, on_bad_row="error")


def test_file_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PromptDataset(tmp_path / "nope.jsonl", tok)
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(ValueError, match=r"expected a .jsonl, .json or .parquet file, found suffix '.csv'"):
        PromptDataset(tmp_path / "d.csv", tok)
    path = write_jsonl(tmp_path / "allbad.jsonl", ["{x"])
    with pytest.raises(ValueError, match="expected at least one usable row, found none"):
        PromptDataset(path, tok, on_bad_row="skip")
    with pytest.raises(ValueError, match="data.train_path"):
        PromptDataset.from_config(DataConfig(), tok)


def test_sampler_is_deterministic_sharded_and_resumable():
    n, b = 10, 4
    ref = PromptSampler(n, b, seed=7)
    stream = [ref.next_global_batch() for _ in range(6)]  # 24 draws: crosses two epoch ends
    flat = [i for batch in stream for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # reshuffled per epoch
    assert PromptSampler(n, b, seed=8).next_global_batch() != stream[0]
    assert PromptSampler(n, b, seed=7, shuffle=False).next_global_batch() == [0, 1, 2, 3]
    # Two DP ranks split every global batch into contiguous halves.
    ranks = [PromptSampler(n, b, seed=7, dp_rank=r, dp_size=2) for r in range(2)]
    for batch in stream:
        assert ranks[0].next_batch() + ranks[1].next_batch() == batch
    # Resume mid-epoch reproduces the rest of the stream.
    a = PromptSampler(n, b, seed=7)
    a.next_global_batch(), a.next_global_batch(), a.next_global_batch()
    b2 = PromptSampler(n, b, seed=7)
    b2.load_state_dict(a.state_dict())
    assert [b2.next_global_batch() for _ in range(3)] == stream[3:]


def test_sampler_errors():
    with pytest.raises(ValueError, match="prompts_per_step: expected a positive multiple of the DP size 4, found 6"):
        PromptSampler(10, 6, seed=0, dp_rank=0, dp_size=4)
    with pytest.raises(ValueError, match="dp_rank=2, dp_size=2"):
        PromptSampler(10, 4, seed=0, dp_rank=2, dp_size=2)
    state = PromptSampler(10, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"expected seed=1 \(this run\), found 0"):
        PromptSampler(10, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"expected num_rows=11 \(this run\), found 10"):
        PromptSampler(11, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        PromptSampler(10, 4, seed=0).load_state_dict({**state, "position": 10})


def test_undecodable_lines_are_bad_rows_and_unreadable_files_name_the_path(tmp_path, tok):
    good = [json.dumps({"prompt": f"Compute {i}+1.", "answer": str(i + 1)}).encode() for i in range(2)]
    latin1 = '{"prompt": "Caf\xe9 1+1.", "answer": "2"}'.encode("latin-1")  # 0xe9 alone is not UTF-8
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([good[0], latin1, good[1]]) + b"\n")
    with pytest.raises(BadRowError, match=r"mixed.jsonl:line 2: expected UTF-8 text, found byte 0xe9 at column 16"):
        PromptDataset(path, tok, on_bad_row="error")
    ds = PromptDataset(path, tok, on_bad_row="skip")
    assert [p.answer for p in ds.prompts] == ["1", "2"] and ds.skipped == 1
    assert ds.skip_reasons[0].startswith(f"{path}:line 2: expected UTF-8")

    fake = tmp_path / "fake.parquet"
    fake.write_text('{"prompt": "not parquet", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"dataset '.*fake.parquet': expected a readable parquet file, found Arrow"):
        PromptDataset(fake, tok)
    locked = tmp_path / "dir.jsonl"
    locked.mkdir()  # exists but is not a readable file
    with pytest.raises(FileNotFoundError, match="dir.jsonl"):
        PromptDataset(locked, tok)
