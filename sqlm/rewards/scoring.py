"""Trajectories to per-token rewards ``r[t]``: the rewards the data carries plus the weighted
rewards of the recipe's rewarders."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.trajectories import Trajectory
from .base import RewardBatch, TokenRewarder, make_batch


def reward_batch(trajectories: Sequence[Trajectory], pad_token_id: int) -> RewardBatch:
    """The :class:`RewardBatch` of some trajectories: prompts left-padded, completions right-padded."""
    keys = sorted({k for t in trajectories for k in t.columns})
    return make_batch(
        [t.prompt_ids for t in trajectories],
        [t.completion_ids for t in trajectories],
        pad_token_id,
        prompts=[t.prompt for t in trajectories],
        completions=[t.completion for t in trajectories],
        columns={k: [t.columns.get(k) for t in trajectories] for k in keys},
    )


def data_rewards(t: Trajectory) -> torch.Tensor:
    """Rewards the trajectory carries from the data: dense token rewards plus a sequence reward on
    the last token."""
    n = len(t.completion_ids)
    r = torch.zeros(n, dtype=torch.float32)
    if t.token_rewards is not None:
        r += torch.tensor(t.token_rewards[:n], dtype=torch.float32)
    if t.sequence_reward is not None and n > 0:
        r[n - 1] += float(t.sequence_reward)
    return r


def score_trajectories(
    trajectories: Sequence[Trajectory],
    rewarders: Sequence[TokenRewarder],
    weights: Sequence[float] | None,
    pad_token_id: int,
    scale: float = 1.0,
    online_only: Sequence[bool] | None = None,
) -> tuple[list[torch.Tensor], dict[str, list[float]]]:
    """Per-token rewards of each trajectory (a 1-D tensor over its completion tokens) and, per source,
    each trajectory's summed reward (for logging). Already-scored trajectories keep their rewards.
    ``online_only[k]``: rewarder ``k`` scores only online samples (its values for the dataset's own
    trajectories were cached as data columns)."""
    weights = list(weights) if weights is not None else [1.0] * len(rewarders)
    online_only = list(online_only) if online_only is not None else [False] * len(rewarders)
    totals = [data_rewards(t) for t in trajectories]
    per_source: dict[str, list[float]] = {}
    if any(t.token_rewards is not None or t.sequence_reward is not None for t in trajectories):
        per_source["data"] = [float(x.sum()) for x in totals]
    for rewarder, w, only in zip(rewarders, weights, online_only):
        todo = [i for i, t in enumerate(trajectories) if not t.scored and (t.source == "online" or not only)]
        if not todo:
            continue
        batch = reward_batch([trajectories[i] for i in todo], pad_token_id)
        r = rewarder(batch).float().cpu()  # [B, T], zero off the completion mask
        per_source[rewarder.name] = [float(x) for x in r.sum(-1)]
        for row, i in enumerate(todo):
            n = len(trajectories[i].completion_ids)
            totals[i] = totals[i] + w * r[row, :n]
    return [scale * x for x in totals], per_source
