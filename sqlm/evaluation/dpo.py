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

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from trl import DPOConfig

from ..config import _accelerator_supports_bf16
from ..errors import SqlmError


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
            self.bf16 = (not self.fp16) and (not self.use_cpu) and _accelerator_supports_bf16()
        super().__post_init__()


def dpo_config_class():
    return SqlmDPOConfig


def _dataclasses():
    from ..config import ModelConfig

    return DPOScriptArguments, dpo_config_class(), ModelConfig


def _column_map(value):
    if value is None or isinstance(value, dict):
        return value
    try:
        out = json.loads(value)
    except json.JSONDecodeError as e:
        raise SqlmError(f"key 'dataset_column_map' must be a mapping or a JSON object string: {e}") from None
    if not isinstance(out, dict):
        raise SqlmError("key 'dataset_column_map' must be a mapping")
    return out


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


def _make_trainer_class():
    from trl import DPOTrainer

    from ..data import prepare_dataset

    class SqlmDPOTrainer(DPOTrainer):
        """``DPOTrainer`` whose datasets are tokenised by ``sqlm.data.prepare_dataset`` (as sqlm's)."""

        def __init__(self, *args, sqlm_data_args=None, **kwargs):
            self._sqlm_data_args = sqlm_data_args
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if self._sqlm_data_args is None:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            return prepare_dataset(dataset, tokenizer, self._sqlm_data_args, mode="offline", name=dataset_name)

    return SqlmDPOTrainer


def load_model_and_tokenizer(model_args, script_args, config, train_dataset):
    """The policy and tokenizer, loaded as ``sqlm train`` loads them: a hub id / local path with the
    same init kwargs, or ``tiny:...`` built offline from the training text (the same cached model
    ``sqlm train`` builds for the same recipe)."""
    name = model_args.model_name_or_path
    if not name:
        raise SqlmError("the recipe sets no 'model_name_or_path' (a hub id, a local path, or 'tiny')")
    if name == "tiny" or name.startswith("tiny:"):
        from ..train import build_tiny_model, dataset_texts

        cmap = _column_map(script_args.dataset_column_map)
        texts = dataset_texts(train_dataset.rename_columns(cmap) if cmap else train_dataset)
        model, tokenizer, _ = build_tiny_model(name, texts)
        return model, tokenizer
    from transformers import AutoTokenizer
    from trl.trainer.utils import create_model_from_path

    trust = bool(getattr(config, "trust_remote_code", False))
    kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": trust,
    }
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.update(_column_map(config.model_init_kwargs) or {})
    tok_name = script_args.tokenizer_name_or_path or name
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_name, revision=model_args.model_revision, trust_remote_code=trust)
        model = create_model_from_path(name, **kwargs)
    except OSError as e:
        raise SqlmError(f"could not load model or tokenizer '{name}': {e}") from None
    return model, tokenizer


def load_datasets(script_args: DPOScriptArguments, recipe: str | None):
    from ..data import load_train_eval

    if script_args.dataset_name is None:
        raise SqlmError("set dataset_name (a preference dataset: prompt, chosen, rejected)")
    return load_train_eval(script_args, str(Path(recipe).resolve().parent) if recipe else None)


def build_trainer(script_args, config, model_args, recipe: str | None = None):
    """A ready :class:`SqlmDPOTrainer` from the three parsed dataclasses."""
    from ..config import get_peft_config

    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise SqlmError("load_in_4bit / load_in_8bit are not supported by sqlm dpo (as sqlm train)")
    train, evaluation = load_datasets(script_args, recipe)
    model, tokenizer = load_model_and_tokenizer(model_args, script_args, config, train)
    trainer_cls = _make_trainer_class()
    return trainer_cls(
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

    recipe, overrides = (argv[0], argv[1:]) if argv and not argv[0].startswith("--") else (None, argv)
    script_args, config, model_args = parse_recipe(_dataclasses(), recipe, overrides)
    return recipe, script_args, config, model_args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sqlm dpo RECIPE.yaml [--key value ...]\n\n" + (__doc__ or ""))
        return 0
    recipe, script_args, config, model_args = parse(argv)
    trainer = build_trainer(script_args, config, model_args, recipe)
    trainer.train()
    out = Path(config.output_dir)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(out)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        summary = {"beta": config.beta, "steps": trainer.state.global_step, "last_log": logs[-1] if logs else None}
        (out / "dpo_summary.json").write_text(json.dumps(summary, indent=1))
        print(f"sqlm dpo: saved the model to {out}")
    return 0
