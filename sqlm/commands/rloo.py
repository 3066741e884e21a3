"""``sqlm rloo RECIPE.yaml [--key value ...]``: TRL's ``RLOOTrainer`` on the prompts, reward and budget
of a paired sqlm online recipe.

An online baseline of sqlm. An RLOO recipe sits beside its sqlm recipe (``recipes/<task>/rloo/``
next to ``recipes/<task>/sqlm/``) and repeats its model, prompts, ``num_generations``,
``max_completion_length``, temperature, steps, learning rate and seed; TRL's
``per_device_train_batch_size`` counts completions (sqlm's batch times ``num_generations``).
``beta`` is RLOO's KL coefficient (TRL's default 0.05), added to the reward.

The recipe's keys are the fields of ``OnlineScriptArguments`` (data and reward, as ``sqlm train``
names them: ``reward_funcs``, ``reward_kwargs``, ``allow_code_rewards``, ``reward_scale``), TRL's
``RLOOConfig`` (training, generation, loss) and TRL's ``ModelConfig`` (model, LoRA). See
``sqlm/commands/_online_baseline.py`` for what is shared with ``sqlm grpo``. Writes the model and
``run_stats.json`` (generated completions and tokens, optimizer steps, wall time) to ``output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import RLOOConfig

from . import _online_baseline as online


@dataclass
class SqlmRLOOConfig(online.AutoBf16, RLOOConfig):
    """TRL's ``RLOOConfig``; ``bf16`` unset = on only with a bf16-capable accelerator."""


def recipe_dataclasses():
    """The config classes a ``sqlm rloo`` recipe parses into."""
    from ..config import ModelConfig

    return online.OnlineScriptArguments, SqlmRLOOConfig, ModelConfig


def parse(argv: list[str]):
    return online.parse(recipe_dataclasses(), argv)


def trainer_class():
    """TRL's ``RLOOTrainer``, generating from sqlm's prompt tokens and counting what it generates."""
    from trl import RLOOTrainer

    return online.make_trainer_class(RLOOTrainer)


def main(argv: list[str] | None = None) -> int:
    return online.main("rloo", recipe_dataclasses(), trainer_class, __doc__ or "", argv)
