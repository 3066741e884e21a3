"""Inference with the model's own values: sampling, self-scored best-of-N and value-guided beam search.

A model trained by sqlm is its own critic (DESIGN.md section 1). From its logits ``z`` and, where
needed, the reference's ``z_ref`` at a state ``s``, one step at a time::

    log pi(a|s)      = z(s,a) - logsumexp z(s)
    Q(s,a)           = tau * (z(s,a) - logsumexp z_ref(s))      (value_anchor 'reference')
    V(s)             = tau * (logsumexp z(s) - logsumexp z_ref(s))
    Q(s,a), V(s)     = tau * z(s,a), tau * logsumexp z(s)        (value_anchor 'none')

so ``tau log pi = Q - V`` either way. The strategies (``DecodingArguments.strategy``):

* ``sample``: ancestral sampling at ``temperature`` (1: the soft-optimal policy itself). The baseline.
* ``best_of_n``: draw ``best_of`` samples per prompt and keep the highest score. Scorers:

  - ``implicit``: ``tau * sum_t log pi(y_t|s_t) / pi_ref(y_t|s_t)``, from the model and its reference
    alone. Summing the soft Bellman identity ``tau log pi*(a|s) = r~(s,a) + V*(s.a) - V*(s)`` (with
    ``r~ = r + tau log pi_ref`` and ``V = 0`` after the end) along ``y`` telescopes to

        tau * log pi*(y) / pi_ref(y) = R(y) - V*(s_0),

    so for a soft-optimal model the implicit score is the true reward up to a constant per prompt,
    and best-of-N by it ranks samples exactly as the reward does (tested on the exact oracle). The
    same holds for DPO's optimum with ``tau = beta``.
  - ``likelihood``: ``tau * sum_t log pi(y_t|s_t)``, the model's own confidence (a control that
    needs no reference: what is left of the implicit score without ``pi_ref``).
  - ``reward_model``: the sum over tokens of any sqlm rewarder or TRL-style reward function
    (``reward_funcs``), i.e. ``R(y)`` for a sequence reward.
  - ``random``: a uniform random score (the control: best-of-N by it is one plain sample).

* ``value_beam``: beam search over partial completions scored by the model's soft values. Each of
  ``num_beams`` live beams draws ``num_candidates`` continuations of ``chunk_length`` tokens from
  ``pi`` at ``temperature`` (at temperature 0: its ``num_candidates`` most likely next tokens, each
  continued greedily to the end of the chunk); every candidate is scored, finished ones (EOS or the
  length limit) go to a pool of the ``num_beams`` best, the ``num_beams`` best unfinished ones live
  on, until none is left; the answer is the pool's best. Scores (``beam_score``) of a prefix
  ``y_<k`` (state ``s_k``) and of a finished ``y`` (last action ``a_T`` at ``s_T``):

  - ``soft`` (default): the accumulated shaped reward plus the value to go,
    ``sum_{t<k} r~_t + V(s_k)`` with ``r~_t = r_t + tau log pi_ref(a_t|s_t)`` and, as in a
    terminal-reward task (a checker, a sequence reward model), ``r_t = 0`` before the end::

        unfinished:  tau * log pi_ref(y_<k) + V(s_k)
        finished:    tau * log pi_ref(y)    + R(y)

    ``R(y)`` comes from ``reward_funcs`` when given, else from the model itself:
    ``R^(y) = Q(s_T, a_T) - tau log pi_ref(a_T|s_T)`` (the Bellman identity with ``V = 0`` after
    the end). At the optimum both lines equal ``tau log pi*(prefix) + V*(s_0)``: the score ranks
    prefixes by ``pi*(prefix)``, never increases along a path, and an exhaustive beam (width at
    least the number of prefixes at every depth, every token a candidate, temperature 0, chunk 1)
    returns ``argmax_y pi*(y)`` (tested). These are properties of the optimum: a learned critic
    far from ``V*`` ranks no better than its values (``scripts/results/decoding``). What it adds over likelihood is the critic: the prefix's
    probability under ``pi_ref`` times ``exp(V(s_k)/tau)``, the model's estimate of what the rest
    can still earn, instead of the model's own probability of the prefix.
  - ``value``: OREO's form (Wang et al. 2024, value-guided step-level beam search): ``V(s_k)``
    alone for unfinished candidates, ``R(y)`` (or ``R^(y)``) for finished ones; it ignores how
    likely the prefix is.
  - ``likelihood``: ``tau * log pi(y_<k)``, plain beam search on the model's probability. It is
    what ``soft`` becomes when the per-token reward is read from the model's own ``Q`` and ``V``
    (``r~_t = Q(s_t,a_t) - V(s_{t+1})``: the sum telescopes to ``tau log pi(prefix) + V(s_0)``); the
    control for the critic.

  Not a score: ``sum_t (r~_t - tau log pi(a_t|s_t)) + V(s_k)`` is ``V(s_0)`` for every prefix at the
  optimum (path consistency), so it ranks nothing.

Mechanics. Prompts are left-padded and run once (their KV cache is shared by all samples or beams
of a prompt); every later call of a model processes one new token per row with its KV cache, so no
logits wider than one step ``[rows, vocab]`` are ever built. Beams and samples are rows of one
batch; choosing beams reorders the caches (``Cache.reorder_cache``). The reference, when a score
needs it, runs in lockstep with its own cache. Random numbers come from one generator per prompt,
drawn in a fixed order, so a prompt's result does not depend on the batch it is decoded in.

:func:`score_completions` reads the same quantities along given completions (the critic
``V(s_t)`` along a path, the implicit score, the model's final-reward estimate).

Compute (:class:`Compute`): tokens generated (every sampled token, discarded candidates included),
forward passes and token positions processed (padding excluded) of the policy and the reference,
and sequences scored by a rewarder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SqlmError
from .fused import accepts_logits_to_keep


STRATEGIES = ("sample", "best_of_n", "value_beam")
SCORERS = ("implicit", "likelihood", "reward_model", "random")
BEAM_SCORES = ("soft", "value", "likelihood")
VALUE_ANCHORS = ("reference", "none")


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        from .recipe import choice_error

        raise choice_error(key, value, choices)


def _at_least(key: str, value: Any, low: int) -> None:
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
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("scorer", self.scorer, SCORERS)
        _choice("beam_score", self.beam_score, BEAM_SCORES)
        _choice("value_anchor", self.value_anchor, VALUE_ANCHORS)
        for key in ("best_of", "num_beams", "num_candidates", "chunk_length"):
            _at_least(key, getattr(self, key), 1)
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


def build_rewarder(args: DecodingArguments, tokenizer=None, search_dirs: Sequence[str] = ()):
    """The rewarder of ``args.reward_funcs`` (their sum), or None when none is named."""
    if not args.reward_funcs:
        return None
    from .rewards.base import WeightedSum
    from .rewards.registry import resolve_reward_funcs

    parts = resolve_reward_funcs(
        list(args.reward_funcs), args.reward_kwargs, args.allow_code_rewards, tokenizer, search_dirs
    )
    return parts[0] if len(parts) == 1 else WeightedSum(parts)


# ----------------------------------------------------------------------------- compute


@dataclass
class Compute:
    """What a decoding run spent. Token positions exclude padding; a prompt's positions count once
    (its KV cache is shared by its samples or beams)."""

    prompts: int = 0
    tokens_generated: int = 0
    policy_forward_passes: int = 0
    policy_forward_tokens: int = 0
    reference_forward_passes: int = 0
    reference_forward_tokens: int = 0
    reward_calls: int = 0
    reward_sequences: int = 0

    @property
    def forward_passes(self) -> int:
        return self.policy_forward_passes + self.reference_forward_passes

    @property
    def forward_tokens(self) -> int:
        return self.policy_forward_tokens + self.reference_forward_tokens

    def add(self, other: Compute) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, float]:
        """Totals, plus per-prompt means of tokens generated and token positions processed."""
        out: dict[str, float] = {**asdict(self), "forward_passes": self.forward_passes}
        out["forward_tokens"] = self.forward_tokens
        n = max(self.prompts, 1)
        out["tokens_generated_per_prompt"] = self.tokens_generated / n
        out["forward_tokens_per_prompt"] = self.forward_tokens / n
        return out


# ----------------------------------------------------------------------------- the lockstep engine


def cache_of(output):
    """The KV cache of a model output (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to one width: ``(ids, attention mask)`` ``[B, W]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class _Rows:
    """Partial completions decoded together: one row each, the same row in both models' caches."""

    owner: torch.Tensor  # [R] the prompt instance of each row (rows of one owner are contiguous)
    slot: torch.Tensor  # [R] the row's rank among its owner's rows (sample index, beam rank)
    tokens: list[list[int]]  # completion so far
    mask: torch.Tensor  # [R, L] attention mask (left-padded prompt, then the completion)
    pos: torch.Tensor  # [R] position id of the last token
    cache: Any
    z: torch.Tensor  # [R, V] fp32 policy logits at the current state
    ref_cache: Any = None
    z_ref: torch.Tensor | None = None
    logp: torch.Tensor | None = None  # [R] fp64 sum_t log pi(a_t|s_t) (temperature 1)
    ref_logp: torch.Tensor | None = None  # [R] fp64 sum_t log pi_ref(a_t|s_t)
    last_q: torch.Tensor | None = None  # [R] fp64 Q(s_T, a_T) of the last action
    last_ref: torch.Tensor | None = None  # [R] fp64 log pi_ref(a_T|s_T) of the last action

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Finished:
    """A finished completion: ``tokens`` (EOS included if it ended so), its sums and last step."""

    owner: int
    slot: int
    tokens: list[int]
    logp: float
    ref_logp: float | None
    last_q: float
    last_ref: float | None
    truncated: bool
    score: float | None = None
    reward: float | None = None


class _Engine:
    """A policy (and, when needed, its reference) stepped together, one token per row per call."""

    def __init__(self, model, ref, *, tau: float, anchor: str, eos_ids: Sequence[int], pad_id: int,
                 max_new_tokens: int, compute: Compute):  # fmt: skip
        self.model, self.ref = model, ref
        self.tau, self.anchor = float(tau), anchor
        self.eos = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=torch.long)
        self.pad_id, self.max_new_tokens, self.compute = int(pad_id), int(max_new_tokens), compute
        try:
            self.device = next(model.parameters()).device
        except (StopIteration, AttributeError):
            self.device = torch.device("cpu")

    def _call(self, model, ids, mask, pos, cache, prefill: bool):
        kwargs = {"logits_to_keep": 1} if prefill and accepts_logits_to_keep(model) else {}
        out = model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=pos.to(self.device),
            cache=cache, use_cache=True, **kwargs,
        )  # fmt: skip
        tokens = int(mask[:, -ids.shape[1] :].sum())
        if model is self.model:
            self.compute.policy_forward_passes += 1
            self.compute.policy_forward_tokens += tokens
        else:
            self.compute.reference_forward_passes += 1
            self.compute.reference_forward_tokens += tokens
        z = out.logits[:, -1]
        return z.to(torch.promote_types(z.dtype, torch.float32)).cpu(), cache_of(out)

    def start(self, prompt_ids: Sequence[Sequence[int]], owners: Sequence[int]) -> _Rows:
        """One row per prompt at ``s_0``: the prompts run once through each model."""
        if any(len(p) == 0 for p in prompt_ids):
            raise SqlmError("every prompt must have at least one token")
        ids, mask = left_pad(prompt_ids, self.pad_id)
        pos = positions(mask)
        z, cache = self._call(self.model, ids, mask, pos, None, prefill=True)
        z_ref = ref_cache = None
        if self.ref is not None:
            z_ref, ref_cache = self._call(self.ref, ids, mask, pos, None, prefill=True)
            if z_ref.shape[1] != z.shape[1]:
                raise SqlmError(
                    f"the model and the reference have different vocabularies ({z.shape[1]} vs {z_ref.shape[1]} logits)"
                )
        n = len(prompt_ids)
        zeros = torch.zeros(n, dtype=torch.float64)
        return _Rows(
            owner=torch.as_tensor(list(owners), dtype=torch.long), slot=torch.zeros(n, dtype=torch.long), tokens=[[] for _ in range(n)], mask=mask,
            pos=pos[:, -1].clone(), cache=cache, z=z, ref_cache=ref_cache, z_ref=z_ref, logp=zeros,
            ref_logp=zeros.clone(), last_q=zeros.clone(), last_ref=zeros.clone(),
        )  # fmt: skip

    @staticmethod
    def _reorder(cache, idx: torch.Tensor):
        if cache is None:
            return None
        if not hasattr(cache, "reorder_cache"):
            raise SqlmError(f"the model's KV cache ({type(cache).__name__}) cannot be reordered for beams")
        cache.reorder_cache(idx)
        return cache

    def select(self, rows: _Rows, idx: torch.Tensor) -> _Rows:
        """The rows ``idx`` (repeats allowed), caches included."""
        idx = idx.long()
        if len(rows) == len(idx) and bool((idx == torch.arange(len(idx))).all()):
            return rows
        dev = idx.to(self.device)
        return _Rows(
            owner=rows.owner[idx], slot=rows.slot[idx], tokens=[list(rows.tokens[i]) for i in idx.tolist()], mask=rows.mask[idx],
            pos=rows.pos[idx], cache=self._reorder(rows.cache, dev), z=rows.z[idx],
            ref_cache=self._reorder(rows.ref_cache, dev), z_ref=None if rows.z_ref is None else rows.z_ref[idx],
            logp=rows.logp[idx], ref_logp=rows.ref_logp[idx], last_q=rows.last_q[idx], last_ref=rows.last_ref[idx],
        )  # fmt: skip

    def values(self, rows: _Rows) -> torch.Tensor:
        """``V(s)`` of each row's current state (fp64)."""
        lse = torch.logsumexp(rows.z.double(), dim=-1)
        if self.anchor == "reference" and rows.z_ref is not None:
            lse = lse - torch.logsumexp(rows.z_ref.double(), dim=-1)
        return self.tau * lse

    def advance(self, rows: _Rows, tok: torch.Tensor) -> tuple[_Rows, list[Finished]]:
        """Take action ``tok [R]`` in every row: update the sums, hand back the rows that ended (EOS or
        the length limit) and run the others one step (their next logits)."""
        tok = tok.long()
        z = rows.z.double()
        z_a = z.gather(1, tok[:, None]).squeeze(1)
        rows.logp = rows.logp + z_a - torch.logsumexp(z, dim=-1)
        if rows.z_ref is not None:
            zr = rows.z_ref.double()
            lse_ref = torch.logsumexp(zr, dim=-1)
            rows.last_ref = zr.gather(1, tok[:, None]).squeeze(1) - lse_ref
            rows.ref_logp = rows.ref_logp + rows.last_ref
            rows.last_q = self.tau * (z_a - lse_ref) if self.anchor == "reference" else self.tau * z_a
        else:
            rows.last_q = self.tau * z_a
        for t, row in zip(tok.tolist(), rows.tokens):
            row.append(t)
        self.compute.tokens_generated += len(tok)
        is_eos = torch.isin(tok, self.eos)
        full = torch.tensor([len(r) >= self.max_new_tokens for r in rows.tokens], dtype=torch.bool)
        ended = is_eos | full
        finished = [
            Finished(
                owner=int(rows.owner[i]),
                slot=int(rows.slot[i]),
                tokens=list(rows.tokens[i]),
                logp=float(rows.logp[i]),
                ref_logp=None if rows.z_ref is None else float(rows.ref_logp[i]),
                last_q=float(rows.last_q[i]),
                last_ref=None if rows.z_ref is None else float(rows.last_ref[i]),
                truncated=not bool(is_eos[i]),
            )  # fmt: skip
            for i in ended.nonzero().flatten().tolist()
        ]
        keep = (~ended).nonzero().flatten()
        if len(keep) == 0:
            return self.select(rows, keep), finished
        rows = self.select(rows, keep)
        tok = tok[keep]
        rows.mask = torch.cat([rows.mask, torch.ones(len(keep), 1, dtype=rows.mask.dtype)], dim=1)
        rows.pos = rows.pos + 1
        rows.z, rows.cache = self._call(self.model, tok[:, None], rows.mask, rows.pos[:, None], rows.cache, False)
        if self.ref is not None:
            rows.z_ref, rows.ref_cache = self._call(
                self.ref, tok[:, None], rows.mask, rows.pos[:, None], rows.ref_cache, False
            )
        return rows, finished


