"""Verifiable rewards: answer extraction, normalisation, comparison and a named registry.

    from megafork.rewards import get_reward
    reward = get_reward("dapo")("... Answer: 42", "42")   # 1.0
"""
from megafork.rewards import math_rewards as _builtin  # noqa: F401  (registers dapo, boxed, math)
from megafork.rewards.extract import (
    VERIFIER,
    answers_match,
    extract_answer,
    extract_boxed,
    extract_final,
    normalize_answer,
)
from megafork.rewards.registry import get_reward, known_rewards, register_reward

__all__ = [
    "VERIFIER", "answers_match", "extract_answer", "extract_boxed", "extract_final", "normalize_answer",
    "get_reward", "known_rewards", "register_reward",
]
