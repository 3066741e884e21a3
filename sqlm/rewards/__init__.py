"""Per-token rewards from reward models, policies and Python functions."""

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
    "CallableRewarder",
    "RewardBatch",
    "TokenRewarder",
    "WeightedSum",
    "as_rewarder",
    "last_token_index",
    "terminal_rewards",
]
