"""sqlm train with a model-based rewarder on offline data: the dense rewards are computed once,
stored as dataset columns, reused on rerun, and reach the loss exactly once (not also live)."""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from sqlm.config import SoftQConfig
from sqlm.rewards import build_rewarder
from sqlm.rewards import cache as reward_cache
from sqlm.rewards.cache import COLUMNS
from sqlm.rewards.toy import toy_preference_dataset, toy_reward_model, toy_tokenizer
from sqlm.tiny import tiny_model_for_tokenizer
from sqlm.trainer import SoftQTrainer


@pytest.fixture(scope="module")
def setup():
    tok = toy_tokenizer(vocab_size=300)
    rm = toy_reward_model(tok, seed=3).eval()
    return tok, rm, toy_preference_dataset(6, seed=1)


def make_trainer(tmp_path, tok, rm, data, mode="offline", **kw):
    args = SoftQConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        max_length=64,
        num_generations=1,
        mode=mode,
        reward_cache_dir=str(tmp_path / "cache"),
        **{"max_completion_length": 32, **kw},
    )
    model = tiny_model_for_tokenizer(
        tok, seed=0, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    abc = build_rewarder("abc", reward_model=rm, tokenizer=tok, beta=0.8, policy_tokenizer=tok)
    return SoftQTrainer(model, args, train_dataset=data, processing_class=tok, reward_funcs=[abc])


def test_dense_rewards_cached_as_columns_and_reused(setup, tmp_path, monkeypatch):
    tok, rm, data = setup
    trainer = make_trainer(tmp_path, tok, rm, data)
    assert set(COLUMNS) <= set(trainer.train_dataset.column_names)

    # a rerun with the same data, reward model and settings computes nothing
    def fail(*a, **k):
        raise AssertionError("dense rewards recomputed although cached")

    monkeypatch.setattr(reward_cache, "compute_token_rewards", fail)
    again = make_trainer(tmp_path, tok, rm, data)
    assert again.train_dataset["chosen_token_rewards"] == trainer.train_dataset["chosen_token_rewards"]


def test_cached_rewards_reach_the_loss_once(setup, tmp_path):
    tok, rm, data = setup
    trainer = make_trainer(tmp_path, tok, rm, data)
    rows = [dict(r) for r in trainer.train_dataset.select(range(2))]
    batch = trainer.build_batch(rows)
    # rows give chosen, rejected, chosen, rejected; each carries exactly its cached column
    expected = [
        rows[0]["chosen_token_rewards"],
        rows[0]["rejected_token_rewards"],
        rows[1]["chosen_token_rewards"],
        rows[1]["rejected_token_rewards"],
    ]
    for i, exp in enumerate(expected):
        got = batch["token_rewards"][i][batch["completion_mask"][i].bool()]
        assert torch.allclose(got, torch.tensor(exp), atol=1e-6)
    # abc puts (1 - beta) * R on the last token, so the rewards are dense and not all zero
    assert (batch["token_rewards"] != 0).sum() > 4


def test_online_samples_still_scored_live(setup, tmp_path):
    tok, rm, data = setup
    trainer = make_trainer(tmp_path, tok, rm, data, mode="mixed", mix_ratio=0.5, max_completion_length=4)
    rows = [dict(r) for r in trainer.train_dataset.select(range(2))]
    batch = trainer.build_batch(rows)
    assert "rewards/abc/mean" in batch["sqlm_metrics"]  # abc ran live on the online sample