def _seed_of(seed: int, owner: int) -> int:
    return (int(seed) * 1_000_003 + int(owner) * 7_919 + 17) % (2**63 - 1)


class _Draws:
    """One generator per prompt instance; each call draws, per owner, one number per row in row order."""

    def __init__(self, seed: int):
        self.seed, self.gens = seed, {}

    def gen(self, owner: int) -> torch.Generator:
        if owner not in self.gens:
            self.gens[owner] = torch.Generator().manual_seed(_seed_of(self.seed, owner))
        return self.gens[owner]

    def uniform(self, owner: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(owner), dtype=torch.float64)
        owners, counts = torch.unique_consecutive(owner, return_counts=True)
        start = 0
        for o, c in zip(owners.tolist(), counts.tolist()):
            out[start : start + c] = torch.rand(c, generator=self.gen(o), dtype=torch.float64)
            start += c
        return out


def _choose(rows: _Rows, temperature: float, draws: _Draws) -> torch.Tensor:
    """One token per row: ``argmax z`` at temperature 0, else a draw from ``softmax(z / T)``
    (inverse CDF with the row's owner's generator: zero-probability tokens are never drawn)."""
    if temperature == 0:
        return rows.z.argmax(-1)
    probs = torch.softmax(rows.z.double() / temperature, dim=-1)
    cdf = probs.cumsum(-1)
    u = draws.uniform(rows.owner) * cdf[:, -1]
    return torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp(max=probs.shape[1] - 1)


