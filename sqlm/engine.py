"""The engine a training launch runs under (DeepSpeed, FSDP, or plain DDP / one process), as the
trainer's frozen models need it: the check that the engine asked for is the one running, and the
reference / target models prepared for it."""

from __future__ import annotations

from torch import nn

from .errors import SqlmError


def check_engine_enabled(trainer) -> None:
    """The engine the launch asks for (accelerate config, ``deepspeed`` / ``fsdp`` keys) is the one that
    runs: accelerate turns FSDP on only for accelerator devices (CUDA, XPU, ...), and otherwise trains
    unsharded without a word (e.g. on CPU processes, or without a launcher)."""
    engine = trainer.args.sharding_engine()
    if engine is None:
        return
    kind, level = engine
    if trainer.is_deepspeed_enabled if kind == "deepspeed" else trainer.is_fsdp_enabled:
        return
    name = f"DeepSpeed ZeRO-{level}" if kind == "deepspeed" else f"FSDP{level}"
    why = "" if kind == "deepspeed" else "; accelerate enables FSDP only on GPUs or other accelerators"
    raise SqlmError(
        f"the launch asks for {name}, but accelerate runs it unsharded (distributed type "
        f"{trainer.accelerator.distributed_type.value}{why}): launch with recipes/accelerate/ddp.yaml instead"
    )


def prepare_frozen(trainer, model: nn.Module, target: bool = False) -> nn.Module:
    """A frozen model (the reference, or the target network's copy when ``target``) prepared for the
    trainer's engine, in evaluation mode."""
    # the target network is sharded exactly as the reference (TRL's prepare_deepspeed / prepare_fsdp),
    # so its pieces line up with the policy's for the shard-by-shard Polyak update
    if trainer.is_deepspeed_enabled:
        from trl.models import prepare_deepspeed

        return prepare_deepspeed(model, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        if target and getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise SqlmError("a target network needs FSDP2 (fsdp_version: 2 in the accelerate config)")
        from trl.models import prepare_fsdp

        return prepare_fsdp(model, trainer.accelerator)
    return trainer.accelerator.prepare_model(model, evaluation_mode=True)


def engine_shards(trainer) -> bool:
    """The engine shards the models (ZeRO-3 or FSDP): each process holds only its own pieces."""
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    return zero3 or trainer.is_fsdp_enabled
