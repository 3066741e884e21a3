"""The model -> soft outputs seam: one forward of a causal LM on a packed batch, read as per-step
soft-Q quantities (DESIGN.md section 1).

A packed batch (``sqlm.data.pack_trajectories``) has ``input_ids`` / ``attention_mask`` ``[N, L]``,
``logits_start`` (the first state whose logits are needed) and, optionally, ``path_mask``. Step
``t`` is the state ``s_t = input_ids[:, :start+t+1]`` taking the action ``input_ids[:, start+t+1]``;
every output is ``[N, L-1-start]``.

:func:`_forward` chooses, in this one place, between the fused LM head (``sqlm.fused``: the head is
applied a chunk of path rows at a time, no ``[N, T, V]`` logits) and the plain logits (e.g. LoRA
on the LM head, or a model sharded by FSDP2 or ZeRO-3: :func:`is_sharded`). The three readings of
a model are built on it:

* :func:`policy_soft_outputs`: ``Q``, ``V``, ``log pi`` (with gradient) of the policy, and its
  value head's ``V_phi`` (:func:`attach_value_head`);
* :func:`model_log_pi`: ``log pi_ref`` and ``logsumexp z_ref`` of a reference (no gradient);
* :func:`model_values`: ``V_bar = tau logsumexp z`` of a target network (no gradient), which
  :func:`polyak_update` moves towards the policy.

With PEFT the target network is a second adapter on the same frozen base
(:func:`add_target_adapter`); :func:`adapter_active` runs the model with one adapter (or none, the
reference) active, and :func:`adapter_pairs` pairs the policy adapter's parameters with the target's
for the Polyak step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import fused
from .errors import SqlmError
from .soft import SoftOutputs, check_tau, soft_outputs


VALUE_HEAD_ATTR = "sqlm_value_head"


class _PlainSteps:
    """The per-step view of one forward through the model's own logits ``[N, T, V]``."""

    def __init__(self, logits: torch.Tensor, actions: torch.Tensor):
        self.logits, self.actions = logits, actions

    def soft(self, tau: float, with_entropy: bool = False) -> SoftOutputs:
        return soft_outputs(self.logits, self.actions, tau, with_entropy=with_entropy)

    def log_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        soft = soft_outputs(self.logits, self.actions, 1.0)
        return soft.log_pi, soft.v


class _FusedSteps:
    """The per-step view of one forward through the fused LM head: final hidden states ``[N, T, H]``
    and the head, projected only on the path rows (0 elsewhere)."""

    def __init__(self, hidden: torch.Tensor, head: fused.LMHead, actions: torch.Tensor, mask: torch.Tensor | None):
        self.hidden, self.head, self.actions, self.mask = hidden, head, actions, mask

    def soft(self, tau: float, with_entropy: bool = False) -> SoftOutputs:
        return fused.fused_soft_outputs(
            self.hidden, self.head, self.actions, tau, mask=self.mask, with_entropy=with_entropy
        )

    def log_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fused.fused_log_probs(self.hidden, self.head, self.actions, mask=self.mask, return_lse=True)


def _forward(model: nn.Module, batch: dict[str, Any], hidden: bool = False):
    """``(output, steps)``: run ``model`` on the batch once and view its states ``start .. L-2``
    through the fused head when the model has one, else through its logits. With ``hidden`` the
    output also carries the hidden states (and so the value head's ``sqlm_values``)."""
    ids = batch["input_ids"]
    start = int(batch["logits_start"])
    actions = ids[:, start + 1 :]
    kwargs = {"output_hidden_states": True} if hidden else {}
    if fused.supports_fused_head(model) and not is_sharded(model):
        out, h = fused.decoder_forward(model, ids, batch["attention_mask"], **kwargs)
        mask = batch["path_mask"][:, start:] if "path_mask" in batch else None
        return out, _FusedSteps(h[:, start:-1], fused.lm_head_of(model), actions, mask)
    keep = ids.shape[1] - start
    if fused.accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False, **kwargs)
    return out, _PlainSteps(out.logits[:, -keep:][:, :-1], actions)


