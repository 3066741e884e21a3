"""``sqlm train RECIPE.yaml [--key value ...]``: fine-tune a causal LM with SoftQTrainer.

The recipe's keys are the fields of :class:`sqlm.config.SoftQConfig` (TrainingArguments plus the
soft-Q, data and reward fields) and of TRL's ``ModelConfig`` (model, dtype, LoRA). Flags override
the recipe. ``python scripts/train.py --config RECIPE.yaml`` and
``accelerate launch --config_file recipes/accelerate/ddp.yaml scripts/train.py --config RECIPE.yaml``
run the same entry point.

``model_name_or_path: tiny[:key=value,...]`` builds (or loads from the cache) a tiny model and
tokenizer from the training set's text, with no download (:func:`sqlm.tiny.build_tiny_model`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import SqlmError
from ..recipe import split_argv, wants_help


QUICKSTART = "recipes/quickstart/sqlm/config.yaml"


def recipe_dataclasses():
    """The config classes a ``sqlm train`` recipe parses into (``SoftQConfig``, ``ModelConfig``)."""
    from ..config import TRAIN_DATACLASSES

    return TRAIN_DATACLASSES


def parse_train_args(argv: Sequence[str]):
    """Recipe + flags -> ``(SoftQConfig, ModelConfig, recipe_dir)``."""
    from ..config import check_train_args
    from ..recipe import parse_recipe

    recipe, overrides = split_argv(argv)
    args, model_args = parse_recipe(recipe_dataclasses(), recipe, overrides)
    check_train_args(args, model_args)
    recipe_dir = str(Path(recipe).resolve().parent) if recipe else None
    return args, model_args, recipe_dir


def build_trainer(args, model_args, recipe_dir: str | None = None):
    """Load data, model, tokenizer and LoRA config from parsed arguments -> a SoftQTrainer."""
    from ..config import get_peft_config
    from ..data import load_train_eval
    from ..loading import check_model_args, load_model_and_tokenizer
    from ..trainer import SoftQTrainer

    if not args.dataset_name:
        raise SqlmError("the recipe sets no 'dataset_name' (a hub id or a local .jsonl/.json/.parquet/.csv)")
    check_model_args(model_args, "sqlm train")
    train, evals = load_train_eval(args, recipe_dir)
    model, tokenizer = load_model_and_tokenizer(model_args, args, train, args.dataset_column_map)
    return SoftQTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        reward_search_dirs=[recipe_dir] if recipe_dir else None,
    )


def save_outputs(trainer) -> None:
    """Save the model (the adapter with PEFT) and tokenizer to output_dir; with ``merge_adapter``
    also the merged model to ``output_dir/merged``. ``run`` adds ``run_stats.json`` (generated
    completions and tokens, optimizer steps, wall time), as every training command writes."""
    from ..target import is_peft

    args = trainer.args
    trainer.save_model(args.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if args.merge_adapter and is_peft(model):
        trainer.accelerator.wait_for_everyone()
        if trainer.accelerator.is_main_process:
            import copy

            merged = copy.deepcopy(model).merge_and_unload()
            out = os.path.join(args.output_dir, "merged")
            merged.save_pretrained(out)
            trainer.processing_class.save_pretrained(out)


def run(argv: Sequence[str]):
    """Parse, train, save; returns the trainer.

    Config, data and model are checked before ``output_dir`` is created. If the run fails after
    that, whatever it wrote there is removed again except complete checkpoints (see
    :class:`sqlm.guards.OutputDirGuard`), so a failed run leaves nothing half-written.
    ``resume_from_checkpoint: true`` / ``latest`` resumes from the newest complete checkpoint of
    ``output_dir`` (:func:`sqlm.checkpoint.resolve_resume`)."""
    from ..checkpoint import resolve_resume
    from ..guards import OutputDirGuard
    from ._stats import write_run_stats

    args, model_args, recipe_dir = parse_train_args(argv)
    checkpoint = resolve_resume(args.resume_from_checkpoint, args.output_dir or ".")
    with OutputDirGuard(args.output_dir, enabled=args.should_save):
        trainer = build_trainer(args, model_args, recipe_dir)
        started = time.time()
        trainer.train(resume_from_checkpoint=checkpoint)
        seconds = time.time() - started
        save_outputs(trainer)
        write_run_stats(trainer, "sqlm", seconds, args.output_dir)
    return trainer


def usage() -> str:
    return (
        "usage: sqlm train RECIPE.yaml [--key value ...]\n"
        "       python scripts/train.py --config RECIPE.yaml [--key value ...]\n\n"
        "Keys: every field of sqlm.config.SoftQConfig (transformers.TrainingArguments plus loss_type, tau,\n"
        "gamma, rollout_length, reduction, mode, mix_ratio, reward_funcs, dataset_name, ...) and of TRL's\n"
        f"ModelConfig (model_name_or_path, dtype, use_peft, lora_r, ...). See {QUICKSTART}."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``sqlm train``: 0 once the run is saved. A process of a multi-process launch does not return: it
    exits with code 0 when every process has finished (see :func:`finish`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(usage())
        return 0
    trainer = run(argv)
    if trainer.accelerator.is_main_process:
        print(f"sqlm train: saved to {trainer.args.output_dir}")
    finish(trainer)
    return 0


def finish(trainer) -> None:
    """The end of a complete, saved run: every process waits for the others and ends its process groups
    (:func:`sqlm.shutdown.end_process_group`). A process of a multi-process launch then exits with code 0
    here (:func:`sqlm.shutdown.exit_process`: ``atexit`` handlers run, the saved files are synced, the
    interpreter's finalisation is skipped): the gloo threads of the groups that FSDP2 / DeepSpeed still hold
    outlive ``destroy_process_group()`` and, left to the finalisation, sometimes abort the finished process
    ("terminate called without an active exception", exit code -6). A single process returns as before."""
    from ..shutdown import end_process_group, exit_process

    launched = trainer.accelerator.num_processes > 1
    end_process_group(trainer.accelerator)
    if launched:
        out = trainer.args.output_dir
        exit_process(0, fsync=[out, os.path.join(out, "merged")] if out else ())
