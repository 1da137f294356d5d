"""Tiny random Qwen3 checkpoints in HF format, for tests and benchmarks.

    from megafork.testing.tiny_qwen3 import make_tiny_qwen3
    hf_dir = make_tiny_qwen3(tmp_path / "hf", num_key_value_heads=1, tie_word_embeddings=False)

The checkpoint is written by `transformers.Qwen3ForCausalLM.save_pretrained`, so it is exactly
what a user's HF directory looks like (config.json, model.safetensors, generation_config.json),
plus a small character-level `tokenizer.json` so that text-based paths work too.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_DEFAULTS = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_dropout=0.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def make_tiny_qwen3(out_dir: str | Path, seed: int = 0, init_std: float = 0.2, **overrides) -> Path:
    """Write a random tiny Qwen3 to `out_dir` and return the path.

    Args:
        out_dir: destination directory (created).
        seed: torch seed for the random weights.
        init_std: std of the random init; larger than HF's 0.02 so logits are not flat.
        **overrides: any `transformers.Qwen3Config` field (defaults in TINY_DEFAULTS).
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen3Config(**{**TINY_DEFAULTS, **overrides})
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, init_std)
    model.save_pretrained(out, safe_serialization=True)
    write_char_tokenizer(out, cfg.vocab_size)
    return out


def write_char_tokenizer(out_dir: str | Path, vocab_size: int) -> None:
    """Write a character-level `tokenizer.json` (ids 0-2 are <pad>, <s>, </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    chars = [chr(c) for c in range(32, 127)][: max(0, vocab_size - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<pad>",
    }, indent=2))
