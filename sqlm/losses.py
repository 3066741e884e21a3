"""Path-consistency losses: pure functions of per-step tensors, each returning ``(loss, stats)``.

Notation (DESIGN.md section 1). A path is ``s_0, a_0, s_1, a_1, ...``; every tensor here is
``[B, T]`` with step ``t`` holding quantities of ``(s_t, a_t)``. ``mask[b, t] = 1`` on the steps of the
path (completion tokens up to and including EOS; 0 on prompt and padding, see
``sqlm.soft.path_mask``). The mask must be one contiguous run per row. The state after the last step
has value 0 (the path ended by EOS or at the length limit).

With a reference policy the reward is shaped, ``r~_t = r_t + tau * log pi_ref(a_t|s_t)``, so every
loss targets ``pi*(y|x) ~ pi_ref(y|x) exp(R(x, y) / tau)`` (the optimum DPO targets with beta=tau).

Reductions (they change the length bias; choose with ``reduction``):

* ``"token"`` (default): ``1/2 * C^2`` averaged over all path steps of the batch. Every step weighs
  the same, so longer paths weigh more in proportion to their length.
* ``"sequence"``: ``1/2 * sum_t C^2`` per path (the seed's ``L = sum 1/2 C^2``), averaged over paths
  (rows with no step do not count as paths).
  Long paths weigh more, and the loss scale grows with the length.
* ``"sequence_mean"``: the mean of ``1/2 * C^2`` within each path, averaged over paths: every path
  weighs the same whatever its length.
* ``"sum"``: the plain sum over all steps (for callers that normalise across micro-batches).
* ``"none"``: the masked ``1/2 * C^2`` per step, ``[B, T]``.

The means are ``reduced_sum(per_step, mask) / normaliser(mask)``; a caller that splits a
batch (gradient accumulation, several processes) divides each part's sum by the normalisers of all
parts added up.

``LOSS_SPECS`` registers every loss with what it reads (a target network, a value head, the rollout
length ``d``); calling an entry takes the same inputs for every loss,
``(soft, rewards, mask, *, value, target_v, target_log_pi, coefficient, d, tau, gamma, ref_log_pi,
reduction)``.

The d-step sums are O(T): a discounted reverse cumulative sum ``G_t = u_t + gamma * G_{t+1}`` then
``sum_{j<d} gamma^j u_{t+j} = G_t - gamma^d G_{t+d}``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .soft import SoftOutputs, check_tau, shaped_rewards


REDUCTIONS = ("token", "sequence", "sequence_mean", "sum", "none")


# ----------------------------------------------------------------------------- validation


def check_gamma(gamma: float) -> float:
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    return float(gamma)


def check_d(d: int | None) -> int | None:
    if d is None:
        return None
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
        raise ValueError(f"d (rollout length) must be an int >= 1 or None for the whole path, got {d!r}")
    return int(d)


def _check_shapes(ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    if ref.dim() != 2:
        raise ValueError(f"{ref_name} must be [B, T], got shape {tuple(ref.shape)}")
    for name, x in tensors.items():
        if x is not None and x.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


# ----------------------------------------------------------------------------- O(T) sums


def discounted_reverse_cumsum(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = sum_{k >= 0} gamma^k x_{t+k}`` along the last dimension, in O(T), differentiable.

    gamma = 1 is a reversed cumsum. For gamma < 1 the series is summed exactly in blocks short enough
    that ``gamma^-k`` stays below 1e6 (so the scaling trick keeps fp64 precision), and the blocks are
    chained by the recursion ``G_t = (block part) + gamma^(len) * G_(next block start)``.
    """
    gamma = check_gamma(gamma)
    if gamma == 1.0:
        return x.flip(-1).cumsum(-1).flip(-1)
    t = x.shape[-1]
    block = max(1, min(t, int(math.log(1e6) / -math.log(gamma))))
    xd = x.double()
    out = []
    carry = torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)
    for end in range(t, 0, -block):
        start = max(0, end - block)
        n = end - start
        k = torch.arange(n, dtype=torch.float64, device=x.device)
        up, down = gamma**k, gamma ** (-k)
        seg = xd[..., start:end] * up  # gamma^k x_{start+k}
        tail = seg.flip(-1).cumsum(-1).flip(-1)  # sum_{j >= k} gamma^j x_{start+j}
        g = tail * down + carry[..., None] * (gamma ** (n - k))
        out.append(g)
        carry = g[..., 0]
    return torch.cat(out[::-1], dim=-1).to(x.dtype)


