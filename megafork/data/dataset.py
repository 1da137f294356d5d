"""Tokenized prompt datasets: rows from `rows.py` encoded with the model directory's tokenizer.

    tok = load_tokenizer(cfg.model.hf_path)
    ds = PromptDataset.from_config(cfg.data, tok)       # every row checked and encoded up front
    ds[i].prompt_ids, ds[i].answer, ds[i].where

Chat-message prompts go through the tokenizer's chat template (with the generation prompt);
plain-string prompts are encoded as they are. Both are encoded without extra special tokens,
so the ids are exactly what the rollout engine is given.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from megafork.data.rows import BadRowError, PromptRow, parse_row, read_rows

log = logging.getLogger("megafork.data")

#: Files that carry a transformers tokenizer; a model directory needs one of them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Prompt:
    """One encoded prompt.

    Attributes:
        prompt_ids: token ids given to the rollout engine.
        answer: ground truth for the reward function.
        where: `file:line N` / `file:row N` of the source row.
    """

    prompt_ids: list[int]
    answer: str
    where: str


def load_tokenizer(model_dir: str | Path):
    """The tokenizer (and chat template) of an HF model directory.

    Args:
        model_dir: directory holding tokenizer.json / tokenizer_config.json.
    """
    from transformers import AutoTokenizer

    p = Path(model_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"model.hf_path {str(p)!r}: expected an HF model directory, found nothing there")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"model.hf_path {str(p)!r}: expected its tokenizer ({p / 'tokenizer.json'}), found "
                                "no tokenizer.json, tokenizer.model or vocab.json; copy the base model's tokenizer "
                                "files there")
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; name the directory
        raise ValueError(f"model.hf_path {str(p)!r}: could not load its tokenizer ({type(exc).__name__}: "
                         f"{exc})") from exc


def encode_prompt(tokenizer, prompt: str | list[dict], where: str = "prompt") -> list[int]:
    """Token ids of a prompt: the chat template for messages, the plain text otherwise.

    Args:
        tokenizer: a transformers tokenizer.
        prompt: a string or a list of chat messages.
        where: the row location, for messages.

    Raises:
        ValueError: messages were given but the tokenizer has no chat template.
    """
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(f"{where}: the prompt is a list of chat messages, so the tokenizer of {name!r} must "
                             f"have a chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
                             f"found none. Give plain-string prompts or use a model directory with a template.")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PromptDataset:
    """Every usable row of a dataset file, encoded.

    Args:
        path: jsonl or parquet file.
        tokenizer: the model's tokenizer.
        max_prompt_len: longest allowed prompt in tokens (longer rows are bad rows).
        on_bad_row: "error" raises BadRowError at the first bad row; "skip" drops bad rows, counts
            them in `skipped` and logs one warning with the count and the first few reasons.

    Attributes:
        prompts: the encoded prompts, in file order.
        skipped: number of rows dropped.
        skip_reasons: the message of every dropped row.
    """

    def __init__(self, path: str | Path, tokenizer, max_prompt_len: int = 2048, on_bad_row: str = "error"):
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row: expected 'error' or 'skip', found {on_bad_row!r}")
        self.path = str(path)
        self.prompts: list[Prompt] = []
        self.skip_reasons: list[str] = []
        for raw in read_rows(path):
            try:
                row: PromptRow = parse_row(raw)
                ids = encode_prompt(tokenizer, row.prompt, row.where)
                if len(ids) > max_prompt_len:
                    raise BadRowError(f"{row.where}: expected a prompt of at most data.max_prompt_len="
                                      f"{max_prompt_len} tokens, found {len(ids)}")
                if not ids:
                    raise BadRowError(f"{row.where}: expected a prompt that encodes to at least one token, found none")
            except BadRowError as e:
                if on_bad_row == "error":
                    raise
                self.skip_reasons.append(str(e))
                continue
            self.prompts.append(Prompt(prompt_ids=ids, answer=row.answer, where=row.where))
        if self.skip_reasons:
            shown = "; ".join(self.skip_reasons[:3])
            log.warning("dataset %s: skipped %d bad row(s) of %d (data.on_bad_row=skip): %s%s", self.path,
                        self.skipped, self.skipped + len(self.prompts), shown,
                        " ..." if self.skipped > 3 else "")
        if not self.prompts:
            raise ValueError(f"dataset {self.path!r}: expected at least one usable row, found none "
                             f"({self.skipped} skipped)")

    @property
    def skipped(self) -> int:
        return len(self.skip_reasons)

    @classmethod
    def from_config(cls, data_cfg, tokenizer, path: str | None = None) -> PromptDataset:
        """Build from a `megafork.train.config.DataConfig`.

        Args:
            data_cfg: the data section.
            tokenizer: the model's tokenizer.
            path: a file other than `data_cfg.train_path` (e.g. the eval set), same rules.
        """
        path = path or data_cfg.train_path
        if not path:
            raise ValueError("data.train_path: expected a .jsonl or .parquet file, found ''")
        return cls(path, tokenizer, max_prompt_len=data_cfg.max_prompt_len, on_bad_row=data_cfg.on_bad_row)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]
