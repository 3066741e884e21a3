"""``sqlm grpo RECIPE.yaml [--key value ...]``: TRL's ``GRPOTrainer`` on the prompts, reward and budget
of a paired sqlm online recipe.

An online baseline of sqlm. A GRPO recipe sits beside its sqlm recipe (``recipes/<task>/grpo/``
next to ``recipes/<task>/sqlm/``) and repeats its model, prompts, ``num_generations``,
``max_completion_length``, temperature, steps, learning rate and seed; TRL's
``per_device_train_batch_size`` counts completions (sqlm's batch times ``num_generations``).
``beta`` is GRPO's KL coefficient (TRL's default 0.0: no reference model).

The recipe's keys are the fields of ``OnlineScriptArguments`` (data and reward, as ``sqlm train``
names them: ``reward_funcs``, ``reward_kwargs``, ``allow_code_rewards``, ``reward_scale``), TRL's
``GRPOConfig`` (training, generation, loss) and TRL's ``ModelConfig`` (model, LoRA). See
``sqlm/commands/_online_baseline.py`` for what is shared with ``sqlm rloo``. Writes the model and
``run_stats.json`` (generated completions and tokens, optimizer steps, wall time) to ``output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import GRPOConfig

from . import _online_baseline as online


@dataclass
class SqlmGRPOConfig(online.AutoBf16, GRPOConfig):
    """TRL's ``GRPOConfig``; ``bf16`` unset = on only with a bf16-capable accelerator."""


def recipe_dataclasses():
    """The config classes a ``sqlm grpo`` recipe parses into."""
    from ..config import ModelConfig

    return online.OnlineScriptArguments, SqlmGRPOConfig, ModelConfig


def parse(argv: list[str]):
    return online.parse(recipe_dataclasses(), argv)


def trainer_class():
    """TRL's ``GRPOTrainer``, generating from sqlm's prompt tokens and counting what it generates."""
    from trl import GRPOTrainer

    return online.make_trainer_class(GRPOTrainer)


def main(argv: list[str] | None = None) -> int:
    return online.main("grpo", recipe_dataclasses(), trainer_class, __doc__ or "", argv)
