"""One interface for per-token rewards.

A :class:`TokenRewarder` maps a batch of (prompt, completion) pairs to ``r[B, T]`` aligned with the
completion tokens: ``r[b, t]`` is the reward of taking ``completion_ids[b, t]``. Entries off
``completion_mask`` are 0. Completions are right-padded; prompts may be padded either side, as the
``prompt_mask`` says.

Any function with TRL's reward-function signature
``f(prompts, completions, completion_ids, **columns) -> list[float | None]`` is a sequence
reward and lands on the last completion token; one that returns a list of per-token lists is used
as dense rewards directly.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SqlmError


@dataclass
class RewardBatch:
    """What a rewarder sees. Token tensors are ``[B, P]`` / ``[B, T]``; masks are 1 on real tokens."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompts: list[Any]  # text or conversational messages, as in the dataset
    completions: list[Any]
    columns: dict[str, list[Any]] = field(default_factory=dict)  # other dataset columns, per row


def pad_rows(rows: list[list[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists to ``(ids, mask)`` of shape ``[N, longest]`` (at least 1 wide), padded on ``side``."""
    n, length = len(rows), max([len(r) for r in rows] + [1])
    ids = torch.full((n, length), pad, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def make_batch(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_id: int,
    prompts: list[Any] | None = None,
    completions: list[Any] | None = None,
    columns: dict[str, list[Any]] | None = None,
    prompt_padding_side: str = "left",
) -> RewardBatch:
    """A :class:`RewardBatch` from lists of ids (prompts padded on ``prompt_padding_side``,
    completions on the right), as a trainer would build it."""
    n = len(prompt_ids)
    p, pm = pad_rows(prompt_ids, pad_id, prompt_padding_side)
    c, cm = pad_rows(completion_ids, pad_id, "right")
    return RewardBatch(
        prompt_ids=p,
        prompt_mask=pm,
        completion_ids=c,
        completion_mask=cm,
        prompts=list(prompts) if prompts is not None else [None] * n,
        completions=list(completions) if completions is not None else [None] * n,
        columns=columns or {},
    )


class TokenRewarder:
    """Base class: subclasses implement :meth:`token_rewards`."""

    name: str = "reward"

    def token_rewards(self, batch: RewardBatch) -> torch.Tensor:  # [B, T] float32
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Everything that changes this rewarder's values (models as weight hashes, parameters).

        Caches of dense rewards are keyed by it (:mod:`sqlm.rewards.cache`), so a subclass with
        parameters must add them here.
        """
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "name": self.name}

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        r = self.token_rewards(batch)
        expected = tuple(batch.completion_ids.shape)
        if tuple(r.shape) != expected:
            raise SqlmError(f"rewarder '{self.name}' returned shape {tuple(r.shape)}, expected {expected}")
        return r.float() * batch.completion_mask.to(r.device).float()


def last_token_index(completion_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each right-padded completion (0 for an empty one)."""
    m = completion_mask.long()
    idx = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return (idx * m).amax(dim=1)


def terminal_rewards(sequence_rewards: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Put each sequence reward ``R[b]`` on the last completion token of row ``b``."""
    out = torch.zeros(completion_mask.shape, dtype=torch.float32, device=completion_mask.device)
    last = last_token_index(completion_mask)
    has = completion_mask.sum(1) > 0
    out[has, last[has]] = sequence_rewards.float().to(out.device)[has]
    return out


class CallableRewarder(TokenRewarder):
    """Wraps a TRL-style reward function: per-sequence floats go on the last token; per-token lists
    (one value per completion token) are used as they are. ``None`` (TRL's "not applicable") is 0."""

    def __init__(self, fn: Callable[..., Sequence[Any]], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "fn": callable_fingerprint(self.fn)}

    def token_rewards(self, batch: RewardBatch) -> torch.Tensor:
        ids = [row[m.bool()].tolist() for row, m in zip(batch.completion_ids, batch.completion_mask)]
        out = self.fn(prompts=batch.prompts, completions=batch.completions, completion_ids=ids, **batch.columns)
        if len(out) != len(ids):
            raise SqlmError(f"reward function '{self.name}' returned {len(out)} values for {len(ids)} completions")
        b, t = batch.completion_ids.shape
        dense = torch.zeros(b, t, dtype=torch.float32)
        seq = torch.zeros(b, dtype=torch.float32)
        is_dense = False
        for i, value in enumerate(out):
            if isinstance(value, (list, tuple, torch.Tensor)):
                is_dense = True
                vals = torch.as_tensor(list(value), dtype=torch.float32)
                if vals.numel() != len(ids[i]):
                    raise SqlmError(
                        f"reward function '{self.name}' returned {vals.numel()} token rewards for row {i}, "
                        f"which has {len(ids[i])} completion tokens"
                    )
                pos = batch.completion_mask[i].bool().nonzero().squeeze(1).cpu()
                dense[i, pos] = vals
            else:
                seq[i] = 0.0 if value is None else float(value)
        mask = batch.completion_mask.cpu()
        r = dense + (terminal_rewards(seq, mask) if not is_dense or seq.abs().sum() > 0 else 0)
        return r.to(batch.completion_ids.device)


def callable_fingerprint(fn: Callable[..., Any]) -> str:
    """Module, qualified name and (when available) a hash of the source of a function."""
    target = getattr(fn, "__func__", fn)
    if not inspect.isfunction(target) and not inspect.ismethod(target) and callable(target):
        target = type(target).__call__
    ident = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):
        source = ""
    cells = getattr(target, "__closure__", None) or ()
    for cell in cells:  # a closure over a constant (a threshold, a weight) is part of the function
        try:
            source += "\n" + repr(cell.cell_contents)[:1000]
        except ValueError:  # empty cell
            pass
    return ident + ":" + hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


class WeightedSum(TokenRewarder):
    """``sum_k w_k r_k``: mixes any rewarders (e.g. 0.5 * abc + 0.5 * implicit)."""

    def __init__(self, rewarders: Sequence[TokenRewarder], weights: Sequence[float] | None = None):
        if weights is None:
            weights = [1.0] * len(rewarders)
        if len(weights) != len(rewarders):
            raise SqlmError(f"got {len(weights)} reward weights for {len(rewarders)} rewarders")
        self.rewarders, self.weights = list(rewarders), [float(w) for w in weights]
        self.name = "+".join(r.name for r in self.rewarders)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "parts": [[w, r.settings()] for r, w in zip(self.rewarders, self.weights)],
        }

    def components(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        """Each source's weighted ``[B, T]`` rewards, for logging per source."""
        parts: dict[str, torch.Tensor] = {}
        for r, w in zip(self.rewarders, self.weights):
            key, k = r.name, 1
            while key in parts:  # two sources with one name (e.g. abc at two betas) both count
                k += 1
                key = f"{r.name}_{k}"
            parts[key] = w * r(batch)
        return parts

    def token_rewards(self, batch: RewardBatch) -> torch.Tensor:
        parts = self.components(batch)
        return torch.stack(list(parts.values())).sum(0)


def as_rewarder(obj: Any) -> TokenRewarder:
    """A TokenRewarder from a rewarder or a TRL-style callable."""
    if isinstance(obj, TokenRewarder):
        return obj
    if callable(obj):
        return CallableRewarder(obj)
    raise SqlmError(f"reward function must be a TokenRewarder or a callable, got {type(obj).__name__}")
