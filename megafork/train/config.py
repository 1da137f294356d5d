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
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from megafork.algo.rollout_correction import check_correction
from megafork.distributed import ParallelConfig
from megafork.rollout.deploy import check_master_addr
from megafork.train.config_model import ModelConfig, OptimConfig
from megafork.train.config_types import ConfigError, _check_types, _positive, _require, coerce

# --------------------------------------------------------------------------------------------------
# Sections.

@dataclass
class RolloutConfig:
    """Response generation.

    Attributes:
        engine: "embedded" (transformers, in the trainer's processes) or "sglang" (HTTP servers).
        sglang_urls: base URLs of SGLang servers (required when engine is "sglang").
        temperature: sampling temperature (the paper samples at 1.0; entropies are at this T).
        top_p: nucleus threshold.
        top_k: top-k cut (-1 = off).
        max_response_len: response token cap (paper: 20,480).
        batch_size: prompts per generate call of the embedded engine.
        weight_sync_bucket_mb: bucket size for weight sync to the engine.
        weight_sync_checksum: verify a checksum of every synced bucket.
        max_inflight_per_server: open `/generate` requests per SGLang server (one per prompt group).
        request_timeout_s: timeout of one `/generate` request; it is then retried on another server.
        request_retries: extra attempts per request after a timeout or a 5xx.
        step_timeout_minutes: how long the other ranks wait (on gloo, not NCCL) for rank 0's rollout.
        weight_sync_master_addr: the address SGLang servers use to reach trainer rank 0 for weight
            sync ("" = detected: the local address that routes to the first server).
        weight_sync_port: TCP port of the weight-update rendezvous on rank 0 (0 = a free one).
        weight_sync_timeout_s: timeout of the weight-update rendezvous, broadcasts and HTTP calls.
        sglang_launch: rank 0 starts the SGLang servers itself (`python -m sglang.launch_server`)
            on its node, from `model.hf_path`; `sglang_urls` must then be empty.
        sglang_launch_servers: servers to launch.
        sglang_launch_tp: GPUs (tensor parallelism) per launched server.
        sglang_launch_base_gpu_id: first GPU of the launched servers; they must not overlap the
            trainer's GPUs on that node (0 .. LOCAL_WORLD_SIZE - 1).
        sglang_launch_base_port: server i listens on base_port + i.
        sglang_launch_args: extra `sglang.launch_server` flags.
    """

    engine: Literal["embedded", "sglang"] = "embedded"
    sglang_urls: list[str] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_response_len: int = 20480
    batch_size: int = 64
    weight_sync_bucket_mb: int = 512
    weight_sync_checksum: bool = False
    max_inflight_per_server: int = 64
    request_timeout_s: float = 3600.0
    request_retries: int = 2
    step_timeout_minutes: float = 480.0
    weight_sync_master_addr: str = ""
    weight_sync_port: int = 0
    weight_sync_timeout_s: float = 600.0
    sglang_launch: bool = False
    sglang_launch_servers: int = 1
    sglang_launch_tp: int = 1
    sglang_launch_base_gpu_id: int = 0
    sglang_launch_base_port: int = 30000
    sglang_launch_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        _check_types(self, "rollout")
        _positive(self, "rollout", "temperature", "max_response_len", "batch_size", "weight_sync_bucket_mb",
                  "max_inflight_per_server", "request_timeout_s", "step_timeout_minutes", "weight_sync_timeout_s",
                  "sglang_launch_servers", "sglang_launch_tp")
        _positive(self, "rollout", "request_retries", "sglang_launch_base_gpu_id", allow_zero=True)
        _require(0 <= self.weight_sync_port < 65536, "rollout.weight_sync_port", "0 (any free port) or a TCP port",
                 self.weight_sync_port)
        _require(0 < self.sglang_launch_base_port < 65536, "rollout.sglang_launch_base_port", "a TCP port",
                 self.sglang_launch_base_port)
        if self.weight_sync_master_addr:
            check_master_addr(self.weight_sync_master_addr, "rollout.weight_sync_master_addr")
        if self.sglang_launch:
            _require(self.engine == "sglang", "rollout.engine", "'sglang' when rollout.sglang_launch=true", self.engine)
            _require(not self.sglang_urls, "rollout.sglang_urls",
                     "no URLs when rollout.sglang_launch=true (the launched servers' URLs are used)", self.sglang_urls)
        _require(0.0 < self.top_p <= 1.0, "rollout.top_p", "a float in (0, 1]", self.top_p)
        _require(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", "-1 or an integer >= 1", self.top_k)
        if self.engine == "sglang" and not self.sglang_launch:
            _require(bool(self.sglang_urls), "rollout.sglang_urls", "at least one URL when rollout.engine='sglang'",
                     self.sglang_urls)
        for i, url in enumerate(self.sglang_urls):
            _require(url.startswith(("http://", "https://")), f"rollout.sglang_urls[{i}]", "an http(s):// URL", url)


@dataclass
class AlgoConfig:
    """DAPO with GRPO advantages (paper defaults).

    Attributes:
        n: responses per prompt (the GRPO group size).
        clip_low, clip_high: clip-higher epsilons: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        clip_ratio_c: dual-clip bound for negative advantages.
        normalizer: "all_tokens" divides by every response token of the step (the paper's formula);
            "selected_tokens" by the selected tokens only (the released code's token-mean).
        adv_eps: epsilon in (r - mean) / (std + eps).
        overlong_shaping: apply DAPO's soft overlong penalty.
        overlong_buffer: tokens before `rollout.max_response_len` where the penalty ramps up.
        overlong_penalty: the penalty reached at the cap.
        dynamic_sampling: drop groups whose rewards are all equal and generate again.
        max_sampling_rounds: generation rounds per step before giving up (and logging the shortfall).
        oversample: prompts generated per round, as a multiple of `train.prompts_per_step`.
        rollout_correction: rollout–trainer mismatch correction (`megafork.algo.rollout_correction`):
            "none", "token_tis" (min(π_old/π_rollout, cap) per token), "seq_tis" (the product over
            the response, truncated) or "seq_mask" (sequences whose geometric-mean ratio leaves
            [rollout_mask_low, rollout_mask_high] are dropped; kept ones get token TIS).
        rollout_is_cap: truncation of the importance weights (verl/slime: 2.0).
        rollout_mask_low, rollout_mask_high: geometric-mean bounds of "seq_mask".
    """

    n: int = 16
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_ratio_c: float = 10.0
    normalizer: Literal["all_tokens", "selected_tokens"] = "all_tokens"
    adv_eps: float = 1e-6
    overlong_shaping: bool = True
    overlong_buffer: int = 4096
    overlong_penalty: float = 1.0
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 10
    oversample: float = 3.0
    rollout_correction: Literal["none", "token_tis", "seq_tis", "seq_mask"] = "none"
    rollout_is_cap: float = 2.0
    rollout_mask_low: float = 0.999
    rollout_mask_high: float = 1.001

    def __post_init__(self):
        _check_types(self, "algo")
        try:
            check_correction(self.rollout_correction, self.rollout_is_cap, self.rollout_mask_low,
                             self.rollout_mask_high)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        _require(self.n >= 2, "algo.n", "an integer >= 2 (GRPO needs a group)", self.n)
        _require(0.0 < self.clip_low < 1.0, "algo.clip_low", "a float in (0, 1)", self.clip_low)
        _positive(self, "algo", "clip_high", "adv_eps", "max_sampling_rounds", "oversample")
        _require(self.clip_ratio_c > 1.0, "algo.clip_ratio_c", "a float > 1", self.clip_ratio_c)
        _positive(self, "algo", "overlong_buffer", "overlong_penalty", allow_zero=True)
        _require(self.oversample >= 1.0, "algo.oversample", "a float >= 1", self.oversample)


@dataclass
class ForkingConfig:
    """Which response tokens get gradient.

    Attributes:
        ratio: fraction rho of response tokens kept (0.2 = the paper's top-20%).
        mode: "top" (highest entropy, the method), "bottom" (lowest, the paper's ablation),
            "random" (a ratio-sized random subset), "all" (plain DAPO; ratio unused).
        scope: the token set the threshold is taken over: "step" (all response tokens of the
            step on all DP x CP ranks, entropy from the old pass; the paper's formula),
            "minibatch", "microbatch", or "local" (the released code: per micro-batch and rank,
            exactly k tokens by torch.topk, entropy from the training forward pass).
    """

    ratio: float = 0.2
    mode: Literal["top", "bottom", "random", "all"] = "top"
    scope: Literal["step", "minibatch", "microbatch", "local"] = "step"

    def __post_init__(self):
        _check_types(self, "forking")
        _require(0.0 < self.ratio <= 1.0, "forking.ratio", "a float in (0, 1]", self.ratio)
        _require(self.scope != "local" or self.mode in ("top", "bottom"), "forking.mode",
                 "'top' or 'bottom' with scope 'local' (torch.topk per micro-batch)", self.mode)


@dataclass
class DataConfig:
    """Training prompts.

    Attributes:
        train_path: jsonl or parquet file of {"prompt", "answer"} or DAPO-Math-17k rows.
        reward: registered reward name (`megafork.rewards.known_rewards()`), or "module:function"
            to import your own `(response_text, answer) -> float` verifier.
        max_prompt_len: prompts longer than this many tokens are bad rows (paper: 2,048).
        on_bad_row: "error" stops at the first bad row; "skip" drops it, counts and logs it.
        shuffle: reshuffle every epoch (deterministically, from `train.seed`).
    """

    train_path: str = ""
    reward: str = "dapo"
    max_prompt_len: int = 2048
    on_bad_row: Literal["error", "skip"] = "error"
    shuffle: bool = True

    def __post_init__(self):
        _check_types(self, "data")
        _positive(self, "data", "max_prompt_len")
        _require(bool(self.reward), "data.reward", "a registered reward name", self.reward)
        from megafork.rewards import get_reward

        try:
            get_reward(self.reward)
        except (KeyError, ImportError, TypeError) as e:
            raise ConfigError(f"data.reward: {e.args[0] if e.args else e}") from e


@dataclass
class TrainConfig:
    """Step structure, checkpoints and seeds.

    Attributes:
        steps: RL steps (one step = one rollout batch and its updates).
        prompts_per_step: prompts whose groups make one step's batch (paper: 512).
        minibatch_prompts: prompts per optimizer update (paper: 32, i.e. 16 updates per step).
        micro_batch_size: sequences per forward/backward micro-batch (per DP rank), padded rows.
        max_tokens_per_microbatch: token budget of a packed micro-batch (0 = off). When > 0 it
            replaces `micro_batch_size`: each mini-batch's sequences on a rank are bin-packed
            (first-fit decreasing) into single rows without padding; a longer sequence gets its own.
        dp_balance: how each mini-batch is spread over DP ranks: "off" (contiguous groups),
            "kk" (Karmarkar–Karp) or "lpt" over the sequences' estimated cost.
        balance_quadratic: b in the cost L + b·L² of a sequence of L tokens (0 = tokens; about
            1 / (6·hidden) weighs attention's quadratic term against the linear layers).
        pad_multiple: pad each micro-batch's length up to a multiple of this (0 = auto: 128 on
            GPU, where a few distinct lengths keep the caching allocator from fragmenting, 1 on CPU).
        save_every: checkpoint every this many steps (0 = only at the end).
        resume: "auto" (the latest checkpoint of the run, if any), "none", or a checkpoint path.
        extend_steps: allow resuming a checkpoint whose LR schedule differs from this run's (e.g. a
            finished run continued with a larger `steps`): model, optimizer, data position and
            RNGs continue, and the schedule is rebuilt from this run's `optim.*` and `steps` at the
            checkpoint's step count. Without it, a changed schedule stops the resume.
        keep_last: keep this many newest checkpoints (0 = all).
        seed: seed for data order, sampling and every RNG.
        rollout_ahead: 0 (synchronous) or 1 (one-step off-policy: the next step's prompts are
            generated while this step trains, with the weights of the step before; needs an
            engine outside the trainer's processes, and should be paired with
            `algo.rollout_correction`). See `megafork.train.rollout_ahead`.
    """

    steps: int = 500
    prompts_per_step: int = 512
    minibatch_prompts: int = 32
    micro_batch_size: int = 4
    pad_multiple: int = 0
    max_tokens_per_microbatch: int = 0
    dp_balance: Literal["off", "kk", "lpt"] = "off"
    balance_quadratic: float = 0.0
    save_every: int = 20
    resume: str = "auto"
    extend_steps: bool = False
    keep_last: int = 3
    seed: int = 1234
    rollout_ahead: int = 0

    def __post_init__(self):
        _check_types(self, "train")
        _require(self.rollout_ahead in (0, 1), "train.rollout_ahead", "0 (synchronous) or 1 (one step ahead)",
                 self.rollout_ahead)
        _positive(self, "train", "steps", "prompts_per_step", "minibatch_prompts", "micro_batch_size")
        _positive(self, "train", "save_every", "seed", "keep_last", "pad_multiple", "max_tokens_per_microbatch",
                  "balance_quadratic", allow_zero=True)
        _require(self.prompts_per_step % self.minibatch_prompts == 0, "train.prompts_per_step",
                 f"a multiple of train.minibatch_prompts={self.minibatch_prompts}", self.prompts_per_step)
        _require(bool(self.resume), "train.resume", "'auto', 'none' or a checkpoint path", self.resume)


@dataclass
class EvalConfig:
    """Held-out avg@k (paper: temperature 1.0, top-p 0.7, avg@16 or avg@32).

    Attributes:
        path: jsonl/parquet held-out set ("" = no evaluation).
        every: evaluate every this many steps (0 = only before and after training).
        k: samples per prompt; accuracy is averaged over them.
        temperature: sampling temperature.
        top_p: nucleus threshold.
        max_prompts: evaluate at most this many prompts (0 = all).
    """

    path: str = ""
    every: int = 20
    k: int = 16
    temperature: float = 1.0
    top_p: float = 0.7
    max_prompts: int = 0

    def __post_init__(self):
        _check_types(self, "eval")
        _positive(self, "eval", "k", "temperature")
        _positive(self, "eval", "every", "max_prompts", allow_zero=True)
        _require(0.0 < self.top_p <= 1.0, "eval.top_p", "a float in (0, 1]", self.top_p)


@dataclass
class LogConfig:
    """Where a run writes: `{dir}/{run_name}/` holds config.yaml, metrics.jsonl, tensorboard
    events, checkpoints/, entropy dumps and plots/.

    Attributes:
        run_name: the run's directory name.
        dir: parent directory of runs.
        tensorboard: also write TensorBoard events.
        progress_bar: rank 0 shows a progress bar.
        entropy_dump_every: write `entropy_step{N}.pt` (see `megafork.analysis.io`) every this
            many steps (0 = never); `megafork analyze` plots the latest one.
    """

    run_name: str = "run"
    dir: str = "runs"
    tensorboard: bool = True
    progress_bar: bool = True
    entropy_dump_every: int = 0

    def __post_init__(self):
        _check_types(self, "log")
        _require(bool(self.run_name) and "/" not in self.run_name, "log.run_name", "a non-empty name without '/'",
                 self.run_name)
        _positive(self, "log", "entropy_dump_every", allow_zero=True)

    @property
    def run_dir(self) -> Path:
        return Path(self.dir) / self.run_name


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
