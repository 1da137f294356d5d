"""Prompt files of the toy task that trainer tests run on a tiny random Qwen3.

    train = write_sum_prompts(root / "train.jsonl", 6)         # "0+0=" .. "5+5=", 36 rows
    heldout = write_double_prompts(root / "heldout.jsonl", 4)  # "0*2=" .. "3*2=", 4 rows

Its usual reward is `megafork.testing.rewards:has_digit`.
"""
from __future__ import annotations

import json
from pathlib import Path


def _write(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_sum_prompts(path: str | Path, n: int = 6, n_b: int | None = None) -> Path:
    """Write {"prompt": "a+b=", "answer": "a+b"} for a in 0..n-1, b in 0..n_b-1 (default n) as jsonl, a-major.

    Returns:
        The path.
    """
    n_b = n if n_b is None else n_b
    return _write(path, [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(n) for b in range(n_b)])


def write_double_prompts(path: str | Path, n: int = 4) -> Path:
    """Write {"prompt": "a*2=", "answer": "2a"} for a in 0..n-1 as jsonl; returns the path."""
    return _write(path, [{"prompt": f"{a}*2=", "answer": str(2 * a)} for a in range(n)])