# ----------------------------------------------------------------------------- strategies on one batch


def _sample_batch(engine: _Engine, prompt_ids, owners, n: int, temperature: float, draws: _Draws) -> list[list]:
    """``n`` completions per prompt: a list of :class:`Finished` per prompt, in draw order."""
    rows = engine.start(prompt_ids, owners)
    rows = engine.select(rows, torch.arange(len(prompt_ids)).repeat_interleave(n))
    rows.slot = torch.arange(n).repeat(len(prompt_ids))
    out: dict[int, list[Finished]] = {int(o): [] for o in owners}
    while len(rows):
        rows, fin = engine.advance(rows, _choose(rows, temperature, draws))
        for f in fin:
            out[f.owner].append(f)
    return [sorted(out[int(o)], key=lambda f: f.slot) for o in owners]


def _reward_estimate(engine: _Engine, f: Finished) -> float:
    """``R^(y) = Q(s_T, a_T) - tau log pi_ref(a_T|s_T)``: the last step's Bellman identity, ``V = 0`` after it."""
    return f.last_q - engine.tau * (f.last_ref or 0.0)


def _rank(scores: list[float], slots: list[int]) -> list[int]:
    """Indices by score, best first; ties by slot (earlier first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], slots[i]))


def _beam_batch(engine: _Engine, prompt_ids, owners, args: DecodingArguments, draws: _Draws, reward_fn) -> list:
    """:mod:`value_beam <sqlm.decoding>` on a batch of prompts: the best finished completion of each
    (a :class:`Finished` with its ``score``; ``reward`` is set on it too)."""
    width, k, temp, tau = args.num_beams, args.num_candidates, float(args.temperature), engine.tau
    rows = engine.start(prompt_ids, owners)
    if temp > 0 and width > 1:  # sampled candidates differ: start from num_beams copies of the prompt
        rows = engine.select(rows, torch.arange(len(prompt_ids)).repeat_interleave(width))
        rows.slot = torch.arange(width).repeat(len(prompt_ids))
    pools: dict[int, list[Finished]] = {int(o): [] for o in owners}

    def finished_scores(fin: list[Finished]) -> None:
        rewards = reward_fn(fin) if reward_fn is not None else [_reward_estimate(engine, f) for f in fin]
        for f, r in zip(fin, rewards):
            f.reward = float(r)
            if args.beam_score == "soft":
                f.score = tau * (f.ref_logp or 0.0) + f.reward
            elif args.beam_score == "value":
                f.score = f.reward
            else:
                f.score = tau * f.logp

    while len(rows):
        fin: list[Finished] = []
        if temp > 0:
            n = len(rows)
            rows = engine.select(rows, torch.arange(n).repeat_interleave(k))
            rows.slot = rows.slot * k + torch.arange(k).repeat(n)
            steps = args.chunk_length
        else:  # the k most likely next tokens of each beam (zero-probability ones dropped), then greedy
            vals, top = rows.z.topk(min(k, rows.z.shape[1]), dim=-1)
            r_idx, c_idx = torch.isfinite(vals).nonzero(as_tuple=True)
            slots = rows.slot[r_idx] * vals.shape[1] + c_idx
            rows = engine.select(rows, r_idx)
            rows.slot = slots
            rows, fin = engine.advance(rows, top[r_idx, c_idx])
            steps = args.chunk_length - 1
        for _ in range(steps):
            if not len(rows):
                break
            rows, more = engine.advance(rows, _choose(rows, temp, draws))
            fin += more
        finished_scores(fin)
        for f in fin:
            pool = pools[f.owner]
            if all(g.tokens != f.tokens for g in pool):
                pool.append(f)
            order = _rank([g.score for g in pool], [g.slot for g in pool])
            pools[f.owner] = [pool[i] for i in order[:width]]
        if not len(rows):
            break
        if args.beam_score == "soft":
            live = tau * rows.ref_logp + engine.values(rows)
        elif args.beam_score == "value":
            live = engine.values(rows)
        else:
            live = tau * rows.logp
        keep, ranks = [], []
        owners_now, counts = torch.unique_consecutive(rows.owner, return_counts=True)
        start = 0
        for c in counts.tolist():
            idx = list(range(start, start + c))
            order = _rank([float(live[i]) for i in idx], [int(rows.slot[i]) for i in idx])
            seen: set[tuple[int, ...]] = set()
            for j in order:
                key = tuple(rows.tokens[idx[j]])
                if key in seen:
                    continue
                seen.add(key)
                keep.append(idx[j])
                ranks.append(len(seen) - 1)
                if len(seen) == width:
                    break
            start += c
        rows = engine.select(rows, torch.tensor(keep, dtype=torch.long))
        rows.slot = torch.tensor(ranks, dtype=torch.long)
    return [max(pools[int(o)], key=lambda f: f.score) if pools[int(o)] else None for o in owners]


# ----------------------------------------------------------------------------- the public API


@dataclass
class DecodeResult:
    """``rows``: one dict per prompt and return index (JSONL-ready); ``compute``: what it cost."""

    rows: list[dict]
    compute: Compute
    settings: dict = field(default_factory=dict)

    def write_jsonl(self, path: str | os.PathLike) -> Path:
        """Write ``rows`` as JSON lines (parent folders created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        tmp.replace(path)
        return path


def _special_ids(tokenizer, model, eos_token_id, pad_token_id) -> tuple[list[int], int]:
    eos = eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        raise SqlmError("no EOS token: give eos_token_id or a tokenizer with an eos_token")
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = pad_token_id
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    return eos_ids, int(eos_ids[0] if pad is None else pad)


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


def prompt_token_ids(prompts: Sequence[Any], tokenizer) -> list[list[int]]:
    """Each prompt's token ids as ``sqlm train`` tokenises them (:func:`sqlm.data.tokenize_prompt`): a
    text as it is, a conversation (a list of ``{role, content}`` messages) through the tokenizer's chat
    template with the generation prompt."""
    from trl.data_utils import is_conversational

    from .data import tokenize_prompt

    out = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt}
        if is_conversational(row) and getattr(tokenizer, "chat_template", None) is None:
            raise SqlmError(f"prompt {i} is a conversation, but the model's tokenizer has no chat template")
        out.append(tokenize_prompt(row, tokenizer)["prompt_ids"])
    return out


