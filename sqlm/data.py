"""Datasets in TRL's formats -> token trajectories for the soft-Q losses.

Formats (TRL's names; each standard (text) or conversational (lists of messages)):

* **preference**: ``prompt``, ``chosen``, ``rejected`` (explicit prompt), or ``chosen`` / ``rejected``
  holding whole conversations (implicit prompt, extracted with ``trl.data_utils.extract_prompt``).
  Offline, each row gives TWO trajectories: the chosen and the rejected completion.
* **prompt-completion**: ``prompt``, ``completion``, with an optional scalar ``reward`` (float) or
  ``label`` (bool, KTO style: true -> +1, false -> -1) that lands on the completion's last token.
* **prompt-only**: ``prompt`` (online rollouts).

Precomputed dense rewards (e.g. from a reward cache) ride along as columns of floats aligned with the
completion tokens: ``chosen_token_rewards`` / ``rejected_token_rewards`` (preference) and
``token_rewards`` (prompt-completion). Their length must equal the number of completion tokens that
:func:`tokenize_preference` / :func:`tokenize_prompt_completion` produce (before truncation).

Precomputed reference values (``precompute_ref_log_probs``, :mod:`sqlm.reference`) ride along the
same way, one float per completion token: ``chosen_ref_log_probs`` / ``chosen_ref_logsumexp`` (and
``rejected_...``), or ``ref_log_probs`` / ``ref_logsumexp`` (prompt-completion) hold
``log pi_ref(a_t|s_t)`` and ``logsumexp z_ref(s_t)`` of each completion token.

Tokenisation is pure and deterministic and, with ``max_prompt_length=None`` and
``max_completion_length=None``, gives exactly the ids of TRL's ``DPOTrainer`` (same EOS handling,
same chat-template calls, same common-prefix split, same ``keep_start`` truncation at ``max_length``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl.data_utils import _tokenize, common_prefix_length, is_conversational, maybe_extract_prompt

# the schema lives in sqlm.columns; importing it here also keeps sqlm.data.REF_COLUMNS etc. working
from .columns import ALL_REF_COLUMNS, REF_COLUMNS, TEXT_COLUMNS, TOKEN_COLUMNS, TOKEN_REWARD_COLUMNS
from .errors import SqlmError


logger = logging.getLogger(__name__)

PREFERENCE, PROMPT_COMPLETION, PROMPT_ONLY = "preference", "prompt_completion", "prompt"
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

FORMAT_HELP = (
    "expected a preference row (prompt, chosen, rejected; or chosen/rejected conversations), "
    "a prompt-completion row (prompt, completion [, reward | label]) or a prompt-only row (prompt)"
)


# ----------------------------------------------------------------------------- loading


def _resolve_path(name: str, base_dir: str | os.PathLike | None) -> Path | None:
    p = Path(name).expanduser()
    if p.exists():
        return p
    if base_dir is not None and not p.is_absolute() and (Path(base_dir) / p).exists():
        return Path(base_dir) / p
    return None


def _one_line(e: BaseException) -> str:
    """The most specific message of an exception chain, on one line (``datasets`` wraps the parser's
    error, e.g. "JSON parse error: ... in row 3", in a generic one)."""
    msgs, first = [], type(e).__name__
    while e is not None and len(msgs) < 5:
        text = " ".join(str(e).split())
        if text:
            msgs.append(f"{type(e).__name__}: {text}")
        e = e.__cause__
    return msgs[-1] if msgs else first


def check_utf8(path: str | os.PathLike, chunk_size: int = 1 << 20) -> None:
    """Raise a :class:`SqlmError` naming the file, line and byte when a text data file is not UTF-8
    (``datasets`` would load it and fail later, when the bad row is read)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                pos = e.start
                at = line + chunk.count(b"\n", 0, pos)
                raise SqlmError(
                    f"dataset file {path} is not UTF-8 text: byte 0x{chunk[pos]:02x} at line {at} "
                    f"(byte offset {offset + pos}); re-encode it as UTF-8"
                ) from None
            if not chunk:
                return
            line += chunk.count(b"\n")
            offset += len(chunk)


def _looks_like_path(name: str) -> bool:
    return Path(name).suffix in _FILE_BUILDERS or name.startswith((".", "/", "~"))


