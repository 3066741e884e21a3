"""A tiny offline preference task with a learnable preference, for the quickstart recipe and tests.

Completions are short strings of words. The gold reward counts words: ``+1`` for each word of
``POSITIVE``, ``−1`` for each of ``NEGATIVE``, 0 otherwise. A pair's chosen completion is the one with
the higher gold reward (ties are skipped), so a reward model that learns the word weights ranks
every pair correctly. Everything is built locally: a byte-level BPE tokenizer trained on the
generated text and a randomly initialised two-layer Qwen2-shaped classifier.
"""

from __future__ import annotations

import random


POSITIVE = ("good", "great", "nice", "happy", "kind")
NEGATIVE = ("bad", "awful", "poor", "sad", "rude")
NEUTRAL = ("the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "home", "it", "was", "very")
PROMPTS = ("Review:", "Say something:", "Describe the day:", "Tell me about the pet:")


def toy_gold_reward(text: str) -> float:
    """The known sequence reward: ``#positive words − #negative words``."""
    words = text.replace(".", " ").split()
    return float(sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words))


def toy_gold_reward_function(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """The gold reward with TRL's reward-function signature (one float per completion)."""
    return [toy_gold_reward(c if isinstance(c, str) else c[-1]["content"]) for c in completions]


def _completion(rng: random.Random, min_words: int = 3, max_words: int = 7) -> str:
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(min_words, max_words))]
    for _ in range(rng.randint(0, 2)):
        words[rng.randrange(len(words))] = rng.choice(POSITIVE)
    for _ in range(rng.randint(0, 2)):
        words[rng.randrange(len(words))] = rng.choice(NEGATIVE)
    return " " + " ".join(words) + "."


def toy_preference_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}`` (standard text format, explicit prompt)."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        a, b = _completion(rng), _completion(rng)
        ra, rb = toy_gold_reward(a), toy_gold_reward(b)
        if ra == rb:
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        rows.append({"prompt": rng.choice(PROMPTS), "chosen": chosen, "rejected": rejected})
    return rows


def toy_preference_dataset(n: int, seed: int = 0):
    from datasets import Dataset

    return Dataset.from_list(toy_preference_rows(n, seed))


def toy_tokenizer(vocab_size: int = 300, seed: int = 0):
    """A byte-level BPE tokenizer trained on text of the toy task (pad and eos are distinct)."""
    from ..tiny import train_tokenizer

    rows = toy_preference_rows(400, seed=10_000 + seed)
    texts = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    return train_tokenizer(texts, vocab_size=vocab_size)


def toy_reward_model(tokenizer, seed: int = 0, **config_kwargs):
    """A tiny randomly initialised ``Qwen2ForSequenceClassification`` with ``num_labels=1``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from ..tiny import tiny_qwen2_config

    torch.manual_seed(seed)
    config = tiny_qwen2_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **config_kwargs,
    )
    config.num_labels = 1
    return AutoModelForSequenceClassification.from_config(config)