def as_completion(prompt: Any, text: str | None) -> Any:
    """A completion as TRL's reward functions get it (and ``sqlm train`` gives it): after a
    conversational prompt, a list with one assistant message; else the text."""
    from trl.data_utils import is_conversational

    if text is not None and is_conversational({"prompt": prompt}):
        return [{"role": "assistant", "content": text}]
    return text


def _reward_fn(rewarder, tokenizer, pad: int, prompt_ids, prompts, compute: Compute, columns=None):
    """``list[Finished] -> list[float]``: the sum over tokens of ``rewarder``'s rewards of each completion
    (``columns``: the prompts' other columns, per prompt instance, passed on as ``sqlm train`` does)."""
    from .rewards.base import make_batch

    def fn(items: list[Finished]) -> list[float]:
        if not items:
            return []
        comps = [f.tokens for f in items]
        texts = [tokenizer.decode(c, skip_special_tokens=True) if tokenizer is not None else None for c in comps]
        batch = make_batch(
            [list(prompt_ids[f.owner]) for f in items], comps, pad,
            prompts=[prompts[f.owner] for f in items],
            completions=[as_completion(prompts[f.owner], t) for f, t in zip(items, texts)],
            columns={k: [v[f.owner] for f in items] for k, v in (columns or {}).items()},
        )  # fmt: skip
        compute.reward_calls += 1
        compute.reward_sequences += len(items)
        return rewarder(batch).sum(-1).tolist()

    return fn


