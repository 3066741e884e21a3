"""``sqlm reward RECIPE.yaml [--key value ...]``: train a Bradley-Terry reward model.

A thin wrapper over TRL's ``RewardTrainer`` (loss ``−log σ(R(x, y_c) − R(x, y_r))``). The recipe's
keys are the fields of :class:`RewardScriptArguments` (model and data) and of TRL's
``RewardConfig`` (training), with the names TRL uses. The model is saved to ``output_dir`` as
safetensors and loads with ``AutoModelForSequenceClassification``; held-out accuracy (chosen scored
above rejected) is written to ``output_dir/reward_eval.json``.

With ``tiny: true`` nothing is downloaded: the tokenizer, the model and a preference dataset with a
learnable preference are built locally (:mod:`sqlm.rewards.toy`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SqlmError


@dataclass
class RewardScriptArguments:
    """Model and data arguments of ``sqlm reward`` (training arguments are TRL's ``RewardConfig``)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model to start from: a Hub id or a local directory (a causal LM or a classifier)."},
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
        default=0.0, metadata={"help": "Hold out this fraction of the train split for evaluation when there is no test split."}
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
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: PEFT's choice for the architecture)."}
    )


def _load_split(args: RewardScriptArguments):
    """(train, eval or None) datasets from the script arguments."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    name = args.dataset_name
    if name is None:
        raise SqlmError("set dataset_name (or tiny: true for the offline toy task)")
    path = Path(name)
    try:
        if path.is_file():
            ext = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
            if ext is None:
                raise SqlmError(f"dataset file {name} must be .json, .jsonl, .csv or .parquet")
            data = load_dataset(ext, data_files={"train": str(path)})
        elif path.is_dir() and (
            (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()
        ):
            data = load_from_disk(str(path))
        else:
            data = load_dataset(name, args.dataset_config)
    except SqlmError:
        raise
    except Exception as e:  # network, missing files, bad formats: all the user's to fix
        raise SqlmError(f"could not load dataset '{name}': {type(e).__name__}: {e}") from None
    if isinstance(data, Dataset):
        data = DatasetDict({"train": data})
    if args.dataset_train_split not in data:
        raise SqlmError(
            f"dataset '{name}' has no split '{args.dataset_train_split}' (dataset_train_split); splits: {list(data)}"
        )
    train = data[args.dataset_train_split]
    evaluation = data[args.dataset_test_split] if args.dataset_test_split in data else None
    if evaluation is None and args.eval_fraction > 0:
        parts = train.train_test_split(test_size=args.eval_fraction, seed=0)
        train, evaluation = parts["train"], parts["test"]
    for col in ("chosen", "rejected"):
        if col not in train.column_names:
            raise SqlmError(f"dataset '{name}' has no '{col}' column; columns: {train.column_names}")
    return train, evaluation


def _check_pad(tokenizer, args: RewardScriptArguments) -> None:
    if args.tokenizer_pad_token is not None:
        if args.tokenizer_pad_token not in tokenizer.get_vocab():
            raise SqlmError(f"tokenizer_pad_token '{args.tokenizer_pad_token}' is not in the tokenizer's vocabulary")
        tokenizer.pad_token = args.tokenizer_pad_token
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise SqlmError(
            "the tokenizer has no pad token distinct from EOS; set tokenizer_pad_token to an unused token "
            "(a sequence classifier reads its score at the last non-pad token, which would skip the EOS)"
        )


def pairwise_accuracy(model, tokenizer, dataset, batch_size: int = 32) -> float:
    """Fraction of pairs whose chosen completion the model scores above the rejected one, with the
    score read at the last real token (:class:`sqlm.rewards.models.TerminalRewarder`)."""
    from .cache import make_batch, tokenize_preference_example
    from .models import TerminalRewarder

    scorer = TerminalRewarder(model, tokenizer, batch_size=batch_size)
    pad = tokenizer.pad_token_id
    wins = 0
    rows = dataset.with_format(None)
    for start in range(0, len(rows), batch_size):
        chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        toks = [tokenize_preference_example(ex, tokenizer) for ex in chunk]
        rc = scorer.sequence_rewards(make_batch([t["prompt_ids"] for t in toks], [t["chosen_ids"] for t in toks], pad))
        rr = scorer.sequence_rewards(make_batch([t["prompt_ids"] for t in toks], [t["rejected_ids"] for t in toks], pad))
        wins += int((rc > rr).sum())
    return wins / max(len(rows), 1)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sqlm reward RECIPE.yaml [--key value ...]\n\n" + (__doc__ or ""))
        return 0
    recipe, overrides = (argv[0], argv[1:]) if not argv[0].startswith("--") else (None, argv)

    from trl import RewardConfig

    from ..recipe import parse_recipe

    script_args, config = parse_recipe([RewardScriptArguments, RewardConfig], recipe, overrides)

    from trl import RewardTrainer

    if script_args.tiny:
        from .toy import toy_preference_dataset, toy_reward_model, toy_tokenizer

        tokenizer = toy_tokenizer(seed=config.seed)
        model = toy_reward_model(tokenizer, seed=config.seed)
        seed = script_args.tiny_data_seed
        train = toy_preference_dataset(script_args.tiny_train_size, seed=seed)
        evaluation = toy_preference_dataset(script_args.tiny_eval_size, seed=seed + 1)
    else:
        from transformers import AutoTokenizer

        if script_args.model_name_or_path is None:
            raise SqlmError("set model_name_or_path (or tiny: true for the offline toy task)")
        tok_name = script_args.tokenizer_name_or_path or script_args.model_name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_name, trust_remote_code=config.trust_remote_code)
        except OSError as e:
            raise SqlmError(f"could not load tokenizer '{tok_name}': {e}") from None
        model = script_args.model_name_or_path  # RewardTrainer loads it with num_labels=1
        train, evaluation = _load_split(script_args)
    _check_pad(tokenizer, script_args)
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if evaluation is not None and script_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(script_args.max_eval_samples, len(evaluation))))

    peft_config = None
    if script_args.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="SEQ_CLS",
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            lora_dropout=script_args.lora_dropout,
            target_modules=script_args.lora_target_modules,
            modules_to_save=["score"],
        )
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    out = Path(config.output_dir)
    if script_args.use_peft:
        model = trainer.model.merge_and_unload()
        if trainer.is_world_process_zero():
            model.save_pretrained(out)  # safetensors
            tokenizer.save_pretrained(out)
    else:
        trainer.save_model(str(out))  # safetensors + the tokenizer, on the main process
        model = trainer.model
    if not trainer.is_world_process_zero():
        return 0
    report = {"train_pairs": len(train)}
    if evaluation is not None:
        model.eval()
        report["eval_pairs"] = len(evaluation)
        report["eval_accuracy"] = pairwise_accuracy(model, tokenizer, evaluation)
        print(f"held-out accuracy (chosen scored above rejected): {report['eval_accuracy']:.3f}")
    (out / "reward_eval.json").write_text(json.dumps(report, indent=1))
    return 0
