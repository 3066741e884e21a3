"""What a training batch logs (the README's metrics table), and the log's averaging over processes.

:func:`batch_metrics` describes a batch's data (rewards, lengths), :func:`policy_metrics` the policy on
it (log-probs, implicit rewards, KL to the reference); both are pure functions of tensors.
:class:`StepMetrics` collects them per mode (train / eval) between two logs and averages every
process's values.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from .data import Trajectory


LOSS_STATS = ("consistency", "v_start", "entropy")
"""Statistics of the loss (``sqlm.losses``) that are logged under their own names."""


def _mean_std(values: list[float], prefix: str) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    out = {f"{prefix}mean" if prefix.endswith("/") else prefix: float(t.mean())}
    std_key = f"{prefix}std" if prefix.endswith("/") else f"{prefix}_std"
    out[std_key] = float(t.std()) if len(values) > 1 else float("nan")  # sample std, as TRL's nanstd
    return out


def batch_metrics(
    trajectories: list[Trajectory],
    rewards: list[torch.Tensor],
    per_source: dict[str, list[float]],
    lengths: torch.Tensor,
    eos_token_ids: list[int],
    online: bool,
) -> dict[str, float]:
    """What a batch logs about its data (the README's metrics table): the summed reward of every
    path (GRPO's ``reward`` / ``reward_std``), per reward function (``rewards/<name>/mean|std``),
    per kind of path (``task_reward/<chosen|rejected|online|replay>``) and the lengths of the trained
    completions (GRPO's ``completions/*``)."""
    totals = [float(r.sum()) for r in rewards]
    out = _mean_std(totals, "reward")
    for name, vals in per_source.items():
        if name == "data":  # rewards the dataset's own rows carry (replayed paths carry their old totals)
            vals = [v for t, v in zip(trajectories, vals) if t.source not in ("online", "replay")]
        if vals:
            out.update(_mean_std(vals, f"rewards/{name}/"))
    by_source: dict[str, list[float]] = {}
    for t, total in zip(trajectories, totals):
        by_source.setdefault(t.source, []).append(total)
    for k, v in by_source.items():
        out[f"task_reward/{k}"] = sum(v) / len(v)
    eos = set(eos_token_ids)
    clipped = [not any(tok in eos for tok in t.completion_ids) for t in trajectories]
    out["completions/mean_length"] = float(lengths.mean())
    out["completions/min_length"] = float(lengths.min())
    out["completions/max_length"] = float(lengths.max())
    out["completions/clipped_ratio"] = sum(clipped) / len(clipped)
    if online:
        out["completions/online_fraction"] = len(by_source.get("online", [])) / len(trajectories)
    return out


def kl_k3(log_pi: torch.Tensor, ref_log_pi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N]``: ``sum_t exp(r_t) - 1 - r_t`` with ``r_t = log pi_ref(a_t|s_t) - log pi(a_t|s_t)`` on the
    path ``mask`` (Schulman's k3, the per-token KL TRL's GRPO logs as ``kl``). Each term is >= 0, and on
    tokens drawn from pi its expectation is KL(pi || pi_ref) at that state, so on paths sampled from pi
    the sum estimates the sequence KL without bias and, unlike ``sum_t -r_t``, never goes negative."""
    r = (ref_log_pi.float() - log_pi.float()) * mask.float()  # 0 off the mask, where exp(0) - 1 - 0 = 0
    return (torch.expm1(r) - r).sum(-1)


def policy_metrics(
    log_pi: torch.Tensor,
    ref_log_pi: torch.Tensor | None,
    mask: torch.Tensor,
    tau: float,
    pair_index: torch.Tensor | None = None,
    on_policy: torch.Tensor | None = None,
) -> dict[str, float]:
    """What a batch logs about the policy (the README's metrics table), from ``log pi(a_t|s_t)`` and
    ``log pi_ref(a_t|s_t)`` ``[N, T]`` on the path ``mask``.

    With preference pairs (``pair_index`` ``[P, 2]``: rows of chosen and rejected), as TRL's DPO logs
    them with ``beta = tau``: ``logps/chosen|rejected`` (sum of log pi over the completion),
    ``rewards/chosen|rejected`` (the implicit reward ``tau * sum_t log pi/pi_ref``),
    ``rewards/margins`` (chosen minus rejected) and ``rewards/accuracies`` (share of pairs whose
    chosen implicit reward is higher). With a reference: ``log_ratio_ref``, the mean over paths of
    ``sum_t log pi/pi_ref`` (on offline paths this is no KL and may be negative), and on the paths
    sampled from pi itself (``on_policy`` ``[N]``) ``kl_ref``, the mean of :func:`kl_k3` (TRL GRPO's
    ``kl`` estimator, summed over each path): an unbiased estimate of the sequence KL(pi || pi_ref)
    that, unlike the mean log-ratio, is never negative."""
    m = mask.float()
    seq_logp = (log_pi.float() * m).sum(-1)
    out: dict[str, float] = {}
    if pair_index is not None and len(pair_index):
        c, r = pair_index[:, 0], pair_index[:, 1]
        out["logps/chosen"] = float(seq_logp[c].mean())
        out["logps/rejected"] = float(seq_logp[r].mean())
    if ref_log_pi is None:
        return out
    ratio = ((log_pi.float() - ref_log_pi.float()) * m).sum(-1)
    out["log_ratio_ref"] = float(ratio.mean())
    if on_policy is not None and bool(on_policy.any()):
        rows = on_policy.to(ratio.device)
        out["kl_ref"] = float(kl_k3(log_pi[rows], ref_log_pi[rows], m[rows]).mean())
    if pair_index is not None and len(pair_index):
        chosen, rejected = tau * ratio[c], tau * ratio[r]
        out["rewards/chosen"] = float(chosen.mean())
        out["rewards/rejected"] = float(rejected.mean())
        out["rewards/margins"] = float((chosen - rejected).mean())
        out["rewards/accuracies"] = float((chosen > rejected).float().mean())
    return out


class StepMetrics:
    """Values logged between two logs, per mode (``train`` / ``eval``): appended by each batch, averaged
    over every process's values at the log, then cleared."""

    def __init__(self):
        self._values: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def __getitem__(self, mode: str) -> dict[str, list[float]]:
        return self._values[mode]

    def add(self, mode: str, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._values[mode][k].append(float(v))

    def averaged(self, mode: str, world_size: int) -> dict[str, float]:
        """The mean of every key over this process's values and, with ``world_size > 1``, every other
        process's (NaNs left out); then the values are cleared."""
        local = {k: [v for v in vals if not math.isnan(v)] for k, vals in self._values[mode].items()}
        if world_size > 1:  # average over every process's values
            from accelerate.utils import gather_object

            merged: dict[str, list[float]] = defaultdict(list)
            for part in gather_object([local]):
                for k, vals in part.items():
                    merged[k].extend(vals)
            local = merged
        self._values[mode].clear()
        return {k: sum(v) / len(v) for k, v in local.items() if v}
