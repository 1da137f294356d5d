"""The `data`, `train`, `eval` and `log` config sections: what a run reads, how its steps are cut into
updates and checkpoints, how it is evaluated, and where it writes. Loaded through `megafork.train.config`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megafork.train.config_types import ConfigError, _check_types, _positive, _require


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
