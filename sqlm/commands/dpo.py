"""``sqlm dpo RECIPE.yaml [--key value ...]``: TRL's ``DPOTrainer`` on the data of a paired sqlm recipe.

The baseline every sqlm result is measured against. A DPO recipe sits beside its sqlm recipe
(``recipes/<task>/dpo/`` next to ``recipes/<task>/sqlm/``) and repeats its model, data, lengths and
seed; ``beta`` plays the part of sqlm's ``tau`` (both target ``pi*(y|x) ~ pi_ref(y|x) exp(R/beta)``).

The recipe's keys are the fields of :class:`DPOScriptArguments` (data, as ``sqlm train`` names
them), TRL's ``DPOConfig`` (training) and TRL's ``ModelConfig`` (model, LoRA).

Same tokens as sqlm: :class:`SqlmDPOTrainer` replaces DPOTrainer's dataset preparation with
``sqlm.data.prepare_dataset`` -- the very function ``sqlm train`` tokenises with (TRL's EOS
handling, chat templates and common-prefix split, plus sqlm's ``max_prompt_length`` /
``max_completion_length``) -- so the two trainers see byte-identical ``prompt_ids`` /
``chosen_ids`` / ``rejected_ids``. The reference is the initial model (a frozen copy, or the base
model with the adapter disabled under LoRA), as in ``sqlm train``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from trl import DPOConfig, DPOTrainer

from ..config import accelerator_supports_bf16, as_mapping
from ..errors import SqlmError
from ..recipe import split_argv, wants_help
from ._stats import write_run_stats


@dataclass
class DPOScriptArguments:
    """Data arguments of ``sqlm dpo``, with the names (and meaning) of ``sqlm train``'s."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Preference data (prompt/chosen/rejected): a hub id, a local folder, or a "
            ".json/.jsonl/.parquet/.csv file (relative paths are also looked up beside the recipe)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split to evaluate on; None = none."})
    dataset_column_map: dict | str | None = field(
        default=None, metadata={"help": "Rename dataset columns to prompt/chosen/rejected before use."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Maximum prompt tokens; longer prompts keep their end (as sqlm train)."}
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Maximum completion tokens; longer completions keep their start."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use; defaults to model_name_or_path."}
    )


@dataclass
class SqlmDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` with one change, as ``SoftQConfig``: ``bf16`` left unset means on only when
    a bf16-capable accelerator is present (TRL's default turns it on, which fails on a CPU)."""

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = (not self.fp16) and (not self.use_cpu) and accelerator_supports_bf16()
        super().__post_init__()


def recipe_dataclasses():
    """The config classes a ``sqlm dpo`` recipe parses into (data, TRL's DPOConfig, TRL's ModelConfig)."""
    from ..config import ModelConfig

    return DPOScriptArguments, SqlmDPOConfig, ModelConfig


def _column_map(value):
    return as_mapping(value, "dataset_column_map")


def data_args(script_args: DPOScriptArguments, config) -> SimpleNamespace:
    """The fields ``sqlm.data.prepare_dataset`` reads, from a DPO recipe (same names as sqlm's)."""
    return SimpleNamespace(
        mode="offline",
        dataset_column_map=_column_map(script_args.dataset_column_map),
        chosen_score_column=None,
        rejected_score_column=None,
        max_length=config.max_length,
        max_prompt_length=script_args.max_prompt_length,
        max_completion_length=script_args.max_completion_length,
        dataset_num_proc=config.dataset_num_proc,
    )


class SqlmDPOTrainer(DPOTrainer):
    """``DPOTrainer`` whose datasets are tokenised by ``sqlm.data.prepare_dataset`` (as sqlm's)."""

    def __init__(self, *args, sqlm_data_args=None, **kwargs):
        self._sqlm_data_args = sqlm_data_args
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        from ..data.prepare import prepare_dataset

        if self._sqlm_data_args is None:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        return prepare_dataset(dataset, tokenizer, self._sqlm_data_args, mode="offline", name=dataset_name)


def build_trainer(script_args, config, model_args, recipe: str | None = None):
    """A ready :class:`SqlmDPOTrainer` from the three parsed dataclasses."""
    from ..config import get_peft_config
    from ..data.sources import load_train_eval
    from ..loading import check_model_args, load_model_and_tokenizer

    if script_args.dataset_name is None:
        raise SqlmError("set dataset_name (a preference dataset: prompt, chosen, rejected)")
    check_model_args(model_args, "sqlm dpo")
    train, evaluation = load_train_eval(script_args, str(Path(recipe).resolve().parent) if recipe else None)
    model, tokenizer = load_model_and_tokenizer(
        model_args, config, train, _column_map(script_args.dataset_column_map), script_args.tokenizer_name_or_path
    )
    return SqlmDPOTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        sqlm_data_args=data_args(script_args, config),
    )


def parse(argv: list[str]):
    from ..recipe import parse_recipe

    recipe, overrides = split_argv(argv)
    script_args, config, model_args = parse_recipe(recipe_dataclasses(), recipe, overrides)
    return recipe, script_args, config, model_args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(argv or [])
    if not argv or wants_help(argv):
        print("usage: sqlm dpo RECIPE.yaml [--key value ...]\n\n" + (__doc__ or ""))
        return 0
    recipe, script_args, config, model_args = parse(argv)
    trainer = build_trainer(script_args, config, model_args, recipe)
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    out = Path(config.output_dir)
    trainer.save_model(str(out))
    write_run_stats(trainer, "dpo", seconds, out)
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(out)
        print(f"sqlm dpo: saved the model to {out}")
    return 0
