"""What every rollout engine speaks: sampling parameters, samples, the engine protocol.

    from megafork.rollout import SamplingParams
    samples = engine.generate(prompt_ids, SamplingParams(n=16, temperature=1.0, max_new_tokens=512, seed=7))

Field names follow SGLang's `sampling_params` (`sglang/srt/sampling/sampling_params.py`), except
`seed`, which SGLang spells `sampling_seed` on the wire; `to_sglang()` does the renaming.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

#: `top_k` meaning "the whole vocabulary" (SGLang accepts -1 on the wire and means the same).
TOP_K_ALL = -1
FINISH_REASONS = ("stop", "length", "abort")


class RolloutError(RuntimeError):
    """A rollout engine or server failed; the message names the engine or URL."""


@dataclass
class SamplingParams:
    """How to sample responses. Validated on construction; errors name the field.

    Attributes:
        n: responses per prompt (SGLang's parallel sampling). Samples come back prompt-major.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_p: nucleus mass in (0, 1]; 1 keeps every token.
        top_k: keep the k most likely tokens; -1 keeps all.
        max_new_tokens: response length limit (>= 1).
        stop_token_ids: extra token ids that end a response (the model's EOS always does unless
            `ignore_eos`). The stop token is part of the response, as in SGLang's `output_ids`.
        ignore_eos: do not stop at the model's EOS token(s).
        seed: makes sampling reproducible: the same prompts and params give the same samples.
            None draws fresh randomness.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    max_new_tokens: int = 128
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        _check_int("n", self.n, lo=1)
        _check_int("max_new_tokens", self.max_new_tokens, lo=1)
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"sampling_params.temperature: expected a finite number >= 0, found {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling_params.top_p: expected a number in (0, 1], found {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"sampling_params.top_k: expected -1 (all) or an integer >= 1, found {self.top_k!r}")
        if isinstance(self.stop_token_ids, (set, tuple)):
            self.stop_token_ids = sorted(self.stop_token_ids)
        if not isinstance(self.stop_token_ids, list):
            raise ValueError(f"sampling_params.stop_token_ids: expected a list of ints, found {self.stop_token_ids!r}")
        for i, tok in enumerate(self.stop_token_ids):
            _check_int(f"stop_token_ids[{i}]", tok, lo=0)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"sampling_params.ignore_eos: expected a bool, found {self.ignore_eos!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, lo=-(2**63), hi=2**63 - 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_sglang(self) -> dict:
        """The SGLang `sampling_params` JSON object for these parameters."""
        out = {
            "n": self.n, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens, "ignore_eos": self.ignore_eos,
        }
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            out["sampling_seed"] = self.seed
        return out


@dataclass
class Sample:
    """One generated response.

    Attributes:
        prompt_index: index of its prompt in the `generate` call.
        response_ids: generated token ids (the stop token included when it ended the response).
        logprobs: one rollout log-prob per response token (see `megafork.rollout.sampling` for
            which distribution they come from).
        finish_reason: "stop" (a stop/EOS token), "length" (max_new_tokens) or "abort" (the
            engine was paused in abort mode mid-request).
        weight_version: the engine's weight version when the sample finished, if it has one.
    """

    prompt_index: int
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: str | None = None

    def __post_init__(self):
        if len(self.response_ids) != len(self.logprobs):
            raise ValueError(f"Sample: {len(self.response_ids)} response ids but {len(self.logprobs)} logprobs")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"Sample.finish_reason: expected one of {FINISH_REASONS}, found {self.finish_reason!r}")


@runtime_checkable
class RolloutEngine(Protocol):
    """An inference engine the trainer generates with and pushes weights into."""

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Sample]:
        """Return `len(prompts) * sampling.n` samples, prompt-major (prompt 0's n samples first)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       weight_version: str | None = None) -> dict:
        """Load full HF-named tensors; returns sync statistics (bytes, seconds, ...)."""
        ...

    def pause(self) -> None:
        """Stop generating until `resume()`."""
        ...

    def resume(self) -> None:
        ...

    def health(self) -> bool:
        ...


def validate_prompts(prompts: object, vocab_size: int | None = None, field_name: str = "input_ids") -> list[list[int]]:
    """Check a batch of token-id prompts and return it as lists of ints.

    Args:
        prompts: a list of non-empty lists of non-negative ints.
        vocab_size: if given, every id must be below it.
        field_name: the name used in error messages.
    """
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(f"{field_name}: expected a non-empty list of token-id lists, found {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or not p:
            raise ValueError(f"{field_name}[{i}]: expected a non-empty list of token ids, found {p!r:.80}")
        for j, t in enumerate(p):
            if not isinstance(t, int) or isinstance(t, bool) or t < 0 or (vocab_size is not None and t >= vocab_size):
                bound = f" < {vocab_size}" if vocab_size is not None else ""
                raise ValueError(f"{field_name}[{i}][{j}]: expected an integer token id >= 0{bound}, found {t!r}")
        out.append([int(t) for t in p])
    return out


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"sampling_params.{name}: expected an integer {rng}, found {value!r}")
