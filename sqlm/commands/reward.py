"""``sqlm reward RECIPE.yaml [--key value ...]``: train a Bradley-Terry reward model.

A thin wrapper over TRL's ``RewardTrainer`` (loss ``−log σ(R(x, y_c) − R(x, y_r))``, see
:func:`sqlm.rewards.train.train_reward_model`). The recipe's keys are the fields of
:class:`RewardScriptArguments` (TRL's ``ModelConfig`` -- model, dtype, LoRA -- plus the data) and of
TRL's ``RewardConfig`` (training), with the names TRL uses. The model is saved to ``output_dir`` as
safetensors and loads with ``AutoModelForSequenceClassification``; held-out accuracy (chosen scored
above rejected) is printed with the number of held-out pairs (a warning when they are fewer than 20,
too few to read) and written to ``output_dir/reward_eval.json``.

With ``tiny: true`` nothing is downloaded: the tokenizer, the model and a preference dataset with a
learnable preference are built locally (:mod:`sqlm.rewards.toy`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig
from ..errors import SqlmError
from ..recipe import split_argv, wants_help


@dataclass
class RewardScriptArguments(ModelConfig):
    """Model and data arguments of ``sqlm reward``: TRL's ``ModelConfig`` keys (``model_name_or_path``,
    ``dtype``, ``use_peft``, ``lora_*``, ...; LoRA on a sequence classifier by default, its ``score``
    head trained in full) and the data (training arguments are TRL's ``RewardConfig``)."""

    lora_task_type: str = field(default="SEQ_CLS", metadata={"help": "PEFT task type (a sequence classifier)."})
    lora_modules_to_save: list[str] | None = field(
        default_factory=lambda: ["score"], metadata={"help": "Modules trained in full beside the LoRA adapters."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use; defaults to model_name_or_path."}
    )
    tokenizer_pad_token: str | None = field(
        default=None,
        metadata={
            "help": "A pad token distinct from EOS (e.g. '<|finetune_right_pad_id|>' for Llama 3). Required when "
            "the tokenizer has no pad token or pads with EOS: the score must be read at the real last token."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Preference data (prompt/chosen/rejected): a Hub id, a directory saved with "
            "datasets' save_to_disk, or a .json/.jsonl/.csv/.parquet file."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default="test", metadata={"help": "Split to evaluate on (skipped when the dataset has none)."}
    )
    eval_fraction: float = field(
        default=0.0,
        metadata={"help": "Hold out this fraction of the train split for evaluation when there is no test split."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many evaluation pairs."})
    tiny: bool = field(
        default=False,
        metadata={"help": "Build a tiny tokenizer, model and toy preference data locally (no downloads)."},
    )
    tiny_train_size: int = field(default=512, metadata={"help": "Toy training pairs (with tiny: true)."})
    tiny_eval_size: int = field(default=128, metadata={"help": "Toy held-out pairs (with tiny: true)."})
    tiny_data_seed: int = field(default=0, metadata={"help": "Seed of the toy data (with tiny: true)."})


def _check_pad(tokenizer, args: RewardScriptArguments) -> None:
    from ..rewards.train import check_pad_token

    check_pad_token(tokenizer, args.tokenizer_pad_token)


def recipe_dataclasses():
    """The config classes a ``sqlm reward`` recipe parses into (``RewardScriptArguments``, TRL's ``RewardConfig``)."""
    from trl import RewardConfig

    return RewardScriptArguments, RewardConfig


def load_data_and_model(script_args: RewardScriptArguments, config, recipe_dir: str | None = None):
    """``(model, tokenizer, train, evaluation)``: the toy task with ``tiny: true``, else the recipe's
    model (a sequence classifier with one label, loaded as every command loads models) and data."""
    from transformers import AutoModelForSequenceClassification, set_seed

    from ..data.sources import load_train_eval, take_first
    from ..loading import check_model_args, load_model, load_tokenizer, model_init_kwargs
    from ..rewards.train import check_preference_columns

    if script_args.tiny:
        from ..rewards.toy import toy_preference_dataset, toy_reward_model, toy_tokenizer

        tokenizer = toy_tokenizer(seed=config.seed)
        model = toy_reward_model(tokenizer, seed=config.seed)
        seed = script_args.tiny_data_seed
        train = toy_preference_dataset(script_args.tiny_train_size, seed=seed)
        evaluation = toy_preference_dataset(script_args.tiny_eval_size, seed=seed + 1)
        _check_pad(tokenizer, script_args)
        return (
            model,
            tokenizer,
            take_first(train, script_args.max_train_samples),
            take_first(evaluation, script_args.max_eval_samples),
        )
    if script_args.model_name_or_path is None:
        raise SqlmError("set model_name_or_path (or tiny: true for the offline toy task)")
    check_model_args(script_args, "sqlm reward")
    kwargs = model_init_kwargs(config, script_args)
    tokenizer = load_tokenizer(
        script_args.tokenizer_name_or_path or script_args.model_name_or_path,
        script_args.model_revision,
        kwargs["trust_remote_code"],
    )
    if script_args.dataset_name is None:
        raise SqlmError("set dataset_name (or tiny: true for the offline toy task)")
    train, evaluation = load_train_eval(script_args, recipe_dir, optional_test_split=True)
    check_preference_columns(train, script_args.dataset_name)
    _check_pad(tokenizer, script_args)
    if config.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # as RewardTrainer: "auto" fails under data parallelism
    set_seed(config.seed)  # the new score head's initialisation
    model = load_model(script_args.model_name_or_path, {**kwargs, "num_labels": 1}, AutoModelForSequenceClassification)
    return model, tokenizer, train, evaluation


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(argv or [])
    if not argv or wants_help(argv):
        print("usage: sqlm reward RECIPE.yaml [--key value ...]\n\n" + (__doc__ or ""))
        return 0
    from ..config import get_peft_config
    from ..recipe import parse_recipe
    from ..rewards.train import MIN_HELDOUT_PAIRS, heldout_warning, train_reward_model

    recipe, overrides = split_argv(argv)
    script_args, config = parse_recipe(recipe_dataclasses(), recipe, overrides)
    recipe_dir = str(Path(recipe).resolve().parent) if recipe else None
    model, tokenizer, train, evaluation = load_data_and_model(script_args, config, recipe_dir)
    _, report = train_reward_model(model, tokenizer, train, evaluation, config, get_peft_config(script_args))
    if report is not None and "eval_accuracy" in report:
        accuracy, pairs = report["eval_accuracy"], report["eval_pairs"]
        print(f"held-out accuracy (chosen scored above rejected): {accuracy:.3f} on {pairs} pairs")
        keys = "tiny_eval_size" if script_args.tiny else "dataset_test_split, eval_fraction, max_eval_samples"
        fix = f"hold out at least {MIN_HELDOUT_PAIRS} pairs ({keys})"
        if msg := heldout_warning(accuracy, pairs, fix):
            logging.getLogger(__name__).warning(msg)
    return 0
