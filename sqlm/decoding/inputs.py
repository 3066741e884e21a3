"""What :func:`sqlm.decoding.decode` reads besides the model: prompts tokenised as ``sqlm train``
tokenises them, the EOS and padding ids, and the rewarder called on finished completions as ``sqlm
train`` calls it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import SqlmError
from .engine import Compute, Finished


def special_ids(tokenizer, model, eos_token_id, pad_token_id) -> tuple[list[int], int]:
    """The EOS ids (given, else the tokenizer's, else the model's generation config) and the padding id
    (given, else the tokenizer's, else the first EOS)."""
    eos = eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        raise SqlmError("no EOS token: give eos_token_id or a tokenizer with an eos_token")
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = pad_token_id
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    return eos_ids, int(eos_ids[0] if pad is None else pad)


def prompt_token_ids(prompts: Sequence[Any], tokenizer) -> list[list[int]]:
    """Each prompt's token ids as ``sqlm train`` tokenises them (:func:`sqlm.data.tokenize_prompt`): a
    text as it is, a conversation (a list of ``{role, content}`` messages) through the tokenizer's chat
    template with the generation prompt."""
    from trl.data_utils import is_conversational

    from ..data import tokenize_prompt

    out = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt}
        if is_conversational(row) and getattr(tokenizer, "chat_template", None) is None:
            raise SqlmError(f"prompt {i} is a conversation, but the model's tokenizer has no chat template")
        out.append(tokenize_prompt(row, tokenizer)["prompt_ids"])
    return out


def as_completion(prompt: Any, text: str | None) -> Any:
    """A completion as TRL's reward functions get it (and ``sqlm train`` gives it): after a
    conversational prompt, a list with one assistant message; else the text."""
    from trl.data_utils import is_conversational

    if text is not None and is_conversational({"prompt": prompt}):
        return [{"role": "assistant", "content": text}]
    return text


def reward_fn_of(rewarder, tokenizer, pad: int, prompt_ids, prompts, compute: Compute, columns=None):
    """``list[Finished] -> list[float]``: the sum over tokens of ``rewarder``'s rewards of each completion
    (``columns``: the prompts' other columns, per prompt instance, passed on as ``sqlm train`` does)."""
    from ..rewards.base import make_batch

    def fn(items: list[Finished]) -> list[float]:
        if not items:
            return []
        comps = [f.tokens for f in items]
        texts = [tokenizer.decode(c, skip_special_tokens=True) if tokenizer is not None else None for c in comps]
        batch = make_batch(
            [list(prompt_ids[f.owner]) for f in items], comps, pad,
            prompts=[prompts[f.owner] for f in items],
            completions=[as_completion(prompts[f.owner], t) for f, t in zip(items, texts)],
            columns={k: [v[f.owner] for f in items] for k, v in (columns or {}).items()},
        )  # fmt: skip
        compute.reward_calls += 1
        compute.reward_sequences += len(items)
        return rewarder(batch).sum(-1).tolist()

    return fn