def policy_soft_outputs(
    model: nn.Module,
    batch: dict[str, Any],
    tau: float,
    *,
    with_entropy: bool = True,
    with_values: bool = False,
) -> tuple[SoftOutputs, torch.Tensor | None]:
    """Per-step soft quantities of the policy on a packed batch: ``Q(s_t, a_t) = tau z``,
    ``V(s_t) = tau logsumexp z``, ``log pi(a_t|s_t)`` (and the entropy, detached), ``[N, T]``; plus,
    with ``with_values``, the separate value head's ``V_phi(s_t)`` (computed inside the model's
    forward by :func:`attach_value_head`, so data parallelism sees it)."""
    out, steps = _forward(model, batch, hidden=with_values)
    soft = steps.soft(tau, with_entropy)
    head_v = None
    if with_values:
        values = out.get("sqlm_values") if hasattr(out, "get") else None
        if values is None:
            raise SqlmError("the model has no value head (loss_type 'pcl' needs value_head: true)")
        head_v = values[:, int(batch["logits_start"]) : -1]
    return soft, head_v


@torch.no_grad()
def model_log_pi(model: nn.Module, batch: dict[str, Any], return_lse: bool = False):
    """``log pi(a_t|s_t)`` of the batch's actions under ``model`` (no grad), ``[N, T]``, and with
    ``return_lse`` also ``logsumexp z(s_t)``; through the fused head only one chunk of logits exists at
    a time (0 off the path steps)."""
    log_pi, lse = _forward(model, batch)[1].log_probs()
    _reshard(model)
    return (log_pi, lse) if return_lse else log_pi


@torch.no_grad()
def model_values(model: nn.Module, batch: dict[str, Any], tau: float) -> torch.Tensor:
    """``V(s_t) = tau logsumexp z(s_t, .)`` under ``model`` (no grad), ``[N, T]``; through the fused
    head, only one chunk of logits exists at a time and nothing is kept (0 off the path steps)."""
    tau = check_tau(tau)
    values = tau * _forward(model, batch)[1].log_probs()[1]
    _reshard(model)
    return values


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded by FSDP2 (the model, or the model in a ``.module``
    wrapper, is an ``FSDPModule``) or partitioned by DeepSpeed ZeRO-3 (:func:`is_zero3_partitioned`).
    Such a model is read through its logits, not the fused head: the fused head applies the LM head's
    weight after the forward has returned, when the engine has already resharded it (a DTensor shard,
    or an empty ZeRO-3 placeholder) and would not reduce its gradient; inside the forward the engine
    gathers it and reduces its gradient."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    inner = model
    while inner is not None:
        if FSDPModule and isinstance(inner, FSDPModule):
            return True
        inner = getattr(inner, "module", None)
    return is_zero3_partitioned(model)


def is_zero3_partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are partitioned by DeepSpeed ZeRO-3 (``zero.Init``): each holds only
    this process's partition (``ds_tensor``) and an empty ``data``."""
    first = next(model.parameters(), None)
    return first is not None and hasattr(first, "ds_tensor")


