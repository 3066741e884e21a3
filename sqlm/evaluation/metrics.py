"""Evaluation metrics as small pure functions.

* :func:`stepwise_kl` / :func:`sequence_kl` — the exact per-token KL ``KL(pi(.|s_t) || pi_ref(.|s_t))``
  (a full-vocabulary sum at every step) and its sum along a sampled completion. For paths ``y ~ pi``

      KL(pi || pi_ref) over sequences = E_{y ~ pi} sum_t KL(pi(.|s_t) || pi_ref(.|s_t))

  (the chain rule of KL), so the mean of :func:`sequence_kl` over samples is an unbiased estimate of
  the sequence KL, with a much smaller variance than the sampled ``sum_t log pi/pi_ref``.
* :func:`mean_se` — mean and standard error ``s / sqrt(n)``.
* :func:`win_rate` — ``P(a > b) + 1/2 P(a = b)`` over paired scores.
* :func:`distinct_n` — distinct n-grams over all n-grams of a set of texts (Li et al. 2016).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def stepwise_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(z) || softmax(z_ref))`` per position, in fp32: ``sum_a p(a) (log p(a) - log p_ref(a))``.

    ``logits`` and ``ref_logits`` are ``[..., V]``; returns ``[...]``.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must have the same shape"
        )
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)


def sequence_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_t mask_t * KL(pi(.|s_t) || pi_ref(.|s_t))`` per path: ``[B, T, V]`` logits, ``[B, T]`` mask -> ``[B]``.

    ``logits[:, t]`` are the logits of the state where completion token ``t`` was chosen (the usual
    causal-LM shift is the caller's job), and ``mask`` is 1 on completion tokens up to and including
    EOS.
    """
    if mask.shape != logits.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {tuple(logits.shape[:2])}, got {tuple(mask.shape)}")
    return (stepwise_kl(logits, ref_logits) * mask.float()).sum(-1)


def mean_se(values: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for n < 2)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = x.numel()
    if n == 0:
        return float("nan"), float("nan")
    mean = x.mean().item()
    se = x.std(unbiased=True).item() / math.sqrt(n) if n > 1 else 0.0
    return mean, se


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """Paired win rate ``mean(1[a > b] + 1/2 1[a = b])`` and its standard error."""
    if len(scores) != len(baseline):
        raise ValueError(f"win_rate needs paired scores, got {len(scores)} and {len(baseline)}")
    a = torch.as_tensor(scores, dtype=torch.float64)
    b = torch.as_tensor(baseline, dtype=torch.float64)
    wins = (a > b).double() + 0.5 * (a == b).double()
    return mean_se(wins)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams over whitespace-split ``texts`` (0 when there are none)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total, seen = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0
