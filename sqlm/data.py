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

Tokenisation is pure and deterministic and, with ``max_prompt_length=None`` and
``max_completion_length=None``, gives exactly the ids of TRL's ``DPOTrainer`` (same EOS handling,
same chat-template calls, same common-prefix split, same ``keep_start`` truncation at ``max_length``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl.data_utils import _tokenize, common_prefix_length, is_conversational, maybe_extract_prompt

from .errors import SqlmError

PREFERENCE, PROMPT_COMPLETION, PROMPT_ONLY = "preference", "prompt_completion", "prompt"
TOKEN_REWARD_COLUMNS = {"chosen": "chosen_token_rewards", "rejected": "rejected_token_rewards", "completion": "token_rewards"}
# columns added by tokenisation; everything else is passed to reward functions
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "row_index")
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion")
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


def load_split(
    name: str,
    split: str,
    config: str | None = None,
    base_dir: str | os.PathLike | None = None,
):
    """Load one split with ``datasets``: a local .json/.jsonl/.parquet/.csv file (its only split),
    a local folder, or a hub id. ``split`` may itself be a file path (e.g. a held-out jsonl)."""
    import datasets

    split_path = _resolve_path(split, base_dir) if split else None
    if split_path is not None and split_path.suffix in _FILE_BUILDERS:
        name, split = str(split_path), "train"
    path = _resolve_path(name, base_dir)
    try:
        if path is not None and path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise SqlmError(
                    f"dataset file {path} has an unknown extension; use one of {', '.join(_FILE_BUILDERS)}"
                )
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path is not None:
            return datasets.load_dataset(str(path), config, split=split)
        return datasets.load_dataset(name, config, split=split)
    except SqlmError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SqlmError(f"could not load split '{split}' of dataset '{name}': {e}") from None
    except Exception as e:  # offline hub misses, malformed files
        raise SqlmError(f"could not load dataset '{name}' (split '{split}'): {type(e).__name__}: {e}") from None


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
    import json

    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(example.get("chat_template_kwargs") or {})}


def _with_eos(text: Any, eos_token: str | None) -> Any:
    if isinstance(text, str) and eos_token and not text.endswith(eos_token):
        return text + eos_token
    return text


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
    completion starts where the tokenised prompt and prompt+completion diverge. Then truncation:
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
    p, (c, r) = _truncate(
        list(prompt_ids[:n]), [list(chosen[n:]), list(rejected[n:])],
        max_length, max_prompt_length, max_completion_length,
    )
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
    p, (c,) = _truncate(list(prompt_ids[:n]), [list(full[n:])], max_length, max_prompt_length, max_completion_length)
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


def _check_row(example: dict[str, Any], fmt: str, idx: int) -> None:
    need = {PREFERENCE: ("chosen", "rejected"), PROMPT_COMPLETION: ("prompt", "completion"), PROMPT_ONLY: ("prompt",)}
    for key in need[fmt]:
        if example.get(key) is None or (isinstance(example.get(key), (str, list)) and len(example[key]) == 0):
            raise SqlmError(f"row {idx}: column '{key}' is empty or missing ({fmt.replace('_', '-')} format: {FORMAT_HELP})")


def prepare_dataset(dataset, tokenizer, args, mode: str | None = None, name: str = "train"):
    """Rename columns (``args.dataset_column_map``), check the format against ``mode`` and tokenise.

    Adds ``prompt_ids`` and ``chosen_ids``/``rejected_ids`` or ``completion_ids``, and ``row_index``;
    the original columns stay (reward functions read them). Rows whose prompt alone fills
    ``max_length`` are dropped, as in TRL's DPO.
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

    def tokenize(example, idx):
        _check_row(example, fmt, idx)
        try:
            if fmt == PREFERENCE:
                out = tokenize_preference(example, tokenizer, **lengths)
            elif fmt == PROMPT_COMPLETION:
                out = tokenize_prompt_completion(example, tokenizer, **lengths)
            else:
                out = tokenize_prompt(example, tokenizer, args.max_prompt_length)
        except SqlmError as e:
            raise SqlmError(f"row {idx} of the {name} dataset: {e}") from None
        if fmt == PREFERENCE and ("prompt" not in example or isinstance(example.get("chosen"), list)):
            extracted = _conversational_prompt(dict(example))
            for key in ("prompt", "chosen", "rejected"):
                out[key] = extracted[key]
        out["row_index"] = idx
        return out

    kwargs = {"num_proc": args.dataset_num_proc} if args.dataset_num_proc else {}
    dataset = dataset.map(tokenize, with_indices=True, desc=f"Tokenizing {name} dataset", **kwargs)
    if args.max_length is not None:
        dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length, **kwargs)
    if len(dataset) == 0:
        raise SqlmError(f"the {name} dataset is empty after tokenisation (max_length={args.max_length})")
    return dataset


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


def _passthrough_columns(example: dict[str, Any]) -> dict[str, Any]:
    skip = set(TOKEN_COLUMNS) | set(TEXT_COLUMNS) | set(TOKEN_REWARD_COLUMNS.values())
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
            )
        )
    return out


def pack_trajectories(
    trajectories: list[Trajectory], rewards: list[torch.Tensor], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded model inputs of prompt+completion: ``input_ids``, ``attention_mask``,
    ``completion_mask`` (1 on completion tokens) and ``token_rewards`` (``r`` of taking the token at
    each position), all ``[N, L]``."""
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
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "token_rewards": token_rewards,
    }


@dataclass
class DataCollatorForSoftQ:
    """Keeps the rows as they are (``{"examples": [...]}``): the trainer turns them into trajectories,
    rolls out prompts and scores them before packing (rewards need the raw text and columns)."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"examples": list(examples)}
