"""A dataset made ready for :class:`sqlm.trainer.SoftQTrainer`: :func:`prepare_dataset` checks it,
tokenises every row and drops the rows that cannot train, in three steps (:func:`_check_dataset`,
:func:`_tokenize_rows`, :func:`_drop_skipped_rows`)."""

from __future__ import annotations

import logging
from typing import Any

from ..columns import TOKEN_REWARD_COLUMNS
from ..errors import SqlmError
from .formats import (
    FORMAT_HELP,
    PREFERENCE,
    PROMPT_COMPLETION,
    PROMPT_ONLY,
    detect_format,
    nonempty,
    row_format,
    text_kind,
)
from .tokenization import conversational_prompt, tokenize_preference, tokenize_prompt, tokenize_prompt_completion


logger = logging.getLogger(__name__)

SKIP_IDENTICAL, SKIP_LONG_PROMPT = "chosen identical to rejected", "prompt fills max_length"
SKIP_TRUNCATED = "chosen and rejected identical only after truncation to {limits}"


def _check_row(example: dict[str, Any], fmt: str, idx: int) -> None:
    """One clear error per bad row: a row of another format (mixed formats in one dataset), an empty
    or missing text column, messages mixed with plain text in one row."""
    row_fmt = row_format(example)
    if row_fmt != fmt and not (fmt == PROMPT_COMPLETION and row_fmt == PROMPT_ONLY):
        raise SqlmError(
            f"row {idx} is a {row_fmt.replace('_', '-')} row but the dataset is in {fmt.replace('_', '-')} format "
            "(mixed formats in one dataset): split it into one dataset per format"
        )
    need = {PREFERENCE: ("chosen", "rejected"), PROMPT_COMPLETION: ("prompt", "completion"), PROMPT_ONLY: ("prompt",)}
    for key in need[fmt]:
        if not nonempty(example.get(key)):
            raise SqlmError(
                f"row {idx}: column '{key}' is empty or missing ({fmt.replace('_', '-')} format: {FORMAT_HELP})"
            )
    explicit_prompt = "prompt" in example and not (fmt == PREFERENCE and isinstance(example.get("chosen"), list))
    if explicit_prompt and not nonempty(example.get("prompt")):
        raise SqlmError(f"row {idx}: column 'prompt' is empty (the first completion token needs a prompt to follow)")
    pairs = {PREFERENCE: ("chosen", "rejected"), PROMPT_COMPLETION: ("prompt", "completion")}.get(fmt)
    if pairs and text_kind(example[pairs[0]]) != text_kind(example[pairs[1]]):
        raise SqlmError(
            f"row {idx} mixes conversational messages and plain text: '{pairs[0]}' is {text_kind(example[pairs[0]])}, "
            f"'{pairs[1]}' is {text_kind(example[pairs[1]])}"
        )
    for key in ("chosen", "rejected", "completion", "prompt"):
        value = example.get(key)
        if value is not None and not isinstance(value, (str, list)):
            raise SqlmError(
                f"row {idx}: column '{key}' must be text or a list of messages, got {type(value).__name__}"
            )


def _check_number(example: dict[str, Any], key: str, idx: int) -> None:
    value = example.get(key)
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (int, float)):
        raise SqlmError(f"row {idx}: column '{key}' must be a number, got {type(value).__name__} {value!r}")


def _check_token_rewards(example: dict[str, Any], out: dict[str, Any], idx: int) -> None:
    for side, column in TOKEN_REWARD_COLUMNS.items():
        values = example.get(column)
        ids = out.get(f"{side}_ids")
        if values is None or ids is None:
            continue
        if not isinstance(values, list) or any(
            isinstance(v, (str, bool)) or not isinstance(v, (int, float)) for v in values
        ):
            raise SqlmError(f"row {idx}: column '{column}' must be a list of numbers (one per completion token)")
        if len(values) < len(ids):
            raise SqlmError(
                f"row {idx}: column '{column}' has {len(values)} token rewards but the completion has "
                f"{len(ids)} tokens (rewards must align with the tokenised completion)"
            )


