"""The target network ``V_bar`` of the losses that use one (``uses_target_model``).

One object per run, whatever the target is, so the trainer never asks which kind it holds:

* :class:`CopyTarget`: a frozen copy of the initial policy (:func:`frozen_copy`), sharded like the
  reference under ZeRO-3 / FSDP;
* :class:`AdapterTarget`: with PEFT, a second adapter ``target`` on the policy's own frozen base
  (:func:`sqlm.forward.add_target_adapter`): no second copy of the base;
* :class:`NoTarget`: the loss needs none; every method does nothing.

Each builds, moves by a Polyak step towards the policy (:meth:`TargetNetwork.update`), gives the
target's values ``V_bar(s_t)`` (:meth:`TargetNetwork.values`) and saves / loads its own weights in a
checkpoint (``target_model.safetensors``; one file per process when sharded).
:class:`TargetNetworkCallback` runs the Polyak step after the optimizer steps, never inside the loss.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import TrainerCallback

from .errors import SqlmError
from .forward import (
    TARGET_ADAPTER,
    VALUE_HEAD_ATTR,
    adapter_active,
    add_target_adapter,
    drop_gathered,
    is_zero3_partitioned,
    local_shard,
    model_log_pi,
    polyak_update,
)


TARGET_FILE = "target_model.safetensors"


def is_peft(model) -> bool:
    """``model`` is a PEFT model (its adapters can be disabled to read the base)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of the initial policy, for the reference or the target network.

    Under accelerate's ZeRO-3, transformers partitions every model loaded once the training arguments
    exist (``zero.Init``; accelerate registers the DeepSpeed config with transformers whatever
    ``zero3_init_flag`` says), so the policy of ``sqlm train`` holds only its own partition of each
    parameter (``ds_tensor``; ``p.data`` is empty): a deepcopy would copy empty parameters without
    their partitions. The copy is then built from the policy's config under
    ``zero.Init`` (``_from_config``: partitioned the same way) and takes the policy's partitions piece
    by piece, with no gather of whole parameters; buffers (not partitioned) are copied as they are."""
    if not is_zero3_partitioned(model):
        return copy.deepcopy(model)
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        raise SqlmError(
            "the model is partitioned by DeepSpeed ZeRO-3 but no ZeRO-3 config is active: create the "
            "SoftQConfig (or TrainingArguments) before loading the model under ZeRO-3"
        )
    dtype = next(model.parameters()).ds_tensor.dtype
    clone = type(model)._from_config(copy.deepcopy(model.config), dtype=dtype)
    polyak_update(model, clone, 1.0, names=[n for n, _ in clone.named_parameters()])
    _copy_buffers(model, clone)
    return clone


def _copy_buffers(src: nn.Module, dst: nn.Module) -> None:
    buffers = dict(src.named_buffers())
    with torch.no_grad():
        for n, b in dst.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])


def trainable_names(model: nn.Module) -> list[str]:
    """The policy's trainable parameters a copy of it mirrors (the value head is the policy's own)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and VALUE_HEAD_ATTR not in n]


def build_target(model: nn.Module, args) -> TargetNetwork:
    """The target network ``args`` asks for, of the policy as it is now: call it after PEFT wraps the
    policy (the target is then an adapter) and before the value head is attached (a copy has none)."""
    if not args.uses_target_model:
        return NoTarget()
    if is_peft(model):
        return AdapterTarget(add_target_adapter(model, TARGET_ADAPTER))
    target = frozen_copy(model)
    target.eval()
    target.requires_grad_(False)
    return CopyTarget(target)


# ----------------------------------------------------------------------------- the three kinds