def _shift_left(x: torch.Tensor, d: int) -> torch.Tensor:
    """``y_t = x_{t+d}``, zero past the end."""
    if d >= x.shape[-1]:
        return torch.zeros_like(x)
    return torch.cat([x[..., d:], torch.zeros_like(x[..., :d])], dim=-1)


def window_sums(x: torch.Tensor, gamma: float, d: int | None) -> torch.Tensor:
    """``S_t = sum_{j<d} gamma^j x_{t+j}`` (``x`` is 0 past the end; ``d=None``: to the end)."""
    g = discounted_reverse_cumsum(x, gamma)
    if d is None or d >= x.shape[-1]:
        return g
    return g - (gamma**d) * _shift_left(g, d)


# ----------------------------------------------------------------------------- consistency


def path_consistency(
    values: torch.Tensor,
    log_pi: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    gamma: float = 1.0,
    d: int | None = None,
    ref_log_pi: torch.Tensor | None = None,
) -> torch.Tensor:
    """``C(t, d) = -V(s_t) + gamma^d V(s_{t+d}) + sum_{j<d} gamma^j [r~_{t+j} - tau log pi(a_{t+j}|s_{t+j})]``

    (seed Theorem 1 for d=1, Corollary 2 for d>1). ``V`` past the end of the path is 0, and
    ``d=None`` (or d past the end) sums to the end of the path. Returns ``C`` ``[B, T]``, zero off
    the mask.
    """
    tau, gamma, d = check_tau(tau), check_gamma(gamma), check_d(d)
    _check_shapes("values", values, log_pi=log_pi, rewards=rewards, mask=mask, ref_log_pi=ref_log_pi)
    m = mask.float()
    r = shaped_rewards(rewards, tau, ref_log_pi)
    u = (r - tau * log_pi.float()) * m
    v = values.float() * m
    c = -v + window_sums(u, gamma, d)
    if d is not None and d < values.shape[-1]:
        c = c + (gamma**d) * _shift_left(v, d)
    return c * m


# ----------------------------------------------------------------------------- reduction and stats