def prepare_dataset(dataset, tokenizer, args, mode: str | None = None, name: str = "train"):
    """Rename columns (``args.dataset_column_map``), check the format against ``mode`` and tokenise.

    Adds ``prompt_ids`` and ``chosen_ids``/``rejected_ids`` or ``completion_ids``, and ``row_index``;
    the original columns stay (reward functions read them).

    Bad rows are errors that name the row: missing or empty text, an empty prompt, a row of another
    format, messages mixed with plain text, non-numeric reward columns, token-reward columns shorter
    than the completion. Rows are skipped instead, with a logged count and reason: preference rows
    whose chosen and rejected completions tokenise identically (no preference between them), pairs
    that differ but become identical once truncated (reported as such, naming ``max_length`` /
    ``max_completion_length``), and rows whose prompt alone fills ``max_length`` (as TRL's DPO drops
    them). If every row is skipped, that is an error.
    """
    mode = mode or args.mode
    dataset, fmt = _check_dataset(dataset, args, mode, name)
    tokenized = _tokenize_rows(dataset, fmt, tokenizer, args, name)
    return _drop_skipped_rows(tokenized, dataset, fmt, tokenizer, args, name)


def _check_dataset(dataset, args, mode: str, name: str):
    """Step 1, the dataset as a whole: ``(dataset with its columns renamed, its format)``, or an error for
    a column map naming absent columns, no rows, no known format, prompt-only data where ``mode`` needs
    completions, or an absent score column."""
    if args.dataset_column_map:
        missing = [c for c in args.dataset_column_map if c not in dataset.column_names]
        if missing:
            raise SqlmError(
                f"dataset_column_map names column(s) {missing} that the {name} dataset lacks "
                f"(it has {dataset.column_names})"
            )
        dataset = dataset.rename_columns(dict(args.dataset_column_map))
    if len(dataset) == 0:
        raise SqlmError(f"the {name} dataset has no rows")
    fmt = detect_format(dataset.column_names)
    if mode in ("offline", "mixed") and fmt == PROMPT_ONLY:
        raise SqlmError(
            f"mode '{mode}' needs completions, but the {name} dataset is prompt-only (columns "
            f"{dataset.column_names}): add 'chosen'/'rejected' or 'completion', or use mode 'online'"
        )
    for key in (args.chosen_score_column, args.rejected_score_column):
        if key is not None and key not in dataset.column_names:
            raise SqlmError(f"score column '{key}' is not in the {name} dataset (columns {dataset.column_names})")
    return dataset, fmt


def _length_limits(args) -> dict[str, int | None]:
    return dict(
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length,
    )


def _tokenize_rows(dataset, fmt: str, tokenizer, args, name: str):
    """Step 2, row by row: every row checked and tokenised (:func:`_tokenize_row`), in one format and
    one kind (all plain text or all conversations)."""
    kwargs = {"num_proc": args.dataset_num_proc} if args.dataset_num_proc else {}
    tokenized = dataset.map(
        _tokenize_row,
        with_indices=True,
        fn_kwargs=dict(fmt=fmt, tokenizer=tokenizer, args=args),
        desc=f"Tokenizing {name} dataset",
        **kwargs,
    )
    column = {PREFERENCE: "chosen", PROMPT_COMPLETION: "completion"}.get(fmt, "prompt")
    first = None
    for idx, value in enumerate(_column(dataset, column)):
        kind = text_kind(value)
        if first is None:
            first = kind
        elif kind != first:
            raise SqlmError(
                f"row {idx} of the {name} dataset is {kind} but row 0 is {first} (mixed formats in one "
                "dataset): use one format for every row"
            )
    return tokenized


def _column(dataset, column: str, batch_size: int = 1000):
    """The values of one column, in row order, read a batch of rows at a time."""
    for batch in dataset.select_columns([column]).iter(batch_size=batch_size):
        yield from batch[column]


