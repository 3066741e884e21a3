"""Tiny models and tokenizers built offline, for tests, the quickstart and the embedded tasks.

Nothing here downloads anything: models come from a config with random weights, tokenizers are
trained locally with ``tokenizers`` on the text given.

``model_name_or_path: tiny[:key=value,...]`` in a recipe builds (or loads from the cache) a tiny
Qwen2-shaped model and a byte-level BPE tokenizer trained on the training set's text
(:func:`build_tiny_model`); keys are ``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``, ``num_key_value_heads``, ``seed``. The cache is ``$SQLM_CACHE/tiny``
(default ``~/.cache/sqlm/tiny``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import SqlmError


SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}

# A minimal chat template, enough for TRL's conversational helpers: "role: content" turns, each
# closed by the EOS token, as a chat model's turns end with the token its generation stops on.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def tiny_qwen2_config(
    vocab_size: int,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    tie_word_embeddings: bool = True,
):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_causal_lm(vocab_size: int, seed: int = 0, **config_kwargs):
    """A randomly initialised Qwen2-shaped causal LM (fp32, eval mode off)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_qwen2_config(vocab_size, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config)
    return model


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on ``texts``, with pad/eos/bos/unk and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_model_for_tokenizer(tokenizer, seed: int = 0, **config_kwargs):
    """A tiny causal LM whose vocabulary and special ids match ``tokenizer``."""
    model = tiny_causal_lm(
        len(tokenizer),
        seed=seed,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **config_kwargs,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# ----------------------------------------------------------------------------- ``tiny:...`` model specs

TINY_DEFAULTS = {
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "seed": 0,
}


def is_tiny_spec(name: str) -> bool:
    """Whether ``model_name_or_path`` names a tiny model built offline (``tiny`` or ``tiny:...``)."""
    return name == "tiny" or name.startswith("tiny:")


def parse_tiny_spec(spec: str) -> dict[str, int]:
    """``tiny:hidden_size=32,num_hidden_layers=1`` -> the tiny model's settings (with defaults)."""
    if not is_tiny_spec(spec):
        raise SqlmError(f"not a tiny model spec: {spec!r} (expected 'tiny' or 'tiny:key=value,...')")
    out = dict(TINY_DEFAULTS)
    body = spec[5:] if spec.startswith("tiny:") else ""
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in TINY_DEFAULTS:
            raise SqlmError(f"bad tiny model setting {part!r} in {spec!r}; keys: {', '.join(TINY_DEFAULTS)}")
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