def _is_saved_dataset(path: Path | None) -> bool:
    """A folder written by ``datasets``' ``save_to_disk``."""
    return (
        path is not None
        and path.is_dir()
        and any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json"))
    )


def _is_train_split(split: str | None) -> bool:
    """``train`` or a slice of it (``train[:90%]``): the only split a single data file has."""
    return not split or split == "train" or split.startswith("train[")


def _json_messages(value: Any) -> list | None:
    """``value`` parsed as a JSON list of ``{role, content}`` messages, or None when it is not one."""
    if not isinstance(value, str) or not value.lstrip().startswith("["):
        return None
    try:
        out = json.loads(value)
    except json.JSONDecodeError:
        return None
    if isinstance(out, list) and out and all(isinstance(m, dict) and "role" in m and "content" in m for m in out):
        return out
    return None


def decode_message_columns(dataset, where: str):
    """Parse the text columns whose cells are JSON-encoded lists of ``{role, content}`` messages (how
    a CSV file holds conversations) into lists of messages, so they go through the chat template
    instead of training as raw JSON text. A column that holds messages in some rows and other text in
    others is an error naming both rows."""
    from datasets import Value

    for col in list(dataset.column_names):
        feature = dataset.features[col]
        if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
            continue
        values = dataset[col]
        decoded = [_json_messages(v) for v in values]
        hits = [i for i, d in enumerate(decoded) if d is not None]
        if not hits:
            continue
        misses = [i for i, (v, d) in enumerate(zip(values, decoded)) if d is None and _nonempty(v)]
        if misses:
            raise SqlmError(
                f"row {misses[0]} of {where}: column '{col}' is not a JSON list of {{role, content}} messages, "
                f"but row {hits[0]} is (conversations in a CSV file must be JSON-encoded in every row)"
            )
        order = dataset.column_names
        dataset = dataset.remove_columns(col).add_column(col, decoded).select_columns(order)
    return dataset


def load_split(
    name: str,
    split: str,
    config: str | None = None,
    base_dir: str | os.PathLike | None = None,
    missing_ok: bool = False,
):
    """Load one split with ``datasets``: a local .json/.jsonl/.parquet/.csv file, a folder written by
    ``save_to_disk``, another local folder, or a hub id. ``split`` may itself be a file path (e.g. a
    held-out jsonl). With ``missing_ok`` a split the dataset does not have is None, not an error.

    A single file has one split, ``train`` (or a slice of it such as ``train[:90%]``); any other split
    name is an error (hold rows out with :func:`hold_out` / ``dataset_test_size`` instead). In a CSV
    file, columns of JSON-encoded messages are parsed into conversations (:func:`decode_message_columns`).

    Errors are one line naming the file or id: a missing file, a file that is not UTF-8 or not valid
    JSON/CSV/Parquet, an unknown split (naming the splits that exist), a hub id that is neither local
    nor cached (with ``HF_HUB_OFFLINE=1``)."""
    import datasets

    split_path = _resolve_path(split, base_dir) if split else None
    if split_path is not None and split_path.suffix in _FILE_BUILDERS:
        name, split = str(split_path), "train"
    elif split and split_path is None and Path(split).suffix in _FILE_BUILDERS:
        where = f" (looked in {os.getcwd()}" + (f" and beside the recipe, in {base_dir})" if base_dir else ")")
        raise SqlmError(f"could not load split file '{split}': no such file{where}")
    path = _resolve_path(name, base_dir)
    if path is None and _looks_like_path(name):
        where = f" (looked in {os.getcwd()}" + (f" and beside the recipe, in {base_dir})" if base_dir else ")")
        raise SqlmError(f"could not load dataset '{name}': no such file or folder{where}")
    if path is not None and path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise SqlmError(f"dataset file {path} has an unknown extension; use one of {', '.join(_FILE_BUILDERS)}")
        if not _is_train_split(split):
            if missing_ok:
                return None
            raise SqlmError(
                f"unknown split '{split}' of dataset file {path}: a single file has one split, 'train'; name a "
                "held-out file as the split, or hold rows out with dataset_test_size"
            )
        if path.stat().st_size == 0:
            raise SqlmError(f"dataset file {path} is empty")
        if builder in ("json", "csv"):
            check_utf8(path)
    try:
        if path is not None and path.is_file():
            ds = datasets.load_dataset(builder, data_files=str(path), split=split or "train")
            return decode_message_columns(ds, f"dataset file {path}") if builder == "csv" else ds
        if _is_saved_dataset(path):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.Dataset):
                data = datasets.DatasetDict({"train": data})
            if split not in data:
                raise ValueError(f'Unknown split "{split}". Should be one of {list(data)}.')
            return data[split]
        if path is not None:
            return datasets.load_dataset(str(path), config, split=split)
        return datasets.load_dataset(name, config, split=split)
    except SqlmError:
        raise
    except Exception as e:  # offline hub misses, malformed files, unknown splits
        if missing_ok and isinstance(e, ValueError) and str(e).startswith("Unknown split"):
            return None
        what = f"dataset file {path}" if path is not None and path.is_file() else f"dataset '{name}'"
        hint = ""
        if path is None and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            hint = " (not a local path and not in the local hub cache; HF_HUB_OFFLINE is set)"
        raise SqlmError(f"could not load split '{split}' of {what}{hint}: {_one_line(e)}") from None


