"""``sqlm train RECIPE.yaml [--key value ...]``: fine-tune a causal LM with SoftQTrainer.

The recipe's keys are the fields of :class:`sqlm.config.SoftQConfig` (TrainingArguments plus the
soft-Q, data and reward fields) and of TRL's ``ModelConfig`` (model, dtype, LoRA). Flags override
the recipe. ``python scripts/train.py --config RECIPE.yaml`` and
``accelerate launch --config_file recipes/accelerate/ddp.yaml scripts/train.py --config RECIPE.yaml``
run the same entry point.

``model_name_or_path: tiny[:key=value,...]`` builds (or loads from the cache) a tiny Qwen2-shaped
model and a byte-level BPE tokenizer trained on the training set's text, with no download; keys are
``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads``, ``seed``. The cache is ``$SQLM_CACHE/tiny`` (default ``~/.cache/sqlm/tiny``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import SqlmError

TINY_DEFAULTS = {
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "seed": 0,
}


# ----------------------------------------------------------------------------- tiny models


def parse_tiny_spec(spec: str) -> dict[str, int]:
    """``tiny:hidden_size=32,num_hidden_layers=1`` -> the tiny model's settings (with defaults)."""
    if spec != "tiny" and not spec.startswith("tiny:"):
        raise SqlmError(f"not a tiny model spec: {spec!r} (expected 'tiny' or 'tiny:key=value,...')")
    out = dict(TINY_DEFAULTS)
    body = spec[5:] if spec.startswith("tiny:") else ""
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in TINY_DEFAULTS:
            raise SqlmError(
                f"bad tiny model setting {part!r} in {spec!r}; keys: {', '.join(TINY_DEFAULTS)}"
            )
        try:
            out[key] = int(value)
        except ValueError:
            raise SqlmError(f"tiny model setting '{key}' must be an integer, got {value!r}") from None
    return out