def normaliser(mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """What the summed loss (:func:`reduced_sum`) of a batch is divided by: its path steps
    (``"token"``) or its paths (``"sequence"``, ``"sequence_mean"``; rows with no step do not count).
    Counts add up over micro-batches and processes, so dividing the sum of every part by the sum of
    their normalisers is the loss of the one big batch."""
    m = mask.float()
    if reduction == "token":
        return m.sum()
    if reduction in ("sequence", "sequence_mean"):
        return (m.sum(-1) > 0).sum().float()
    raise ValueError(f"the normaliser's reduction must be token, sequence or sequence_mean, got {reduction!r}")


def reduced_sum(per_step: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """The numerator of a reduction: the sum of a masked per-step loss ``[B, T]`` (for
    ``"sequence_mean"`` the sum of each path's mean)."""
    per_step = per_step * mask.float()
    if reduction == "sequence_mean":
        return (per_step.sum(-1) / mask.float().sum(-1).clamp(min=1.0)).sum()
    return per_step.sum()


def reduce_loss(per_step: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a masked per-step loss ``[B, T]`` (see the module docstring):
    ``reduced_sum / normaliser``, or the masked ``[B, T]`` itself for ``"none"``."""
    if reduction == "none":
        return per_step * mask.float()
    if reduction == "sum":
        return reduced_sum(per_step, mask, reduction)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduced_sum(per_step, mask, reduction) / normaliser(mask, reduction).clamp(min=1.0)


@torch.no_grad()
def _stats(
    residual: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor,
    log_pi: torch.Tensor | None,
    ref_log_pi: torch.Tensor | None,
    entropy: torch.Tensor | None,
    rewards: torch.Tensor,
) -> dict[str, float]:
    m = mask.float()
    n = m.sum().clamp(min=1.0)
    rows = m.sum(-1) > 0
    first = m.argmax(-1)  # first step of each path
    v0 = values.float().gather(1, first[:, None]).squeeze(1)[rows]
    stats = {
        "consistency": ((residual.abs() * m).sum() / n).item(),
        "v_start": v0.mean().item() if v0.numel() else 0.0,
        "reward": (rewards.float() * m).sum(-1)[rows].mean().item() if rows.any() else 0.0,
        "length": m.sum(-1)[rows].mean().item() if rows.any() else 0.0,
    }
    if entropy is not None:
        stats["entropy"] = ((entropy.float() * m).sum() / n).item()
    if ref_log_pi is not None and log_pi is not None:
        # sequence KL estimate on the sampled tokens: sum_t log pi/pi_ref, mean over paths
        kl = ((log_pi.float() - ref_log_pi.float()) * m).sum(-1)[rows]
        stats["kl_ref"] = kl.mean().item() if kl.numel() else 0.0
    return stats


# ----------------------------------------------------------------------------- losses


def pcl_loss(
    log_pi: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    gamma: float = 1.0,
    d: int | None = None,
    ref_log_pi: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    reduction: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PCL, seed Algorithm 1 (Nachum et al. 2017):

        C(s_{i:i+d}, theta, phi) = -V_phi(s_i) + gamma^d V_phi(s_{i+d})
                                   + sum_{j=0}^{d-1} gamma^j [r~(s_{i+j}, a_{i+j}) - tau log pi_theta(a_{i+j}|s_{i+j})]
        L(theta, phi) = sum_i 1/2 C(s_{i:i+d}, theta, phi)^2

    ``log_pi`` from the LM, ``values`` from a separate value head. ``d=None`` uses the whole
    remaining path.
    """
    c = path_consistency(values, log_pi, rewards, mask, tau=tau, gamma=gamma, d=d, ref_log_pi=ref_log_pi)
    loss = reduce_loss(0.5 * c.pow(2), mask, reduction)
    return loss, _stats(c, mask, values, log_pi, ref_log_pi, entropy, rewards)


def unified_pcl_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    gamma: float = 1.0,
    d: int | None = None,
    ref_log_pi: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    reduction: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Unified PCL, seed Algorithm 2: one model gives both

        V_rho(s) = tau log sum_a exp(Q_rho(s, a) / tau),   pi_rho(a|s) = exp((Q_rho(s, a) - V_rho(s)) / tau)

    and the loss is PCL's ``sum_i 1/2 C(s_{i:i+d})^2`` with ``tau log pi = Q - V`` and ``V = V_rho``.
    ``q``, ``v`` are ``SoftOutputs.q`` / ``.v`` of the logits (``Q = tau * z``).
    """
    tau = check_tau(tau)
    log_pi = (q - v) / tau
    c = path_consistency(v, log_pi, rewards, mask, tau=tau, gamma=gamma, d=d, ref_log_pi=ref_log_pi)
    loss = reduce_loss(0.5 * c.pow(2), mask, reduction)
    return loss, _stats(c, mask, v, log_pi, ref_log_pi, entropy, rewards)


def group_means(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``[B]``: the mean of ``x`` ``[B]`` over the rows of each row's group (``group`` ``[B]`` ids)."""
    ids, inverse = torch.unique(group, return_inverse=True)
    sums = torch.zeros(len(ids), dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    counts = torch.zeros(len(ids), dtype=x.dtype, device=x.device).index_add_(0, inverse, torch.ones_like(x))
    return (sums / counts)[inverse]


GROUP_SCALES = ("none", "group", "batch")


def path_rewards(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``[B]``: each path's discounted reward ``sum_t gamma^t r_t`` over its masked steps (``t`` counted from
    the path's first step)."""
    m = mask.float()
    t = (m.cumsum(-1) - 1).clamp(min=0)
    return (rewards * m * torch.pow(torch.as_tensor(gamma, dtype=m.dtype, device=m.device), t)).sum(-1)


@torch.no_grad()
def residual_scales(r: torch.Tensor, group: torch.Tensor, rows: torch.Tensor, scale: str, tau: float) -> torch.Tensor:
    """``[B]`` weights ``1 / (tau * s)`` of :func:`group_pcl_loss`'s ``scale`` from the path rewards ``r``
    ``[B]`` (rows with ``rows`` False and ids -1 excluded). ``s`` is the unbiased standard deviation of ``r``
    over the row's group ("group") or over the batch ("batch"). Where that is 0 (every reward the same: the
    residuals hold only the log-ratio differences) ``s`` falls back to the batch's deviation, and to 1 where
    the whole batch has one reward, so such paths keep their small residuals instead of having them blown up."""
    if scale not in GROUP_SCALES:
        raise ValueError(f"scale must be one of {GROUP_SCALES}, got {scale!r}")
    if scale == "none":
        return torch.ones_like(r)
    live = r[rows]
    batch = live.std() if live.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
    batch = torch.where(batch > 0, batch, torch.ones_like(batch))
    if scale == "batch":
        s = batch.expand_as(r)
    else:
        mean = group_means(r, group)
        sq = group_means((r - mean).pow(2), group)
        n = _group_sizes(group).to(r.dtype)
        s = (sq * n / (n - 1).clamp(min=1)).sqrt()
        s = torch.where(s > 0, s, batch)
    return 1.0 / (tau * s)


def _group_sizes(group: torch.Tensor) -> torch.Tensor:
    """``[B]``: the number of rows in each row's group."""
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    return counts[inverse]


def _whole_path_residuals(q, v, rewards, mask, tau, gamma, ref_log_pi):
    """``(log_pi, c0, m, rows, first)``: each path's whole-path residual ``C(s_0)`` ``[B]`` read at its first
    step (``first`` ``[B]``), with ``log pi = (Q - V) / tau``, the float mask ``m`` and ``rows`` (paths with a step)."""
    log_pi = (q - v) / tau
    c = path_consistency(v, log_pi, rewards, mask, tau=tau, gamma=gamma, d=None, ref_log_pi=ref_log_pi)
    m = mask.float()
    rows = m.sum(-1) > 0
    first = m.argmax(-1)
    return log_pi, c.gather(1, first[:, None]).squeeze(1), m, rows, first


def _on_first_steps(x: torch.Tensor, m: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: each path's value ``x`` ``[B]`` on its first step ``first``, zero elsewhere and off the mask."""
    return torch.zeros_like(m).scatter(1, first[:, None], x[:, None]) * m


def _path_stats(c, rows, m, first, mask, v, log_pi, ref_log_pi, entropy, rewards) -> dict[str, float]:
    """:func:`_stats` of one whole-path residual ``c`` ``[B]`` per path, ``consistency`` its mean ``|c|`` per path."""
    stats = _stats(_on_first_steps(c.detach(), m, first), mask, v, log_pi, ref_log_pi, entropy, rewards)
    stats["consistency"] = c.abs()[rows].mean().item() if rows.any() else 0.0
    return stats


def group_pcl_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    group: torch.Tensor,
    tau: float,
    gamma: float = 1.0,
    ref_log_pi: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    reduction: str = "token",
    scale: str = "none",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Group path consistency: the whole-path residual of each completion, measured against the other
    completions of the same prompt.

        C_i = -V(s_0) + sum_t gamma^t [r~_t - tau log pi(a_t|s_t)]     (seed Corollary 2, one segment: the whole path)
        G_i = C_i - mean_{j in group(i)} C_j
        L   = sum_i 1/2 G_i^2

    Paths of one group start in the same state ``s_0`` (the same prompt), so ``V(s_0)`` cancels from
    ``G`` exactly: ``G_i - G_j = (R_i - tau log pi/pi_ref(y_i)) - (R_j - tau log pi/pi_ref(y_j))``. All
    ``G`` are 0 iff ``R(y) - tau log pi(y)/pi_ref(y)`` is the same for every path of the prompt, i.e.
    ``pi(y|x) = pi_ref(y|x) exp((R(x, y) - c(x)) / tau)``, which normalisation makes ``pi*`` with
    ``c(x) = V*(x)``: the fixed point of every other loss here, whatever policy drew the paths. The
    gradient is ``-tau * G_i * grad log pi(y_i)``: REINFORCE on ``R - tau log pi/pi_ref`` with the group
    mean as baseline (RLOO-like, without its ``n/(n-1)``), so failures are pushed down from the first
    step, while the residual of a lone path from ``V(s_0) = V_ref(s_0)`` gives a failure no signal until
    the value has risen. A path alone in its group gives ``G = 0`` (no signal).

    ``G_i / 2`` squared sits on each path's first step, so ``reduction`` "token" divides the batch's sum
    by its path steps (TRL GRPO's ``dapo`` normalisation), "sequence" by its paths. ``v`` is only read
    to form ``log pi``; ``d`` does not apply.

    ``scale`` weighs each path's ``G_i^2 / 2`` by ``w = 1 / (tau * s)``, ``s`` a reward scale computed without
    gradient (:func:`residual_scales`): "group" the standard deviation of the path rewards in the path's
    group (TRL GRPO's ``scale_rewards: group``), "batch" over the batch, "none" ``w = 1``. The gradient is
    then ``-(G_i / s) grad log pi(y_i)``: GRPO's advantage with ``R - tau log pi/pi_ref`` in place of ``R``,
    free of tau and of the reward's units. A positive weight held constant in the gradient leaves the zero
    set of every ``G`` and so the fixed point ``pi*`` unchanged.
    """
    tau = check_tau(tau)
    log_pi, c0, m, rows, first = _whole_path_residuals(q, v, rewards, mask, tau, gamma, ref_log_pi)
    if group.shape != c0.shape:
        raise ValueError(f"group must be [B] = {tuple(c0.shape)}, got {tuple(group.shape)}")
    # rows with no step neither count in their group's mean nor get a loss
    ids = torch.where(rows, group.to(c0.device), torch.full_like(group, -1).to(c0.device))
    g = torch.where(rows, c0 - group_means(c0, ids), torch.zeros_like(c0))
    w = residual_scales(path_rewards(rewards, mask, gamma), ids, rows, scale, tau).to(g.dtype)  # float64 rewards too
    loss = reduce_loss(_on_first_steps(0.5 * w * g.pow(2), m, first), mask, reduction)
    return loss, _path_stats(g, rows, m, first, mask, v, log_pi, ref_log_pi, entropy, rewards)


def tbrm_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    gamma: float = 1.0,
    ref_log_pi: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    reduction: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Trajectory Bellman residual minimisation (TBRM, Yuan et al. 2025, arXiv 2505.15311): one squared
    residual per path, the whole path's consistency from its first state, with ``V(s_0)`` read from the
    logits like every ``Q`` and ``V`` of the path:

        C_i = -V(s_0) + sum_t gamma^t [r~_t - tau log pi(a_t|s_t)]     (seed Corollary 2, one segment)
        L   = sum_i 1/2 C_i^2

    TBRM's ``sum_h [Q(s_h, a_h) - V(s_{h+1})] - r`` telescopes to ``-C_i`` with ``Q - V = tau log pi`` and
    ``r~ = r + tau log pi_ref``. ``C_i = 0`` on every path of every prompt iff ``pi`` is ``pi*`` and
    ``V(s_0) = V*(s_0)``, whatever policy drew the paths: the fixed point of the other losses. Unlike
    :func:`group_pcl_loss` no group mean removes ``V(s_0)``: the logits must also learn the soft value of the
    prompt, and with the value anchored at the reference a failed path (``R = 0``) of the untrained
    policy has ``C = 0`` and no gradient until ``V(s_0)`` rises. ``C_i / 2`` squared sits on each path's
    first step, so ``reduction`` "token" divides the batch's sum by its path steps, "sequence" by its paths.
    ``d`` does not apply."""
    tau = check_tau(tau)
    log_pi, c0, m, rows, first = _whole_path_residuals(q, v, rewards, mask, tau, gamma, ref_log_pi)
    c0 = torch.where(rows, c0, torch.zeros_like(c0))
    loss = reduce_loss(_on_first_steps(0.5 * c0.pow(2), m, first), mask, reduction)
    return loss, _path_stats(c0, rows, m, first, mask, v, log_pi, ref_log_pi, entropy, rewards)


def multistep_soft_q_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    gamma: float = 1.0,
    d: int | None = None,
    ref_log_pi: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    reduction: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft Q-learning with d-step returns as targets (d=None: Monte-Carlo, to the end of the path):

        L = 1/2 (Q_theta(s_t, a_t) - sg[ r~_t + sum_{j=1}^{d-1} gamma^j (r~_{t+j} - tau log pi(a_{t+j}|s_{t+j}))
                                          + gamma^d V(s_{t+d}) ])^2

    with the target detached (sg). Its residual is minus unified PCL's ``C(t, d)``, but the gradient
    reaches only ``Q_theta(s_t, a_t)``: every step is regressed on its own soft return, rather than
    every step's log-probability being moved by the residuals of all the segments that contain it
    (the whole-path PCL gradient of the step ``k`` weighs ``sum_{t<=k} C(t)``, which grows along the
    path). Its fixed point is ``pi*`` on any paths, as PCL's: at the optimum every action's soft return
    ``Q*(s,a) - tau log pi*(a|s)`` is ``V*(s)``, so the targets need no importance weights; only the
    dynamics differ. ``d = 1`` is soft_q with the online ``V``, detached, instead of a target network.
    """
    tau = check_tau(tau)
    _check_shapes("q", q, v=v, rewards=rewards, mask=mask, ref_log_pi=ref_log_pi)
    log_pi = ((q - v) / tau).detach()
    c = path_consistency(v.detach(), log_pi, rewards, mask, tau=tau, gamma=gamma, d=d, ref_log_pi=ref_log_pi)
    m = mask.float()
    residual = (q.float() - (q.detach().float() + c)) * m  # the value -C(t, d); the gradient through Q only
    loss = reduce_loss(0.5 * residual.pow(2), mask, reduction)
    return loss, _stats(residual, mask, v, log_pi, ref_log_pi, entropy, rewards)


def _target_inputs(q, v, target_v, rewards, mask, tau, gamma, ref_log_pi):
    """Checked ``(tau, gamma, mask, V_bar, r~)`` of the target-network losses; ``V_bar`` is the
    target's value, detached and masked (``None``: the online ``v``, detached)."""
    tau, gamma = check_tau(tau), check_gamma(gamma)
    _check_shapes("q", q, v=v, target_v=target_v, rewards=rewards, mask=mask, ref_log_pi=ref_log_pi)
    m = mask.float()
    vbar = (v if target_v is None else target_v).detach().float() * m
    return tau, gamma, m, vbar, shaped_rewards(rewards, tau, ref_log_pi)


def soft_q_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    target_v: torch.Tensor | None,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    gamma: float = 1.0,
    ref_log_pi: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    reduction: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft Q-learning (Haarnoja et al. 2017; Guo et al. 2021 eq. 4), one-step Bellman residual:

        L = 1/2 (Q_theta(s_i, a_i) - r~_i - gamma V_bar(s_{i+1}))^2

    ``V_bar`` is the target network's value (``target_v``, detached; ``None`` uses the online
    ``v`` detached). ``V_bar`` past the end of the path is 0.
    """
    tau, gamma, m, vbar, r = _target_inputs(q, v, target_v, rewards, mask, tau, gamma, ref_log_pi)
    residual = (q.float() - r - gamma * _shift_left(vbar, 1)) * m
    loss = reduce_loss(0.5 * residual.pow(2), mask, reduction)
    log_pi = (q - v).detach() / tau
    return loss, _stats(residual, mask, v, log_pi, ref_log_pi, entropy, rewards)


def check_coefficient(coefficient: float) -> float:
    if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)) or not 0 <= coefficient <= 1:
        raise ValueError(f"coefficient must be in [0, 1], got {coefficient!r}")
    return float(coefficient)


def guo_residuals(
    q: torch.Tensor,
    v: torch.Tensor,
    target_v: torch.Tensor | None,
    target_log_pi: torch.Tensor | None,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    gamma: float = 1.0,
    ref_log_pi: torch.Tensor | None = None,
    multistep: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(forward, reversed)`` residuals of Guo et al. 2021's one-step (eq. 9, their code's ``v2``) or
    multi-step (eq. 10, ``v3``) advantage forms, ``[B, T]``, zero off the mask.

    With ``A_theta = Q_theta - V_theta = tau log pi_theta`` (online, with gradient) and the target
    network's ``V_bar`` and ``A_bar = tau log pi_bar`` (detached):

        one-step   forward   -V_bar(s_t) + gamma V_bar(s_{t+1}) + r~_t - A_theta(s_t, a_t)
                   reversed  -V_theta(s_t) + gamma V_theta(s_{t+1}) + r~_t - A_bar(s_t, a_t)
        multi-step forward   -V_bar(s_t) + sum_{l>=t} gamma^{l-t} (r~_l - A_theta(s_l, a_l))
                   reversed  -V_theta(s_t) + sum_{l>=t} gamma^{l-t} (r~_l - A_bar(s_l, a_l))

    The forward forms move only ``A_theta`` (their logit gradient sums to zero at every state); the
    reversed forms (the original code calls the loss with the online and target logits swapped) regress
    the online values on the target's advantages, with no detach, and so are the only terms that train
    the level of ``V_theta``. ``target_log_pi`` None uses the online ``log pi``, detached.
    """
    tau, gamma, m, vbar, r = _target_inputs(q, v, target_v, rewards, mask, tau, gamma, ref_log_pi)
    _check_shapes("q", q, target_log_pi=target_log_pi)
    r = r * m
    adv = (q.float() - v.float()) * m
    abar = (adv if target_log_pi is None else tau * target_log_pi.float()).detach() * m
    vt = v.float() * m
    if multistep:
        forward = -vbar + discounted_reverse_cumsum(r - adv, gamma)
        backward = -vt + discounted_reverse_cumsum(r - abar, gamma)
    else:
        forward = -vbar + gamma * _shift_left(vbar, 1) + r - adv
        backward = -vt + gamma * _shift_left(vt, 1) + r - abar
    return forward * m, backward * m


def advantage_pcl_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    target_v: torch.Tensor | None,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    gamma: float = 1.0,
    ref_log_pi: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    reduction: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Single-step PCL on the advantage only (Guo et al. 2021, eq. 9; their code's ``v2``):

        L = 1/2 (-V_bar(s_t) + gamma V_bar(s_{t+1}) + r~_t - A_theta(s_t, a_t))^2,
        A_theta(s, a) = Q_theta(s, a) - V_theta(s) = tau log pi_theta(a|s)

    The gradient flows through ``A_theta`` only; both values come from the target network.
    """
    residual, _ = guo_residuals(q, v, target_v, None, rewards, mask, tau=tau, gamma=gamma, ref_log_pi=ref_log_pi)
    loss = reduce_loss(0.5 * residual.pow(2), mask, reduction)
    return loss, _stats(residual, mask, v, (q - v).detach() / tau, ref_log_pi, entropy, rewards)


def multistep_pcl_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    target_v: torch.Tensor | None,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    gamma: float = 1.0,
    ref_log_pi: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    reduction: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Multi-step PCL to the end of the path (Guo et al. 2021, eq. 10; their code's ``v3``):

        L = 1/2 (-V_bar(s_t) + sum_{l>=t} gamma^{l-t} r~_l - sum_{l>=t} gamma^{l-t} A_theta(s_l, a_l))^2

    with ``A_theta = Q_theta - V_theta = tau log pi_theta`` and ``V_bar`` from the target network.
    """
    residual, _ = guo_residuals(
        q, v, target_v, None, rewards, mask, tau=tau, gamma=gamma, ref_log_pi=ref_log_pi, multistep=True
    )
    loss = reduce_loss(0.5 * residual.pow(2), mask, reduction)
    return loss, _stats(residual, mask, v, (q - v).detach() / tau, ref_log_pi, entropy, rewards)


def _guo_mix(
    forms, q, v, target_v, rewards, mask, target_log_pi, coefficient, tau, gamma, ref_log_pi, entropy, reduction
):
    """``mean over forms of 1/2 [c * forward^2 + (1 - c) * reversed^2]`` (see :func:`guo_residuals`)."""
    c = check_coefficient(coefficient)
    per_step, shown = 0.0, None
    for multistep in forms:
        fwd, rev = guo_residuals(
            q, v, target_v, target_log_pi, rewards, mask, tau=tau, gamma=gamma, ref_log_pi=ref_log_pi,
            multistep=multistep,
        )  # fmt: skip
        per_step = per_step + 0.5 * (c * fwd.pow(2) + (1.0 - c) * rev.pow(2)) / len(forms)
        shown = rev if shown is None and c == 0 else fwd if shown is None else shown
    loss = reduce_loss(per_step, mask, reduction)
    return loss, _stats(shown, mask, v, (q - v).detach() / tau, ref_log_pi, entropy, rewards)


def advantage_pcl_mix_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    target_v: torch.Tensor | None,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    gamma: float = 1.0,
    target_log_pi: torch.Tensor | None = None,
    coefficient: float = 0.5,
    ref_log_pi: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    reduction: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Guo et al.'s one-step form with its reversed term (their code's ``v2_v2r``):

        L = 1/2 [c (-V_bar(s_t) + gamma V_bar(s_{t+1}) + r~_t - A_theta)^2
                 + (1 - c) (-V_theta(s_t) + gamma V_theta(s_{t+1}) + r~_t - A_bar)^2]

    ``c = coefficient`` (their ``sql_loss_coefficients``); ``c = 1`` is ``advantage_pcl``, ``c = 0``
    the reversed form alone. ``A_bar = tau log pi_bar(a_t|s_t)`` of the target network
    (``target_log_pi``). The fixed point of both terms together is the soft Bellman equation
    ``Q_theta(s_t, a_t) = r~_t + gamma V_theta(s_{t+1})`` on the sampled steps, as soft_q's.
    """
    return _guo_mix(
        (False,), q, v, target_v, rewards, mask, target_log_pi, coefficient, tau, gamma, ref_log_pi, entropy, reduction
    )


def multistep_pcl_mix_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    target_v: torch.Tensor | None,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    gamma: float = 1.0,
    target_log_pi: torch.Tensor | None = None,
    coefficient: float = 0.5,
    ref_log_pi: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    reduction: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Guo et al.'s multi-step form with its reversed term (their code's ``v3_v3r``):

        L = 1/2 [c (-V_bar(s_t) + sum_{l>=t} gamma^{l-t} (r~_l - A_theta(s_l, a_l)))^2
                 + (1 - c) (-V_theta(s_t) + sum_{l>=t} gamma^{l-t} (r~_l - A_bar(s_l, a_l)))^2]

    ``c = 1`` is ``multistep_pcl``, ``c = 0`` the reversed form alone, which regresses ``V_theta`` on
    the Monte-Carlo soft return of the target's log-probabilities (no importance weights: off-policy its
    fixed point is the behaviour policy's soft value, not ``V*``).
    """
    return _guo_mix(
        (True,), q, v, target_v, rewards, mask, target_log_pi, coefficient, tau, gamma, ref_log_pi, entropy, reduction
    )


def guo_pcl_mix_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    target_v: torch.Tensor | None,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    gamma: float = 1.0,
    target_log_pi: torch.Tensor | None = None,
    coefficient: float = 0.5,
    ref_log_pi: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    reduction: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean of :func:`advantage_pcl_mix_loss` and :func:`multistep_pcl_mix_loss` (Guo et al.'s
    default loss, their code's ``v2_v2r_v3_v3r``)."""
    return _guo_mix(
        (False, True), q, v, target_v, rewards, mask, target_log_pi, coefficient, tau, gamma, ref_log_pi, entropy,
        reduction,
    )  # fmt: skip


@dataclass(frozen=True)
class LossSpec:
    """A loss of :data:`LOSS_SPECS` and what it reads; calling it gives every loss one signature.

    ``needs_target``: ``V_bar`` from a target network (``target_v``; without one the online ``V``,
    detached). ``needs_target_log_pi``: also the target's ``log pi_bar(a_t|s_t)`` (``target_log_pi``)
    and the mixing ``coefficient`` of Guo et al.'s forward and reversed terms. ``needs_value_head``:
    ``V`` from a separate value head (``value``) rather than the logits, with ``log pi`` from the
    logits. ``uses_d``: takes the rollout length ``d``.
    """

    fn: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    needs_target: bool = False
    needs_target_log_pi: bool = False
    needs_value_head: bool = False
    uses_d: bool = False
    needs_groups: bool = False

    def __call__(
        self,
        soft: SoftOutputs,
        rewards: torch.Tensor,
        mask: torch.Tensor,
        *,
        value: torch.Tensor | None = None,
        target_v: torch.Tensor | None = None,
        target_log_pi: torch.Tensor | None = None,
        coefficient: float = 0.5,
        d: int | None = None,
        tau: float,
        gamma: float = 1.0,
        ref_log_pi: torch.Tensor | None = None,
        reduction: str = "token",
        group: torch.Tensor | None = None,
        group_scale: str = "none",
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``(loss, stats)`` from the policy's soft outputs (``q``, ``v``, ``log_pi``, ``entropy``),
        the per-step rewards and path mask, and what the loss reads besides."""
        kw = dict(tau=tau, gamma=gamma, ref_log_pi=ref_log_pi, entropy=soft.entropy, reduction=reduction)
        if self.uses_d:
            kw["d"] = d
        if self.needs_groups:
            if group is None:
                raise ValueError(f"{self.fn.__name__} needs group, the prompt group id of each row [B]")
            kw.update(group=group, scale=group_scale)
        if self.needs_target_log_pi:
            kw.update(target_log_pi=target_log_pi, coefficient=coefficient)
        if self.needs_value_head:
            if value is None:
                raise ValueError(f"{self.fn.__name__} needs value, the value head's V_phi(s_t)")
            return self.fn(soft.log_pi, value, rewards, mask, **kw)
        if self.needs_target:
            return self.fn(soft.q, soft.v, target_v, rewards, mask, **kw)
        return self.fn(soft.q, soft.v, rewards, mask, **kw)


LOSS_SPECS: dict[str, LossSpec] = {
    "pcl": LossSpec(pcl_loss, needs_value_head=True, uses_d=True),
    "unified_pcl": LossSpec(unified_pcl_loss, uses_d=True),
    "group_pcl": LossSpec(group_pcl_loss, needs_groups=True),
    "tbrm": LossSpec(tbrm_loss),
    "soft_q": LossSpec(soft_q_loss, needs_target=True),
    "multistep_soft_q": LossSpec(multistep_soft_q_loss, uses_d=True),
    "advantage_pcl": LossSpec(advantage_pcl_loss, needs_target=True),
    "multistep_pcl": LossSpec(multistep_pcl_loss, needs_target=True),
    "advantage_pcl_mix": LossSpec(advantage_pcl_mix_loss, needs_target=True, needs_target_log_pi=True),
    "multistep_pcl_mix": LossSpec(multistep_pcl_mix_loss, needs_target=True, needs_target_log_pi=True),
    "guo_pcl_mix": LossSpec(guo_pcl_mix_loss, needs_target=True, needs_target_log_pi=True),
}
LOSSES = {name: spec.fn for name, spec in LOSS_SPECS.items()}  # the loss functions by name


def loss_spec(loss_type: str) -> LossSpec:
    """The registry entry of ``loss_type``; ``ValueError`` naming the known losses otherwise."""
    if loss_type not in LOSS_SPECS:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_SPECS)}, got {loss_type!r}")
    return LOSS_SPECS[loss_type]
