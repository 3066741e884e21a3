"""Token trajectories: the dataset's own paths of a tokenised row (:func:`offline_trajectories`), and
a batch of paths packed into right-padded model inputs (:func:`pack_trajectories`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..columns import ALL_REF_COLUMNS, REF_COLUMNS, TEXT_COLUMNS, TOKEN_COLUMNS, TOKEN_REWARD_COLUMNS
from ..errors import SqlmError


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


def passthrough_columns(example: dict[str, Any]) -> dict[str, Any]:
    """A row's other columns (not token ids, TRL's text columns, dense rewards or reference values): the
    :attr:`Trajectory.columns` that reward functions read."""
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
    cols = passthrough_columns(example)
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
