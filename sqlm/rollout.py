"""On-policy rollouts, scoring of trajectories, and a replay buffer of off-policy samples.

* :func:`generate_completions` samples completions from the current policy inside the Trainer with
  TRL's ``unwrap_model_for_generation`` (KV cache on; temperature 1 samples the soft policy
  ``pi = softmax(logits)`` the losses are written for).
* :func:`resolve_reward_funcs` turns recipe names into rewarders; :func:`score_trajectories` gives
  each trajectory its per-token rewards ``r[t]`` (dataset rewards + weighted reward functions).
* :class:`ReplayBuffer` keeps recent online trajectories (with their rewards) for re-use; it is
  saved with checkpoints.
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .data import Trajectory
from .errors import SqlmError
from .rewards.base import RewardBatch, TokenRewarder, as_rewarder

# ----------------------------------------------------------------------------- built-in sequence rewards


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


def resolve_reward_funcs(
    names: Sequence[str] | None,
    kwargs: dict[str, dict] | None = None,
    allow_code: bool = False,
    policy_tokenizer=None,
) -> list[TokenRewarder]:
    """Rewarders from recipe names, in this order of lookup:

    1. a built-in sequence reward of this module (``keyword``, ``length``);
    2. ``module:function`` -- imported only when ``allow_code`` (the recipe's ``allow_code_rewards``);
       the function has TRL's reward signature, or is a factory when kwargs are given for it;
    3. ``sqlm.rewards.build_rewarder(name, **kwargs)`` when the rewards package provides it
       (``policy_tokenizer`` is passed along; its ``callable`` rewarder, alone or inside
       ``weighted``, also needs ``allow_code`` when it names a function by a string).
    """
    kwargs = kwargs or {}
    unknown = [k for k in kwargs if k not in (names or [])]
    if unknown:
        raise SqlmError(f"reward_kwargs names {unknown}, which are not in reward_funcs {list(names or [])}")
    out: list[TokenRewarder] = []
    for name in names or []:
        kw = dict(kwargs.get(name) or {})
        if name in BUILTIN_REWARDS:
            try:
                fn = BUILTIN_REWARDS[name](**kw)
            except TypeError as e:
                raise SqlmError(f"reward_kwargs for '{name}': {e}") from None
            r = as_rewarder(fn)
        elif ":" in name:
            if not allow_code:
                raise SqlmError(
                    f"reward function '{name}' imports Python code; set allow_code_rewards: true in the "
                    "recipe to allow it"
                )
            module_name, _, attr = name.partition(":")
            try:
                fn = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as e:
                raise SqlmError(f"cannot import reward function '{name}': {e}") from None
            r = as_rewarder(fn(**kw) if kw else fn)
        else:
            from . import rewards

            build = getattr(rewards, "build_rewarder", None)
            if build is None:
                raise SqlmError(
                    f"unknown reward function '{name}'; built-in: {', '.join(BUILTIN_REWARDS)}, or "
                    "'module:function' with allow_code_rewards"
                )
            if not allow_code and _names_code(name, kw):
                raise SqlmError(
                    f"reward function '{name}' imports Python code by name; set allow_code_rewards: true "
                    "in the recipe to allow it"
                )
            if policy_tokenizer is not None and name != "callable":
                kw.setdefault("policy_tokenizer", policy_tokenizer)
            r = as_rewarder(build(name, **kw))
        r.name = name
        out.append(r)
    return out


def _names_code(name: str, kw: dict) -> bool:
    if name == "callable":
        return isinstance(kw.get("fn"), str)
    if name == "weighted":
        return any(
            isinstance(c, dict) and _names_code(str(c.get("name")), c) for c in kw.get("components") or []
        )
    return False


# ----------------------------------------------------------------------------- scoring


def _pad_rows(rows: list[list[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
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


def reward_batch(trajectories: Sequence[Trajectory], pad_token_id: int) -> RewardBatch:
    """The :class:`RewardBatch` of some trajectories: prompts left-padded, completions right-padded."""
    prompt_ids, prompt_mask = _pad_rows([t.prompt_ids for t in trajectories], pad_token_id, "left")
    comp_ids, comp_mask = _pad_rows([t.completion_ids for t in trajectories], pad_token_id, "right")
    keys = sorted({k for t in trajectories for k in t.columns})
    columns = {k: [t.columns.get(k) for t in trajectories] for k in keys}
    return RewardBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=comp_ids,
        completion_mask=comp_mask,
        prompts=[t.prompt for t in trajectories],
        completions=[t.completion for t in trajectories],
        columns=columns,
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


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_completions(
    model_wrapped,
    accelerator,
    prompt_ids: list[list[int]],
    *,
    pad_token_id: int,
    eos_token_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    generation_kwargs: dict | None = None,
    gradient_checkpointing_kwargs: dict | None = None,
) -> list[list[int]]:
    """Sample one completion per prompt from the current policy; each is cut after its first EOS
    (which stays in). Prompts are left-padded; the KV cache is on."""
    from transformers import GenerationConfig
    from trl.models import unwrap_model_for_generation

    ids, mask = _pad_rows(prompt_ids, pad_token_id, "left")
    ids, mask = ids.to(accelerator.device), mask.to(accelerator.device)
    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k if top_k is not None else 0,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_ids,
        use_cache=True,
        **(generation_kwargs or {}),
    )
    with unwrap_model_for_generation(
        model_wrapped, accelerator, gradient_checkpointing_kwargs=gradient_checkpointing_kwargs
    ) as unwrapped:
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            out = unwrapped.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        finally:
            unwrapped.train(was_training)
    completions = out[:, ids.shape[1] :].cpu()
    result = []
    eos = set(eos_token_ids)
    for row in completions.tolist():
        cut = []
        for tok in row:
            cut.append(tok)
            if tok in eos:
                break
        # generation pads finished rows with pad; a row that never hit EOS keeps its full length
        result.append(cut)
    return result


# ----------------------------------------------------------------------------- replay


class ReplayBuffer:
    """A FIFO buffer of scored trajectories (capacity ``size``), sampled uniformly."""

    def __init__(self, size: int, seed: int = 0):
        self.size = int(size)
        self.items: list[dict[str, Any]] = []
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, trajectories: Sequence[Trajectory], rewards: Sequence[torch.Tensor]) -> None:
        if self.size <= 0:
            return
        for t, r in zip(trajectories, rewards):
            d = t.to_dict()
            d.update(token_rewards=[float(x) for x in r], sequence_reward=None, scored=True, source="replay")
            self.items.append(d)
        if len(self.items) > self.size:
            self.items = self.items[len(self.items) - self.size :]

    def sample(self, k: int) -> list[Trajectory]:
        if not self.items or k <= 0:
            return []
        picks = [self.items[self.rng.randrange(len(self.items))] for _ in range(k)]
        return [Trajectory(**p) for p in picks]

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "items": self.items, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = int(state["size"])
        self.items = list(state["items"])
        rng = state.get("rng")
        if rng is not None:
            self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
