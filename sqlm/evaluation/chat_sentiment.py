"""Chat sentiment: a preference task for an instruct model (SmolLM2-135M-Instruct), scored by VADER.

**Prompts** are one-turn conversations in TRL's format asking for a one-sentence review::

    [{"role": "user", "content": "Write a one-sentence review of a film about a lighthouse keeper."}]

built from :data:`SUBJECTS` x :data:`FRAMINGS` (48 x 8 = 384 distinct prompts, :func:`all_prompts`).
:func:`split_prompts` shuffles them with a fixed seed and holds out the first :data:`N_HELDOUT` (128);
the other 256 are the training prompts. Train and held-out prompts never share a (subject, framing).

**Gold** (:func:`gold_scores`): VADER's compound sentiment of the reply text, in [-1, 1], higher is
better -- the scorer of the tiny ``sentiment`` task (:func:`sqlm.evaluation.gold.gold_reward`). It only
labels the pairs and scores evaluations; the learners train on a Bradley-Terry reward model fitted to
the pairs (or on the pairs themselves, DPO).

**Pairs** (:func:`pair_rows`): two replies of the base model to one training prompt (a prompt gives
several pairs from more replies); the one with the higher gold score is ``chosen``, the other
``rejected``; a tie gives no pair. Rows are conversational preference rows with the gold scores in
``chosen_score`` / ``rejected_score``. :func:`reward_model_split` holds the pairs of some prompts out of
the reward model's training, for its accuracy on prompts it never saw.

The task that samples the replies, fits the reward model and evaluates policies is
:class:`sqlm.evaluation.tasks.ChatSentimentTask`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ..errors import SqlmError


SUBJECTS: tuple[str, ...] = (
    "a lighthouse keeper", "a retired astronaut", "a small-town baker", "a chess prodigy", "a travelling circus",
    "a haunted hotel", "a jazz pianist", "a mountain rescue team", "a family of beekeepers", "a stolen painting",
    "a desert road trip", "a robot that learns to paint", "a village football team", "a deep-sea expedition",
    "a wedding that goes wrong", "a night-shift nurse", "an old bookshop", "a marathon runner", "a ghost ship",
    "a teenage inventor", "a cooking competition", "a lost dog finding its way home", "a war correspondent",
    "a ballet school", "a struggling rock band", "a bank heist", "a farmer in a drought", "a time traveller",
    "a village election", "a street magician", "a polar research station", "a long-distance friendship",
    "a failing restaurant", "a secret garden", "a colony on Mars", "a grandmother who learns to surf",
    "a storm at sea", "a summer camp", "a school orchestra", "an island ferry", "two rival chefs", "a clockmaker",
    "a snowbound train", "a city zoo", "a pirate radio station", "a translator", "a runaway balloon",
    "a family reunion",
)  # fmt: skip
FRAMINGS: tuple[str, ...] = (
    "Write a one-sentence review of a film about {subject}.",
    "Write a one-sentence review of a novel about {subject}.",
    "Write a one-sentence review of a documentary about {subject}.",
    "Write a one-sentence review of a stage play about {subject}.",
    "Write a one-sentence review of a podcast about {subject}.",
    "Write a one-sentence review of a video game about {subject}.",
    "In one sentence, review a short story about {subject}.",
    "Give a one-sentence review of a TV series about {subject}.",
)
#: held-out prompts (the rest are the training prompts)
N_HELDOUT = 128
#: the seed of the fixed shuffle that splits the prompts
SPLIT_SEED = 0


def conversation(text: str) -> list[dict[str, str]]:
    """A one-turn conversational prompt."""
    return [{"role": "user", "content": text}]


def all_prompts() -> list[list[dict[str, str]]]:
    """Every prompt, subject-major, as conversations (each distinct)."""
    return [conversation(f.format(subject=s)) for s in SUBJECTS for f in FRAMINGS]


def split_prompts(n_train: int | None = None, n_eval: int | None = None) -> tuple[list, list]:
    """``(train, held-out)`` prompts: :func:`all_prompts` shuffled with :data:`SPLIT_SEED`, the first
    :data:`N_HELDOUT` held out; the first ``n_train`` / ``n_eval`` of each (default all). The same
    arguments give the same lists, and a smaller setting's prompts are the first of a larger one's."""
    prompts = all_prompts()
    random.Random(SPLIT_SEED).shuffle(prompts)
    held_out, train = prompts[:N_HELDOUT], prompts[N_HELDOUT:]
    for name, n, pool in (("n_train", n_train, train), ("n_eval", n_eval, held_out)):
        if n is not None and not 1 <= n <= len(pool):
            raise SqlmError(f"chat_sentiment: {name} must be between 1 and {len(pool)}, got {n}")
    return train[:n_train], held_out[:n_eval]


# ----------------------------------------------------------------------------- gold


def reply_text(reply: Any) -> str:
    """A reply as text: a string, or the ``content`` of the last of a list of messages."""
    if isinstance(reply, str):
        return reply
    if isinstance(reply, (list, tuple)) and reply and isinstance(reply[-1], dict):
        return str(reply[-1].get("content", ""))
    raise SqlmError(f"a reply is a string or a list of messages, got {type(reply).__name__}")


def gold_scores(replies: Sequence[Any]) -> list[float]:
    """VADER's compound sentiment of each reply's text (:func:`sqlm.evaluation.gold.gold_reward`)."""
    from .gold import gold_reward

    return gold_reward([reply_text(r) for r in replies])


def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float]:
    """The gold score with TRL's reward-function signature (for evaluation hooks such as ``sqlm
    generate``'s ``gold``; no learner of the task trains on it)."""
    return gold_scores(completions)