def _reshard(model: nn.Module) -> None:
    """Free the gathered parameters of an FSDP2 model after a forward with no backward: its root
    module keeps them otherwise (it expects a backward), which would hold a whole reference or target
    network per process and leave the target's parameters unsharded for the Polyak update."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    if isinstance(model, FSDPModule):
        model.reshard()


# ----------------------------------------------------------------------------- value head and target network


def _value_head_hook(module, args, output):
    hs = getattr(output, "hidden_states", None)
    if hs is not None:
        head = getattr(module, VALUE_HEAD_ATTR)
        output["sqlm_values"] = head(hs[-1].to(head.weight.dtype)).squeeze(-1).float()
    return output


def attach_value_head(model: nn.Module) -> nn.Module:
    """Add a zero-initialised linear value head ``V_phi(s) = w . h(s) + b`` on the last hidden state
    (seed Algorithm 1's separate critic). Its output joins the model's forward output as
    ``sqlm_values`` when hidden states are requested."""
    hidden = model.config.get_text_config().hidden_size
    head = nn.Linear(hidden, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    setattr(model, VALUE_HEAD_ATTR, head.to(next(model.parameters()).device))
    model.register_forward_hook(_value_head_hook)
    return model


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """The piece of a parameter this process holds: a DTensor's local shard (FSDP2), a DeepSpeed
    ZeRO-3 parameter's partition (``ds_tensor``), or the parameter itself."""
    if hasattr(p, "ds_tensor"):  # ZeRO-3: p.data is empty outside a gather; the partition is ds_tensor
        return p.ds_tensor
    to_local = getattr(p, "to_local", None)
    return to_local() if to_local is not None else p.data


@torch.no_grad()
def polyak_update(
    policy: nn.Module,
    target: nn.Module,
    alpha: float,
    names: list[str] | None = None,
    pairs: list[tuple[str, str]] | None = None,
) -> None:
    """``target <- (1 - alpha) * target + alpha * policy`` on the named parameters (default: all of
    the policy's; the target is a copy of the policy, so names match), or on ``pairs`` of (policy
    name, target name) (e.g. two adapters of one model, :func:`adapter_pairs`).

    Sharded models (FSDP2 DTensors, ZeRO-3 partitions) are updated piece by piece on each process's
    local shards (:func:`local_shard`), with no all-gather: policy and target are sharded the same
    way (same shapes, same mesh), so the local pieces line up element for element."""
    src = dict(policy.named_parameters())
    dst = src if target is policy else dict(target.named_parameters())
    if pairs is None:
        pairs = [(n, n) for n in (src if names is None else names)]
    for s, d in pairs:
        a, b = local_shard(src[s]), local_shard(dst[d])
        if a.shape != b.shape:
            raise SqlmError(
                f"target parameter '{d}' is sharded unlike the policy's '{s}' (local shapes "
                f"{tuple(b.shape)} vs {tuple(a.shape)}); shard both with the same engine and mesh"
            )
        if alpha == 1.0:  # a hard copy, whatever the target held (even non-finite values)
            b.copy_(a)
        else:
            b.mul_(1.0 - alpha).add_(a.to(b.dtype), alpha=alpha)
        drop_gathered(dst[d])


def drop_gathered(p: torch.Tensor) -> None:
    """After its partition (``ds_tensor``) was written: free the whole copy DeepSpeed ZeRO-3 may hold of
    the parameter, so that the next forward gathers the new partitions. A *persistent* (small) ZeRO-3
    parameter keeps its gathered copy from its first forward on and never re-reads its partition; its
    updates would be invisible. Frees memory only: no collective. Other tensors: nothing to do."""
    if not hasattr(p, "ds_tensor"):
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if p.ds_status == ZeroParamStatus.AVAILABLE:
        p.partition()


# ----------------------------------------------------------------------------- adapters (PEFT)

TARGET_ADAPTER = "target"


def adapter_pairs(model: nn.Module, src: str, dst: str) -> list[tuple[str, str]]:
    """``(name of a parameter of adapter src, name of the same parameter of adapter dst)`` for every
    parameter of adapter ``src`` of a PEFT model (``...lora_A.default.weight`` ->
    ``...lora_A.target.weight``; also ``modules_to_save``)."""
    names = [n for n, _ in model.named_parameters()]
    have = set(names)
    pairs, missing = [], []
    for n in names:
        parts = n.split(".")
        if src not in parts:
            continue
        i = parts.index(src)
        other = ".".join(parts[:i] + [dst] + parts[i + 1 :])
        (pairs if other in have else missing).append((n, other))
    if missing or not pairs:
        what = missing[0][1] if missing else f"any parameter of adapter '{src}'"
        raise SqlmError(f"adapter '{dst}' does not mirror adapter '{src}': no {what}")
    return pairs


@torch.no_grad()
def add_target_adapter(model: nn.Module, name: str = TARGET_ADAPTER) -> list[tuple[str, str]]:
    """Add a frozen adapter ``name`` to a PEFT model, on the same base, with the active (policy)
    adapter's config and a copy of its weights: the target network without a second copy of the
    base. The policy adapter stays active and trainable; the random numbers PEFT draws to
    initialise the new adapter do not move the global RNG. Returns :func:`adapter_pairs`."""
    import copy

    policy = model.active_adapter
    if name in model.peft_config:
        raise SqlmError(f"the model already has an adapter named '{name}' (the target network's adapter)")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.random.fork_rng(devices=[]):
        model.add_adapter(name, copy.deepcopy(model.peft_config[policy]))
    pairs = adapter_pairs(model, policy, name)
    params = dict(model.named_parameters())
    for s, d in pairs:
        params[d].data.copy_(params[s].data)
    for n, p in params.items():  # exactly the trainable set of before: the new adapter is frozen
        p.requires_grad_(n in trainable)
    return pairs


@contextmanager
def adapter_active(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Run a PEFT model with adapter ``name`` active (None: every adapter disabled, i.e. the base
    model), in eval mode; the previously active adapter, which parameters require gradients, and
    train/eval mode are restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        if name is None:
            with model.disable_adapter():
                yield model
        else:
            previous = model.active_adapter
            model.set_adapter(name)
            try:
                yield model
            finally:
                model.set_adapter(previous)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
