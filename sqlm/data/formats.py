"""TRL's dataset formats: which format a dataset's columns are, which format one row is, and
whether a text column holds plain text or conversational messages."""

from __future__ import annotations

from typing import Any

from ..errors import SqlmError


PREFERENCE, PROMPT_COMPLETION, PROMPT_ONLY = "preference", "prompt_completion", "prompt"

FORMAT_HELP = (
    "expected a preference row (prompt, chosen, rejected; or chosen/rejected conversations), "
    "a prompt-completion row (prompt, completion [, reward | label]) or a prompt-only row (prompt)"
)


def detect_format(columns: list[str] | dict) -> str:
    """The format of a dataset with these columns (an error naming the missing ones when none fits)."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return PREFERENCE
    if {"prompt", "completion"} <= cols:
        return PROMPT_COMPLETION
    if "prompt" in cols:
        return PROMPT_ONLY
    missing = [c for c in ("prompt", "chosen", "rejected", "completion") if c not in cols]
    raise SqlmError(
        f"dataset has columns {sorted(cols)}; missing {', '.join(repr(c) for c in missing)}: {FORMAT_HELP}"
    )


def nonempty(value: Any) -> bool:
    """A cell that holds something: not None, not an empty text or list of messages."""
    return value is not None and not (isinstance(value, (str, list)) and len(value) == 0)


def row_format(example: dict[str, Any]) -> str:
    """The format of one row, from which of its text columns are filled."""
    if nonempty(example.get("chosen")) or nonempty(example.get("rejected")):
        return PREFERENCE
    if nonempty(example.get("completion")):
        return PROMPT_COMPLETION
    return PROMPT_ONLY


def text_kind(value: Any) -> str:
    """``conversational`` (a list of messages) or ``standard`` (plain text)."""
    return "conversational" if isinstance(value, list) else "standard"
