"""Soft-Q outputs straight from a causal LM's final hidden states, without building its logits.

The plain path runs the LM head, ``z = h W^T + b`` (``[B, T, V]``), and then
``sqlm.soft.soft_outputs``. Here the head is applied to a few rows at a time and folded at once into
the per-row quantities the losses need (DESIGN.md section 1)::

    Q(s_t, a_t) = tau * z_t[a_t]
    V(s_t)      = tau * logsumexp_a z_t[a]
    log pi      = z_t[a_t] - logsumexp_a z_t[a]

so no ``[B, T, V]`` tensor exists at any time, in forward or backward. The backward recomputes each
chunk of logits and turns it into ``dL/dz = g_lse * softmax(z) + g_za * onehot(a)``, from which it
accumulates ``dL/dh = dL/dz W``, ``dL/dW = dL/dz^T h`` and ``dL/db = sum dL/dz`` (fp32 accumulators).
Values and gradients equal the plain path's (to float rounding; tests check 1e-5 in fp32).

Supported heads: a plain ``nn.Linear`` output embedding, with or without bias, tied to the input
embedding or not (Qwen2, Llama, Mistral, Phi-3, GPT-2-style heads...), and the two logit transforms
some families apply after it: a scale (Cohere's ``logit_scale``; Granite's ``logits_scaling``, which
divides) and Gemma 2/3's ``final_logit_softcapping`` (``z = c * tanh(z / c)``). A head that is not a
plain ``nn.Linear`` (e.g. LoRA on ``lm_head``) raises ``SqlmError``; use the plain path there.

Only the rows of ``mask`` (the path steps) are projected; the other rows of every output are 0,
which is what every loss in ``sqlm.losses`` reads there anyway. ``sqlm.forward`` runs a model
through this path when ``supports_fused_head`` says it can, and through its logits otherwise.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .errors import SqlmError
from .soft import SoftOutputs, check_tau


# Rows of hidden states per chunk are chosen so that a chunk of logits [rows, V] holds about this many
# fp32 elements: 32 MiB on a CPU (about 256 rows of a 32k vocabulary: enough rows that the head's
# weight is read few times), 256 MiB on an accelerator (fewer launches).
_ELEMENTS_CPU = 1 << 23
_ELEMENTS_ACCEL = 1 << 26


@dataclass
class LMHead:
    """The output projection of a causal LM: ``z = transform(scale * (h @ weight.T + bias))``."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None  # [V]
    scale: float = 1.0
    softcap: float | None = None


def lm_head_of(model) -> LMHead:
    """The ``LMHead`` of a transformers causal LM (or a PEFT model around one).

    Reads ``get_output_embeddings()`` and, from the (text) config, ``logit_scale`` (multiplies),
    ``logits_scaling`` (divides, as in Granite) and ``final_logit_softcapping`` (Gemma 2/3).
    """
    model = _unwrap(model)
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise SqlmError(
            f"the fused LM head needs a plain torch.nn.Linear output embedding, got {type(head).__name__} "
            "(e.g. LoRA on lm_head); use the plain logits path for this model"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = 1.0 / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return LMHead(head.weight, head.bias, 1.0 if scale is None else float(scale), softcap)


def _unwrap(model):
    """The transformers model inside data-parallel (``.module``) and PEFT wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP / DeepSpeed engines
        model = model.module
    if hasattr(model, "get_base_model"):  # a PEFT model: the transformers model with adapters injected
        model = model.get_base_model()
    return model


def backbone_of(model) -> torch.nn.Module:
    """The decoder of a causal LM (``model.base_model``): returns ``last_hidden_state``, no logits."""
    model = _unwrap(model)
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise SqlmError(f"cannot find the decoder (base_model) of {type(model).__name__}")
    return backbone


_LOGITS_TO_KEEP: dict[type, bool] = {}


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any DDP / DeepSpeed / PEFT wrapper takes ``logits_to_keep``."""
    key = type(_unwrap(model))
    if key not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[key] = "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters
    return _LOGITS_TO_KEEP[key]


def decoder_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """``(output, hidden)``: run a causal LM without building its logits, and capture the final
    hidden states ``[B, L, H]`` (after the last norm).

    The call goes through the model's own forward (so wrappers such as DDP, which prepare gradient
    synchronisation there, and forward hooks on the model see it) with ``logits_to_keep=1``; the
    decoder's ``last_hidden_state`` is captured by a forward hook. ``output`` is the model's output
    (its logits cover the last position only). A model without ``logits_to_keep`` runs its decoder
    alone, and ``output`` is the decoder's.
    """
    kwargs.setdefault("use_cache", False)
    inner = _unwrap(model)
    backbone = backbone_of(inner)
    captured: list[torch.Tensor] = []

    def hook(_module, _args, out):
        captured.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])

    handle = backbone.register_forward_hook(hook)
    try:
        if accepts_logits_to_keep(inner):
            out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, **kwargs)
        else:
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        handle.remove()
    return out, captured[-1]


