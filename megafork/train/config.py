"""Typed run configuration: YAML file + dotted `key=value` overrides, validated before any work.

    cfg = load_config("examples/configs/tiny_cpu.yaml", ["forking.ratio=0.1", "optim.lr=3e-4"])
    cfg.save_resolved("runs/tiny/config.yaml")

Sections (one dataclass each, two levels deep): model, parallel, rollout, algo, forking, data,
optim, train, eval, log. The forking-token knobs live in their own `forking` section so the keys
read as in the paper and the issue: `forking.ratio`, `forking.mode`, `forking.scope`.

Defaults are the paper's settings (arXiv 2506.01939, released 14B DAPO script; REFERENCE.md).
Every value is checked against its field's type (enums are `Literal`s) and range; an unknown key,
a bad value or a malformed override raises `ConfigError` naming the key, what was expected and
what was found.

The sections live in `config_model` (model, optim), `config_rollout`, `config_algo` (algo, forking)
and `config_run` (data, train, eval, log); `megafork.distributed.ParallelConfig` is `parallel`.
This module holds the whole-run `Config`, its cross-section checks and the loading, and re-exports
every section class.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megafork.distributed import ParallelConfig
from megafork.train.config_algo import AlgoConfig, ForkingConfig
from megafork.train.config_model import ModelConfig, OptimConfig
from megafork.train.config_rollout import RolloutConfig
from megafork.train.config_run import DataConfig, EvalConfig, LogConfig, TrainConfig
from megafork.train.config_types import ConfigError, _check_types, _require, coerce

__all__ = [
    "SECTIONS", "AlgoConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "ForkingConfig", "LogConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "RolloutConfig", "TrainConfig", "load_config", "parse_override",
]


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "parallel": ParallelConfig, "rollout": RolloutConfig, "algo": AlgoConfig,
    "forking": ForkingConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
    "eval": EvalConfig, "log": LogConfig,
}


@dataclass
class Config:
    """A whole run. Build it with `load_config` (or `Config.from_dict`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    forking: ForkingConfig = field(default_factory=ForkingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            _require(isinstance(getattr(self, name), cls), name, f"a {cls.__name__}", getattr(self, name))
        # ParallelConfig checks ranges only; type-check it like our own sections.
        _check_types(self.parallel, "parallel")
        if not self.optim.grad_reduce_in_fp32:
            _require(self.model.dtype != "float32", "optim.grad_reduce_in_fp32",
                     "true with model.dtype='float32' (false only changes bf16/fp16 gradient buffers)", False)
        budget = self.train.max_tokens_per_microbatch
        if budget:
            _require(self.parallel.cp == 1, "train.max_tokens_per_microbatch",
                     f"0 with parallel.cp={self.parallel.cp} (packed rows are not split over context-parallel "
                     "ranks)", budget)
            multiple = self.parallel.tp if self.parallel.sequence_parallel else 1
            _require(budget >= multiple, "train.max_tokens_per_microbatch",
                     f">= parallel.tp={multiple} (sequence parallelism pads each packed row to a multiple of TP)",
                     budget)
        if self.train.rollout_ahead:
            _require(self.rollout.engine != "embedded", "train.rollout_ahead",
                     "0 with rollout.engine='embedded' (the embedded engine runs in the trainer's processes, so "
                     "generation cannot overlap training; use rollout.engine='sglang' with SGLang or megafork serve)",
                     self.train.rollout_ahead)
            if self.algo.rollout_correction == "none":
                warnings.warn("train.rollout_ahead=1 trains on samples from the previous step's weights; pair it "
                              "with algo.rollout_correction (token_tis, seq_tis or seq_mask) to correct for the lag",
                              UserWarning, stacklevel=2)
        if self.algo.overlong_shaping:
            _require(self.algo.overlong_buffer < self.rollout.max_response_len, "algo.overlong_buffer",
                     f"< rollout.max_response_len={self.rollout.max_response_len}", self.algo.overlong_buffer)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> Config:
        """Build from a nested dict {section: {field: value}}, coercing each value to its field type.

        Args:
            raw: the nested mapping (e.g. parsed YAML).
            source: where it came from, for messages.
        """
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections {sorted(SECTIONS)}, found {type(raw).__name__}")
        sections = {}
        for name, body in raw.items():
            if name not in SECTIONS:
                raise ConfigError(f"{source}: unknown section {name!r}{_suggest(name, SECTIONS)}; "
                                  f"known sections: {sorted(SECTIONS)}")
            body = {} if body is None else body
            if not isinstance(body, dict):
                raise ConfigError(f"{name}: expected a mapping of fields, found {body!r} ({type(body).__name__})")
            sec_cls = SECTIONS[name]
            hints = typing.get_type_hints(sec_cls)
            kwargs = {}
            for key, value in body.items():
                if key not in hints:
                    raise ConfigError(f"{name}.{key}: unknown key{_suggest(key, hints)}; known keys in "
                                      f"{name!r}: {sorted(hints)}")
                kwargs[key] = coerce(value, hints[key], f"{name}.{key}")
            try:
                sections[name] = sec_cls(**kwargs)
            except ConfigError:
                raise
            except ValueError as e:  # ParallelConfig raises ValueError with its own field names
                raise ConfigError(str(e)) from e
        return cls(**sections)

    def to_dict(self) -> dict:
        """Nested plain dict (YAML-safe) of every resolved value."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def save_resolved(self, path: str | Path) -> Path:
        """Write the fully resolved config as YAML (loadable by `load_config`).

        Args:
            path: the output file (parent directories are created).
        """
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return out


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_override(text: str) -> tuple[str, str, str]:
    """Split `section.key=value` into (section, key, value); the value stays a string.

    Args:
        text: one command-line override.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. optim.lr=1e-6), found no '='")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected a key of the form section.key (two levels, e.g. "
                          f"forking.ratio), found {key.strip()!r}")
    return parts[0], parts[1], value.strip()


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML run config and apply `section.key=value` overrides, validating everything.

    Args:
        path: YAML file (None = all defaults).
        overrides: dotted overrides; later ones win. Values are parsed to the field's type
            (lists as comma-separated strings).

    Raises:
        ConfigError: unknown section/key, unparsable or out-of-range value, malformed override.
    """
    raw: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {source!r}: expected an existing YAML file, found nothing there")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {source!r}: expected valid YAML, found a parse error: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {source!r}: expected a mapping of sections, found {type(raw).__name__}")
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        body = raw.setdefault(section, {})
        if body is None:
            body = raw[section] = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a mapping of fields, found {body!r}")
        body[key] = value
    return Config.from_dict(raw, source=source)
