"""A registry of reward functions, so a config can name the verifier it wants.

    @register_reward("my_task")
    def my_reward(response: str, ground_truth: str) -> float: ...

    reward_fn = get_reward(cfg.data.reward)     # "dapo" unless configured otherwise

A reward function takes the decoded response text and the row's ground truth and returns a float.
"""
from __future__ import annotations

from collections.abc import Callable

RewardFn = Callable[[str, str], float]
_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator that registers a reward function under `name`.

    Args:
        name: the name configs use; registering the same name twice is an error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_reward: expected a non-empty name, found {name!r}")

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"register_reward: a reward named {name!r} is already registered "
                             f"({_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = fn
        return fn

    return wrap


def get_reward(name: str) -> RewardFn:
    """The reward function registered as `name`.

    Args:
        name: a registered name.

    Raises:
        KeyError: naming the unknown name and listing the known ones.
    """
    if name not in _REGISTRY:
        raise KeyError(f"reward {name!r} is not registered; known rewards: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def known_rewards() -> list[str]:
    """Sorted names of every registered reward."""
    return sorted(_REGISTRY)
