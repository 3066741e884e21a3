"""Dense rewards for offline preference data, computed once and stored as dataset columns.

:func:`add_token_rewards` adds ``chosen_token_rewards`` and ``rejected_token_rewards`` (or
``token_rewards`` for prompt-completion data): per row, a
list of floats with one value per completion token of the *policy* tokenizer, in the tokenization
TRL's ``DPOTrainer`` uses (prompt tokenized alone; completion = the tokens of prompt+completion after
their common prefix; EOS appended to text completions; conversational rows through the chat
template). A trainer that tokenizes the same way can put ``r[b, t]`` on its completion tokens
directly; the list lengths let it check.

The cache is keyed by (a) a hash of the dataset's content, (b) the rewarder's :meth:`settings`
(model weight hashes, tokenizers, parameters such as ``beta``), (c) the policy tokenizer and (d) a
format version: rerunning with the same inputs loads the columns from ``cache_dir``; changing any of
them computes (and stores) new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..columns import TOKEN_REWARD_COLUMNS
from ..errors import SqlmError
from .base import TokenRewarder, make_batch
from .loading import tokenizer_fingerprint


logger = logging.getLogger(__name__)

CACHE_VERSION = 1
COLUMNS = (TOKEN_REWARD_COLUMNS["chosen"], TOKEN_REWARD_COLUMNS["rejected"])
COMPLETION_COLUMN = TOKEN_REWARD_COLUMNS["completion"]  # prompt-completion data
ALL_COLUMNS = (*COLUMNS, COMPLETION_COLUMN)


def tokenize_preference_example(example: dict[str, Any], tokenizer) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` of one preference row: the trainer's own
    :func:`sqlm.data.tokenize_preference` (as TRL's DPOTrainer), so cached rewards and the trainer
    agree token for token."""
    from ..data.tokenization import tokenize_preference

    out = tokenize_preference(example, tokenizer)
    return {k: list(out[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


def tokenize_prompt_completion_example(example: dict[str, Any], tokenizer) -> dict[str, list[int]]:
    """``prompt_ids``, ``completion_ids`` of a prompt-completion row, tokenized as one side of a
    preference pair (:func:`sqlm.data.tokenize_prompt_completion`)."""
    from ..data.tokenization import tokenize_prompt_completion

    out = tokenize_prompt_completion(example, tokenizer)
    return {"prompt_ids": list(out["prompt_ids"]), "completion_ids": list(out["completion_ids"])}


def reward_sides(column_names) -> list[tuple[str, str]]:
    """``(text column, reward column)`` pairs of a dataset: chosen/rejected or completion."""
    if "chosen" in column_names and "rejected" in column_names:
        return [("chosen", COLUMNS[0]), ("rejected", COLUMNS[1])]
    if "completion" in column_names:
        return [("completion", COMPLETION_COLUMN)]
    raise SqlmError(
        f"dense rewards need preference data (chosen, rejected) or prompt-completion data (completion); "
        f"the dataset has columns {list(column_names)}"
    )


def dataset_fingerprint(dataset) -> str:
    """Hash of a dataset's content (column names, types and every value), independent of its
    on-disk layout or history; the reward columns themselves are left out."""
    h = hashlib.blake2b(digest_size=16)
    keep = [c for c in dataset.column_names if c not in ALL_COLUMNS]
    h.update(json.dumps(keep).encode())
    h.update(str(dataset.select_columns(keep).features).encode())
    h.update(str(len(dataset)).encode())
    for chunk in dataset.select_columns(keep).with_format(None).iter(batch_size=1000):
        h.update(json.dumps(chunk, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(dataset, rewarder: TokenRewarder, tokenizer) -> tuple[str, dict[str, Any]]:
    """The cache key and the description it hashes."""
    desc = {
        "version": CACHE_VERSION,
        "data": dataset_fingerprint(dataset),
        "rewarder": rewarder.settings(),
        "policy_tokenizer": tokenizer_fingerprint(tokenizer),
    }
    key = hashlib.blake2b(json.dumps(desc, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()
    return key, desc


def compute_token_rewards(dataset, rewarder: TokenRewarder, tokenizer, batch_size: int = 16) -> dict[str, list]:
    """The reward columns, computed live: ``{"chosen_token_rewards": [...], ...}`` (preference data)
    or ``{"token_rewards": [...]}`` (prompt-completion data)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = dataset.with_format(None)
    sides = reward_sides(dataset.column_names)
    preference = sides[0][0] == "chosen"
    out: dict[str, list] = {col: [] for _, col in sides}
    other = [c for c in dataset.column_names if c not in ("prompt", "chosen", "rejected", "completion", *ALL_COLUMNS)]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        n = len(next(iter(chunk.values())))
        examples = [{k: v[i] for k, v in chunk.items()} for i in range(n)]
        if preference:  # implicit-prompt conversations: split off the shared prompt, as TRL does
            from trl.data_utils import maybe_extract_prompt

            examples = [maybe_extract_prompt(ex) for ex in examples]
        toks = []
        for i, ex in enumerate(examples):
            try:
                if preference:
                    toks.append(tokenize_preference_example(ex, tokenizer))
                else:
                    toks.append(tokenize_prompt_completion_example(ex, tokenizer))
            except SqlmError as e:
                raise SqlmError(f"row {start + i}: {e}") from None
        prompts = [ex.get("prompt") for ex in examples]
        columns = {k: [ex.get(k) for ex in examples] for k in other}
        for side, col in sides:
            key = f"{side}_ids"
            ids = [t[key] for t in toks]
            batch = make_batch(
                [t["prompt_ids"] for t in toks],
                ids,
                pad_id,
                prompts=prompts,
                completions=[ex.get(side) for ex in examples],
                columns=columns,
            )
            r = rewarder(batch).float().cpu()
            out[col].extend(r[i, : len(ids[i])].tolist() for i in range(n))
    return out


def add_token_rewards(
    dataset,
    rewarder: TokenRewarder,
    tokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
):
    """``dataset`` with dense reward columns added: ``chosen_token_rewards`` /
    ``rejected_token_rewards`` for preference data, ``token_rewards`` for prompt-completion data.

    ``tokenizer`` is the policy's. With ``cache_dir`` the columns are stored under
    ``cache_dir/<key>/`` and reused whenever the data, the rewarder's settings (its models' weights
    included) and the tokenizer are unchanged (see the module docstring).
    """
    from datasets import Dataset, load_from_disk

    base = dataset.remove_columns([c for c in ALL_COLUMNS if c in dataset.column_names])
    names = [col for _, col in reward_sides(base.column_names)]
    path = None
    if cache_dir is not None:
        key, desc = cache_key(base, rewarder, tokenizer)
        path = Path(cache_dir) / key
        if (path / "meta.json").is_file():
            cached = load_from_disk(str(path / "columns"))
            if len(cached) == len(base) and set(names) <= set(cached.column_names):
                logger.info("dense rewards: reusing cache %s", path)
                for c in names:
                    base = base.add_column(c, cached[c])
                return base
    cols = compute_token_rewards(base, rewarder, tokenizer, batch_size=batch_size)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(cols).save_to_disk(str(path / "columns"))
        (path / "meta.json").write_text(json.dumps(desc, sort_keys=True, indent=1, default=str))
    for c in names:
        base = base.add_column(c, cols[c])
    return base
