"""On-policy rollouts and a replay buffer of off-policy samples.

* :func:`generate_completions` samples completions from the current policy inside the Trainer with
  TRL's ``unwrap_model_for_generation`` (KV cache on; temperature 1 samples the soft policy
  ``pi = softmax(logits)`` the losses are written for).
* :class:`ReplayBuffer` keeps recent online trajectories (with their rewards) for re-use; it is
  saved with checkpoints.

Rewards (built-in reward functions, the name registry, trajectory scoring) live in
:mod:`sqlm.rewards`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from .data import Trajectory
from .rewards.base import pad_rows

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

    ids, mask = pad_rows(prompt_ids, pad_token_id, "left")
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
