"""Qwen3 checkpoints: megatron-core dist_checkpointing (reshardable) and HF safetensors export.

    save_megatron_checkpoint(model, ckpt_dir, groups, opts, hf_dir=hf_dir)
    model = build_from_megatron_checkpoint(ckpt_dir, groups)        # any TP/PP layout
    save_hf_checkpoint(model, groups, out_dir, copy_files_from=ckpt_dir)

A megatron checkpoint directory holds dist_checkpointing's files plus `megafork_qwen3.json`
(the HF config, the padded vocab and the dtype, so it can be rebuilt at any TP/PP) and copies
of the tokenizer/generation files, so HF export needs nothing but the checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megafork.models.qwen3.config import Qwen3BuildOptions, read_hf_config
from megafork.models.qwen3.hf_io import SAFETENSORS_INDEX, export_hf_tensors
from megafork.models.qwen3.model import Qwen3GPTModel, build_qwen3
from megafork.models.qwen3.spec_keys import match_checkpoint_keys, stored_keys

META_FILE = "megafork_qwen3.json"
# Files an HF checkpoint carries besides its weights; copied verbatim when present.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer and generation files from `src` to `dst`; returns the names copied."""
    copied = []
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def save_megatron_checkpoint(model: Qwen3GPTModel, ckpt_dir: str | Path, groups, opts: Qwen3BuildOptions,
                             hf_dir: str | Path | None = None) -> None:
    """Save the model with `dist_checkpointing` (every rank writes its shards). Call on all ranks.

    Args:
        model: this rank's stage.
        ckpt_dir: output directory (created; must be empty or absent).
        groups: this rank's `ParallelGroups`.
        opts: the build options the model was made with (dtype is recorded).
        hf_dir: HF source whose tokenizer/generation files are copied alongside.
    """
    from megatron.core import dist_checkpointing

    out = Path(ckpt_dir)
    if _rank0():
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out}: checkpoint directory is not empty")
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(out))
    if _rank0():
        meta = {"hf_config": model.hf_config.raw, "padded_vocab_size": model.vocab_size,
                "dtype": opts.dtype, "saved_with": {"tp": groups.tp_size, "pp": groups.pp_size}}
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        if hf_dir is not None:
            copy_side_files(hf_dir, out)
    _barrier()


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    """The megafork metadata of a megatron checkpoint, validated.

    Raises:
        FileNotFoundError / ValueError: naming the file and field.
    """
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {ckpt_dir} is not a megafork Qwen3 checkpoint "
                                "(write one with tools/convert_hf_to_megatron.py)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from exc
    for key in ("hf_config", "padded_vocab_size", "dtype"):
        if key not in meta:
            raise ValueError(f"{path}: field {key!r} is missing")
    return meta


def load_megatron_checkpoint(model: Qwen3GPTModel, ckpt_dir: str | Path) -> None:
    """Load a dist_checkpointing checkpoint into `model`, resharding to the model's TP/PP.

    The checkpoint may come from another layer spec (local or transformer-engine): norm names
    and `_extra_state` are matched by `spec_keys.match_checkpoint_keys`.

    Args:
        model: a stage built for the current layout with the checkpoint's padded vocab
            (`build_from_megatron_checkpoint` does both).
        ckpt_dir: checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    meta = read_checkpoint_meta(ckpt_dir)
    if meta["padded_vocab_size"] != model.vocab_size:
        raise ValueError(f"{Path(ckpt_dir) / META_FILE}: padded_vocab_size {meta['padded_vocab_size']} "
                         f"but the model was built with {model.vocab_size}")
    # Spec-neutral: a local-spec checkpoint loads into a TE model and vice versa.
    sharded = match_checkpoint_keys(model.sharded_state_dict(), stored_keys(ckpt_dir), str(ckpt_dir))
    state = dist_checkpointing.load(sharded, str(ckpt_dir))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{ckpt_dir}: state dict mismatch; missing {missing}, unexpected {unexpected}")


def build_from_megatron_checkpoint(ckpt_dir: str | Path, groups, opts: Qwen3BuildOptions | None = None):
    """Build the model for this rank's layout from a checkpoint's metadata and load it.

    Args:
        ckpt_dir: checkpoint directory written by `save_megatron_checkpoint`.
        groups: this rank's `ParallelGroups` (any TP/PP the config divides).
        opts: build options; default: the checkpoint's dtype, no initialisation.

    Returns:
        (model, opts).
    """
    meta = read_checkpoint_meta(ckpt_dir)
    hf = read_hf_config(meta["hf_config"])
    hf = dataclasses.replace(hf, source=str(Path(ckpt_dir) / META_FILE))
    padded = meta["padded_vocab_size"]
    if padded % groups.tp_size:
        raise ValueError(f"{Path(ckpt_dir) / META_FILE}: padded_vocab_size {padded} is not divisible by "
                         f"tensor-parallel size {groups.tp_size}")
    opts = opts or Qwen3BuildOptions(dtype=meta["dtype"], perform_initialization=False)
    model = build_qwen3(hf, opts, groups, padded_vocab=padded)
    load_megatron_checkpoint(model, ckpt_dir)
    return model, opts


def save_hf_checkpoint(model: Qwen3GPTModel, groups, out_dir: str | Path, copy_files_from: str | Path | None = None,
                       max_shard_bytes: int = 4 << 30) -> None:
    """Write the model as an HF checkpoint: safetensors shards + index, config.json, side files.

    Call on every rank; tensors stream to global rank 0 one at a time (`export_hf_tensors`),
    which holds at most one shard (`max_shard_bytes`) in memory and writes it.

    Args:
        model: this rank's stage.
        groups: this rank's `ParallelGroups`.
        out_dir: output directory (created).
        copy_files_from: directory whose tokenizer/generation files are copied.
        max_shard_bytes: size of each safetensors shard.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    rank0 = _rank0()
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, shard_files, weight_map, total = 0, [], {}, 0

    def flush():
        nonlocal pending, pending_bytes
        name = f"shard-{len(shard_files):05d}.tmp"
        save_file({k: v.cpu() for k, v in pending.items()}, str(out / name), metadata={"format": "pt"})
        shard_files.append((name, list(pending)))
        pending, pending_bytes = {}, 0

    for name, tensor in export_hf_tensors(model, groups):
        nbytes = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + nbytes > max_shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += nbytes
        total += nbytes
    if rank0:
        if pending:
            flush()
        n = len(shard_files)
        for i, (tmp, names) in enumerate(shard_files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (out / tmp).rename(out / final)
            weight_map.update({k: final for k in names})
        (out / SAFETENSORS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        raw = dict(model.hf_config.raw)
        dtype_key = "torch_dtype" if "torch_dtype" in raw else "dtype"
        raw[dtype_key] = _DTYPE_NAMES[next(model.parameters()).dtype]
        (out / "config.json").write_text(json.dumps(raw, indent=2))
        if copy_files_from is not None:
            copy_side_files(copy_files_from, out)
    _barrier()
