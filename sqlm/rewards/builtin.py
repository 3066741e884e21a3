"""Built-in sequence rewards with TRL's reward-function signature, chosen by name in a recipe."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any


def _text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: the assistant messages
        return " ".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def keyword_reward(words: Sequence[str] = ("good",), penalty_words: Sequence[str] = (), per_hit: float = 1.0):
    """Sequence reward ``per_hit * (#words in the completion - #penalty_words)`` (whole words,
    case-insensitive). A tiny, transparent reward for the quickstart."""
    pos = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in words]
    neg = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in penalty_words]

    def keyword(prompts, completions, **kwargs) -> list[float]:
        out = []
        for c in completions:
            text = _text(c)
            hits = sum(len(p.findall(text)) for p in pos) - sum(len(p.findall(text)) for p in neg)
            out.append(per_hit * float(hits))
        return out

    return keyword


def length_reward(target: int = 16, scale: float = 1.0):
    """Sequence reward ``-scale * |n_tokens - target| / target``: prefers completions of ``target`` tokens."""

    def length(prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [-scale * abs(len(ids) - target) / max(target, 1) for ids in completion_ids]

    return length


BUILTIN_REWARDS: dict[str, Callable[..., Callable]] = {"keyword": keyword_reward, "length": length_reward}
