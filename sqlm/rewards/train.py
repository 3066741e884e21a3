"""Fitting a Bradley-Terry reward model on preference pairs, and measuring it.

:func:`train_reward_model` is a thin wrapper over TRL's ``RewardTrainer`` (loss
``−log σ(R(x, y_c) − R(x, y_r))``): it fits a sequence classifier with one label, saves it as
safetensors (LoRA merged) with its tokenizer, and reports the held-out pair accuracy
(:func:`pairwise_accuracy`) in ``output_dir/reward_eval.json``. ``sqlm reward``
(:mod:`sqlm.commands.reward`) is its command line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import SqlmError


MIN_HELDOUT_PAIRS = 20
"""Fewer held-out pairs than this give an accuracy too noisy to read (standard error above 0.11)."""


def check_pad_token(tokenizer, pad_token: str | None = None, key: str = "tokenizer_pad_token") -> None:
    """Set ``pad_token`` (when given) and insist on a pad token distinct from EOS: a sequence
    classifier reads its score at the last non-pad token, which would skip the EOS. ``key``: the
    recipe key that sets ``pad_token``, named in the errors."""
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            raise SqlmError(f"{key} '{pad_token}' is not in the tokenizer's vocabulary")
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise SqlmError(
            f"the tokenizer has no pad token distinct from EOS; set {key} to an unused token "
            "(a sequence classifier reads its score at the last non-pad token, which would skip the EOS)"
        )


def heldout_warning(accuracy: float, pairs: int, fix: str) -> str | None:
    """The one-line warning for a pair accuracy measured on fewer than :data:`MIN_HELDOUT_PAIRS`
    held-out pairs, with its binomial standard error at chance, ``sqrt(0.5 * 0.5 / pairs)``, and
    ``fix`` (how to hold out more); None when there are enough pairs."""
    if pairs >= MIN_HELDOUT_PAIRS:
        return None
    se = 0.5 / math.sqrt(pairs) if pairs > 0 else math.inf
    return (
        f"held-out accuracy {accuracy:.3f} is measured on only {pairs} pairs: its binomial standard error is "
        f"{se:.2f} at chance (0.5), too wide to read; {fix}"
    )


def check_preference_columns(dataset, name: str) -> None:
    for col in ("chosen", "rejected"):
        if col not in dataset.column_names:
            raise SqlmError(f"dataset '{name}' has no '{col}' column; columns: {dataset.column_names}")


def pairwise_accuracy(model, tokenizer, dataset, batch_size: int = 32) -> float:
    """Fraction of pairs whose chosen completion the model scores above the rejected one, with the
    score read at the last real token (:class:`sqlm.rewards.models.TerminalRewarder`)."""
    from .cache import make_batch, tokenize_preference_example
    from .models import TerminalRewarder

    scorer = TerminalRewarder(model, tokenizer, batch_size=batch_size)
    pad = tokenizer.pad_token_id
    wins = 0
    rows = dataset.with_format(None)
    for start in range(0, len(rows), batch_size):
        chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        toks = [tokenize_preference_example(ex, tokenizer) for ex in chunk]
        rc = scorer.sequence_rewards(make_batch([t["prompt_ids"] for t in toks], [t["chosen_ids"] for t in toks], pad))
        rr = scorer.sequence_rewards(
            make_batch([t["prompt_ids"] for t in toks], [t["rejected_ids"] for t in toks], pad)
        )
        wins += int((rc > rr).sum())
    return wins / max(len(rows), 1)


def train_reward_model(model, tokenizer, train, evaluation, config, peft_config=None, pad_token: str | None = None):
    """Fit ``model`` (a sequence classifier with ``num_labels=1``) on the preference pairs ``train``
    with TRL's ``RewardTrainer`` and ``config`` (a ``trl.RewardConfig``); save it to
    ``config.output_dir`` (safetensors, a LoRA adapter merged) with ``tokenizer``.

    Returns ``(model, report)``: the trained model and, on the main process, ``{"train_pairs",
    "eval_pairs", "eval_accuracy"}`` (the last two with ``evaluation``), also written to
    ``output_dir/reward_eval.json``; None on the other processes."""
    from trl import RewardTrainer

    check_pad_token(tokenizer, pad_token)
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    out = Path(config.output_dir)
    if peft_config is not None:
        model = trainer.model.merge_and_unload()
        if trainer.is_world_process_zero():
            model.save_pretrained(out)  # safetensors
            tokenizer.save_pretrained(out)
    else:
        trainer.save_model(str(out))  # safetensors + the tokenizer, on the main process
        model = trainer.model
    if not trainer.is_world_process_zero():
        return model, None
    report = {"train_pairs": len(train)}
    if evaluation is not None:
        model.eval()
        report["eval_pairs"] = len(evaluation)
        report["eval_accuracy"] = pairwise_accuracy(model, tokenizer, evaluation)
    (out / "reward_eval.json").write_text(json.dumps(report, indent=1))
    return model, report
