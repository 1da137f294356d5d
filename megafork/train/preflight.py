"""Checks `megafork train` makes after the config loads and before any work: inputs and launch.

The config's own validation checks each value's type and range; these need the file system and
the process environment: the required paths are set and hold what they must, and the process
layout asks for no more ranks than were launched.
"""
from __future__ import annotations

import os
from pathlib import Path

from megafork.data.dataset import TOKENIZER_FILES
from megafork.train.config_types import ConfigError
from megafork.train.storage import storage_error


def check_inputs(cfg) -> None:
    """Required paths are set, and `model.hf_path` is an HF model directory with a tokenizer.

    Args:
        cfg: the loaded `Config`.

    Raises:
        ConfigError: naming the key, what was expected and what was found.
    """
    for key, value, what in (("model.hf_path", cfg.model.hf_path, "an HF model directory (config.json, safetensors, "
                                                                   "tokenizer)"),
                             ("data.train_path", cfg.data.train_path, "a .jsonl or .parquet file of prompts")):
        if not value.strip():
            raise ConfigError(f"{key}: expected {what}, found an empty path; set it in the YAML file or as "
                              f"{key}=PATH")
    hf = Path(cfg.model.hf_path)
    if not hf.is_dir():
        raise ConfigError(f"model.hf_path: expected an HF model directory, found "
                          f"{'a file' if hf.exists() else 'nothing'} at {str(hf)!r}")
    if not (hf / "config.json").is_file():
        raise ConfigError(f"model.hf_path: expected {hf / 'config.json'}, found no such file (files: "
                          f"{sorted(p.name for p in hf.iterdir())[:10]})")
    if not any((hf / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.hf_path: expected a tokenizer in {hf} ({hf / 'tokenizer.json'}), found none of "
                          f"{list(TOKENIZER_FILES)}; copy the tokenizer files of the base model there")
    for key, value in (("data.train_path", cfg.data.train_path), ("eval.path", cfg.eval.path)):
        if value and not Path(value).is_file():
            raise ConfigError(f"{key}: expected a .jsonl or .parquet file, found nothing at {value!r}")


def check_launch(cfg, config_path: str, env: dict | None = None) -> None:
    """A multi-rank layout (tp*pp*cp > 1) needs a launcher; say how to start it when there is none.

    Args:
        cfg: the loaded `Config`.
        config_path: the `--config` argument, quoted in the suggested command.
        env: the process environment (default `os.environ`).

    Raises:
        ConfigError: the layout needs N ranks and this is a single process outside torchrun.
    """
    env = os.environ if env is None else env
    par = cfg.parallel
    need = par.tp * par.pp * par.cp
    if need > 1 and "WORLD_SIZE" not in env:
        raise ConfigError(f"parallel.tp={par.tp} x parallel.pp={par.pp} x parallel.cp={par.cp}: expected at least "
                          f"{need} processes, found 1 (this process was not started by torchrun). Launch it with\n"
                          f"  torchrun --nproc_per_node={need} -m megafork train --config {config_path} ...\n"
                          f"(with the venv active, or as .venv/bin/torchrun), or set parallel.tp/pp/cp to 1")


def prepare_run_dir(cfg) -> None:
    """Create `log.dir/log.run_name` and save the resolved config there (rank 0).

    Raises:
        ConfigError: the directory cannot be created or written, naming `log.dir` and why.
    """
    run_dir = cfg.log.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_resolved(run_dir / "config.yaml")
    except OSError as exc:
        reason = storage_error(exc, run_dir, "creating the run directory").reason
        raise ConfigError(f"log.dir={cfg.log.dir!r}: expected a directory this process can write; {reason}") from exc
