"""Train a tiny causal LM towards the exact soft-optimal policy of a :class:`sqlm.oracle.TokenMDP`.

The harness behind the exact-oracle tests (``tests/test_convergence.py``), ``sqlm oracle`` and the
oracle section of the report: every loss of ``sqlm.losses.LOSS_SPECS`` is driven on paths of the MDP
and its exact ``KL(pi_theta || pi*)`` is measured along the way. The MDP math lives in ``sqlm.oracle``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..forward import polyak_update
from ..losses import loss_spec
from ..oracle import (
    OracleSolution,
    _model_device,
    policy_log_probs,
    restricted_logits,
    sample_paths,
    sequence_kl,
)
from ..soft import soft_outputs


@dataclass
class TrainResult:
    """KL curve ``[(step, KL(pi_theta || pi*)), ...]`` and the auxiliary modules that were trained."""

    curve: list[tuple[int, float]]
    value_head: torch.nn.Module | None = None
    target: torch.nn.Module | None = None
    losses: list[float] = field(default_factory=list)


def _hidden_size(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)


def _trainables(model, spec, value_head, device):
    """The parameters to optimise, the value head (zero-initialised when needed and not given) and the target copy."""
    params = list(model.parameters())
    if spec.needs_value_head:
        if value_head is None:
            value_head = torch.nn.Linear(_hidden_size(model), 1).to(device)
            torch.nn.init.zeros_(value_head.weight)
            torch.nn.init.zeros_(value_head.bias)
        params += list(value_head.parameters())
    target = None
    if spec.needs_target:
        target = copy.deepcopy(model)
        target.requires_grad_(False)
    return params, value_head, target


def _optimizer(params, lr: float, final_lr: float | None, steps: int):
    """Adam with a learning rate decaying linearly from ``lr`` to ``final_lr`` (default ``lr / 10``)."""
    opt = torch.optim.Adam(params, lr=lr)
    final_lr = lr / 10 if final_lr is None else final_lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 1.0 + (final_lr / lr - 1.0) * min(i / max(steps - 1, 1), 1.0)
    )
    return opt, sched


def _progress_bar(progress: bool, steps: int, loss_type: str, on_policy: bool):
    """A tqdm bar over the steps, or None without ``progress``."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=steps, desc=f"{loss_type} ({'on' if on_policy else 'off'}-policy)", leave=False, mininterval=0.5
        )
    return bar


def _paths_loss(
    model, mdp, spec, tokens, device, value_head, target, *, coefficient, d, reduction, group_scale
) -> torch.Tensor:
    """The loss ``spec`` on the sampled paths ``tokens``, with its value head and target network as it needs."""
    tau, gamma = mdp.tau, mdp.gamma
    rewards, ref, mask = mdp.step_rewards(tokens)
    rewards, mask = rewards.to(device), mask.to(device)
    ref = None if ref is None else ref.to(device)
    _, cols, _ = mdp.path_indices(tokens)
    cols = cols.to(device)
    value = target_v = target_log_pi = None
    if spec.needs_value_head:
        logits, hidden = restricted_logits(model, mdp, tokens, output_hidden_states=True)
        value = value_head(hidden.float()).squeeze(-1)
    else:
        logits = restricted_logits(model, mdp, tokens)
    so = soft_outputs(logits, cols, tau)
    if target is not None:
        with torch.no_grad():
            target_so = soft_outputs(restricted_logits(target, mdp, tokens), cols, tau)
        target_v, target_log_pi = target_so.v, target_so.log_pi
    loss, _ = spec(
        so,
        rewards,
        mask,
        value=value,
        target_v=target_v,
        target_log_pi=target_log_pi,
        coefficient=coefficient,
        d=d,
        tau=tau,
        gamma=gamma,
        ref_log_pi=ref,
        reduction=reduction,
        group=torch.zeros(len(tokens), dtype=torch.long, device=device),  # every path starts at the root
        group_scale=group_scale,
    )
    return loss


