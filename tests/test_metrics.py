"""The logged metrics: exactly the README's table in every mode, with TRL's meanings (DPO's implicit
rewards on pairs, GRPO's rewards and completion lengths), checked by hand on a tiny batch."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from sqlm.config import SoftQConfig
from sqlm.data import Trajectory
from sqlm.tiny import tiny_model_for_tokenizer, train_tokenizer
from sqlm.train_metrics import batch_metrics, kl_k3, policy_metrics
from sqlm.trainer import SoftQTrainer


os.environ.setdefault("HF_HUB_OFFLINE", "1")
README = Path(__file__).resolve().parent.parent / "README.md"
PROMPTS = ["Rate the film:", "Rate the book:", "Rate the song:", "Rate the game:"]
GOOD, BAD = " good and fun.", " bad and dull."
MODES = ("offline", "online", "mixed")


def documented_metrics() -> dict[str, set[str]]:
    """``{key: modes}`` from the README's table of logged metrics."""
    text = README.read_text()
    table = text[text.index("### Logged metrics") :]
    rows = {}
    for line in table.splitlines()[1:]:
        if line.startswith("#"):
            break
        m = re.match(r"\| `([^`]+)` \|", line)
        if m:
            cell = line.rstrip().rstrip("|").rsplit("|", 1)[1]
            rows[m.group(1)] = {w for w in re.findall(r"[a-z]+", cell) if w in MODES}
    return rows


def good_reward(prompts, completions, **kwargs):
    return [1.0 if "good" in c else -1.0 for c in completions]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [p + GOOD for p in PROMPTS] + [p + BAD for p in PROMPTS]
    return train_tokenizer(texts * 4, vocab_size=300)


def test_readme_table_is_parsed():
    rows = documented_metrics()
    assert {"loss", "rewards/chosen", "rewards/accuracies", "kl_ref", "completions/clipped_ratio"} <= set(rows)
    assert rows["kl_ref"] == {"online", "mixed"} and rows["loss"] == set(MODES)
    assert rows["nonfinite/skipped_steps"] == set()


@pytest.mark.parametrize("mode", MODES)
def test_logged_keys_are_the_documented_keys(tmp_path, tokenizer, mode):
    data = Dataset.from_list([{"prompt": PROMPTS[i % 4], "chosen": GOOD, "rejected": BAD} for i in range(8)])
    args = SoftQConfig(
        output_dir=str(tmp_path),
        mode=mode,
        per_device_train_batch_size=2,
        max_steps=4,
        logging_steps=1,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        max_length=32,
        max_completion_length=6,
        replay_buffer_size=0 if mode == "offline" else 8,
        dataloader_num_workers=0,
    )
    model = tiny_model_for_tokenizer(tokenizer, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1)  # fmt: skip
    trainer = SoftQTrainer(model, args, train_dataset=data, processing_class=tokenizer, reward_funcs=[good_reward])
    trainer.train()
    # log_history adds the step number to each log
    logged = {k for entry in trainer.state.log_history if "loss" in entry for k in entry} - {"step"}
    expected = {
        k.replace("<name>", "good_reward").replace("<generator>", "hf")
        for k, modes in documented_metrics().items()
        if mode in modes
    }
    assert logged == expected, (sorted(logged - expected), sorted(expected - logged))


