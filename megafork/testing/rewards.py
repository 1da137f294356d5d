"""Rewards for tests that run the trainer in subprocesses (`data.reward=megafork.testing.rewards:NAME`)."""
from __future__ import annotations


def has_digit(response: str, answer: str) -> float:
    """+1 when the response contains a digit: about half of a random tiny model's answers earn it."""
    return 1.0 if any(c.isdigit() for c in response) else -1.0
