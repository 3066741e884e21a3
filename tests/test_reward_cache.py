"""Dense reward columns for offline preference data: cached values equal live ones, and any change
of data, reward model or setting computes new ones."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from datasets import Dataset

from sqlm.rewards import add_token_rewards, build_rewarder
from sqlm.rewards.cache import COLUMNS, make_batch, tokenize_preference_example
from sqlm.rewards.toy import toy_preference_rows, toy_reward_model, toy_tokenizer


class Counting:
    """Wraps a rewarder and counts the batches it scores."""

    def __init__(self, rewarder):
        self.rewarder, self.calls = rewarder, 0

    def settings(self):
        return self.rewarder.settings()

    def __call__(self, batch):
        self.calls += 1
        return self.rewarder(batch)


@pytest.fixture(scope="module")
def setup():
    tok = toy_tokenizer(vocab_size=300)
    rm = toy_reward_model(tok, seed=4).eval()
    data = Dataset.from_list(toy_preference_rows(10, seed=5))
    return tok, rm, data


def live(data, rewarder, tok, side):
    """The rewards a trainer would compute on the fly for one side of every pair."""
    toks = [tokenize_preference_example(r, tok) for r in data]
    batch = make_batch(
        [t["prompt_ids"] for t in toks],
        [t[f"{side}_ids"] for t in toks],
        tok.pad_token_id,
        prompts=data["prompt"],
        completions=data[side],
    )
    r = rewarder(batch)
    return [r[i, : len(t[f"{side}_ids"])].tolist() for i, t in enumerate(toks)]


def test_cached_equals_live_and_is_reused(setup, tmp_path):
    tok, rm, data = setup
    counting = Counting(build_rewarder("abc", reward_model=rm, tokenizer=tok, beta=0.8))
    first = add_token_rewards(data, counting, tok, cache_dir=tmp_path, batch_size=4)
    calls = counting.calls
    assert calls > 0 and set(COLUMNS) <= set(first.column_names)
    for side, col in (("chosen", COLUMNS[0]), ("rejected", COLUMNS[1])):
        expected = live(data, counting.rewarder, tok, side)
        for got, exp in zip(first[col], expected):
            assert len(got) == len(exp)
            assert torch.allclose(torch.tensor(got), torch.tensor(exp), atol=1e-6)
    # a rerun (even on a dataset that already carries the columns) loads them
    again = add_token_rewards(first, counting, tok, cache_dir=tmp_path, batch_size=4)
    assert counting.calls == calls
    assert again[COLUMNS[0]] == first[COLUMNS[0]] and again[COLUMNS[1]] == first[COLUMNS[1]]
    # the lengths are the policy tokenizer's completion lengths (what the trainer checks)
    for row, rewards in zip(data, again[COLUMNS[1]]):
        assert len(rewards) == len(tokenize_preference_example(row, tok)["rejected_ids"])


def test_changed_setting_model_or_data_invalidates(setup, tmp_path):
    tok, rm, data = setup
    base = add_token_rewards(
        data, build_rewarder("abc", reward_model=rm, tokenizer=tok, beta=0.8), tok, cache_dir=tmp_path
    )
    n_entries = len(list(tmp_path.iterdir()))

    other_beta = Counting(build_rewarder("abc", reward_model=rm, tokenizer=tok, beta=0.5))
    changed = add_token_rewards(data, other_beta, tok, cache_dir=tmp_path)
    assert other_beta.calls > 0 and changed[COLUMNS[0]] != base[COLUMNS[0]]
    assert len(list(tmp_path.iterdir())) == n_entries + 1

    rm2 = toy_reward_model(tok, seed=4).eval()
    with torch.no_grad():
        rm2.score.weight.mul_(2.0)  # same architecture and config, other weights
    other_model = Counting(build_rewarder("abc", reward_model=rm2, tokenizer=tok, beta=0.8))
    scaled = add_token_rewards(data, other_model, tok, cache_dir=tmp_path)
    assert other_model.calls > 0
    assert torch.allclose(torch.tensor(scaled[COLUMNS[0]][0]), 2 * torch.tensor(base[COLUMNS[0]][0]), atol=1e-5)

    same = Counting(build_rewarder("abc", reward_model=rm, tokenizer=tok, beta=0.8))
    fewer = add_token_rewards(data.select(range(5)), same, tok, cache_dir=tmp_path)
    assert same.calls > 0 and fewer[COLUMNS[0]] == base[COLUMNS[0]][:5]

    other_kind = Counting(build_rewarder("prefix", reward_model=rm, tokenizer=tok))
    add_token_rewards(data, other_kind, tok, cache_dir=tmp_path)
    assert other_kind.calls > 0
    assert len(list(tmp_path.iterdir())) == n_entries + 4


def test_prompt_completion_data_gets_token_rewards(setup, tmp_path):
    tok, rm, data = setup
    pc = Dataset.from_dict({"prompt": data["prompt"], "completion": data["chosen"]})
    rewarder = build_rewarder("prefix", reward_model=rm, tokenizer=tok)
    out = add_token_rewards(pc, rewarder, tok, cache_dir=tmp_path)
    pref = add_token_rewards(data, rewarder, tok)
    assert out.column_names == ["prompt", "completion", "token_rewards"]
    for got, exp in zip(out["token_rewards"], pref[COLUMNS[0]]):  # the chosen side, tokenized alike
        assert torch.allclose(torch.tensor(got), torch.tensor(exp), atol=1e-6)