def supports_fused_head(model) -> bool:
    """Whether ``lm_head_of(model)`` works (a plain ``nn.Linear`` head, a decoder to call)."""
    try:
        lm_head_of(model)
        backbone_of(model)
    except SqlmError:
        return False
    return True


# ----------------------------------------------------------------------------- the fused function


def _rows(n_vocab: int, device: torch.device, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    budget = _ELEMENTS_CPU if device.type == "cpu" else _ELEMENTS_ACCEL
    return max(1, budget // max(n_vocab, 1))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: float, softcap):
    """fp32 logits of one chunk, and ``tanh`` of the soft-cap (``None`` without one)."""
    y = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    z = y.float()  # a copy when the compute dtype is not fp32, else ``y`` itself
    if scale != 1.0:
        z.mul_(scale)
    if softcap is None:
        return z, None
    t = z.div_(softcap).tanh_()
    return t * softcap, t


class _FusedSoftStats(torch.autograd.Function):
    """``(logsumexp z, z[a], H(softmax z) or None)`` per row for ``z = head(hidden)``, in row chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, actions, rows, scale, softcap, with_entropy):
        dtype = _compute_dtype(hidden)
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        z_a = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, rows):
                e = min(s + rows, n)
                z, _ = _chunk_logits(hidden[s:e].to(dtype), w, b, scale, softcap)
                lse[s:e] = torch.logsumexp(z, dim=-1)
                z_a[s:e] = z.gather(1, actions[s:e, None]).squeeze(1)
                if with_entropy:
                    # H = lse - sum_a softmax(z)_a z_a
                    p = torch.exp(z - lse[s:e, None])
                    ent[s:e] = lse[s:e] - (p * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, actions, lse)
        ctx.rows, ctx.scale, ctx.softcap, ctx.dtype = rows, scale, softcap, dtype
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return lse, z_a, ent

    @staticmethod
    def backward(ctx, g_lse, g_za, _g_ent):
        hidden, weight, bias, actions, lse = ctx.saved_tensors
        rows, scale, softcap, dtype = ctx.rows, ctx.scale, ctx.softcap, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse.float()
        g_za = torch.zeros_like(lse) if g_za is None else g_za.float()
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, rows):
                e = min(s + rows, n)
                h = hidden[s:e].to(dtype)
                z, t = _chunk_logits(h, w, b, scale, softcap)
                # dL/dz = g_lse * softmax(z) + g_za * onehot(a), in place in z
                g = z.sub_(lse[s:e, None]).exp_().mul_(g_lse[s:e, None])
                g.scatter_add_(1, actions[s:e, None], g_za[s:e, None])
                if softcap is not None:
                    g.mul_(1 - t * t)  # d(c tanh(y/c))/dy
                if scale != 1.0:
                    g.mul_(scale)
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[s:e] = g @ w
                if grad_w is not None:
                    if dtype == torch.float32:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += (g.t() @ h).float()
                if grad_b is not None:
                    grad_b += g.sum(0, dtype=torch.float32)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


# ----------------------------------------------------------------------------- public API


def _check(hidden: torch.Tensor, head: LMHead, actions: torch.Tensor | None, mask: torch.Tensor | None):
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if head.weight.dim() != 2 or head.weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"head.weight must be [V, H={hidden.shape[-1]}], got shape {tuple(head.weight.shape)}")
    for name, x in (("actions", actions), ("mask", mask)):
        if x is not None and x.shape != hidden.shape[:2]:
            raise ValueError(f"{name} must be [B, T] = {tuple(hidden.shape[:2])}, got shape {tuple(x.shape)}")


def _scatter_rows(x: torch.Tensor, keep: torch.Tensor | None, shape) -> torch.Tensor:
    if keep is None:
        return x.reshape(shape)
    return x.new_zeros(shape).masked_scatter(keep, x)


def fused_soft_outputs(
    hidden: torch.Tensor,
    head: LMHead,
    actions: torch.Tensor,
    tau: float,
    *,
    mask: torch.Tensor | None = None,
    with_entropy: bool = False,
    chunk_size: int | None = None,
) -> SoftOutputs:
    """``sqlm.soft.soft_outputs(head(hidden), actions, tau)`` without the logits.

    ``hidden[b, t]`` is the final hidden state of state ``s_t`` and ``actions[b, t]`` the token taken
    there (for a causal LM: ``hidden[:, :-1]`` against ``input_ids[:, 1:]``). With ``mask``
    ``[B, T]``, only its rows are projected and the rest of every output is 0. Negative action ids
    are read as token 0. Differentiable in ``hidden``, ``head.weight`` and ``head.bias``.
    """
    tau = check_tau(tau)
    _check(hidden, head, actions, mask)
    shape = hidden.shape[:2]
    keep = None if mask is None else mask.bool()
    h = hidden.reshape(-1, hidden.shape[-1]) if keep is None else hidden[keep]
    a = (actions.reshape(-1) if keep is None else actions[keep]).clamp(min=0).long()
    rows = _rows(head.weight.shape[0], hidden.device, chunk_size)
    lse, z_a, ent = _FusedSoftStats.apply(h, head.weight, head.bias, a, rows, head.scale, head.softcap, with_entropy)
    lse, z_a = _scatter_rows(lse, keep, shape), _scatter_rows(z_a, keep, shape)
    entropy = None if ent is None else _scatter_rows(ent, keep, shape)
    return SoftOutputs(q=tau * z_a, v=tau * lse, log_pi=z_a - lse, entropy=entropy)


@torch.no_grad()
def _stats_no_grad(hidden, head, actions, mask, chunk_size):
    """``(lse, z[a] or None)`` ``[B, T]`` fp32 without autograd; one chunk of logits at a time."""
    _check(hidden, head, actions, mask)
    shape = hidden.shape[:2]
    keep = None if mask is None else mask.bool()
    h = hidden.reshape(-1, hidden.shape[-1]) if keep is None else hidden[keep]
    a = None
    if actions is not None:
        a = (actions.reshape(-1) if keep is None else actions[keep]).clamp(min=0).long()
    rows = _rows(head.weight.shape[0], hidden.device, chunk_size)
    dtype = _compute_dtype(h)
    w = head.weight.to(dtype)
    b = None if head.bias is None else head.bias.to(dtype)
    lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    z_a = None if a is None else torch.empty_like(lse)
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, h.shape[0], rows):
            e = min(s + rows, h.shape[0])
            z, _ = _chunk_logits(h[s:e].to(dtype), w, b, head.scale, head.softcap)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            if a is not None:
                z_a[s:e] = z.gather(1, a[s:e, None]).squeeze(1)
    return _scatter_rows(lse, keep, shape), None if z_a is None else _scatter_rows(z_a, keep, shape)


def fused_values(
    hidden: torch.Tensor,
    head: LMHead,
    tau: float,
    *,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``V(s_t) = tau * logsumexp head(hidden)[b, t]``, ``[B, T]`` fp32, without autograd.

    For a target network: nothing is kept for a backward and only one chunk of logits exists at a
    time. Rows outside ``mask`` are 0.
    """
    tau = check_tau(tau)
    lse, _ = _stats_no_grad(hidden, head, None, mask, chunk_size)
    return tau * lse


def fused_log_probs(
    hidden: torch.Tensor,
    head: LMHead,
    actions: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log pi(a_t | s_t) = z[a_t] - logsumexp z`` ``[B, T]`` fp32, without autograd (a reference
    model's log-probs for ``r~ = r + tau log pi_ref``); with ``return_lse`` also ``logsumexp z``.
    Rows outside ``mask`` are 0."""
    lse, z_a = _stats_no_grad(hidden, head, actions, mask, chunk_size)
    return (z_a - lse, lse) if return_lse else z_a - lse
