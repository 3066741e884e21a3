"""Tokenisation of one row, pure and deterministic: the ids of TRL's ``DPOTrainer`` (same EOS handling,
same chat-template calls, same common-prefix split, same ``keep_start`` truncation at ``max_length``)
when no prompt or completion limit is set."""

from __future__ import annotations

import json
from typing import Any

from trl.data_utils import _tokenize, common_prefix_length, is_conversational, maybe_extract_prompt

from ..errors import SqlmError


def _template_kwargs(example: dict[str, Any]) -> dict[str, Any]:
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(example.get("chat_template_kwargs") or {})}


def _with_eos(text: Any, eos_token: str | None) -> Any:
    if isinstance(text, str) and eos_token and not text.endswith(eos_token):
        return text + eos_token
    return text


_TURN_END_PROBE = "sqlm-turn-end-probe"
_turn_end_cache: dict[tuple, bool] = {}


def template_ends_turns(tokenizer) -> bool:
    """Whether the tokenizer's chat template closes an assistant turn with a special token (an
    end-of-turn marker such as ``<|im_end|>``, ``<|eot_id|>`` or the EOS), which a chat model's
    generation stops on. Templates that write nothing special after the assistant's content give
    completions that never teach the model to stop; :func:`tokenize_preference` then appends the EOS
    to conversational completions. A template that cannot render the probe counts as closing turns."""
    template = getattr(tokenizer, "chat_template", None)
    key = (template, getattr(tokenizer, "eos_token", None), getattr(tokenizer, "name_or_path", None))
    if key not in _turn_end_cache:
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _TURN_END_PROBE}], tokenize=False
            )
            tail = text[text.rindex(_TURN_END_PROBE) + len(_TURN_END_PROBE) :]
            specials = set(getattr(tokenizer, "all_special_tokens", [])) | {
                str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
            }
            _turn_end_cache[key] = any(s and s in tail for s in specials)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            # no template, or one that rejects the probe: leave its output as it is
            _turn_end_cache[key] = True
    return _turn_end_cache[key]


def _end_turn(ids: list[int], tokenizer) -> list[int]:
    """A conversational completion's ids, ending with the EOS when the template has no end-of-turn token."""
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None or template_ends_turns(tokenizer) or (ids and ids[-1] == eos_id):
        return ids
    return [*ids, eos_id]


def _truncate(prompt_ids, completions, max_length, max_prompt_length, max_completion_length):
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]  # keep the end of the prompt
    if max_completion_length is not None:
        completions = [c[:max_completion_length] for c in completions]
    if max_length is not None:  # keep_start, as TRL's DataCollatorForPreference
        room = max(0, max_length - len(prompt_ids))
        prompt_ids = prompt_ids[:max_length]
        completions = [c[:room] for c in completions]
    return prompt_ids, completions


def conversational_prompt(example: dict[str, Any]) -> dict[str, Any]:
    """Explicit prompt, or the prompt extracted from whole conversations (implicit prompt). When
    ``chosen``/``rejected`` are whole conversations and ``prompt`` is a plain string (as in
    HuggingFaceH4/ultrafeedback_binarized), the conversations' shared prefix is the prompt."""
    if isinstance(example.get("chosen"), list) and isinstance(example.get("prompt"), str):
        example = {k: v for k, v in example.items() if k != "prompt"}
    return maybe_extract_prompt(example)


def tokenize_preference(
    example: dict[str, Any],
    tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
) -> dict[str, list[int]]:
    """``{prompt_ids, chosen_ids, rejected_ids}`` of one preference row (explicit or implicit prompt).

    As TRL's DPOTrainer: standard text gets the EOS token appended to each completion; conversational
    rows go through the chat template (the prompt with ``add_generation_prompt=True``); the
    completion starts where the tokenised prompt and prompt+completion diverge. A conversational
    completion ends with the template's end-of-turn token; when the template writes none (see
    :func:`template_ends_turns`), the EOS is appended, so the model learns to stop. Then truncation:
    the prompt keeps its end (``max_prompt_length``), completions their start
    (``max_completion_length``), and prompt+completion its start (``max_length``).
    """
    example = conversational_prompt(dict(example))
    for key in ("prompt", "chosen", "rejected"):
        if example.get(key) is None:
            raise SqlmError(f"preference row is missing '{key}'")
    eos = getattr(tokenizer, "eos_token", None)
    if is_conversational(example):
        kw = _template_kwargs(example)
        prompt_ids = _tokenize(tokenizer, example["prompt"], add_generation_prompt=True, **kw)["input_ids"]
        chosen = _tokenize(tokenizer, example["prompt"] + example["chosen"], **kw)["input_ids"]
        rejected = _tokenize(tokenizer, example["prompt"] + example["rejected"], **kw)["input_ids"]
    else:
        prompt_ids = _tokenize(tokenizer, example["prompt"])["input_ids"]
        chosen = _tokenize(tokenizer, example["prompt"] + _with_eos(example["chosen"], eos))["input_ids"]
        rejected = _tokenize(tokenizer, example["prompt"] + _with_eos(example["rejected"], eos))["input_ids"]
    n = min(common_prefix_length(prompt_ids, chosen), common_prefix_length(prompt_ids, rejected))
    c, r = list(chosen[n:]), list(rejected[n:])
    if is_conversational(example):
        c, r = _end_turn(c, tokenizer), _end_turn(r, tokenizer)
    p, (c, r) = _truncate(list(prompt_ids[:n]), [c, r], max_length, max_prompt_length, max_completion_length)
    return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}


def tokenize_prompt_completion(
    example: dict[str, Any],
    tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
) -> dict[str, list[int]]:
    """``{prompt_ids, completion_ids}`` of a prompt-completion row, tokenised as
    :func:`tokenize_preference` tokenises one side of a pair."""
    eos = getattr(tokenizer, "eos_token", None)
    if is_conversational(example):
        kw = _template_kwargs(example)
        prompt_ids = _tokenize(tokenizer, example["prompt"], add_generation_prompt=True, **kw)["input_ids"]
        full = _tokenize(tokenizer, example["prompt"] + example["completion"], **kw)["input_ids"]
    else:
        prompt_ids = _tokenize(tokenizer, example["prompt"])["input_ids"]
        full = _tokenize(tokenizer, example["prompt"] + _with_eos(example["completion"], eos))["input_ids"]
    n = common_prefix_length(prompt_ids, full)
    c = list(full[n:])
    if is_conversational(example):
        c = _end_turn(c, tokenizer)
    p, (c,) = _truncate(list(prompt_ids[:n]), [c], max_length, max_prompt_length, max_completion_length)
    return {"prompt_ids": p, "completion_ids": c}


def tokenize_prompt(example: dict[str, Any], tokenizer, max_prompt_length: int | None = None) -> dict[str, list[int]]:
    """``{prompt_ids}`` of a prompt (with the generation prompt for conversations), keeping its end."""
    if is_conversational(example):
        ids = _tokenize(tokenizer, example["prompt"], add_generation_prompt=True, **_template_kwargs(example))
    else:
        ids = _tokenize(tokenizer, example["prompt"])
    ids = list(ids["input_ids"])
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        ids = ids[len(ids) - max_prompt_length :]
    return {"prompt_ids": ids}
