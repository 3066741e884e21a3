"""Guards of a training run: non-finite numbers and no half-written output (checkpoints: :mod:`sqlm.checkpoint`).

* **Non-finite numbers.** :func:`nonfinite_reward_source` and :func:`nonfinite_value_source` name
  where a NaN/inf came from (a reward function, a dataset column, the policy's values, the reference,
  the target network, the value head). :class:`NonFiniteError` is the one-line error of
  ``nan_policy: stop``; it names the step and the source.
* **No half-written output.** :class:`OutputDirGuard` removes, when a run fails, whatever that run
  added to ``output_dir`` except complete checkpoints (and the folder itself if the run created it
  and nothing is left).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import checkpoint_step, is_complete
from .columns import TOKEN_REWARD_COLUMNS
from .errors import SqlmError


NAN_POLICIES = ("stop", "skip")


# ----------------------------------------------------------------------------- non-finite numbers


class NonFiniteError(SqlmError):
    """NaN or inf in a reward, a value or the loss (``nan_policy: stop``)."""

    def __init__(self, source: str, step: int | None = None):
        self.source, self.step = source, step
        where = f" at step {step}" if step is not None else ""
        super().__init__(
            f"non-finite {source}{where}; no update or checkpoint was written for it (the last complete "
            "checkpoint is intact; nan_policy: skip skips such batches instead)"
        )

    def __reduce__(self):  # picklable across processes
        return (type(self), (self.source, self.step))


def _finite(x: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask.to(torch.bool)
    return not bool(bad.any())


def nonfinite_reward_source(
    trajectories: Iterable[Any], per_source: Mapping[str, list[float]], rewards: Iterable[torch.Tensor]
) -> str | None:
    """``"reward from 'keyword'"`` (a reward function), ``"reward in dataset column 'token_rewards'"``,
    ... or None when every reward is finite. ``per_source`` holds each source's summed reward per
    trajectory (a sum is non-finite iff one of its terms is)."""
    rewards = list(rewards)
    if all(_finite(r) for r in rewards):
        return None
    trajectories = list(trajectories)
    for t in trajectories:
        if t.token_rewards is not None and not all(math.isfinite(float(v)) for v in t.token_rewards):
            if t.source == "replay":
                return "reward of a replayed sample"
            col = TOKEN_REWARD_COLUMNS.get(t.source, TOKEN_REWARD_COLUMNS["completion"])
            return f"reward in dataset column '{col}'"
        if t.sequence_reward is not None and not math.isfinite(float(t.sequence_reward)):
            return "sequence reward in the dataset (column 'reward', 'label' or a score column)"
    for name, sums in per_source.items():
        if name != "data" and not all(math.isfinite(s) for s in sums):
            return f"reward from '{name}'"
    return "reward after reward_scale"


def nonfinite_value_source(named: Mapping[str, torch.Tensor | None], mask: torch.Tensor | None) -> str | None:
    """The first of ``named`` (e.g. ``{"value V(s) of the policy": v, ...}``) with a NaN/inf on a
    path step (``mask``), or None."""
    for name, x in named.items():
        if x is not None and not _finite(x.detach(), mask if mask is not None and mask.shape == x.shape else None):
            return name
    return None


# ----------------------------------------------------------------------------- output folder


class OutputDirGuard:
    """On failure, remove what this run added to ``output_dir`` except complete checkpoints.

    Use as a context manager around everything that writes into ``output_dir``; ``enabled=False``
    (e.g. on non-main processes) makes it do nothing."""

    def __init__(self, output_dir: str | os.PathLike | None, enabled: bool = True):
        self.dir = Path(output_dir) if output_dir else None
        self.enabled = enabled and self.dir is not None
        self.existed = bool(self.dir is not None and self.dir.exists())
        self.before = set(os.listdir(self.dir)) if self.existed and self.dir.is_dir() else set()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self.enabled:
            self.cleanup()
        return False

    def cleanup(self) -> None:
        if not self.dir.is_dir():
            return
        for name in sorted(set(os.listdir(self.dir)) - self.before):
            p = self.dir / name
            if p.is_dir() and checkpoint_step(p) is not None and is_complete(p):
                continue  # the last good state: keep it for resuming
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.unlink()
                except OSError:
                    pass
        if not self.existed:
            try:
                self.dir.rmdir()  # only when empty
            except OSError:
                pass
