"""sqlm: causal language models trained as soft Q-learners.

A causal LM's logits are read as Q-values: ``Q = tau * logits``,
``V = tau * logsumexp(logits)`` and ``pi = softmax(logits)``.

The public API, as TRL's: ``from sqlm import SoftQConfig, SoftQTrainer``, the losses of
:mod:`sqlm.losses`, :func:`sqlm.rewards.build_rewarder` and the exact oracle's ``TokenMDP`` /
``solve``. Each is imported on first use, so ``import sqlm`` (and ``sqlm --help``) loads neither
torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


__version__ = "0.1.0"

_LOSS_NAMES = (
    "LOSSES",
    "pcl_loss",
    "unified_pcl_loss",
    "soft_q_loss",
    "advantage_pcl_loss",
    "multistep_pcl_loss",
    "advantage_pcl_mix_loss",
    "multistep_pcl_mix_loss",
    "guo_pcl_mix_loss",
)
_LAZY = {
    "SoftQConfig": "sqlm.config",
    "SoftQTrainer": "sqlm.trainer",
    "build_rewarder": "sqlm.rewards",
    "TokenMDP": "sqlm.oracle",
    "solve": "sqlm.oracle",
    **dict.fromkeys(_LOSS_NAMES, "sqlm.losses"),
}
__all__ = [
    "LOSSES",
    "SoftQConfig",
    "SoftQTrainer",
    "TokenMDP",
    "__version__",
    "advantage_pcl_loss",
    "advantage_pcl_mix_loss",
    "build_rewarder",
    "guo_pcl_mix_loss",
    "multistep_pcl_loss",
    "multistep_pcl_mix_loss",
    "pcl_loss",
    "soft_q_loss",
    "solve",
    "unified_pcl_loss",
]

if TYPE_CHECKING:
    from .config import SoftQConfig
    from .losses import (
        LOSSES,
        advantage_pcl_loss,
        advantage_pcl_mix_loss,
        guo_pcl_mix_loss,
        multistep_pcl_loss,
        multistep_pcl_mix_loss,
        pcl_loss,
        soft_q_loss,
        unified_pcl_loss,
    )
    from .oracle import TokenMDP, solve
    from .rewards import build_rewarder
    from .trainer import SoftQTrainer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sqlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
