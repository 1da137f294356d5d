"""What a run directory holds, as far as analysis is concerned, and how to read it.

    runs/<name>/
      config.yaml              the resolved config (`Config.save_resolved`); `model.hf_path` names the tokenizer
      metrics.jsonl            one JSON object per step; keys below
      entropy_step{N}.pt       optional per-step dumps of response-token entropies (format below)
      plots/                   written by `megafork analyze RUN_DIR`

metrics.jsonl: every line has "step" (int). The plots read METRIC_REWARD, METRIC_ACCURACY and
METRIC_EVAL_ACCURACY when present; the other names are the trainer's standard keys (see
METRIC_KEYS) so tools agree on spelling.

entropy_step{N}.pt is a `torch.save`d dict over the step's valid response tokens, flattened in
(response, position) order:
    "step": int, "ratio": float, "threshold": float (the entropy cut actually used),
    "token_ids": int64 [T], "entropy": float32 [T], "selected": bool [T],
    "response_index": int64 [T] (which response), "position": int64 [T] (index within it).
`write_entropy_dump` writes it and `read_entropy_dump` checks it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

METRIC_REWARD = "reward_mean"
METRIC_ACCURACY = "accuracy"
METRIC_EVAL_ACCURACY = "eval_accuracy"
METRIC_KEYS = (
    "step", METRIC_REWARD, METRIC_ACCURACY, METRIC_EVAL_ACCURACY, "response_len_mean",
    "entropy_p50", "entropy_p80", "entropy_p95", "entropy_threshold", "selected_fraction", "selected_count",
    "clip_fraction_low", "clip_fraction_high", "grad_norm", "lr", "logprob_gap",
    "seconds_rollout", "seconds_old_pass", "seconds_update", "seconds_sync", "tokens_per_second",
    "mismatch_kl", "is_weight_mean", "is_weight_max", "is_truncated_fraction", "is_masked_fraction",
    "staleness_mean", "staleness_max", "rollout_weight_version", "seconds_rollout_wait",
)
DUMP_RE = re.compile(r"^entropy_step(\d+)\.pt$")
DUMP_FIELDS = {"token_ids": torch.int64, "entropy": torch.float32, "selected": torch.bool,
               "response_index": torch.int64, "position": torch.int64}


def read_metrics(path: str | Path, notes: list[str] | None = None) -> list[dict]:
    """Rows of a metrics.jsonl, in file order.

    A last line cut off mid-write (a run killed while logging, or still running) is skipped, and
    a note says so; a bad line anywhere else is an error.

    Args:
        path: the metrics.jsonl file.
        notes: where to append that note (default: dropped silently).

    Raises:
        ValueError: a line other than the last is not a JSON object with an integer "step" (names
            file and line).
    """
    rows = []
    p = Path(path)
    lines = [(n, line) for n, line in enumerate(p.read_text().splitlines(), 1) if line.strip()]
    for i, (lineno, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                if notes is not None:
                    notes.append(f"{p}:line {lineno}: skipped the last line, cut off mid-write ({e.msg}): "
                                 f"{line[:60]!r}")
                break
            raise ValueError(f"{p}:line {lineno}: expected a JSON object, found invalid JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{p}:line {lineno}: expected an object with an integer 'step', found {line[:80]!r}")
        rows.append(row)
    return rows


def dump_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"entropy_step{step}.pt"


def write_entropy_dump(run_dir: str | Path, step: int, token_ids: torch.Tensor, entropy: torch.Tensor,
                       selected: torch.Tensor, response_index: torch.Tensor, position: torch.Tensor,
                       ratio: float, threshold: float) -> Path:
    """Write `entropy_step{step}.pt` (format in the module docstring); 1-D tensors of one length.

    Args:
        run_dir: the run directory.
        step: training step.
        token_ids, entropy, selected, response_index, position: per valid response token.
        ratio: the configured forking ratio.
        threshold: the entropy threshold used for selection.
    """
    data = {"token_ids": token_ids, "entropy": entropy, "selected": selected,
            "response_index": response_index, "position": position}
    data = {k: v.detach().reshape(-1).to("cpu", DUMP_FIELDS[k]) for k, v in data.items()}
    _check_dump(data, f"entropy dump for step {step}")
    out = dump_path(run_dir, step)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".pt.tmp")
    torch.save({"step": int(step), "ratio": float(ratio), "threshold": float(threshold), **data}, tmp)
    tmp.replace(out)  # readers never see a half-written dump
    return out


def _check_dump(data: dict, where: str) -> None:
    lengths = set()
    for key, dtype in DUMP_FIELDS.items():
        t = data.get(key)
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != dtype:
            found = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(type(t))
            raise ValueError(f"{where}: expected {key!r} to be a 1-D {dtype} tensor, found {found}")
        lengths.add(t.numel())
    if len(lengths) != 1:
        raise ValueError(f"{where}: expected every per-token field to have one length, found lengths "
                         f"{ {k: data[k].numel() for k in DUMP_FIELDS} }")


def read_entropy_dump(path: str | Path) -> dict:
    """Load and check an entropy dump.

    Args:
        path: an `entropy_step{N}.pt` file.
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict, found {type(data).__name__}")
    for key in ("step", "ratio", "threshold"):
        if key not in data:
            raise ValueError(f"{path}: expected a {key!r} entry, found keys {sorted(data)}")
    _check_dump(data, str(path))
    return data


def list_dumps(run_dir: str | Path) -> dict[int, Path]:
    """{step: path} of every entropy dump in `run_dir`, sorted by step."""
    found = {int(m.group(1)): p for p in Path(run_dir).iterdir() if (m := DUMP_RE.match(p.name))}
    return dict(sorted(found.items()))
