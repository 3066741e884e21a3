"""On-policy rollouts and a replay buffer of off-policy samples.

* :func:`generate_completions` samples completions from the current policy inside the Trainer with
  TRL's ``unwrap_model_for_generation`` (KV cache on; temperature 1 samples the soft policy
  ``pi = softmax(logits)`` the losses are written for).
* :func:`vllm_generation` / :func:`generate_completions_vllm`: the same with vLLM (``use_vllm``), through
  TRL's ``VLLMGeneration`` exactly as ``GRPOTrainer`` uses it (colocate or ``trl vllm-serve``); the
  sampled token ids are used as they come (no decode / re-encode), cut after the first EOS like HF's.
  This path needs a CUDA GPU and vllm and is not exercised by the CPU tests.
* :class:`ReplayBuffer` keeps recent online trajectories (with their rewards) for re-use; it is
  saved with checkpoints.

Rewards (built-in reward functions, the name registry, trajectory scoring) live in
:mod:`sqlm.rewards`.
"""

from __future__ import annotations

import math
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
    # generation pads finished rows with pad; a row that never hit EOS keeps its full length
    return [cut_at_eos(row, eos_token_ids) for row in completions.tolist()]


def cut_at_eos(ids: Sequence[int], eos_token_ids: Sequence[int]) -> list[int]:
    """``ids`` up to and including the first EOS (all of them when there is none)."""
    eos = set(eos_token_ids)
    out = []
    for tok in ids:
        out.append(int(tok))
        if tok in eos:
            break
    return out


def vllm_generation(trainer):
    """TRL's ``VLLMGeneration`` for a SoftQTrainer, configured as ``GRPOTrainer`` configures it from the
    same keys (``vllm_mode``, ``vllm_server_*``, ``vllm_gpu_memory_utilization``...). Sampling stops at
    the trainer's EOS ids; no logit processing beyond temperature / top-p / top-k."""
    from trl.generation.vllm_generation import VLLMGeneration

    args = trainer.args
    return VLLMGeneration(
        model=trainer.model,
        accelerator=trainer.accelerator,
        processing_class=trainer.processing_class,
        mode=args.vllm_mode,
        server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host,
        server_port=args.vllm_server_port,
        group_port=args.vllm_group_port,
        server_timeout=args.vllm_server_timeout,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.vllm_max_model_length,
        max_num_seqs=args.per_device_train_batch_size * args.vllm_tensor_parallel_size,  # the batch counts completions
        enable_sleep_mode=args.vllm_enable_sleep_mode,
        trust_remote_code=args.trust_remote_code,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k or 0,
        max_completion_length=args.max_completion_length,
        generation_kwargs={"stop_token_ids": list(trainer.eos_token_ids), **(args.generation_kwargs or {})},
    )


def generate_completions_vllm(
    generation, prompt_ids: list[list[int]], num_generations: int, eos_token_ids: list[int]
) -> list[list[int]]:
    """One completion per entry of ``prompt_ids`` (each prompt repeated ``num_generations`` times in a
    row, as TRL's generator expects), each cut after its first EOS."""
    _, completions, _, _ = generation.generate(prompts=prompt_ids, images=None, num_generations=num_generations)
    return [cut_at_eos(c, eos_token_ids) for c in completions]


# ----------------------------------------------------------------------------- replay


class ReplayBuffer:
    """A FIFO buffer of scored trajectories (capacity ``size``), sampled uniformly or, with ``priority``
    ``alpha > 0``, in proportion to ``exp(alpha * R)``, ``R`` a trajectory's summed reward (PCL's prioritised
    replay, Nachum et al. 2017, section 5: their half-uniform, half-prioritised buffer drew by reward)."""

    def __init__(self, size: int, seed: int = 0, priority: float = 0.0):
        self.size = int(size)
        self.priority = float(priority)
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
        if self.priority > 0:
            r = [sum(it["token_rewards"]) for it in self.items]
            top = max(r)
            weights = [math.exp(self.priority * (x - top)) for x in r]
            picks = self.rng.choices(self.items, weights=weights, k=k)
        else:
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
