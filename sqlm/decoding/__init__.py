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

# The modules: arguments (the keys and their checks), engine (the lockstep engine, its rows, draws and
# compute counts), strategies (sampling, the best-of-N scorers, beam search and its one score formula),
# inputs (prompts, special ids, the rewarder on completions), api (decode, score_completions).

from .api import DecodeResult, best_of_n, decode, sample, score_completions, value_beam
from .arguments import (
    BEAM_SCORES,
    SCORERS,
    STRATEGIES,
    VALUE_ANCHORS,
    DecodingArguments,
    check_reference,
    rewarder_for,
)
from .engine import Compute, Finished, cache_of, left_pad, positions
from .inputs import as_completion, prompt_token_ids


__all__ = [
    "BEAM_SCORES",
    "SCORERS",
    "STRATEGIES",
    "VALUE_ANCHORS",
    "Compute",
    "DecodeResult",
    "DecodingArguments",
    "Finished",
    "as_completion",
    "best_of_n",
    "cache_of",
    "check_reference",
    "decode",
    "left_pad",
    "positions",
    "prompt_token_ids",
    "rewarder_for",
    "sample",
    "score_completions",
    "value_beam",
]
