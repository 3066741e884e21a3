"""Rows held out of the training split as the evaluation set (``dataset_test_size``), and the checks
of the hold-out keys that :class:`sqlm.config.SoftQConfig` and :func:`sqlm.data.load_train_eval` share."""

from __future__ import annotations

import math

from ..errors import SqlmError


HOLD_OUT_SEED = 0
"""Seed of :func:`hold_out`: the same rows are held out on every run, whatever the training ``seed``."""


def check_hold_out(size: float | None, test_split: str | None = None) -> None:
    """The hold-out keys of a recipe: ``dataset_test_size`` (None, a fraction in (0, 1) or a whole number
    of rows >= 1) and ``dataset_test_split``, which cannot both be set (there is one evaluation set)."""
    if size is None:
        return
    if not (math.isfinite(size) and size > 0 and (size < 1 or size == int(size))):
        raise SqlmError(
            f"key 'dataset_test_size' must be a fraction in (0, 1) or a whole number of rows >= 1, got {size!r}"
        )
    if test_split:
        raise SqlmError("keys 'dataset_test_split' and 'dataset_test_size' cannot both be set: choose one eval set")


def hold_out_indices(n_rows: int, size: float, seed: int = HOLD_OUT_SEED) -> tuple[list[int], list[int]]:
    """``(train, test)`` row indices, each in file order: ``size`` rows (``>= 1``) or that fraction of
    the rows (``0 < size < 1``, rounded, at least one) drawn at random with ``seed``."""
    import random

    check_hold_out(size)
    n_test = int(size) if size >= 1 else max(1, round(size * n_rows))
    if not 1 <= n_test < n_rows:
        raise SqlmError(
            f"key 'dataset_test_size' holds out {n_test} of {n_rows} rows; it must leave at least one row on each side"
        )
    test = set(random.Random(seed).sample(range(n_rows), n_test))
    return [i for i in range(n_rows) if i not in test], sorted(test)


def hold_out(dataset, size: float, seed: int = HOLD_OUT_SEED):
    """``(train, test)``: ``dataset`` split by :func:`hold_out_indices` (rows keep their order)."""
    train_idx, test_idx = hold_out_indices(len(dataset), size, seed)
    return dataset.select(train_idx), dataset.select(test_idx)