def test_pair_metrics_by_hand():
    """Two pairs, tau = 0.5: DPO's implicit rewards tau * sum_t log pi/pi_ref on the path mask."""
    tau = 0.5
    log_pi = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -1.0, -9.0], [-0.5, -0.5, -0.5], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -2.0, -1.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]])  # the last step of rows 0, 1 is padding
    pairs = torch.tensor([[0, 1], [2, 3]])  # (chosen, rejected)
    on_policy = torch.tensor([False, False, True, True])
    out = policy_metrics(log_pi, ref, mask, tau, pairs, on_policy)
    # sums of log pi/pi_ref: row 0: 1 + 0 = 1; row 1: -2 + 0 = -2; row 2: 1.5; row 3: -1.5
    chosen, rejected = [0.5 * 1, 0.5 * 1.5], [0.5 * -2, 0.5 * -1.5]
    assert out["rewards/chosen"] == pytest.approx(sum(chosen) / 2)
    assert out["rewards/rejected"] == pytest.approx(sum(rejected) / 2)
    assert out["rewards/margins"] == pytest.approx((1.5 + 1.5) / 2)
    assert out["rewards/accuracies"] == 1.0
    assert out["logps/chosen"] == pytest.approx((-3.0 + -1.5) / 2)
    assert out["logps/rejected"] == pytest.approx((-4.0 + -3.0) / 2)
    assert out["log_ratio_ref"] == pytest.approx((1 - 2 + 1.5 - 1.5) / 4)
    # kl_ref on the on-policy rows 2, 3: k3 = exp(r) - 1 - r per token, r = log pi_ref - log pi = -0.5, 0.5
    k3 = (3 * (math.exp(-0.5) - 1 + 0.5) + 3 * (math.exp(0.5) - 1 - 0.5)) / 2
    assert out["kl_ref"] == pytest.approx(k3)
    # one pair where the rejected path gains more: accuracy 1/2
    swapped = policy_metrics(log_pi, ref, mask, tau, torch.tensor([[0, 1], [3, 2]]))
    assert swapped["rewards/accuracies"] == 0.5 and "kl_ref" not in swapped
    # no reference: only the log-probs
    assert set(policy_metrics(log_pi, None, mask, tau, pairs)) == {"logps/chosen", "logps/rejected"}


def test_kl_ref_is_k3_and_never_negative(gen):
    """On samples the mean of sum_t log pi/pi_ref can be negative (a real model logged -0.013): kl_ref
    is TRL GRPO's k3, exp(r) - 1 - r with r = log pi_ref - log pi, >= 0 per token, summed on the path."""
    ref = -torch.rand(8, 5, generator=gen)
    log_pi = ref - 0.1 - torch.rand(8, 5, generator=gen)  # pi below pi_ref on every sampled token
    mask = torch.ones(8, 5)
    mask[:, 3:] = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 0.0]] * 4)  # paths of 4 and 3 tokens, then padding
    log_pi = log_pi.masked_fill(mask == 0, -30.0)  # padding must not count
    on_policy = torch.ones(8, dtype=torch.bool)
    out = policy_metrics(log_pi, ref, mask, 0.1, on_policy=on_policy)
    assert out["log_ratio_ref"] < 0 < out["kl_ref"]  # the naive mean is negative, k3 is not
    r = (ref - log_pi) * mask
    assert out["kl_ref"] == pytest.approx(float((torch.exp(r) - 1 - r).sum(-1).mean()), rel=1e-5)
    assert float(kl_k3(log_pi, log_pi, mask).abs().max()) == 0  # pi = pi_ref: 0
    # only the on-policy rows count
    part = policy_metrics(log_pi, ref, mask, 0.1, on_policy=torch.arange(8) < 2)
    assert part["kl_ref"] == pytest.approx(float(kl_k3(log_pi[:2], ref[:2], mask[:2]).mean()), rel=1e-6)


def test_batch_metrics_by_hand():
    eos = 9
    trajs = [
        Trajectory(prompt_ids=[1], completion_ids=[4, 5, eos], source="chosen"),
        Trajectory(prompt_ids=[1], completion_ids=[6, 7], source="rejected"),  # no EOS: clipped
        Trajectory(prompt_ids=[2], completion_ids=[4, eos], source="online"),
    ]
    rewards = [torch.tensor([0.0, 0.0, 2.0]), torch.tensor([0.0, -1.0]), torch.tensor([0.5, 0.5])]
    per_source = {"f": [2.0, -1.0, 1.0]}
    out = batch_metrics(trajs, rewards, per_source, torch.tensor([3.0, 2.0, 2.0]), [eos], online=True)
    assert out["reward"] == pytest.approx(2 / 3)
    assert out["reward_std"] == pytest.approx(torch.tensor([2.0, -1.0, 1.0]).std().item())
    assert out["rewards/f/mean"] == pytest.approx(2 / 3)
    assert (
        out["task_reward/chosen"] == 2.0 and out["task_reward/rejected"] == -1.0 and out["task_reward/online"] == 1.0
    )
    assert out["completions/mean_length"] == pytest.approx(7 / 3)
    assert out["completions/min_length"] == 2 and out["completions/max_length"] == 3
    assert out["completions/clipped_ratio"] == pytest.approx(1 / 3)
    assert out["completions/online_fraction"] == pytest.approx(1 / 3)
