"""The `megafork` command: `megafork train | convert | serve | analyze | plan`.

    torchrun --nproc_per_node=2 -m megafork train --config examples/configs/tiny_cpu.yaml
    megafork serve --model HF_DIR --port 30000

Each subcommand lives with its concept; this file only dispatches.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": ("megafork.train.cli", "RLVR training (DAPO on forking tokens)"),
    "serve": ("megafork.rollout.server", "SGLang-protocol HTTP server for the embedded engine"),
    "convert": ("megafork.models.qwen3.cli", "HF <-> Megatron checkpoint conversion"),
    "analyze": ("megafork.analysis.cli", "entropy statistics and forking-token tables of a run"),
    "plan": ("megafork.plan.cli", "per-GPU memory of a config on every pipeline stage (fits 80 GB?)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: megafork {" + ",".join(SUBCOMMANDS) + "} [args...]\n")
        for name, (_, text) in SUBCOMMANDS.items():
            print(f"  {name:<8} {text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"megafork: unknown subcommand {name!r}; expected one of {sorted(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
