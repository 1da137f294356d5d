"""A real `tokenizer.json` for the demo task, trained with HF `tokenizers`.

    from megafork.demo.tokenizer import build_task_tokenizer
    tok = build_task_tokenizer(ArithmeticTask(2).corpus())   # transformers PreTrainedTokenizerFast
    tok.save_pretrained(hf_dir)

It is a BPE with Qwen-style single-digit splitting and a Qwen-style chat template, so loading it
with `AutoTokenizer.from_pretrained(hf_dir)` exercises the same code paths as a real Qwen3
checkpoint; only the vocabulary is small (about 64 ids) to keep the demo model tiny.
"""
from __future__ import annotations

from collections.abc import Iterable

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIALS = [EOS, IM_START, IM_END]

# Qwen's template, reduced to what the demo's prompts need (no tools, no thinking blocks).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_task_tokenizer(corpus: Iterable[str], vocab_size: int = 64, chat_template: bool = True):
    """Train a small BPE on `corpus` and wrap it as a `transformers` fast tokenizer.

    Args:
        corpus: training texts (the task's prompts and responses).
        vocab_size: target vocabulary size, special tokens included.
        chat_template: attach CHAT_TEMPLATE so chat-message prompts work.

    Returns:
        A `PreTrainedTokenizerFast` whose eos and pad token is `<|endoftext|>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus)
    alphabet = sorted({c for t in texts for c in t} | {" ", "\n"})
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # Digits one by one (as Qwen does) so numbers are never merged into opaque chunks; Metaspace
    # keeps spaces reversible without a byte-level alphabet of 256 symbols.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=[c if c != " " else "\u2581" for c in alphabet],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast
