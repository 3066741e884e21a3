"""Shared test setup: offline, one thread, and a few tiny helpers (keep this file small)."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator, so each test draws the same numbers whatever ran before it."""
    return torch.Generator().manual_seed(1234)


def contiguous_mask(lengths, width, starts=None) -> torch.Tensor:
    """``[B, width]`` float mask with one run of ``lengths[b]`` ones per row from ``starts[b]``."""
    starts = [0] * len(lengths) if starts is None else starts
    m = torch.zeros(len(lengths), width)
    for b, (s, n) in enumerate(zip(starts, lengths)):
        m[b, s : s + n] = 1.0
    return m
