"""Rewards: "Answer: X" and \\boxed{} extraction edge cases, normalisation, comparison, registry."""
from __future__ import annotations

import pytest

from megafork.rewards import (
    answers_match,
    extract_answer,
    extract_boxed,
    extract_final,
    get_reward,
    known_rewards,
    normalize_answer,
    register_reward,
)


@pytest.mark.parametrize("text,expected", [
    ("Answer: 42", "42"),
    ("so the Answer:   7  \nmore text", "7"),
    ("Answer: 1\n... wait, Answer: 2", "2"),           # last occurrence wins
    ("answer: -3", "-3"),                              # case-insensitive
    ("Answer:\nnothing on the line", None),            # empty answer line
    ("no answer here", None),
    ("Answer: \\boxed{5}", "\\boxed{5}"),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    (r"\boxed{42}", "42"),
    (r"x \boxed{\frac{1}{2}} y", r"\frac{1}{2}"),          # nested braces
    (r"\boxed{1} then \boxed{{a}+{b}}", "{a}+{b}"),        # last box, doubly nested
    (r"\fbox{7}", "7"),
    (r"\boxed{unclosed {x}", None),
    ("no box", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_final_prefers_answer_line_and_unboxes_it():
    assert extract_final(r"Answer: \boxed{12}") == "12"
    assert extract_final(r"we get \boxed{3}. Answer: 4") == "4"
    assert extract_final(r"we get \boxed{3}.") == "3"
    assert extract_final("nothing") is None


@pytest.mark.parametrize("raw,norm", [
    (" $1,000.$ ", "1000"), ("3.50", "3.5"), ("2.0", "2"), ("+7", "7"), (r"\frac{3}{4}", "3/4"),
    (r"\dfrac{3}{4}", "3/4"), (r"\text{ 5 }", "5"), (r"\left( 1, 2 \right)", "(1,2)"), ("1,2", "1,2"),
])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("pred,gt,ok", [
    ("42", "42", True), ("42.0", "42", True), ("0.5", r"\frac{1}{2}", True), ("1/2", "0.50", True),
    ("1,000", "1000", True), ("41", "42", False), (None, "42", False), ("", "0", False), ("-0", "0", True),
    ("x+1", "x + 1", True), ("2/4", "1/2", True), ("1/0", "1", False),
])
def test_answers_match(pred, gt, ok):
    assert answers_match(pred, gt) is ok


def test_dapo_reward_is_plus_minus_one():
    dapo = get_reward("dapo")
    assert dapo("Let me compute. Answer: 85", "85") == 1.0
    assert dapo("Answer: 84", "85") == -1.0
    assert dapo("85", "85") == -1.0            # DAPO needs the "Answer:" line
    assert dapo(r"Answer: \boxed{85}", "85") == 1.0
    assert get_reward("boxed")(r"\boxed{85}", "85") == 1.0 and get_reward("boxed")("Answer: 85", "85") == -1.0
    assert get_reward("math")(r"\boxed{85}", "85") == 1.0 and get_reward("math")("Answer: 85", "85") == 1.0


def test_registry():
    assert {"dapo", "boxed", "math"} <= set(known_rewards())
    with pytest.raises(KeyError, match=r"reward 'dapo2' is not registered; known rewards: \[.*'boxed'.*'dapo'"):
        get_reward("dapo2")

    @register_reward("test_len")
    def by_length(response: str, ground_truth: str) -> float:
        return float(len(response) == int(ground_truth))

    assert get_reward("test_len") is by_length and get_reward("test_len")("abc", "3") == 1.0
    register_reward("test_len")(by_length)  # re-registering the same function is harmless
    with pytest.raises(ValueError, match=r"a reward named 'test_len' is already registered"):
        register_reward("test_len")(lambda r, g: 0.0)
    with pytest.raises(ValueError, match="expected a non-empty name"):
        register_reward("")
