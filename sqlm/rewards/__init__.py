"""Per-token rewards from reward models, policies and Python functions.

``build_rewarder(name, **kwargs)`` makes one by name (keyword, length, terminal, uniform, abc,
prefix, implicit, callable, weighted); :func:`resolve_rewarders` turns a config's ``reward_funcs``
into a trainer's rewarders; :func:`score_trajectories` gives trajectories their per-token rewards;
:func:`add_token_rewards` stores them as columns of offline preference data.
Heavy modules (transformers models) are imported only when used.
"""

from .base import (
    CallableRewarder,
    RewardBatch,
    TokenRewarder,
    WeightedSum,
    as_rewarder,
    last_token_index,
    terminal_rewards,
)


__all__ = [
    "ABCRewarder",
    "CallableRewarder",
    "ImplicitRewarder",
    "PrefixRewarder",
    "RewardBatch",
    "TerminalRewarder",
    "TokenRewarder",
    "UniformRewarder",
    "WeightedSum",
    "add_token_rewards",
    "as_rewarder",
    "build_rewarder",
    "last_token_index",
    "resolve_rewarders",
    "rewarder_from_spec",
    "score_trajectories",
    "terminal_rewards",
]

_LAZY = {
    "ABCRewarder": "models",
    "ImplicitRewarder": "models",
    "PrefixRewarder": "models",
    "TerminalRewarder": "models",
    "UniformRewarder": "models",
    "add_token_rewards": "cache",
    "build_rewarder": "registry",
    "resolve_rewarders": "registry",
    "rewarder_from_spec": "registry",
    "score_trajectories": "scoring",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
