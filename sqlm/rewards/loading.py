"""Loading the models behind the model rewarders (:mod:`sqlm.rewards.models`), and the fingerprints of
models and tokenizers that key what is cached of them: the rewarders' settings, the dense-reward
columns (:mod:`sqlm.rewards.cache`) and the fitted Bradley-Terry model (:mod:`sqlm.rewards.auto`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..errors import SqlmError


# ---------------------------------------------------------------------------------------------
# fingerprints (cache keys)


def model_fingerprint(model) -> str:
    """Hash of a model's class, config and weights (every tensor's name, dtype, shape and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that changes how a tokenizer maps text to ids and back."""
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    h.update(repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    h.update(repr(getattr(tokenizer, "padding_side", None)).encode())
    return h.hexdigest()


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (SqlmError for a name that is not a torch dtype)."""
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype):
        raise SqlmError(f"dtype must be a torch dtype name such as 'float32' or 'bfloat16', got {dtype!r}")
    return value


def load_reward_model(path: str, *, eager_attention: bool = False, dtype: str | torch.dtype = "float32"):
    """``(model, tokenizer)`` of a saved sequence-classification reward model, in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..gguf import resolve_model_path

    path = resolve_model_path(path)
    kwargs: dict[str, Any] = {"dtype": as_dtype(dtype)}
    if eager_attention:
        kwargs["attn_implementation"] = "eager"
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise SqlmError(f"could not load the reward model from '{path}': {e}") from None
    return model.eval(), tokenizer


def load_causal_lm(path: str, dtype: str | torch.dtype = "float32"):
    """``(model, tokenizer)`` of a saved causal LM, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..gguf import resolve_model_path

    path = resolve_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=as_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise SqlmError(f"could not load the model from '{path}': {e}") from None
    return model.eval(), tokenizer
