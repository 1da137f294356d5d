"""Create the demo's tiny Qwen3 in HF format, with the task tokenizer beside it.

    from megafork.demo.model import DemoModelConfig, create_demo_model
    hf_dir = create_demo_model("runs/tiny/hf_init", ArithmeticTask(2), DemoModelConfig())

The directory is what a user's HF checkpoint looks like (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja), written by
`Qwen3ForCausalLM.save_pretrained` and `PreTrainedTokenizerFast.save_pretrained`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megafork.demo.task import ArithmeticTask
from megafork.demo.tokenizer import build_task_tokenizer


@dataclass
class DemoModelConfig:
    """Shape of the demo model (a Qwen3 with the real architecture, only smaller).

    Attributes:
        vocab_size: embedding rows; the task tokenizer must fit (it is padded up to this).
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, head_dim: the usual Qwen3 shape fields.
        max_position_embeddings: longest prompt + response.
        tie_word_embeddings: tie the LM head to the embedding (as Qwen3 <= 4B does).
    """

    vocab_size: int = 64
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 64
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for name, value in asdict(self).items():
            if name == "tie_word_embeddings":
                if not isinstance(value, bool):
                    raise ValueError(f"DemoModelConfig.{name}: expected a bool, found {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DemoModelConfig.{name}: expected an integer >= 1, found {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"DemoModelConfig.num_attention_heads: expected a multiple of num_key_value_heads="
                f"{self.num_key_value_heads}, found {self.num_attention_heads}")


def create_demo_model(out_dir: str | Path, task: ArithmeticTask, shape: DemoModelConfig | None = None,
                      seed: int = 0) -> Path:
    """Write a randomly initialised tiny Qwen3 plus the task tokenizer to `out_dir`.

    Args:
        out_dir: destination directory (created).
        task: the task whose corpus trains the tokenizer.
        shape: model shape; DemoModelConfig() when None.
        seed: seed for the tokenizer corpus and the weights.

    Returns:
        `out_dir` as a Path.
    """
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    shape = shape or DemoModelConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_task_tokenizer(task.corpus(seed=seed), vocab_size=shape.vocab_size)
    if len(tok) > shape.vocab_size:
        raise ValueError(f"DemoModelConfig.vocab_size: the task tokenizer has {len(tok)} ids, "
                         f"expected at most vocab_size={shape.vocab_size}")
    cfg = Qwen3Config(
        **asdict(shape), rope_theta=1_000_000.0, rms_norm_eps=1e-6, attention_dropout=0.0,
        hidden_act="silu", bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=True, temperature=1.0, top_p=1.0)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
