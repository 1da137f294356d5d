"""Reading prompt rows from jsonl or parquet, and checking their shape.

Two row shapes are accepted:
- `{"prompt": str | [chat messages], "answer": str}`;
- DAPO-Math-17k: `{"prompt": [chat messages], "reward_model": {"ground_truth": str, ...}, ...}`.

Chat messages are `{"role": "system"|"user"|"assistant", "content": str}`. Every row keeps where it
came from (`file:line N` for jsonl, `file:row N` for parquet, both 1-based) so a bad row is named.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")


class BadRowError(ValueError):
    """A dataset row is malformed; the message starts with `file:line N` or `file:row N`."""


@dataclass(frozen=True)
class RawRow:
    """One undecoded row and its location."""

    where: str
    data: object


@dataclass(frozen=True)
class PromptRow:
    """A checked row: `prompt` is a string or a list of chat messages; `answer` the ground truth."""

    where: str
    prompt: str | list[dict]
    answer: str


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield every row of a `.jsonl`/`.json` (one object per line) or `.parquet` file.

    A jsonl line that is not valid UTF-8 or not valid JSON is yielded as a RawRow whose `data` is
    the decode error, so the caller decides (error or skip) like for any other bad row. Blank
    lines are not rows. A file that cannot be read (or a .parquet file that is not parquet) raises
    `ValueError` naming the path.

    Args:
        path: the dataset file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset {str(p)!r}: expected a .jsonl or .parquet file, found nothing there")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        try:
            f = p.open("rb")  # bytes: a line that is not UTF-8 is one bad row, not the end of the file
        except OSError as e:
            raise ValueError(f"dataset {str(p)!r}: cannot read it ({e.strerror or e})") from e
        with f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield RawRow(f"{p}:line {lineno}", e)
                    continue
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as e:
                    data = e
                yield RawRow(f"{p}:line {lineno}", data)
    elif suffix == ".parquet":
        yield from _parquet_rows(p)
    else:
        raise ValueError(f"dataset {str(p)!r}: expected a .jsonl, .json or .parquet file, found suffix {suffix!r}")


def _parquet_rows(p: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=4096):
            for data in batch.to_pylist():
                index += 1
                yield RawRow(f"{p}:row {index}", data)
    except (pa.ArrowException, OSError) as e:
        where = f"{p} after row {index}" if index else str(p)
        raise ValueError(f"dataset {where!r}: expected a readable parquet file, found {type(e).__name__}: {e}") from e


def _check_messages(msgs: list, where: str) -> list[dict]:
    if not msgs:
        raise BadRowError(f"{where}: expected 'prompt' to hold at least one chat message, found an empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise BadRowError(f"{where}: expected prompt[{i}] to be {{'role': one of {list(ROLES)}, "
                              f"'content': str}}, found {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer_text(value, key: str, where: str) -> str:
    # JSON numbers are common in answer columns; they are exact as text. bool/None are not answers.
    if isinstance(value, bool) or value is None or not isinstance(value, str | int | float):
        raise BadRowError(f"{where}: expected {key} to be a string (or number), found {value!r}")
    text = str(value).strip()
    if not text:
        raise BadRowError(f"{where}: expected {key} to be a non-empty answer, found {value!r}")
    return text


def parse_row(raw: RawRow) -> PromptRow:
    """Check a row's shape and return its prompt and answer.

    Args:
        raw: a row from `read_rows`.

    Raises:
        BadRowError: naming the row's file and line, the expected shape and what was found.
    """
    where, data = raw.where, raw.data
    if isinstance(data, json.JSONDecodeError):
        raise BadRowError(f"{where}: expected a JSON object, found invalid JSON ({data.msg} at column {data.colno})")
    if isinstance(data, UnicodeDecodeError):
        raise BadRowError(f"{where}: expected UTF-8 text, found byte {data.object[data.start]:#04x} at column "
                          f"{data.start + 1} ({data.reason})")
    if not isinstance(data, dict):
        raise BadRowError(f"{where}: expected an object with 'prompt' and 'answer' (or 'reward_model.ground_truth'), "
                          f"found {type(data).__name__}")
    if "prompt" not in data:
        raise BadRowError(f"{where}: expected a 'prompt' field, found keys {sorted(data)}")
    prompt = data["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRowError(f"{where}: expected a non-empty prompt, found {prompt!r}")
    elif isinstance(prompt, list):
        prompt = _check_messages(prompt, where)
    else:
        raise BadRowError(f"{where}: expected 'prompt' to be a string or a list of chat messages, "
                          f"found {type(prompt).__name__}")
    has_answer = data.get("answer") is not None
    rm = data.get("reward_model")
    has_gt = isinstance(rm, dict) and rm.get("ground_truth") is not None
    if not has_answer and not has_gt:
        raise BadRowError(f"{where}: expected 'answer' or 'reward_model.ground_truth', found keys {sorted(data)}"
                          + (f" and reward_model={rm!r}" if rm is not None else ""))
    answer = _answer_text(data["answer"], "'answer'", where) if has_answer else None
    if has_gt:
        gt = _answer_text(rm["ground_truth"], "'reward_model.ground_truth'", where)
        if answer is not None and answer != gt:
            raise BadRowError(f"{where}: 'answer' ({answer!r}) and 'reward_model.ground_truth' ({gt!r}) disagree; "
                              f"expected one answer")
        answer = gt
    return PromptRow(where=where, prompt=prompt, answer=answer)