class TargetNetwork:
    """What every kind of target network does; ``policy`` arguments are the unwrapped policy."""

    model: nn.Module | None = None
    """The separate target model (as the trainer prepared it), or None (an adapter, or no target)."""
    sharded = False
    """Each process holds (and saves) only its own pieces (ZeRO-3 or FSDP)."""
    loaded = False
    """Restored from a checkpoint (a sharded copy then keeps what it loaded at the start)."""

    def __bool__(self) -> bool:
        return True

    def param_names(self) -> list[str]:
        """Names of the target's own weights (what a checkpoint keeps)."""
        raise NotImplementedError

    def parameters_of(self, policy: nn.Module) -> dict[str, torch.Tensor]:
        """Named parameters of the module that holds the target's weights."""
        raise NotImplementedError

    def network(self, policy: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """The module to run for the target's forward."""
        raise NotImplementedError

    def prepare(self, prepare: Callable[..., nn.Module], policy: nn.Module, sharded: bool) -> None:
        """Once the Trainer exists: wrap a separate target for the engine (``prepare``) and note whether it
        is sharded."""
        self.sharded = sharded

    def init_from_policy(self, policy: nn.Module, device) -> None:
        """At the start of training: nothing to do unless the target is a sharded copy."""

    def update(self, policy: nn.Module, alpha: float) -> None:
        """Polyak step: ``target <- (1 - alpha) * target + alpha * policy`` on the target's weights."""
        raise NotImplementedError

    def values(self, policy: nn.Module, inputs, tau: float, with_log_pi: bool = False):
        """``V_bar(s_t)`` of the target network ``[N, T]`` (no grad); with ``with_log_pi`` the pair
        ``(V_bar, log pi_bar(a_t|s_t))`` (Guo et al.'s reversed terms read the target's advantage
        ``tau log pi_bar``)."""
        with self.network(policy) as net:
            log_pi, lse = model_log_pi(net, inputs, return_lse=True)
        values = tau * lse
        return (values, log_pi) if with_log_pi else values

    def state_dict(self, policy: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The target network's own weights (this process's pieces when sharded)."""
        params = self.parameters_of(policy)
        return {n: local_shard(params[n]).detach() for n in self.param_names()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], where: str, policy: nn.Module | None = None) -> None:
        """Copy ``state`` (:meth:`state_dict`'s names) into the target network."""
        params = self.parameters_of(policy)
        expected = set(self.param_names())
        if set(state) != expected:
            odd = min(set(state) ^ expected)
            raise SqlmError(f"{where}: the saved target network does not match this one (parameter '{odd}')")
        for n, t in state.items():
            piece = local_shard(params[n])
            if piece.shape != t.shape:
                raise SqlmError(
                    f"{where}: target parameter '{n}' was saved with shape {tuple(t.shape)}, this process "
                    f"holds {tuple(piece.shape)} (a sharded checkpoint resumes on the same number of processes)"
                )
            piece.copy_(t.to(piece.device, piece.dtype))
            drop_gathered(params[n])
        self.loaded = True

    def file(self, folder: str, process_index: int = 0, is_main: bool = True) -> str | None:
        """Where this process saves / loads the target network: every process its own shards
        (``target_model_rank{i}.safetensors``) when sharded, else the main process the whole of it."""
        if self.sharded:
            return os.path.join(folder, TARGET_FILE.replace(".safetensors", f"_rank{process_index}.safetensors"))
        return os.path.join(folder, TARGET_FILE) if is_main else None

    def save(self, folder: str, policy: nn.Module | None = None, process_index: int = 0, is_main: bool = True) -> None:
        """Write the target's weights into checkpoint ``folder`` (safetensors)."""
        path = self.file(folder, process_index, is_main)
        if path is None:
            return
        from safetensors.torch import save_file

        save_file({n: t.contiguous().cpu() for n, t in self.state_dict(policy).items()}, path)

    def load(self, folder: str, policy: nn.Module | None = None, process_index: int = 0) -> None:
        """Restore what :meth:`save` wrote (every process reads the whole file, or its own shards)."""
        path = self.file(folder, process_index, is_main=True)
        if not os.path.exists(path):
            raise SqlmError(
                f"checkpoint {folder} has no {os.path.basename(path)}; it was saved without a target "
                "network (or by another number of processes)"
            )
        from safetensors.torch import load_file

        self.load_state_dict(load_file(path), f"checkpoint {folder}", policy)

    @contextlib.contextmanager
    def policy_only_saved(self, policy: nn.Module) -> Iterator[None]:
        """While the policy is saved as a model (not a checkpoint): leave the target out of it."""
        yield


class NoTarget(TargetNetwork):
    """No target network: no update, no values, nothing saved."""

    def __bool__(self) -> bool:
        return False

    def prepare(self, prepare, policy, sharded):
        pass

    def update(self, policy, alpha):
        pass

    def values(self, policy, inputs, tau, with_log_pi=False):
        return (None, None) if with_log_pi else None

    def state_dict(self, policy=None):
        return {}

    def file(self, folder, process_index=0, is_main=True):
        return None

    def load(self, folder, policy=None, process_index=0):
        pass


class CopyTarget(TargetNetwork):
    """A frozen copy of the policy; ``names`` are the weights it mirrors (default: set by :meth:`prepare`
    from the policy's trainable parameters)."""

    def __init__(self, model: nn.Module, names: list[str] | None = None):
        self.model = model
        self.names = list(names) if names is not None else []

    @property
    def module(self) -> nn.Module:
        """The copy without the engine's wrapper."""
        return getattr(self.model, "module", self.model)

    def param_names(self):
        return self.names

    def parameters_of(self, policy=None):
        return dict(self.module.named_parameters())

    def network(self, policy):
        return contextlib.nullcontext(self.model)

    def prepare(self, prepare, policy, sharded):
        self.model = prepare(self.model, target=True)
        self.names = trainable_names(policy)
        self.sharded = sharded

    def init_from_policy(self, policy, device):
        # A sharded target starts as an exact copy of the sharded policy, made shard by shard: ranks
        # that loaded no weights (e.g. FSDP's cpu_ram_efficient_loading) got theirs by broadcast only
        # into the policy. A resumed run keeps the target it loaded.
        if not self.sharded or self.loaded:
            return
        target = self.module
        if any(p.is_meta for p in target.parameters()):
            target.to_empty(device=device)
        polyak_update(policy, target, 1.0, self.names)
        _copy_buffers(policy, target)

    def update(self, policy, alpha):
        polyak_update(policy, self.module, alpha, self.names)


class AdapterTarget(TargetNetwork):
    """The adapter ``target`` of a PEFT policy; ``pairs`` are (policy adapter, target adapter) parameter
    names. Only the adapter weights move; for its forward the target adapter is made active (eval
    mode) and the policy adapter comes back after."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs

    def param_names(self):
        return [d for _, d in self.pairs]

    def parameters_of(self, policy):
        return dict(policy.named_parameters())

    def network(self, policy):
        return adapter_active(policy, TARGET_ADAPTER)

    def update(self, policy, alpha):
        polyak_update(policy, policy, alpha, pairs=self.pairs)

    @contextlib.contextmanager
    def policy_only_saved(self, policy):
        # PEFT would add the target as a ``target/`` adapter folder, which is not what a user loads;
        # checkpoints keep the target in target_model.safetensors (resume reads it)
        policy.save_pretrained = functools.partial(policy.save_pretrained, selected_adapters=[policy.active_adapter])
        try:
            yield
        finally:
            del policy.save_pretrained  # the class's method again


# ----------------------------------------------------------------------------- callback


class TargetNetworkCallback(TrainerCallback):
    """Updates the target network after every ``target_model_sync_steps`` optimizer steps (not after a
    step that ``nan_policy: skip`` dropped), through ``trainer.update_target_model``."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        t.target.init_from_policy(t.accelerator.unwrap_model(t.model), t.accelerator.device)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.nonfinite.step_skipped:  # nan_policy skip: the step changed nothing
            return
        if state.global_step % args.target_model_sync_steps == 0:
            self.trainer.update_target_model()
