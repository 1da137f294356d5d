"""Prompt datasets: jsonl/parquet rows ({"prompt", "answer"} or DAPO-Math-17k), encoded with the
model's tokenizer and chat template, plus a deterministic resumable DP-sharded sampler.

    tok = load_tokenizer(cfg.model.hf_path)
    ds = PromptDataset.from_config(cfg.data, tok)
    sampler = PromptSampler(len(ds), cfg.train.prompts_per_step, cfg.train.seed, cfg.data.shuffle,
                            dp_rank=groups.dp_rank, dp_size=groups.dp_size)
    step_prompts = [ds[i] for i in sampler.next_batch()]
"""
from megafork.data.dataset import Prompt, PromptDataset, encode_prompt, load_tokenizer
from megafork.data.rows import BadRowError, PromptRow, RawRow, parse_row, read_rows
from megafork.data.sampler import PromptSampler

__all__ = ["BadRowError", "Prompt", "PromptDataset", "PromptRow", "PromptSampler", "RawRow", "encode_prompt",
           "load_tokenizer", "parse_row", "read_rows"]
