"""``sqlm online_dpo RECIPE.yaml [--key value ...]``: TRL's ``OnlineDPOTrainer`` (``trl.experimental``) on
the prompts, reward and budget of a paired sqlm online recipe.

An online baseline of sqlm, beside ``sqlm grpo`` and ``sqlm rloo`` (what they share is in
``sqlm/commands/_online_baseline.py``): each step samples two completions per prompt from the
policy, the reward picks the chosen one, and the pair takes a DPO step with ``beta`` against the
initial model. Its batch counts prompts, as sqlm's; it always samples 2 completions per prompt (sqlm's
default ``num_generations``); its generation limit is TRL's ``max_new_tokens`` (sqlm's
``max_completion_length``) and ``max_length`` is both TRL's prompt+completion limit and sqlm's
long-prompt filter. Set ``temperature: 1.0`` (TRL's default is 0.9) to sample as sqlm does.

The recipe's keys are the fields of ``PromptRewardArguments`` (data and reward, as ``sqlm train``
names them), TRL's ``OnlineDPOConfig`` and TRL's ``ModelConfig``. Writes the model and
``run_stats.json`` (generated completions and tokens, optimizer steps, wall time) to ``output_dir``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

from . import _online_baseline as online


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.online_dpo import OnlineDPOConfig


@dataclass
class SqlmOnlineDPOConfig(online.AutoBf16, OnlineDPOConfig):
    """TRL's ``OnlineDPOConfig``; ``bf16`` unset = on only with a bf16-capable accelerator, and ``beta``
    one number, as in ``sqlm dpo`` (TRL's per-epoch list of betas is collapsed to its one value anyway,
    and indexing it by a fractional epoch fails)."""

    beta: float = field(
        default=0.1,
        metadata={"help": "KL coefficient of the DPO loss on each sampled pair; plays the part of sqlm's tau."},
    )


def recipe_dataclasses():
    """The config classes a ``sqlm online_dpo`` recipe parses into."""
    from ..config import ModelConfig

    return online.PromptRewardArguments, SqlmOnlineDPOConfig, ModelConfig


def parse(argv: list[str]):
    return online.parse(recipe_dataclasses(), argv)


def trainer_class():
    """``OnlineDPOTrainer`` generating from the batch's ``prompt_ids`` (sqlm's tokens) and counting what
    it generates."""
    import torch
    from trl.experimental.online_dpo import OnlineDPOTrainer
    from trl.experimental.utils import truncate_right
    from trl.models import unwrap_model_for_generation

    from ..rewards.base import pad_rows

    class SqlmOnlineDPOTrainer(OnlineDPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.generated_completions = 0
            self.generated_tokens = 0
            self._prompt_ids = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            self._prompt_ids = inputs.get("prompt_ids")
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._prompt_ids = None

        def _generate(self, model, prompts, images=None):
            rows = self._prompt_ids
            if images is not None or rows is None or len(rows) != len(prompts):
                out = super()._generate(model, prompts, images)
            else:  # TRL's generation (non-vision, no vLLM) from sqlm's prompt tokens
                pad = self._tokenizer.pad_token_id
                ids, mask = pad_rows([list(r) for r in rows], pad, "left")
                device = next(model.parameters()).device
                prompt_ids, prompt_mask = ids.to(device).repeat(2, 1), mask.to(device).repeat(2, 1)
                with (
                    unwrap_model_for_generation(
                        model,
                        self.accelerator,
                        gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                        generation_kwargs=self.generation_kwargs,
                    ) as unwrapped,
                    torch.no_grad(),
                ):
                    output = unwrapped.generate(
                        input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config
                    )
                completion_ids, completion_mask = truncate_right(
                    output[:, prompt_ids.size(1) :], self.eos_token_ids, pad
                )
                out = (prompt_ids, prompt_mask, completion_ids, completion_mask, None)
            self.generated_completions += int(out[3].shape[0])
            self.generated_tokens += int(out[3].sum())
            return out

    return SqlmOnlineDPOTrainer


def main(argv: list[str] | None = None) -> int:
    return online.main("online_dpo", recipe_dataclasses(), trainer_class, __doc__ or "", argv)