def _texts(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _texts(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _texts(v)


def dataset_texts(dataset, columns: Sequence[str] = ("prompt", "chosen", "rejected", "completion")) -> list[str]:
    """All text of the given columns (conversations flattened), in row order."""
    out: list[str] = []
    for col in columns:
        if col in dataset.column_names:
            for v in dataset[col]:
                out.extend(_texts(v))
    return out


def tiny_cache_dir() -> Path:
    from .paths import cache_dir

    return cache_dir("tiny")


def build_tiny_model(spec: str, texts: Sequence[str], cache_dir: str | os.PathLike | None = None):
    """A tiny causal LM and a tokenizer trained on ``texts`` (deterministic), cached on disk by a hash
    of the spec and the texts. Returns ``(model, tokenizer, path)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tiny import tiny_model_for_tokenizer, train_tokenizer

    settings = parse_tiny_spec(spec)
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace") + b"\0")
    path = Path(cache_dir) if cache_dir is not None else tiny_cache_dir() / h.hexdigest()[:16]
    if not (path / "config.json").exists():
        s = dict(settings)
        vocab, seed = s.pop("vocab_size"), s.pop("seed")
        tok = train_tokenizer(texts, vocab_size=vocab)
        model = tiny_model_for_tokenizer(tok, seed=seed, intermediate_size=2 * s["hidden_size"], **s)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, path)  # atomic; another process may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, path


# ----------------------------------------------------------------------------- building a run


def split_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[RECIPE] [--config RECIPE] [--key value ...]`` -> (recipe, overrides)."""
    argv = list(argv)
    recipe = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SqlmError("--config needs a recipe path")
        recipe = argv[i + 1]
        del argv[i : i + 2]
    elif any(a.startswith("--config=") for a in argv):
        i = next(i for i, a in enumerate(argv) if a.startswith("--config="))
        recipe = argv.pop(i).split("=", 1)[1]
    if recipe is None and argv and not argv[0].startswith("-"):
        recipe = argv.pop(0)
    return recipe, argv


def parse_train_args(argv: Sequence[str]):
    """Recipe + flags -> ``(SoftQConfig, ModelConfig, recipe_dir)``."""
    from .config import TRAIN_DATACLASSES, check_train_args
    from .recipe import parse_recipe

    recipe, overrides = split_argv(argv)
    args, model_args = parse_recipe(TRAIN_DATACLASSES, recipe, overrides)
    check_train_args(args, model_args)
    recipe_dir = str(Path(recipe).resolve().parent) if recipe else None
    return args, model_args, recipe_dir


def model_init_kwargs(args, model_args) -> dict[str, Any]:
    kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": bool(args.trust_remote_code or getattr(model_args, "trust_remote_code", False)),
    }
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.update(args.model_init_kwargs or {})
    if kwargs.get("use_safetensors", True) is not True:
        raise SqlmError("key 'model_init_kwargs' sets use_safetensors: false; sqlm loads weights from safetensors only")
    kwargs["use_safetensors"] = True  # never unpickle weights
    return kwargs


def load_pretrained(name: str, args, model_args):
    """Model and tokenizer from a hub id or local folder (safetensors only; ``trust_remote_code``
    only when the recipe turns it on). A missing folder or, offline, an uncached hub id is one
    :class:`SqlmError` naming it."""
    from transformers import AutoTokenizer
    from trl.trainer.utils import create_model_from_path

    from .data import _one_line

    kwargs = model_init_kwargs(args, model_args)
    try:
        model = create_model_from_path(name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=kwargs.get("trust_remote_code", False)
        )
    except (OSError, ValueError, ImportError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = " (not a local folder and not in the local hub cache; HF_HUB_OFFLINE is set)" if offline and not Path(name).exists() else ""
        raise SqlmError(f"could not load model '{name}'{hint}: {_one_line(e)}") from None
    return model, tokenizer


def build_trainer(args, model_args, recipe_dir: str | None = None):
    """Load data, model, tokenizer and LoRA config from parsed arguments -> a SoftQTrainer."""
    from accelerate import PartialState

    from .config import get_peft_config
    from .data import load_train_eval
    from .trainer import SoftQTrainer

    if not args.dataset_name:
        raise SqlmError("the recipe sets no 'dataset_name' (a hub id or a local .jsonl/.json/.parquet/.csv)")
    if not model_args.model_name_or_path:
        raise SqlmError("the recipe sets no 'model_name_or_path' (a hub id, a local path, or 'tiny')")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise SqlmError("load_in_4bit / load_in_8bit are not supported by sqlm train; use LoRA on a bf16 model")

    train, evals = load_train_eval(args, recipe_dir)

    name = model_args.model_name_or_path
    if name == "tiny" or name.startswith("tiny:"):
        texts = dataset_texts(train.rename_columns(dict(args.dataset_column_map)) if args.dataset_column_map else train)
        with PartialState().main_process_first():
            model, tokenizer, _ = build_tiny_model(name, texts)
    else:
        model, tokenizer = load_pretrained(name, args, model_args)
    return SoftQTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        reward_search_dirs=[recipe_dir] if recipe_dir else None,
    )


def _resume_value(value: str | None, output_dir: str | None = None):
    """``resume_from_checkpoint`` -> a complete checkpoint folder or None (``true`` / ``latest``: the
    newest complete checkpoint of ``output_dir``; see :func:`sqlm.guards.resolve_resume`)."""
    from .guards import resolve_resume

    return resolve_resume(value, output_dir or ".")


def save_outputs(trainer) -> None:
    """Save the model (the adapter with PEFT) and tokenizer to output_dir; with ``merge_adapter``
    also the merged model to ``output_dir/merged``."""
    from .trainer import _is_peft

    args = trainer.args
    trainer.save_model(args.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if args.merge_adapter and _is_peft(model):
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
    :class:`sqlm.guards.OutputDirGuard`), so a failed run leaves nothing half-written."""
    from .guards import OutputDirGuard

    args, model_args, recipe_dir = parse_train_args(argv)
    checkpoint = _resume_value(args.resume_from_checkpoint, args.output_dir)
    with OutputDirGuard(args.output_dir, enabled=args.should_save):
        trainer = build_trainer(args, model_args, recipe_dir)
        trainer.train(resume_from_checkpoint=checkpoint)
        save_outputs(trainer)
    return trainer


def _help() -> str:
    return (
        "usage: sqlm train RECIPE.yaml [--key value ...]\n"
        "       python scripts/train.py --config RECIPE.yaml [--key value ...]\n\n"
        "Keys: every field of sqlm.config.SoftQConfig (transformers.TrainingArguments plus loss_type, tau,\n"
        "gamma, rollout_length, reduction, mode, mix_ratio, reward_funcs, dataset_name, ...) and of TRL's\n"
        "ModelConfig (model_name_or_path, dtype, use_peft, lora_r, ...). See recipes/quickstart/sqlm.yaml."
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(_help())
        return 0
    trainer = run(argv)
    if trainer.accelerator.is_main_process:
        print(f"sqlm train: saved to {trainer.args.output_dir}")
    return 0


def recipe_dataclasses():
    """The config classes a ``sqlm train`` recipe parses into (``SoftQConfig``, ``ModelConfig``)."""
    from .config import TRAIN_DATACLASSES

    return TRAIN_DATACLASSES
