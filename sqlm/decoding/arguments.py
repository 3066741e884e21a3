"""The decoding strategy and its keys (:class:`DecodingArguments`), their checks, and the rewarder the
keys name (:func:`rewarder_for`). What each strategy does is in :mod:`sqlm.decoding`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SqlmError


STRATEGIES = ("sample", "best_of_n", "value_beam")
SCORERS = ("implicit", "likelihood", "reward_model", "random")
BEAM_SCORES = ("soft", "value", "likelihood")
VALUE_ANCHORS = ("reference", "none")


def check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    """The one-line error (with "did you mean") of a key whose value is not one of ``choices``."""
    if value not in choices:
        from ..recipe import choice_error

        raise choice_error(key, value, choices)


def check_at_least(key: str, value: Any, low: int) -> None:
    """The one-line error of a key that must be an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SqlmError(f"key '{key}' must be an integer >= {low}, got {value!r}")


@dataclass
class DecodingArguments:
    """The decoding strategy and its parameters (``sqlm generate`` and ``sqlm eval`` recipes)."""

    strategy: str = field(
        default="sample",
        metadata={"help": "How completions are chosen: 'sample', 'best_of_n' or 'value_beam' (see sqlm.decoding)."},
    )
    best_of: int = field(default=4, metadata={"help": "best_of_n: N, the samples drawn per prompt (>= 1)."})
    scorer: str = field(
        default="implicit",
        metadata={
            "help": "best_of_n: 'implicit' (tau * sum log pi/pi_ref, needs ref_model), 'likelihood' "
            "(tau * sum log pi), 'reward_model' (reward_funcs) or 'random' (the control)."
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Rewarders for scorer 'reward_model' and for finished beams of value_beam: names known to "
            "sqlm.rewards.build_rewarder or 'module:function' with TRL's reward signature (needs allow_code_rewards)."
        },
    )
    reward_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments per reward function name (a mapping)."}
    )
    allow_code_rewards: bool = field(
        default=False,
        metadata={"help": "Allow 'module:function' reward functions to be imported (runs that module's code)."},
    )
    num_beams: int = field(default=4, metadata={"help": "value_beam: beams kept alive (and finished ones pooled)."})
    num_candidates: int = field(
        default=2, metadata={"help": "value_beam: continuations each live beam draws per round."}
    )
    chunk_length: int = field(
        default=8, metadata={"help": "value_beam: tokens between scoring points (1 = score every token)."}
    )
    beam_score: str = field(
        default="soft",
        metadata={
            "help": "value_beam: 'soft' (tau log pi_ref(prefix) + V(s); finished: + R), 'value' (OREO: V(s); "
            "finished: R) or 'likelihood' (tau log pi(prefix), the control)."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature of candidates (1 = the soft policy; 0 = greedy / top-k beams)."},
    )
    tau: float = field(
        default=1.0,
        metadata={"help": "The model's temperature tau (DPO: beta): scales Q, V and the implicit reward."},
    )
    value_anchor: str = field(
        default="reference",
        metadata={
            "help": "Where values are measured from, as in training: 'reference' (V = tau (lse z - lse z_ref)) "
            "or 'none' (V = tau lse z)."
        },
    )

    def __post_init__(self):
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("scorer", self.scorer, SCORERS)
        check_choice("beam_score", self.beam_score, BEAM_SCORES)
        check_choice("value_anchor", self.value_anchor, VALUE_ANCHORS)
        for key in ("best_of", "num_beams", "num_candidates", "chunk_length"):
            check_at_least(key, getattr(self, key), 1)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise SqlmError(f"key 'temperature' must be a number >= 0, got {self.temperature!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SqlmError(f"key 'temperature' must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not self.tau > 0:
            raise SqlmError(f"key 'tau' must be a number > 0, got {self.tau!r}")
        if isinstance(self.reward_kwargs, str):
            try:
                self.reward_kwargs = json.loads(self.reward_kwargs)
            except json.JSONDecodeError as e:
                raise SqlmError(f"key 'reward_kwargs' must be a mapping (YAML) or a JSON object string: {e}") from None
        if self.reward_kwargs is not None and not isinstance(self.reward_kwargs, dict):
            raise SqlmError(f"key 'reward_kwargs' must be a mapping, got {type(self.reward_kwargs).__name__}")

    def needs_reference(self) -> bool:
        """Whether this strategy reads ``pi_ref`` (and so a reference model must be given)."""
        if self.strategy == "best_of_n":
            return self.scorer == "implicit"
        if self.strategy == "value_beam":
            return self.beam_score == "soft" or (self.beam_score == "value" and self.value_anchor == "reference")
        return False

    def needs_rewarder(self) -> bool:
        return self.strategy == "best_of_n" and self.scorer == "reward_model"

    def label(self) -> str:
        """A short name of the strategy and its parameters (for tables and plots)."""
        if self.strategy == "best_of_n":
            return f"best_of_n[{self.scorer}, N={self.best_of}]"
        if self.strategy == "value_beam":
            return (
                f"value_beam[{self.beam_score}, W={self.num_beams}, K={self.num_candidates}, "
                f"L={self.chunk_length}, T={self.temperature:g}]"
            )
        return f"sample[T={self.temperature:g}]"


def check_reference(args: DecodingArguments, ref_model) -> None:
    """The one-line error of a strategy that reads ``pi_ref`` when no reference is given."""
    if ref_model is not None or not args.needs_reference():
        return
    if args.strategy == "best_of_n":
        raise SqlmError("scorer 'implicit' needs a reference model (set ref_model: the pi_ref of tau * log pi/pi_ref)")
    if args.beam_score == "soft":
        raise SqlmError(
            "beam_score 'soft' needs a reference model (set ref_model; it scores tau * log pi_ref(prefix))"
        )
    raise SqlmError("value_anchor 'reference' needs a reference model (set ref_model, or value_anchor: none)")


def rewarder_for(args: DecodingArguments, tokenizer=None, search_dirs: Sequence[str] = ()):
    """The rewarder of ``args.reward_funcs`` (their sum), or None when none is named."""
    if not args.reward_funcs:
        return None
    from ..rewards.base import WeightedSum
    from ..rewards.registry import resolve_reward_funcs

    parts = resolve_reward_funcs(
        list(args.reward_funcs), args.reward_kwargs, args.allow_code_rewards, tokenizer, search_dirs
    )
    return parts[0] if len(parts) == 1 else WeightedSum(parts)