def _record_kl(result: TrainResult, step: int, mdp, tables, solution: OracleSolution, bar) -> None:
    """Append the exact ``KL(pi_theta || pi*)`` at ``step`` to ``result.curve`` (and show it on the bar)."""
    kl = float(sequence_kl(mdp, tables, solution.log_pi))
    result.curve.append((step, kl))
    if bar is not None:
        bar.set_postfix(kl=f"{kl:.4f}")


def _update(opt, sched, loss: torch.Tensor, model, target, target_rate: float) -> None:
    """One optimizer and scheduler step on ``loss``, then the Polyak update of the target network (if any)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if target is not None:
        polyak_update(model, target, target_rate)


def train_towards_oracle(
    model,
    solution: OracleSolution,
    loss_type: str = "unified_pcl",
    *,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 1e-2,
    final_lr: float | None = None,
    on_policy: bool = True,
    d: int | None = None,
    target_rate: float = 0.1,
    reduction: str = "token",
    eval_every: int = 10,
    seed: int = 0,
    coefficient: float = 0.5,
    value_head: torch.nn.Module | None = None,
    progress: bool = False,
    group_scale: str = "none",
) -> TrainResult:
    """Train ``model`` with the loss ``sqlm.losses.LOSS_SPECS[loss_type]`` on paths of ``solution.mdp``.

    On-policy paths are sampled from the current model, off-policy paths from ``pi_ref`` (uniform
    without a reference). A loss that needs a value head (``pcl``) learns a linear one on the last
    hidden states (created zero-initialised unless given); one that needs a target network
    (``soft_q``, ``advantage_pcl``, ``multistep_pcl``) reads ``V_bar`` from a Polyak target copy
    updated after each optimizer step (Guo et al.'s mixes also its ``log pi_bar``, weighted against their
    forward terms by ``coefficient``). ``d`` is the rollout
    length of ``pcl`` / ``unified_pcl`` (None: to the end). The learning rate decays linearly from
    ``lr`` to ``final_lr`` (default ``lr / 10``). ``group_scale`` is ``group_pcl``'s ``scale`` (every path
    is in one group: they all start at the root). Returns the exact KL curve, measured
    before the first step and every ``eval_every`` steps (and after the last).
    """
    spec = loss_spec(loss_type)
    mdp = solution.mdp
    gen = torch.Generator().manual_seed(seed)
    device = _model_device(model)
    params, value_head, target = _trainables(model, spec, value_head, device)
    opt, sched = _optimizer(params, lr, final_lr, steps)
    behaviour = None if on_policy else mdp.behaviour_log_probs()
    result = TrainResult(curve=[], value_head=value_head, target=target)

    bar = _progress_bar(progress, steps, loss_type, on_policy)
    for step in range(steps + 1):
        need_eval = step % eval_every == 0 or step == steps
        tables = policy_log_probs(model, mdp) if (on_policy or need_eval) else None
        if need_eval:
            _record_kl(result, step, mdp, tables, solution, bar)
        if step == steps:
            break
        tokens, _ = sample_paths(mdp, tables if on_policy else behaviour, batch_size, gen)
        loss = _paths_loss(model, mdp, spec, tokens, device, value_head, target,
                           coefficient=coefficient, d=d, reduction=reduction, group_scale=group_scale)  # fmt: skip
        _update(opt, sched, loss, model, target, target_rate)
        result.losses.append(loss.item())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return result


def tiny_reference_lm(vocab_size: int = 8, seed: int = 1, sharpness: float = 5.0):
    """A tiny random causal LM whose next-token distributions are clearly away from uniform (final
    norm scaled by ``sharpness``) but keep full support: a reference for demos and tests."""
    from ..tiny import tiny_causal_lm

    lm = tiny_causal_lm(vocab_size, seed=seed, hidden_size=16, num_hidden_layers=1)
    with torch.no_grad():
        lm.model.norm.weight.fill_(sharpness)
    return lm
