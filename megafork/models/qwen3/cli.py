"""`megafork convert`: HF <-> megatron checkpoint conversion and the parity check against transformers.

    torchrun --nproc_per_node=4 -m megafork convert hf-to-megatron --hf-dir HF --out-dir CKPT --tp 2 --pp 2
    torchrun --nproc_per_node=2 -m megafork convert megatron-to-hf --in-dir CKPT --out-dir HF2 --tp 2
    torchrun --nproc_per_node=2 -m megafork convert compare --hf-dir HF [--megatron-dir CKPT] --tp 2 \\
        [--input-ids 1,2,3] [--dump-logits logits.pt]

A plain `python` runs one process. Inputs are validated (config.json, TP/PP divisibility, every
tensor's name and shape) before any process group or model is created. `tools/` holds the same
commands as standalone scripts.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from megafork.models.qwen3.config import Qwen3BuildOptions, check_parallel_layout, read_hf_config
from megafork.models.qwen3.hf_io import HFCheckpoint

COMMANDS = ("hf-to-megatron", "megatron-to-hf", "compare")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_world(tp: int, pp: int) -> None:
    world = _world_size()
    if world % (tp * pp):
        raise ValueError(f"--tp {tp} --pp {pp}: world size {world} (WORLD_SIZE) is not divisible by tp*pp = {tp * pp}")


def _layout_args(p: argparse.ArgumentParser, default_tp: int = 1) -> None:
    p.add_argument("--tp", type=int, default=default_tp, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafork convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF safetensors -> megatron dist_checkpointing")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out-dir", required=True)
    a.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    _layout_args(a)
    b = sub.add_parser("megatron-to-hf", help="megatron dist_checkpointing -> HF safetensors")
    b.add_argument("--in-dir", required=True)
    b.add_argument("--out-dir", required=True)
    b.add_argument("--max-shard-gb", type=float, default=4.0)
    _layout_args(b)
    c = sub.add_parser("compare", help="megafork logits vs transformers.Qwen3ForCausalLM")
    c.add_argument("--hf-dir", required=True)
    c.add_argument("--megatron-dir", default=None, help="load this checkpoint instead of the HF weights")
    c.add_argument("--input-ids", default=None, help="comma-separated token ids (default 1..16)")
    c.add_argument("--dump-logits", default=None, help="write megafork's [seq, vocab] fp32 logits here")
    c.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    c.add_argument("--tolerance", type=float, default=1e-4, help="max relative difference to pass")
    _layout_args(c)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one conversion command; returns the exit code (2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        return {"hf-to-megatron": hf_to_megatron, "megatron-to-hf": megatron_to_hf,
                "compare": compare}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"megafork convert {args.command}: error: {exc}", file=sys.stderr)
        return 2


def hf_to_megatron(args) -> int:
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import build_qwen3, load_hf_weights
    from megafork.models.qwen3.checkpoint import save_megatron_checkpoint

    hf = read_hf_config(args.hf_dir)
    check_parallel_layout(hf, args.tp, args.pp)
    _check_world(args.tp, args.pp)
    ckpt = HFCheckpoint(args.hf_dir)
    try:
        ckpt.check(hf)
    finally:
        ckpt.close()
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out-dir {out}: directory is not empty")

    groups = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp))
    opts = Qwen3BuildOptions(dtype=args.dtype, perform_initialization=False)
    model = build_qwen3(hf, opts, groups)
    load_hf_weights(model, args.hf_dir, groups)
    save_megatron_checkpoint(model, out, groups, opts, hf_dir=args.hf_dir)
    if groups.rank == 0:
        print(f"wrote {out} (tp={args.tp}, pp={args.pp}, dtype={args.dtype})")
    return 0


def megatron_to_hf(args) -> int:
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3.checkpoint import (
        build_from_megatron_checkpoint,
        read_checkpoint_meta,
        save_hf_checkpoint,
    )

    meta = read_checkpoint_meta(args.in_dir)
    hf = read_hf_config(meta["hf_config"])
    check_parallel_layout(hf, args.tp, args.pp)
    _check_world(args.tp, args.pp)
    groups = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp))
    model, _ = build_from_megatron_checkpoint(args.in_dir, groups)
    save_hf_checkpoint(model, groups, args.out_dir, copy_files_from=args.in_dir,
                       max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    if groups.rank == 0:
        print(f"wrote {args.out_dir}")
    return 0


def compare(args) -> int:
    import torch.distributed as dist

    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import build_qwen3, load_hf_weights
    from megafork.models.qwen3.checkpoint import build_from_megatron_checkpoint, read_checkpoint_meta
    from megafork.models.qwen3.forward import forward_logits

    hf = read_hf_config(args.hf_dir)
    check_parallel_layout(hf, args.tp, args.pp)
    _check_world(args.tp, args.pp)
    ids = _parse_ids(args.input_ids, hf.vocab_size)
    if args.megatron_dir is None:
        ckpt = HFCheckpoint(args.hf_dir)
        try:
            ckpt.check(hf)
        finally:
            ckpt.close()
    else:
        read_checkpoint_meta(args.megatron_dir)

    groups = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp))
    opts = Qwen3BuildOptions(dtype=args.dtype, perform_initialization=False)
    if args.megatron_dir is None:
        model = build_qwen3(hf, opts, groups)
        load_hf_weights(model, args.hf_dir, groups)
    else:
        model, _ = build_from_megatron_checkpoint(args.megatron_dir, groups, opts)
    logits = forward_logits(model, groups, ids.unsqueeze(0))
    # The last stage's first rank of DP replica 0 reports; everyone exits with its verdict.
    reporter = groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0
    ok = torch.ones(1)
    if reporter:
        from transformers import Qwen3ForCausalLM

        ref = Qwen3ForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            want = ref(ids.unsqueeze(0)).logits[0]
        got = logits[0].cpu()
        abs_err = (got - want).abs().max().item()
        rel_err = abs_err / max(want.abs().max().item(), 1e-12)
        passed = rel_err <= args.tolerance
        print(f"tp={args.tp} pp={args.pp} seq={ids.numel()} vocab={got.shape[-1]}: max abs diff {abs_err:.3e}, "
              f"max relative diff {rel_err:.3e} (tolerance {args.tolerance:g}) -> {'OK' if passed else 'FAIL'}")
        if args.dump_logits:
            torch.save(got.contiguous(), args.dump_logits)
            print(f"wrote logits [{got.shape[0]}, {got.shape[1]}] fp32 to {args.dump_logits}")
        ok.fill_(1.0 if passed else 0.0)
    if dist.is_initialized() and groups.world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return 0 if ok.item() == 1.0 else 1


def _parse_ids(text: str | None, vocab: int) -> torch.Tensor:
    if text is None:
        return torch.arange(1, 17) % vocab
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise ValueError(f"--input-ids {text!r}: expected comma-separated integers") from exc
    bad = [i for i in ids if not 0 <= i < vocab]
    if not ids or bad:
        raise ValueError(f"--input-ids: expected ids in [0, {vocab}), found {bad or 'none'}")
    return torch.tensor(ids)