def _row(f: Finished, tokenizer, eos_ids, tau: float) -> dict:
    n = len(f.tokens) - (1 if f.tokens and f.tokens[-1] in eos_ids else 0)
    return {
        "completion": tokenizer.decode(f.tokens, skip_special_tokens=True) if tokenizer is not None else None,
        "completion_ids": list(f.tokens),
        "logprob": f.logp,
        "ref_logprob": f.ref_logp,
        "implicit": None if f.ref_logp is None else tau * (f.logp - f.ref_logp),
        "length": n,
        "truncated": f.truncated,
    }


def _decode_batch(engine, batch_ids, owners, args, draws, reward_fn, tokenizer, eos_ids, keep_candidates) -> list:
    """The rows of one batch of prompt instances under ``args.strategy``."""
    tau, rows = engine.tau, []
    if args.strategy == "value_beam":
        for best in _beam_batch(engine, batch_ids, owners, args, draws, reward_fn):
            row = _row(best, tokenizer, eos_ids, tau)
            row.update(score=best.score, reward=best.reward, beam_score=args.beam_score)
            rows.append(row)
        return rows
    n = args.best_of if args.strategy == "best_of_n" else 1
    groups = _sample_batch(engine, batch_ids, owners, n, args.temperature, draws)
    if args.strategy == "sample":
        return [{**_row(c[0], tokenizer, eos_ids, tau), "score": c[0].logp} for c in groups]
    if args.scorer == "reward_model":  # one rewarder call for the whole batch
        flat = reward_fn([f for cands in groups for f in cands])
        all_scores = [flat[i * n : (i + 1) * n] for i in range(len(groups))]
    for i, (o, cands) in enumerate(zip(owners, groups)):
        if args.scorer == "implicit":
            scores = [tau * (f.logp - f.ref_logp) for f in cands]
        elif args.scorer == "likelihood":
            scores = [tau * f.logp for f in cands]
        elif args.scorer == "reward_model":
            scores = [float(x) for x in all_scores[i]]
        else:
            scores = torch.rand(len(cands), generator=draws.gen(o), dtype=torch.float64).tolist()
        best = _rank(scores, [f.slot for f in cands])[0]
        row = _row(cands[best], tokenizer, eos_ids, tau)
        row.update(score=scores[best], scorer=args.scorer, best_of=n, chosen=best, candidate_scores=scores)
        if keep_candidates:
            row["candidates"] = [{**_row(f, tokenizer, eos_ids, tau), "score": sc} for f, sc in zip(cands, scores)]
        rows.append(row)
    return rows