def _tokenize_row(example: dict[str, Any], idx: int, fmt: str, tokenizer, args) -> dict[str, Any]:
    """One row's token ids and ``row_index``, after its checks: an error names the row. An implicit
    prompt is extracted into the row's ``prompt`` / ``chosen`` / ``rejected``."""
    try:
        _check_row(example, fmt, idx)
        for key in ("reward", args.chosen_score_column, args.rejected_score_column):
            if key is not None and fmt != PROMPT_ONLY:
                _check_number(example, key, idx)
        if example.get("label") is not None and (
            isinstance(example["label"], str) or not isinstance(example["label"], (bool, int, float))
        ):
            raise SqlmError(f"row {idx}: column 'label' must be true/false, got {example['label']!r}")
        if fmt == PREFERENCE:
            out = tokenize_preference(example, tokenizer, **_length_limits(args))
        elif fmt == PROMPT_COMPLETION:
            out = tokenize_prompt_completion(example, tokenizer, **_length_limits(args))
        else:
            out = tokenize_prompt(example, tokenizer, args.max_prompt_length)
        _check_token_rewards(example, out, idx)
    except SqlmError as e:
        msg = str(e)
        raise SqlmError(msg if msg.startswith(f"row {idx}") else f"row {idx}: {msg}") from None
    except (TypeError, ValueError, KeyError) as e:  # e.g. a chat template that rejects the messages
        raise SqlmError(f"row {idx}: cannot tokenise it: {type(e).__name__}: {e}") from None
    if not out["prompt_ids"]:
        raise SqlmError(f"row {idx}: the prompt is empty after tokenisation")
    if fmt == PREFERENCE and ("prompt" not in example or isinstance(example.get("chosen"), list)):
        extracted = conversational_prompt(dict(example))
        for key in ("prompt", "chosen", "rejected"):
            out[key] = extracted[key]
    out["row_index"] = idx
    return out


def _drop_skipped_rows(tokenized, dataset, fmt: str, tokenizer, args, name: str):
    """Step 3: ``tokenized`` without the rows that cannot train (:func:`_skip_reasons`), with a logged
    count and reason per kind of skip; an error if every row is skipped. ``dataset`` is the same rows
    before tokenisation."""
    skipped = _skip_reasons(tokenized, dataset, fmt, tokenizer, args)
    if not skipped:
        return tokenized
    detail = "; ".join(
        f"{len(rows)} with {why} (rows {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''})"
        for why, rows in skipped.items()
    )
    n_skipped = sum(len(v) for v in skipped.values())
    if n_skipped == len(tokenized):
        limits = "" if "max_length=" in detail else f" (max_length={args.max_length})"
        raise SqlmError(f"every row of the {name} dataset was skipped: {detail}{limits}")
    logger.warning("skipped %d of %d rows of the %s dataset: %s", n_skipped, len(tokenized), name, detail)
    dropped = {i for rows in skipped.values() for i in rows}
    return tokenized.select([i for i in range(len(tokenized)) if i not in dropped])


def _skip_reasons(tokenized, dataset, fmt: str, tokenizer, args) -> dict[str, list[int]]:
    """``{reason: rows}`` of the rows that cannot train, in row order: a prompt that fills ``max_length``,
    or (preference rows) a chosen completion identical to the rejected one, before truncation (no
    preference between them) or only after it (the reason names the limits)."""
    limits = ", ".join(f"{k}={v}" for k, v in _length_limits(args).items() if v is not None)
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"] if fmt == PREFERENCE else ["prompt_ids"]
    skipped: dict[str, list[int]] = {}
    idx = 0
    for batch in tokenized.select_columns(columns).iter(batch_size=1000):
        for j, prompt_ids in enumerate(batch["prompt_ids"]):
            why = ""
            if args.max_length is not None and len(prompt_ids) >= args.max_length:
                why = SKIP_LONG_PROMPT
            elif fmt == PREFERENCE and batch["chosen_ids"][j] == batch["rejected_ids"][j]:
                full = tokenize_preference(dataset[idx + j], tokenizer)
                why = (
                    SKIP_IDENTICAL
                    if full["chosen_ids"] == full["rejected_ids"]
                    else SKIP_TRUNCATED.format(limits=limits)
                )
            if why:
                skipped.setdefault(why, []).append(idx + j)
        idx += len(batch["prompt_ids"])
    return skipped
