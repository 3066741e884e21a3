"""Loading models and tokenizers: one way for every command, the trainer and the evaluation.

* **Safetensors only.** Weights load with ``use_safetensors=True``: a folder with only a pickled
  checkpoint is refused without being unpickled, and ``model_init_kwargs: {use_safetensors: false}``
  is an error.
* **Remote code is opt-in.** ``trust_remote_code`` is on only when the recipe turns it on (the
  trainer config's key, or ``model_init_kwargs``).
* **One-line errors.** A missing folder, an uncached hub id (offline) or a model that needs remote
  code is one :class:`sqlm.errors.SqlmError` naming it.

The model keys of TRL's ``ModelConfig`` (``model_name_or_path``, ``model_revision``, ``dtype``,
``attn_implementation``; ``use_peft`` and ``lora_*`` for :func:`sqlm.config.get_peft_config`) mean the
same in ``sqlm train``, ``sqlm dpo`` and ``sqlm reward``: :func:`model_init_kwargs` reads them.
``model_name_or_path: tiny[:...]`` builds a tiny model offline (:func:`sqlm.tiny.build_tiny_model`); a
path ending in ``.gguf`` (or ``model_init_kwargs: {gguf_file: ...}`` beside a folder), or a packaged
model's short name such as ``smollm2-135m-instruct``, loads a GGUF model through its converted
safetensors folder (:mod:`sqlm.gguf`), in every loader here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .errors import SqlmError


def _one_line(e: BaseException) -> str:
    from .data.sources import one_line

    return one_line(e)


def _offline_hint(name: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline and not Path(name).exists():
        return " (not a local folder and not in the local hub cache; HF_HUB_OFFLINE is set)"
    return ""


def model_init_kwargs(args, model_args=None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments from a trainer config (its ``trust_remote_code`` and
    ``model_init_kwargs``, which win) and TRL's ``ModelConfig`` (``model_revision``, ``dtype``,
    ``attn_implementation``); ``use_safetensors`` is always True."""
    kwargs: dict[str, Any] = {}
    if model_args is not None:
        kwargs = {
            "revision": model_args.model_revision,
            "dtype": model_args.dtype,
            "attn_implementation": model_args.attn_implementation,
        }
    trust = getattr(args, "trust_remote_code", False) or getattr(model_args, "trust_remote_code", False)
    kwargs["trust_remote_code"] = bool(trust)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    from .config import as_mapping

    extra = as_mapping(getattr(args, "model_init_kwargs", None), "model_init_kwargs")
    kwargs.update(extra or {})
    if kwargs.get("use_safetensors", True) is not True:
        raise SqlmError(
            "key 'model_init_kwargs' sets use_safetensors: false; sqlm loads weights from safetensors only"
        )
    kwargs["use_safetensors"] = True  # never unpickle weights
    return kwargs


def check_model_args(model_args, command: str) -> None:
    """The model keys every training command needs: a model, and no 4/8-bit loading."""
    if not model_args.model_name_or_path:
        raise SqlmError("the recipe sets no 'model_name_or_path' (a hub id, a local path, or 'tiny')")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise SqlmError(f"load_in_4bit / load_in_8bit are not supported by {command}; use LoRA on a bf16 model")


def load_model(name: str, init_kwargs: dict[str, Any], architecture=None):
    """A model from a hub id or local folder with ``init_kwargs`` (from :func:`model_init_kwargs`);
    ``architecture`` is an ``AutoModelFor...`` class (default: the config's)."""
    from trl.trainer.utils import create_model_from_path

    from .gguf import resolve_model_path

    if init_kwargs.get("use_safetensors") is not True:
        raise SqlmError("sqlm loads weights from safetensors only (use_safetensors must be true)")
    init_kwargs = dict(init_kwargs)
    name = resolve_model_path(name, init_kwargs.pop("gguf_file", None))
    try:
        return create_model_from_path(name, architecture, **init_kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise SqlmError(f"could not load model '{name}'{_offline_hint(name)}: {_one_line(e)}") from None


def load_tokenizer(
    name: str, revision: str | None = None, trust_remote_code: bool = False, gguf_file: str | None = None
):
    from transformers import AutoTokenizer

    from .gguf import resolve_model_path

    name = resolve_model_path(name, gguf_file)
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        raise SqlmError(f"could not load tokenizer '{name}'{_offline_hint(name)}: {_one_line(e)}") from None


def load_pretrained(name: str, args, model_args, tokenizer_name: str | None = None):
    """Causal LM and tokenizer from a hub id or local folder, with :func:`model_init_kwargs`."""
    kwargs = model_init_kwargs(args, model_args)
    model = load_model(name, kwargs)
    gguf_file = None if tokenizer_name else kwargs.get("gguf_file")
    tokenizer = load_tokenizer(
        tokenizer_name or name, model_args.model_revision, kwargs["trust_remote_code"], gguf_file
    )
    return model, tokenizer


def load_model_and_tokenizer(model_args, args, train_dataset, column_map=None, tokenizer_name: str | None = None):
    """The policy and tokenizer of ``sqlm train`` and ``sqlm dpo``: ``tiny:...`` built offline from the
    training text (columns renamed by ``column_map`` first; the same cached model for the same data),
    else :func:`load_pretrained`."""
    name = model_args.model_name_or_path
    from .tiny import build_tiny_model, dataset_texts, is_tiny_spec

    if is_tiny_spec(name):
        from accelerate import PartialState
        from transformers import AutoModelForCausalLM
        from transformers.integrations import is_deepspeed_zero3_enabled

        texts = dataset_texts(train_dataset.rename_columns(dict(column_map)) if column_map else train_dataset)
        zero3 = is_deepspeed_zero3_enabled()
        # the main process builds and caches it first, alone: under ZeRO-3 not partitioned (zero.Init's
        # collectives would wait for the other processes, which wait for it)
        with PartialState().main_process_first(), unpartitioned_models():
            model, tokenizer, path = build_tiny_model(name, texts)
        if zero3:  # then every process loads it together, partitioned as any model under ZeRO-3
            model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", use_safetensors=True)
        return model, tokenizer
    return load_pretrained(name, args, model_args, tokenizer_name)


@contextlib.contextmanager
def unpartitioned_models():
    """Models built or loaded in here are whole even when a DeepSpeed ZeRO-3 config is registered with
    transformers (which otherwise partitions them with ``zero.Init``, a collective of every process):
    for work one process does alone."""
    import transformers.integrations.deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_ds.set_hf_deepspeed_config(config)


def load_policy(path: str | os.PathLike):
    """A saved causal LM folder (a LoRA adapter folder is merged into its base), in eval mode, and its
    tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .gguf import resolve_model_path

    p = Path(resolve_model_path(path))
    if not p.exists():
        raise SqlmError(f"model folder not found: {path}")
    try:
        if (p / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            if not (p / "adapter_model.safetensors").is_file():
                raise SqlmError(f"adapter folder {path} has no adapter_model.safetensors (safetensors only)")
            model = AutoPeftModelForCausalLM.from_pretrained(str(p)).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(p), use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError, ImportError) as e:
        raise SqlmError(f"could not load model '{path}': {_one_line(e)}") from None
    model.eval()
    return model, tokenizer