# ----------------------------------------------------------------------------- pairs


def pair_rows(
    prompts: Sequence[list[dict]], first: Sequence[str], second: Sequence[str], scores: Sequence[tuple[float, float]]
) -> list[dict]:
    """One preference row per prompt whose two replies' gold ``scores`` differ: the higher-scored reply
    ``chosen``, the other ``rejected`` (as assistant messages), with their scores in ``chosen_score`` /
    ``rejected_score``; a tie gives none. Rows keep the prompts' order."""
    if not len(prompts) == len(first) == len(second) == len(scores):
        raise SqlmError(
            f"pair_rows: {len(prompts)} prompts, {len(first)} and {len(second)} replies, {len(scores)} scores"
        )
    rows = []
    for prompt, a, b, (sa, sb) in zip(prompts, first, second, scores):
        if sa == sb:
            continue
        (chosen, cs), (rejected, rs) = ((a, sa), (b, sb)) if sa > sb else ((b, sb), (a, sa))
        rows.append({
            "prompt": list(prompt), "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "chosen_score": float(cs),
            "rejected_score": float(rs),
        })  # fmt: skip
    return rows


def preference_pairs(prompts: Sequence[list[dict]], first: Sequence[str], second: Sequence[str]) -> list[dict]:
    """:func:`pair_rows` of two replies per prompt, scored by :func:`gold_scores`."""
    sa, sb = gold_scores(list(first)), gold_scores(list(second))
    return pair_rows(prompts, first, second, list(zip(sa, sb)))


def reward_model_split(
    rows: Sequence[dict], prompts: Sequence[list[dict]], fraction: float = 0.2
) -> tuple[list, list]:
    """``(train, held-out)`` rows for the reward model, split by prompt: the rows of the last ``fraction``
    of ``prompts`` (at least one prompt) are held out, so its accuracy is measured on prompts it never saw
    (several pairs of one prompt would otherwise straddle the split). Both keep the rows' order."""
    if not 0.0 < fraction < 1.0 or len(prompts) < 2:
        raise SqlmError(
            f"reward_model_split: need 0 < fraction < 1 and 2 or more prompts, got {fraction}, {len(prompts)}"
        )
    n_held = max(1, int(len(prompts) * fraction))
    held_prompts = {repr(p) for p in prompts[len(prompts) - n_held :]}
    train, held = [], []
    for r in rows:
        (held if repr(r["prompt"]) in held_prompts else train).append(r)
    return train, held
