"""The sentiment gold task's base LM: one seed gives bit-identical weights whatever the caller's torch
threads (deterministic pretraining), another seed other weights; cached by its settings."""

from __future__ import annotations

import json

import pytest
import torch

from sqlm.evaluation import gold
from sqlm.evaluation.gold import GoldTaskConfig, weights_digest


# the default width: at this size one and two threads give different sums unless pretraining pins them
TINY = dict(corpus_sentences=150, heldout_sentences=30, vocab_size=300, hidden_size=128, num_hidden_layers=2,
            num_attention_heads=4, lm_steps=3, lm_batch_size=48)  # fmt: skip


def test_pretraining_is_bit_identical_for_a_seed_and_differs_across_seeds():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # pretraining runs on one thread whatever the caller set
        m1, t1, h1, l1 = gold.pretrain_base(GoldTaskConfig(seed=3, **TINY))
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(1)
        m2, t2, h2, l2 = gold.pretrain_base(GoldTaskConfig(seed=3, **TINY))
    finally:
        torch.set_num_threads(old)
    m3, _, _, _ = gold.pretrain_base(GoldTaskConfig(seed=4, **TINY))
    assert l1 == l2 and h1 == h2 and t1.get_vocab() == t2.get_vocab()
    assert weights_digest(m1) == weights_digest(m2)
    assert weights_digest(m1) != weights_digest(m3)


def test_base_model_is_cached_by_its_settings(tmp_path, monkeypatch):
    cfg = GoldTaskConfig(**TINY)
    path = gold.build_base_model(cfg, tmp_path, progress=False)
    meta = json.loads((path / "base_lm.json").read_text())
    assert meta["settings"] == cfg.base_key() and meta["settings"]["pretraining"] == "deterministic"
    model, _ = gold.load_base(path)
    assert weights_digest(model) == meta["weights_sha256"]
    monkeypatch.setattr(gold, "pretrain_base", lambda *a, **k: pytest.fail("pretrained again"))
    assert gold.build_base_model(GoldTaskConfig(**TINY), tmp_path) == path
    assert gold.base_model_dir(GoldTaskConfig(**{**TINY, "seed": 1}), tmp_path) != path
