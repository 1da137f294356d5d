"""The built-in math rewards: DAPO's +1/-1 on the "Answer: X" line, and a `\\boxed{}` variant."""
from __future__ import annotations

from megafork.rewards.extract import answers_match, extract_answer, extract_boxed, extract_final
from megafork.rewards.registry import register_reward

CORRECT, WRONG = 1.0, -1.0


@register_reward("dapo")
def dapo_reward(response: str, ground_truth: str) -> float:
    """+1 when the last "Answer: X" (or a box inside it) matches `ground_truth`, else -1 (DAPO).

    Args:
        response: decoded response text.
        ground_truth: reference answer.
    """
    answer = extract_answer(response)
    if answer is not None:
        boxed = extract_boxed(answer)
        answer = boxed if boxed is not None else answer
    return CORRECT if answers_match(answer, ground_truth) else WRONG


@register_reward("boxed")
def boxed_reward(response: str, ground_truth: str) -> float:
    r"""+1 when the last `\boxed{X}` matches `ground_truth`, else -1."""
    return CORRECT if answers_match(extract_boxed(response), ground_truth) else WRONG


@register_reward("math")
def math_reward(response: str, ground_truth: str) -> float:
    r"""+1 when the final answer ("Answer: X" or `\boxed{X}`) matches, else -1."""
    return CORRECT if answers_match(extract_final(response), ground_truth) else WRONG