@torch.no_grad()
def decode(
    model,
    tokenizer,
    prompts: Sequence[Any] | None,
    args: DecodingArguments | None = None,
    *,
    ref_model=None,
    rewarder=None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    num_return_sequences: int = 1,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    keep_candidates: bool = False,
    progress: bool = False,
    columns: dict[str, Sequence[Any]] | None = None,
) -> DecodeResult:
    """Decode every prompt with ``args.strategy`` (see the module docstring).

    ``prompts`` are texts or conversations (lists of ``{role, content}`` messages), tokenised as
    ``sqlm train`` tokenises them (:func:`prompt_token_ids`), or None with ``prompt_ids``; ``rewarder``
    is a :class:`sqlm.rewards.TokenRewarder` or TRL-style function (default: ``args.reward_funcs``),
    which also gets ``columns`` (the prompts' other dataset columns, one value per prompt).
    ``batch_size`` prompts are decoded together, each with its samples or beams as rows of one batch.
    ``num_return_sequences`` independent results per prompt (each its own samples or beams).
    Returns one row per prompt and return index, in prompt order: the completion, its ``score``
    under the strategy, ``logprob = sum log pi(y_t|s_t)`` and, when the reference ran,
    ``ref_logprob`` and ``implicit = tau (logprob - ref_logprob)``. With ``keep_candidates`` a
    best-of-N row also lists every candidate with its score.
    """
    from .rewards.base import as_rewarder

    args = args if args is not None else DecodingArguments()
    for key, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                       ("num_return_sequences", num_return_sequences)):  # fmt: skip
        _at_least(key, value, 1)
    check_reference(args, ref_model)
    if rewarder is None and (args.needs_rewarder() or args.strategy == "value_beam"):
        rewarder = build_rewarder(args, tokenizer)
    if args.needs_rewarder() and rewarder is None:
        raise SqlmError("scorer 'reward_model' needs reward_funcs (a rewarder name or 'module:function')")
    if rewarder is not None and args.strategy != "sample":
        rewarder = as_rewarder(rewarder)
    if prompt_ids is None:
        if prompts is None or tokenizer is None:
            raise SqlmError("give prompts and a tokenizer, or prompt_ids")
        prompt_ids = prompt_token_ids(prompts, tokenizer)
    prompt_ids = [list(p) for p in prompt_ids]
    texts = list(prompts) if prompts is not None else [None] * len(prompt_ids)
    if not prompt_ids:
        raise SqlmError("no prompts to decode")
    eos_ids, pad = _special_ids(tokenizer, model, eos_token_id, pad_token_id)
    ref = ref_model if args.needs_reference() else None
    compute = Compute(prompts=len(prompt_ids) * num_return_sequences)
    draws = _Draws(seed)
    nrs = num_return_sequences
    inst_ids = [prompt_ids[i // nrs] for i in range(len(prompt_ids) * nrs)]
    inst_texts = [texts[i // nrs] for i in range(len(prompt_ids) * nrs)]
    inst_columns = {k: [v[i // nrs] for i in range(len(prompt_ids) * nrs)] for k, v in (columns or {}).items()}
    reward_fn = None
    if rewarder is not None and args.strategy != "sample":
        reward_fn = _reward_fn(rewarder, tokenizer, pad, inst_ids, inst_texts, compute, inst_columns)
    tau = float(args.tau)
    models = [m for m in (model, ref) if m is not None]
    states = [m.training for m in models]
    for m in models:
        m.eval()
    rows: list[dict] = []
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(inst_ids), desc=args.strategy, disable=not progress, leave=False, unit="prompt")
        for start in range(0, len(inst_ids), batch_size):
            owners = list(range(start, min(start + batch_size, len(inst_ids))))
            engine = _Engine(model, ref, tau=tau, anchor=args.value_anchor, eos_ids=eos_ids, pad_id=pad,
                             max_new_tokens=max_new_tokens, compute=compute)  # fmt: skip
            batch_ids = [inst_ids[o] for o in owners]
            rows += _decode_batch(
                engine, batch_ids, owners, args, draws, reward_fn, tokenizer, eos_ids, keep_candidates
            )
            bar.update(len(owners))
        bar.close()
    finally:
        for m, s in zip(models, states):
            m.train(s)
    for i, row in enumerate(rows):
        row.update(prompt=inst_texts[i], prompt_index=i // nrs, return_index=i % nrs, strategy=args.strategy)
    settings = {**asdict(args), "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed,
                "num_return_sequences": nrs, "label": args.label()}  # fmt: skip
    return DecodeResult(rows=rows, compute=compute, settings=settings)


def sample(model, tokenizer, prompts, *, temperature: float = 1.0, **kwargs) -> DecodeResult:
    """:func:`decode` with ``strategy='sample'``."""
    return decode(model, tokenizer, prompts, DecodingArguments(strategy="sample", temperature=temperature), **kwargs)


def best_of_n(model, tokenizer, prompts, *, n: int = 4, scorer: str = "implicit", tau: float = 1.0,
              temperature: float = 1.0, **kwargs) -> DecodeResult:  # fmt: skip
    """:func:`decode` with ``strategy='best_of_n'`` (``n`` is the key ``best_of``)."""
    args = DecodingArguments(strategy="best_of_n", best_of=n, scorer=scorer, tau=tau, temperature=temperature)
    return decode(model, tokenizer, prompts, args, **kwargs)


def value_beam(model, tokenizer, prompts, *, num_beams: int = 4, num_candidates: int = 2, chunk_length: int = 8,
               beam_score: str = "soft", tau: float = 1.0, temperature: float = 1.0,
               value_anchor: str = "reference", **kwargs) -> DecodeResult:  # fmt: skip
    """:func:`decode` with ``strategy='value_beam'``."""
    args = DecodingArguments(
        strategy="value_beam", num_beams=num_beams, num_candidates=num_candidates, chunk_length=chunk_length,
        beam_score=beam_score, tau=tau, temperature=temperature, value_anchor=value_anchor,
    )  # fmt: skip
    return decode(model, tokenizer, prompts, args, **kwargs)


@torch.no_grad()
def score_completions(
    model,
    ref_model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    tau: float,
    value_anchor: str = "reference",
    eos_token_id: int | Sequence[int],
    pad_token_id: int = 0,
    batch_size: int = 64,
) -> dict[str, list]:
    """Given completions, read step by step (KV cache, one step of logits at a time): per completion
    ``logprob = sum_t log pi``, ``ref_logprob``, ``implicit = tau (logprob - ref_logprob)`` and the
    model's estimate of the final reward ``reward = Q(s_T,a_T) - tau log pi_ref(a_T|s_T)``, and the
    critic along it, ``values = [V(s_0), ..., V(s_T)]`` (the state of each action taken). A
    completion ends at its first EOS (what follows is ignored) or its last token."""
    _choice("value_anchor", value_anchor, VALUE_ANCHORS)
    if len(prompt_ids) != len(completion_ids):
        raise SqlmError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if any(len(c) == 0 for c in completion_ids):
        raise SqlmError("every completion must have at least one token")
    eos_ids = [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]
    compute = Compute(prompts=len(prompt_ids))
    out: list[Finished | None] = [None] * len(prompt_ids)
    values: list[list[float]] = [[] for _ in prompt_ids]
    for start in range(0, len(prompt_ids), batch_size):
        owners = list(range(start, min(start + batch_size, len(prompt_ids))))
        longest = max(len(completion_ids[o]) for o in owners)
        engine = _Engine(model, ref_model, tau=tau, anchor=value_anchor, eos_ids=eos_ids, pad_id=pad_token_id,
                         max_new_tokens=longest, compute=compute)  # fmt: skip
        rows = engine.start([prompt_ids[o] for o in owners], owners)
        while len(rows):
            t = len(rows.tokens[0])
            more = torch.tensor([len(completion_ids[int(o)]) > t for o in rows.owner], dtype=torch.bool)
            for i in (~more).nonzero().flatten().tolist():  # ran out of tokens without an EOS
                out[int(rows.owner[i])] = Finished(
                    owner=int(rows.owner[i]), slot=0, tokens=list(rows.tokens[i]), logp=float(rows.logp[i]),
                    ref_logp=None if rows.z_ref is None else float(rows.ref_logp[i]), last_q=float(rows.last_q[i]),
                    last_ref=None if rows.z_ref is None else float(rows.last_ref[i]), truncated=True,
                )  # fmt: skip
            rows = engine.select(rows, more.nonzero().flatten())
            if not len(rows):
                break
            tok = torch.tensor([completion_ids[int(o)][t] for o in rows.owner], dtype=torch.long)
            for o, v in zip(rows.owner.tolist(), engine.values(rows).tolist()):
                values[o].append(v)
            rows, fin = engine.advance(rows, tok)
            for f in fin:
                out[f.owner] = f
    return {
        "logprob": [f.logp for f in out],
        "ref_logprob": [f.ref_logp for f in out],
        "implicit": [None if f.ref_logp is None else tau * (f.logp - f.ref_logp) for f in out],
        "reward": [f.last_q - tau * (f.last_ref or 0.0) for f in out],
        "length": [len(f.tokens) for f in out],
        "values": values,
    }
