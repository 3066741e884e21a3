"""The NaN guard of an optimizer step (``nan_policy``): what was non-finite in the step, and the
callback that acts on it before the optimizer sees the gradients (:mod:`sqlm.guards` names the
sources and holds the error)."""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from .guards import NonFiniteError, nonfinite_value_source


logger = logging.getLogger(__name__)


class NonFiniteCallback(TrainerCallback):
    """Acts on a NaN/inf found while building or computing this optimizer step (rewards, values,
    loss), before the optimizer sees the gradients: ``nan_policy: stop`` raises
    :class:`sqlm.guards.NonFiniteError` (no update, no checkpoint of the bad state); ``skip`` drops
    the gradients (``grad = None``: the optimizer leaves every parameter and its moments alone) and
    counts the step. The decision is shared by every process.

    It holds the step's state: the trainer calls :meth:`begin_step` when a step's batches are built
    and :meth:`found` with what was non-finite; the target network's callback reads
    ``step_skipped``."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.source: str | None = None  # what was non-finite in this optimizer step (the first found)
        self.step_skipped = False
        self.skipped_steps = 0

    def begin_step(self) -> None:
        self.source, self.step_skipped = None, False

    def found(self, source: str) -> None:
        """Record a non-finite ``source`` of this step (only the first one is named)."""
        if self.source is None:
            self.source = source

    def check_loss(self, loss: torch.Tensor, mask: torch.Tensor, inputs: dict[str, torch.Tensor | None]) -> None:
        """A non-finite ``loss``: record the first of its ``inputs`` (by name, on the path ``mask``) that
        holds a NaN/inf, else the loss itself (unless this step already has a source)."""
        if self.source is None and not bool(torch.isfinite(loss.detach())):
            self.found(nonfinite_value_source(inputs, mask) or "loss")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        bad = torch.tensor([1.0 if self.source else 0.0], device=args.device)
        if args.world_size > 1:
            bad = t.accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            return
        step = state.global_step + 1
        source = self.source or "value or loss on another process"
        if args.nan_policy == "stop":
            raise NonFiniteError(source, step)
        self.step_skipped = True
        self.skipped_steps += 1
        for p in t.model.parameters():
            p.grad = None
        logger.warning("skipped step %d: non-finite %s (%d step(s) skipped so far)", step, source, self.skipped_steps)
