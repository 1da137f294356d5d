"""`megafork train`: RLVR training from a YAML config plus dotted overrides.

    torchrun --nproc_per_node=2 -m megafork train --config examples/configs/tiny_cpu.yaml
    megafork train --config examples/configs/qwen3_8b.yaml train.steps=10 forking.ratio=0.2

The config is fully validated before any work (unknown keys and bad values name the key, the
expected value and the value found) and saved as `runs/<name>/config.yaml`.
"""
from __future__ import annotations

import argparse
import logging
import os

from megafork.train.config import ConfigError, load_config
from megafork.train.preflight import check_inputs, check_launch, prepare_run_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megafork train", description="DAPO on forking tokens (megatron-core)")
    p.add_argument("--config", required=True, help="YAML config (see examples/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=4")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_inputs(cfg)
        check_launch(cfg, args.config)
    except ConfigError as e:
        p.exit(2, f"megafork train: {e}\n")
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines are per-bucket/per-config dumps
    if rank == 0:
        try:
            prepare_run_dir(cfg)
        except ConfigError as e:
            p.exit(2, f"megafork train: {e}\n")
    from tqdm.contrib.logging import logging_redirect_tqdm

    from megafork.train.loop import train

    with logging_redirect_tqdm():  # log lines print above the progress bar, not through it
        summary = train(cfg)
    if rank == 0:
        print(f"megafork train: done; summary {summary} in {cfg.log.run_dir}")
    return 0
