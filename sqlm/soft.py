"""The soft-Q view of a causal LM's logits (pure tensor functions).

With logits ``z(s, .)`` of a causal LM and temperature ``tau``::

    Q(s, a)     = tau * z(s, a)
    V(s)        = tau * logsumexp_a z(s, a)
    tau*log pi  = Q(s, a) - V(s)

Everything here is computed in fp32, in chunks of rows, by one custom autograd function whose
backward recomputes the softmax chunk by chunk: no extra full-size ``[B, T, V]`` copy of the logits
is kept between forward and backward (the only full-size tensor is the gradient itself, as for
``torch.nn.functional.cross_entropy``).

Alignment: ``logits[b, t]`` are the logits of state ``s_t`` and ``actions[b, t]`` the token taken
there. For a causal LM that means ``logits[:, :-1]`` against ``input_ids[:, 1:]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# Rows per chunk are chosen so that one fp32 chunk holds about this many elements: on a CPU a chunk
# that stays in cache (1 MiB; each pass over it then costs no memory traffic), on an accelerator a
# large one (64 MiB; fewer kernel launches).
_CHUNK_ELEMENTS_CPU = 1 << 18
_CHUNK_ELEMENTS = 1 << 24


def check_tau(tau: float) -> float:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau > 0:
        raise ValueError(f"tau must be a number > 0, got {tau!r}")
    return float(tau)


def _rows_per_chunk(vocab: int, chunk_size: int | None, device: torch.device | None = None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    budget = _CHUNK_ELEMENTS_CPU if device is None or device.type == "cpu" else _CHUNK_ELEMENTS
    return max(1, budget // max(vocab, 1))


class _SoftStats(torch.autograd.Function):
    """(logsumexp z, z[a]) per row of a 2-D logits tensor, chunked over rows.

    Forward saves only the logits (no copy) and the fp32 logsumexp; backward writes
    ``g_lse * softmax(z) + g_za * onehot(a)`` chunk by chunk into one gradient tensor.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, actions: torch.Tensor, rows: int):
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for start in range(0, n, rows):
            chunk = logits[start : start + rows].float()
            lse[start : start + rows] = torch.logsumexp(chunk, dim=-1)
        z_a = logits.gather(1, actions[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, actions, lse)
        ctx.rows = rows
        return lse, z_a

    @staticmethod
    def backward(ctx, g_lse: torch.Tensor, g_za: torch.Tensor):
        logits, actions, lse = ctx.saved_tensors
        rows = ctx.rows
        grad = torch.empty_like(logits)
        g_lse, g_za = g_lse.float(), g_za.float()
        in_place = logits.dtype == torch.float32  # write each chunk straight into the gradient
        n = logits.shape[0]
        for start in range(0, n, rows):
            end = min(start + rows, n)
            if in_place:
                p = torch.sub(logits[start:end], lse[start:end, None], out=grad[start:end])
            else:
                p = logits[start:end].float() - lse[start:end, None]
            p.exp_().mul_(g_lse[start:end, None])
            p.scatter_add_(1, actions[start:end, None], g_za[start:end, None])
            if not in_place:
                grad[start:end] = p
        return grad, None, None


def logsumexp_chunked(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """fp32 ``logsumexp`` over the last dimension, chunked over rows, differentiable."""
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    dummy = torch.zeros(flat.shape[0], dtype=torch.long, device=logits.device)
    lse, _ = _SoftStats.apply(flat, dummy, _rows_per_chunk(flat.shape[-1], chunk_size, flat.device))
    return lse.reshape(shape)


@torch.no_grad()
def entropy_chunked(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dimension in fp32, chunked, without grad."""
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    rows = _rows_per_chunk(flat.shape[-1], chunk_size, flat.device)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], rows):
        z = flat[start : start + rows].float()
        logp = torch.log_softmax(z, dim=-1)
        out[start : start + rows] = -(logp.exp() * logp).sum(-1)
    return out.reshape(shape)


@dataclass
class SoftOutputs:
    """Per-step soft-Q quantities of a batch of paths, all fp32 ``[B, T]``."""

    q: torch.Tensor  # Q(s_t, a_t) = tau * z(s_t, a_t)
    v: torch.Tensor  # V(s_t) = tau * logsumexp z(s_t, .)
    log_pi: torch.Tensor  # log pi(a_t | s_t) = (Q - V) / tau
    entropy: torch.Tensor | None = None  # H(pi(. | s_t)), detached


def soft_outputs(
    logits: torch.Tensor,
    actions: torch.Tensor,
    tau: float,
    *,
    with_entropy: bool = False,
    chunk_size: int | None = None,
) -> SoftOutputs:
    """Q of the taken tokens, V and log pi from logits ``[B, T, V]`` and actions ``[B, T]``.

    Negative action ids (e.g. ``-100`` labels) are read as token 0; mask them out downstream.
    """
    tau = check_tau(tau)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if actions.shape != logits.shape[:2]:
        raise ValueError(f"actions must be [B, T] = {tuple(logits.shape[:2])}, got shape {tuple(actions.shape)}")
    b, t, vocab = logits.shape
    flat = logits.reshape(b * t, vocab)
    acts = actions.reshape(b * t).clamp(min=0).long()
    lse, z_a = _SoftStats.apply(flat, acts, _rows_per_chunk(vocab, chunk_size, flat.device))
    lse, z_a = lse.reshape(b, t), z_a.reshape(b, t)
    entropy = entropy_chunked(logits, chunk_size) if with_entropy else None
    return SoftOutputs(q=tau * z_a, v=tau * lse, log_pi=z_a - lse, entropy=entropy)


def shaped_rewards(rewards: torch.Tensor, tau: float, ref_log_pi: torch.Tensor | None = None) -> torch.Tensor:
    """``r~ = r + tau * log pi_ref(a|s)``; with no reference ``r~ = r`` (plain max-entropy RL)."""
    tau = check_tau(tau)
    rewards = rewards.float()
    if ref_log_pi is None:
        return rewards
    if ref_log_pi.shape != rewards.shape:
        raise ValueError(
            f"ref_log_pi must have the shape of rewards {tuple(rewards.shape)}, got {tuple(ref_log_pi.shape)}"
        )
    return rewards + tau * ref_log_pi.float()


def path_mask(
    actions: torch.Tensor,
    action_mask: torch.Tensor,
    eos_token_id: int | list[int] | None = None,
) -> torch.Tensor:
    """The steps of each path: ``action_mask`` (completion, not prompt or padding) cut after the
    first EOS, which itself stays in (taking EOS is the last action; the state after it has V=0)."""
    mask = action_mask.bool()
    if eos_token_id is None:
        return mask.float()
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.zeros_like(mask)
    for e in eos_ids:
        is_eos |= actions == e
    is_eos &= mask
    # number of EOS strictly before t; a step is kept while none came before it
    before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return (mask & (before == 0)).float()


def fold_rewards_into_path(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rewards ``[N, T]`` with whatever lies on steps after each path's last step (``mask``, one
    contiguous run per row) added to that last step; everything else unchanged.

    A path ends at its first EOS, but a completion may hold tokens after it: ChatML closes an assistant
    turn with ``<|im_end|>\\n``, so a sequence reward put on the completion's last token lands on the
    ``\\n``, outside the path, and no loss would see it. The tokens after the end are not actions of the
    MDP (the state after EOS has V = 0), so their reward belongs to the action that ended the path; it
    is added undiscounted. Rows without a step are returned as they are."""
    if rewards.shape != mask.shape:
        raise ValueError(f"rewards and mask must have one shape, got {tuple(rewards.shape)} and {tuple(mask.shape)}")
    on = mask.bool()
    has_step = on.any(-1)
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(on, positions, torch.full_like(positions, -1)).max(-1).values  # [N]
    after = positions > last.unsqueeze(-1)
    spill = torch.where(after & has_step.unsqueeze(-1), rewards, torch.zeros_like(rewards)).sum(-1)
    out = torch.where(after & has_step.unsqueeze(-1), torch.zeros_like(rewards), rewards).clone()
    rows = has_step.nonzero().squeeze(-1)
    out[rows, last[rows]] += spill[rows]
    return out