HOLD_OUT_SEED = 0
"""Seed of :func:`hold_out`: the same rows are held out on every run, whatever the training ``seed``."""


def hold_out_indices(n_rows: int, size: float, seed: int = HOLD_OUT_SEED) -> tuple[list[int], list[int]]:
    """``(train, test)`` row indices, each in file order: ``size`` rows (``>= 1``) or that fraction of
    the rows (``0 < size < 1``, rounded, at least one) drawn at random with ``seed``."""
    import random

    n_test = int(size) if size >= 1 else max(1, round(size * n_rows))
    if size >= 1 and size != int(size):
        raise SqlmError(
            f"key 'dataset_test_size' must be a fraction in (0, 1) or a whole number of rows, got {size!r}"
        )
    if not 1 <= n_test < n_rows:
        raise SqlmError(
            f"key 'dataset_test_size' holds out {n_test} of {n_rows} rows; it must leave at least one row on each side"
        )
    test = set(random.Random(seed).sample(range(n_rows), n_test))
    return [i for i in range(n_rows) if i not in test], sorted(test)


def hold_out(dataset, size: float, seed: int = HOLD_OUT_SEED):
    """``(train, test)``: ``dataset`` split by :func:`hold_out_indices` (rows keep their order)."""
    train_idx, test_idx = hold_out_indices(len(dataset), size, seed)
    return dataset.select(train_idx), dataset.select(test_idx)


def take_first(ds, limit: int | None):
    """The first ``limit`` rows of ``ds`` (all with None; None stays None)."""
    return ds if ds is None or limit is None else ds.select(range(min(limit, len(ds))))


def load_train_eval(args, base_dir: str | None = None, optional_test_split: bool = False):
    """``(train, eval or None)`` from a config's ``dataset_name``, ``dataset_config``,
    ``dataset_train_split`` / ``dataset_test_split``, ``dataset_test_size`` (rows held out of the
    training split when there is no test split) and ``max_train_samples`` / ``max_eval_samples``
    (sqlm train, sqlm dpo and sqlm reward read their data through this one function). The held-out
    rows are drawn before the sample limits, so the two sets never share a row.

    With ``optional_test_split`` a test split the dataset lacks means no evaluation data; then an
    ``eval_fraction`` > 0 in ``args`` (``sqlm reward``'s key) holds out that fraction of the train
    split with ``datasets``' ``train_test_split`` (seed 0)."""
    test_size = getattr(args, "dataset_test_size", None)
    train = load_split(args.dataset_name, args.dataset_train_split, args.dataset_config, base_dir)
    evals = None
    if args.dataset_test_split:
        if test_size is not None:
            raise SqlmError(
                "keys 'dataset_test_split' and 'dataset_test_size' cannot both be set: choose one eval set"
            )
        evals = load_split(
            args.dataset_name, args.dataset_test_split, args.dataset_config, base_dir, missing_ok=optional_test_split
        )
    elif test_size is not None:
        train, evals = hold_out(train, test_size)
    fraction = getattr(args, "eval_fraction", 0.0) or 0.0
    if evals is None and fraction > 0:
        parts = train.train_test_split(test_size=fraction, seed=0)
        train, evals = parts["train"], parts["test"]
    return take_first(train, args.max_train_samples), take_first(evals, args.max_eval_samples)


