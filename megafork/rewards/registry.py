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
    """The reward function registered as `name`, or imported from `"package.module:function"`.

    The import form lets `data.reward=my_rewards:score` plug a user's verifier into
    `megafork train` without editing megafork (the module is imported in every trainer process).

    Args:
        name: a registered name, or "module:attribute".

    Raises:
        KeyError: naming the unknown name and listing the known ones.
        ImportError / AttributeError / TypeError: the "module:attribute" form names nothing callable.
    """
    if ":" in name:
        import importlib

        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ImportError(f"data.reward={name!r}: expected an importable module {module_name!r}, found none "
                              f"({e})") from e
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise TypeError(f"data.reward={name!r}: expected a callable {attr!r} in {module_name}, found {fn!r}")
        return fn
    if name not in _REGISTRY:
        raise KeyError(f"reward {name!r} is not registered; known rewards: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def known_rewards() -> list[str]:
    """Sorted names of every registered reward."""
    return sorted(_REGISTRY)
