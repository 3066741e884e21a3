"""Tiny models and tokenizers built offline, for tests, the quickstart and the embedded tasks.

Nothing here downloads anything: models come from a config with random weights, tokenizers are
trained locally with ``tokenizers`` on the text given.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

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