def detect_format(columns: list[str] | dict) -> str:
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


# ----------------------------------------------------------------------------- tokenisation (pure)


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


def _conversational_prompt(example: dict[str, Any]) -> dict[str, Any]:
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
    example = _conversational_prompt(dict(example))
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


# ----------------------------------------------------------------------------- dataset preparation


def _nonempty(value: Any) -> bool:
    return value is not None and not (isinstance(value, (str, list)) and len(value) == 0)


def _row_format(example: dict[str, Any]) -> str:
    if _nonempty(example.get("chosen")) or _nonempty(example.get("rejected")):
        return PREFERENCE
    if _nonempty(example.get("completion")):
        return PROMPT_COMPLETION
    return PROMPT_ONLY


def _kind(value: Any) -> str:
    return "conversational" if isinstance(value, list) else "standard"


def _check_row(example: dict[str, Any], fmt: str, idx: int) -> None:
    """One clear error per bad row: a row of another format (mixed formats in one dataset), an empty
    or missing text column, messages mixed with plain text in one row."""
    row_fmt = _row_format(example)
    if row_fmt != fmt and not (fmt == PROMPT_COMPLETION and row_fmt == PROMPT_ONLY):
        raise SqlmError(
            f"row {idx} is a {row_fmt.replace('_', '-')} row but the dataset is in {fmt.replace('_', '-')} format "
            "(mixed formats in one dataset): split it into one dataset per format"
        )
    need = {PREFERENCE: ("chosen", "rejected"), PROMPT_COMPLETION: ("prompt", "completion"), PROMPT_ONLY: ("prompt",)}
    for key in need[fmt]:
        if not _nonempty(example.get(key)):
            raise SqlmError(
                f"row {idx}: column '{key}' is empty or missing ({fmt.replace('_', '-')} format: {FORMAT_HELP})"
            )
    explicit_prompt = "prompt" in example and not (fmt == PREFERENCE and isinstance(example.get("chosen"), list))
    if explicit_prompt and not _nonempty(example.get("prompt")):
        raise SqlmError(f"row {idx}: column 'prompt' is empty (the first completion token needs a prompt to follow)")
    pairs = {PREFERENCE: ("chosen", "rejected"), PROMPT_COMPLETION: ("prompt", "completion")}.get(fmt)
    if pairs and _kind(example[pairs[0]]) != _kind(example[pairs[1]]):
        raise SqlmError(
            f"row {idx} mixes conversational messages and plain text: '{pairs[0]}' is {_kind(example[pairs[0]])}, "
            f"'{pairs[1]}' is {_kind(example[pairs[1]])}"
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


SKIP_IDENTICAL, SKIP_LONG_PROMPT = "chosen identical to rejected", "prompt fills max_length"
SKIP_TRUNCATED = "chosen and rejected identical only after truncation to {limits}"
_SKIP, _KIND = "sqlm_skip", "sqlm_row_kind"  # temporary columns


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

    lengths = dict(
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length,
    )

    truncated = SKIP_TRUNCATED.format(limits=", ".join(f"{k}={v}" for k, v in lengths.items() if v is not None))

    def tokenize(example, idx):
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
                out = tokenize_preference(example, tokenizer, **lengths)
            elif fmt == PROMPT_COMPLETION:
                out = tokenize_prompt_completion(example, tokenizer, **lengths)
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
            extracted = _conversational_prompt(dict(example))
            for key in ("prompt", "chosen", "rejected"):
                out[key] = extracted[key]
        out["row_index"] = idx
        skip = ""
        if args.max_length is not None and len(out["prompt_ids"]) >= args.max_length:
            skip = SKIP_LONG_PROMPT
        elif fmt == PREFERENCE and out["chosen_ids"] == out["rejected_ids"]:
            full = tokenize_preference(example, tokenizer)
            skip = SKIP_IDENTICAL if full["chosen_ids"] == full["rejected_ids"] else truncated
        out[_SKIP] = skip
        out[_KIND] = _kind(
            example["prompt"] if fmt == PROMPT_ONLY else example[{PREFERENCE: "chosen"}.get(fmt, "completion")]
        )
        return out

    kwargs = {"num_proc": args.dataset_num_proc} if args.dataset_num_proc else {}
    dataset = dataset.map(tokenize, with_indices=True, desc=f"Tokenizing {name} dataset", **kwargs)
    kinds = dataset[_KIND]
    if len(set(kinds)) > 1:
        other = next(i for i, k in enumerate(kinds) if k != kinds[0])
        raise SqlmError(
            f"row {other} of the {name} dataset is {kinds[other]} but row 0 is {kinds[0]} (mixed formats in one "
            "dataset): use one format for every row"
        )
    reasons = dataset[_SKIP]
    skipped: dict[str, list[int]] = {}
    for i, why in enumerate(reasons):
        if why:
            skipped.setdefault(why, []).append(i)
    if skipped:
        detail = "; ".join(
            f"{len(rows)} with {why} (rows {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''})"
            for why, rows in skipped.items()
        )
        n_skipped = sum(len(v) for v in skipped.values())
        if n_skipped == len(dataset):
            limits = "" if "max_length=" in detail else f" (max_length={args.max_length})"
            raise SqlmError(f"every row of the {name} dataset was skipped: {detail}{limits}")
        logger.warning("skipped %d of %d rows of the %s dataset: %s", n_skipped, len(dataset), name, detail)
        dataset = dataset.filter(lambda why: not why, input_columns=[_SKIP], **kwargs)
    return dataset.remove_columns([_SKIP, _KIND])


# ----------------------------------------------------------------------------- trajectories


@dataclass
class Trajectory:
    """One path: a prompt and a completion, with whatever rewards the data already carries."""

    prompt_ids: list[int]
    completion_ids: list[int]
    prompt: Any = None  # text or messages, for reward functions
    completion: Any = None  # text or messages; None = decode completion_ids
    token_rewards: list[float] | None = None  # dense rewards from the data, one per completion token
    sequence_reward: float | None = None  # sequence reward from the data, on the last token
    columns: dict[str, Any] = field(default_factory=dict)  # other dataset columns
    source: str = "completion"  # chosen | rejected | completion | online | replay
    scored: bool = False  # rewards final (replayed samples are not scored again)
    ref_log_probs: list[float] | None = None  # precomputed log pi_ref(a_t|s_t), one per completion token
    ref_logsumexp: list[float] | None = None  # precomputed logsumexp z_ref(s_t), one per completion token

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _dense(example: dict[str, Any], column: str, n_tokens: int, idx: Any) -> list[float] | None:
    values = example.get(column)
    if values is None:
        return None
    values = [float(v) for v in values]
    if len(values) < n_tokens:
        raise SqlmError(
            f"row {idx}: column '{column}' has {len(values)} token rewards but the completion has "
            f"{n_tokens} tokens (rewards must align with the tokenised completion)"
        )
    return values[:n_tokens]  # completions may have been truncated


def _label_reward(example: dict[str, Any]) -> float | None:
    if example.get("reward") is not None:
        return float(example["reward"])
    if example.get("label") is not None:
        return 1.0 if bool(example["label"]) else -1.0
    return None


def _ref_values(example: dict[str, Any], side: str, n_tokens: int, idx: Any) -> dict[str, list[float] | None]:
    """The precomputed reference columns of one side of a row (both or neither), exactly one value per
    completion token."""
    out = {}
    for key, column in zip(("ref_log_probs", "ref_logsumexp"), REF_COLUMNS[side]):
        values = example.get(column)
        if values is not None and len(values) != n_tokens:
            raise SqlmError(
                f"row {idx}: column '{column}' has {len(values)} values but the completion has {n_tokens} tokens "
                "(precomputed with other data or tokenisation settings; delete the column to recompute it)"
            )
        out[key] = None if values is None else [float(v) for v in values]
    if (out["ref_log_probs"] is None) != (out["ref_logsumexp"] is None):
        raise SqlmError(f"row {idx}: columns {' and '.join(REF_COLUMNS[side])} must be given together")
    return out


def _passthrough_columns(example: dict[str, Any]) -> dict[str, Any]:
    skip = set(TOKEN_COLUMNS) | set(TEXT_COLUMNS) | set(TOKEN_REWARD_COLUMNS.values()) | set(ALL_REF_COLUMNS)
    return {k: v for k, v in example.items() if k not in skip}


def offline_trajectories(
    example: dict[str, Any],
    chosen_score_column: str | None = None,
    rejected_score_column: str | None = None,
) -> list[Trajectory]:
    """The dataset's own trajectories of a tokenised row: chosen AND rejected for preference rows,
    the completion for prompt-completion rows, none for prompt-only rows."""
    idx = example.get("row_index")
    cols = _passthrough_columns(example)
    out = []
    if "chosen_ids" in example and example["chosen_ids"] is not None:
        for side, score_col in (("chosen", chosen_score_column), ("rejected", rejected_score_column)):
            ids = list(example[f"{side}_ids"])
            score = example.get(score_col) if score_col else None
            out.append(
                Trajectory(
                    prompt_ids=list(example["prompt_ids"]),
                    completion_ids=ids,
                    prompt=example.get("prompt"),
                    completion=example.get(side),
                    token_rewards=_dense(example, TOKEN_REWARD_COLUMNS[side], len(ids), idx),
                    sequence_reward=None if score is None else float(score),
                    columns=cols,
                    source=side,
                    **_ref_values(example, side, len(ids), idx),
                )
            )
    elif "completion_ids" in example and example["completion_ids"] is not None:
        ids = list(example["completion_ids"])
        out.append(
            Trajectory(
                prompt_ids=list(example["prompt_ids"]),
                completion_ids=ids,
                prompt=example.get("prompt"),
                completion=example.get("completion"),
                token_rewards=_dense(example, TOKEN_REWARD_COLUMNS["completion"], len(ids), idx),
                sequence_reward=_label_reward(example),
                columns=cols,
                **_ref_values(example, "completion", len(ids), idx),
            )
        )
    return out


def pack_trajectories(
    trajectories: list[Trajectory], rewards: list[torch.Tensor], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded model inputs of prompt+completion: ``input_ids``, ``attention_mask``,
    ``completion_mask`` (1 on completion tokens) and ``token_rewards`` (``r`` of taking the token at
    each position), all ``[N, L]``. When some trajectories carry precomputed reference values, also
    ``ref_log_probs`` / ``ref_logsumexp`` ``[N, L]`` (at the position of each completion token, 0
    elsewhere) and ``ref_precomputed`` ``[N]`` (which rows have them)."""
    if not trajectories:
        raise SqlmError("no trajectories in the batch")
    length = max(len(t.prompt_ids) + len(t.completion_ids) for t in trajectories)
    n = len(trajectories)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    completion = torch.zeros((n, length), dtype=torch.long)
    token_rewards = torch.zeros((n, length), dtype=torch.float32)
    for i, (t, r) in enumerate(zip(trajectories, rewards)):
        p, c = len(t.prompt_ids), len(t.completion_ids)
        input_ids[i, : p + c] = torch.tensor(t.prompt_ids + t.completion_ids, dtype=torch.long)
        attention[i, : p + c] = 1
        completion[i, p : p + c] = 1
        token_rewards[i, p : p + c] = r[:c].float().cpu()
    out = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "token_rewards": token_rewards,
    }
    has_ref = [t.ref_log_probs is not None for t in trajectories]
    if any(has_ref):
        ref_lp, ref_lse = torch.zeros((n, length)), torch.zeros((n, length))
        for i, t in enumerate(trajectories):
            if has_ref[i]:
                p, c = len(t.prompt_ids), len(t.completion_ids)
                ref_lp[i, p : p + c] = torch.tensor(t.ref_log_probs, dtype=torch.float32)
                ref_lse[i, p : p + c] = torch.tensor(t.ref_logsumexp, dtype=torch.float32)
        out.update(ref_log_probs=ref_lp, ref_logsumexp=ref_lse, ref_precomputed=torch.tensor(has_ref))
    return out


@dataclass
class DataCollatorForSoftQ:
    """Keeps the rows as they are (``{"examples": [...]}``): the trainer turns them into trajectories,
    rolls out prompts and scores them before packing (rewards need the raw text and columns)."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"examples": list(examples)}
