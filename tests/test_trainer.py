"""SoftQTrainer on tiny models: every mode trains, LoRA, gradient accumulation, resume."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from datasets import Dataset

from sqlm.config import SoftQConfig
from sqlm.forward import model_log_pi
from sqlm.tiny import tiny_model_for_tokenizer, train_tokenizer
from sqlm.trainer import SoftQTrainer


os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["Rate the film:", "Rate the book:", "Rate the song:", "Rate the game:"]
GOOD, BAD = " good and fun.", " bad and dull."


@pytest.fixture(scope="module")
def tokenizer():
    texts = [p + GOOD for p in PROMPTS] + [p + BAD for p in PROMPTS]
    return train_tokenizer(texts * 4, vocab_size=300)


def make_model(tokenizer, seed=0):
    return tiny_model_for_tokenizer(
        tokenizer, seed=seed, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )


def pref_data(n=8):
    return Dataset.from_list([{"prompt": PROMPTS[i % 4], "chosen": GOOD, "rejected": BAD} for i in range(n)])


def good_reward(prompts, completions, **kwargs):
    return [1.0 if "good" in c else -1.0 for c in completions]


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        max_length=32,
        max_completion_length=6,
        num_generations=2,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return SoftQConfig(**base)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "mode,loss_type",
    [("offline", "unified_pcl"), ("online", "soft_q"), ("mixed", "pcl")],
)
def test_every_mode_trains_every_parameter(tmp_path, tokenizer, mode, loss_type):
    model = make_model(tokenizer)
    args = config(tmp_path, mode=mode, loss_type=loss_type, replay_buffer_size=8 if mode == "online" else 0)
    trainer = SoftQTrainer(
        model, args, train_dataset=pref_data(), processing_class=tokenizer, reward_funcs=[good_reward]
    )
    before = snapshot(trainer.model)
    if loss_type == "pcl":
        assert any("sqlm_value_head" in n for n in before)
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    after = snapshot(trainer.model)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{mode}: parameters did not change: {unchanged}"
    logged = {k for entry in trainer.state.log_history for k in entry}
    for key in (
        "loss",
        "consistency",
        "v_start",
        "entropy",
        "log_ratio_ref",
        "rewards/good_reward/mean",
        "completions/mean_length",
    ):
        assert key in logged, (mode, key, logged)
    if mode != "offline":
        assert "completions/online_fraction" in logged and "kl_ref" in logged
    else:
        assert "rewards/margins" in logged and "kl_ref" not in logged
    if mode == "online":
        assert len(trainer.replay_buffer) > 0
        # the target network moved towards the policy but is not the policy
        tgt = dict(trainer.target_model.named_parameters())
        pol = dict(trainer.model.named_parameters())
        name = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(tgt[name], pol[name])


def test_lora_trains_adapter_only_and_reference_is_base(tmp_path, tokenizer):
    from peft import LoraConfig

    model = make_model(tokenizer)
    initial = copy.deepcopy(model)
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = SoftQTrainer(
        model,
        config(tmp_path, max_steps=3),
        train_dataset=pref_data(),
        processing_class=tokenizer,
        reward_funcs=[good_reward],
        peft_config=peft_config,
    )
    assert trainer.ref_model is None and trainer.reference.peft_base
    names_trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert names_trainable and all("lora_" in n for n in names_trainable)
    full_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(full_before[n], p)}
    assert changed == names_trainable

    batch = trainer._prepare_inputs(trainer.build_batch([dict(r) for r in trainer.train_dataset.select(range(2))]))
    ref = trainer.reference_log_pi(trainer.model, batch)
    expected = model_log_pi(initial, batch)
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)
    policy = model_log_pi(trainer.model, batch)
    assert not torch.allclose(policy, expected, atol=1e-4)  # the adapter changed the policy

    trainer.save_model(str(tmp_path / "adapter"))
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")


def _one_step_update(tmp_path, tokenizer, rows, batch, accum, reduction):
    model = make_model(tokenizer)
    before = snapshot(model)
    args = config(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        loss_type="unified_pcl",
        logging_steps=1,
        reduction=reduction,
    )
    trainer = SoftQTrainer(
        model, args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, reward_funcs=[good_reward]
    )
    trainer.train()
    after = snapshot(trainer.model)
    return {n: before[n] - after[n] for n in before}  # = lr * grad


@pytest.mark.parametrize("reduction", ["token", "sequence_mean"])
def test_grad_accumulation_matches_one_big_batch(tmp_path, tokenizer, reduction):
    # completions of different lengths, so a per-micro-batch mean would not match
    rows = [
        {"prompt": PROMPTS[0], "chosen": " good.", "rejected": BAD + BAD},
        {"prompt": PROMPTS[1], "chosen": GOOD + GOOD, "rejected": " bad."},
        {"prompt": PROMPTS[2], "chosen": GOOD, "rejected": " dull."},
        {"prompt": PROMPTS[3], "chosen": " fun fun fun fun.", "rejected": BAD},
    ]
    g_big = _one_step_update(tmp_path / "a", tokenizer, rows, batch=4, accum=1, reduction=reduction)
    g_acc = _one_step_update(tmp_path / "b", tokenizer, rows, batch=2, accum=2, reduction=reduction)
    assert any(g.abs().sum() > 0 for g in g_big.values())
    for n in g_big:
        torch.testing.assert_close(g_acc[n], g_big[n], rtol=1e-4, atol=1e-6)


def test_resume_restores_target_network_and_optimizer(tmp_path, tokenizer):
    kw = dict(
        loss_type="soft_q",
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        target_model_mixup_alpha=0.3,
        learning_rate=5e-3,
    )
    full = SoftQTrainer(
        make_model(tokenizer),
        config(tmp_path, **kw),
        train_dataset=pref_data(),
        processing_class=tokenizer,
        reward_funcs=[good_reward],
    )
    full.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "target_model.safetensors").exists()

    # same initial model (it is also the reference); the checkpoint supplies the rest
    resumed = SoftQTrainer(
        make_model(tokenizer),
        config(tmp_path, **{**kw, "output_dir": str(tmp_path / "r")}),
        train_dataset=pref_data(),
        processing_class=tokenizer,
        reward_funcs=[good_reward],
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"policy {n}")
    for (n, a), b in zip(full.target_model.named_parameters(), resumed.target_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"target {n}")


def test_replay_buffer_is_saved_and_restored(tmp_path, tokenizer):
    args = config(tmp_path, mode="online", max_steps=2, replay_buffer_size=16, per_device_train_batch_size=4)
    trainer = SoftQTrainer(
        make_model(tokenizer), args, train_dataset=pref_data(), processing_class=tokenizer, reward_funcs=[good_reward]
    )
    trainer.train()
    trainer.save_aux_state(str(tmp_path / "aux"))
    other = SoftQTrainer(
        make_model(tokenizer), args, train_dataset=pref_data(), processing_class=tokenizer, reward_funcs=[good_reward]
    )
    assert len(other.replay_buffer) == 0
    other.load_aux_state(str(tmp_path / "aux"))
    assert other.replay_buffer.items == trainer.replay_buffer.items
    assert len(trainer.replay_buffer) == 8  # 2 steps x 2 prompts x 2 generations


def test_precomputed_token_rewards_reach_the_loss(tmp_path, tokenizer):
    data = pref_data(2)
    trainer = SoftQTrainer(make_model(tokenizer), config(tmp_path), train_dataset=data, processing_class=tokenizer)
    rows = [dict(r) for r in trainer.train_dataset]
    for r in rows:
        r["chosen_token_rewards"] = [0.5] * len(r["chosen_ids"])
        r["rejected_token_rewards"] = [-0.25] * len(r["rejected_ids"])
    batch = trainer.build_batch(rows)
    # rows: chosen, rejected, chosen, rejected
    n_c, n_r = len(rows[0]["chosen_ids"]), len(rows[0]["rejected_ids"])
    assert batch["token_rewards"][0].sum().item() == pytest.approx(0.5 * n_c)
    assert batch["token_rewards"][1].sum().item() == pytest.approx(-0.25 * n_r)
    assert torch.equal(batch["token_rewards"] != 0, batch["completion_mask"].bool())


def test_evaluate_reports_loss_and_metrics(tmp_path, tokenizer):
    trainer = SoftQTrainer(
        make_model(tokenizer),
        config(tmp_path, per_device_eval_batch_size=4),
        train_dataset=pref_data(),
        eval_dataset=pref_data(4),
        processing_class=tokenizer,
        reward_funcs=[good_reward],
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and "eval_consistency" in metrics and "eval_rewards/chosen" in metrics


def test_online_conversational_prompts_and_prompt_completion_labels(tmp_path, tokenizer):
    seen = []

    def reads_messages(prompts, completions, completion_ids, topic, **kwargs):
        seen.append((prompts[0], completions[0], topic[0]))
        return [float(len(ids)) / 10 for ids in completion_ids]

    convo = Dataset.from_list([{"prompt": [{"role": "user", "content": p}], "topic": p.split()[-1]} for p in PROMPTS])
    trainer = SoftQTrainer(
        make_model(tokenizer),
        config(tmp_path, mode="online", max_steps=2),
        train_dataset=convo,
        processing_class=tokenizer,
        reward_funcs=[reads_messages],
    )
    trainer.train()
    prompt, completion, topic = seen[0]
    assert prompt[0]["role"] == "user" and completion[0]["role"] == "assistant" and topic.endswith(":")
    # prompt ids came from the chat template with the generation prompt
    assert tokenizer.decode(trainer.train_dataset[0]["prompt_ids"]).endswith("assistant: ")

    kto = Dataset.from_list(
        [{"prompt": p, "completion": GOOD if i % 2 else BAD, "label": bool(i % 2)} for i, p in enumerate(PROMPTS)]
    )
    trainer = SoftQTrainer(
        make_model(tokenizer), config(tmp_path / "kto", max_steps=2), train_dataset=kto, processing_class=tokenizer
    )
    trainer.train()
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"task_reward/completion", "rewards/data/mean"} <= logged


def test_reference_log_pi_through_fused_head_equals_full_logits(tmp_path, tokenizer):
    from sqlm.soft import soft_outputs

    trainer = SoftQTrainer(
        make_model(tokenizer), config(tmp_path), train_dataset=pref_data(2), processing_class=tokenizer
    )
    batch = trainer.build_batch([dict(r) for r in trainer.train_dataset])
    start = int(batch["logits_start"])
    with torch.no_grad():
        logits = trainer.ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = soft_outputs(logits[:, start:-1], batch["input_ids"][:, start + 1 :], 1.0).log_pi
    fused = model_log_pi(trainer.ref_model, batch)
    on = batch["path_mask"][:, start:].bool()
    assert on.any()
    assert torch.allclose(fused[on], plain[on], atol=1e-5)


@pytest.mark.parametrize("loss_type", ["unified_pcl", "soft_q", "multistep_pcl", "guo_pcl_mix"])
def test_reference_anchored_values_start_at_the_zero_reward_optimum(tmp_path, tokenizer, loss_type):
    """With value_anchor 'reference', a policy equal to its reference has Q = tau log pi_ref and V = 0:
    the exact soft optimum when every reward is 0, so every consistency residual is 0 at step 0.
    Unanchored, the random logits' logsumexp levels count as values and the residuals are not 0."""
    losses = {}
    for anchor in ("reference", "none"):
        trainer = SoftQTrainer(
            make_model(tokenizer),
            config(tmp_path, loss_type=loss_type, value_anchor=anchor, tau=0.5),
            train_dataset=pref_data(2),
            processing_class=tokenizer,
        )
        batch = trainer.build_batch([dict(r) for r in trainer.train_dataset])
        assert batch["token_rewards"].abs().sum() == 0
        with torch.no_grad():
            _, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        losses[anchor] = out["per_step_loss"].abs().max().item()
    assert losses["reference"] < 1e-9
    assert losses["none"] > 1e-3


@pytest.mark.parametrize("mode", ["online", "mixed"])
def test_online_batch_counts_completions(tmp_path, tokenizer, mode):
    """As in TRL's GRPO: per_device_train_batch_size 4 with num_generations 2 is 2 prompts x 2
    completions (mixed: 1 prompt rolled out twice + 1 pair), and an epoch rolls out every prompt once."""
    args = config(tmp_path, mode=mode, per_device_train_batch_size=4, max_steps=-1, num_train_epochs=1,
                  mix_ratio=0.5)  # fmt: skip
    model = make_model(tokenizer).eval()  # as from_pretrained returns it: the first batch is built in eval mode
    trainer = SoftQTrainer(model, args, train_dataset=pref_data(8), processing_class=tokenizer,
                           reward_funcs=[good_reward])  # fmt: skip
    seen = []
    build = trainer.build_batch

    def spy(examples, train=True):
        batch = build(examples, train)
        seen.append(
            (len(examples), int(batch["input_ids"].shape[0]), batch["sqlm_metrics"].get("completions/online_fraction"))
        )
        return batch

    trainer.build_batch = spy
    trainer.train()
    assert trainer.state.global_step == 8 * 2 // 4  # 8 prompts x 2 completions, 4 a step
    # run_stats.json's counts: every rolled-out completion (online: all 16; mixed: half of them)
    assert trainer.generated_completions == (16 if mode == "online" else 8)
    assert trainer.generated_tokens >= trainer.generated_completions
    assert all(rows == 4 and seqs == 4 for rows, seqs, _ in seen), seen
    if mode == "mixed":  # one prompt group online (2 completions), one pair offline (2 sequences)
        assert all(frac == 0.5 for _, _, frac in seen), seen


def test_group_sampler_repeats_each_steps_prompts_num_iterations_times():
    """num_iterations (TRL's repeat_count): the shuffled prompts in chunks of one step's prompts, each chunk
    given repeat_count times in a row, every prompt num_generations times; an epoch visits every prompt of
    the whole chunks; repeat_count 1 is the plain per-prompt repeat."""
    from sqlm.batching import GroupRepeatSampler

    plain = list(GroupRepeatSampler(5, 2, seed=3))
    order = plain[::2]
    assert sorted(order) == list(range(5)) and plain == [i for i in order for _ in range(2)]
    s = GroupRepeatSampler(5, 2, seed=3, batch_size=2, repeat_count=3)
    got = list(s)
    assert len(got) == len(s) == 2 * 2 * 2 * 3
    chunk = [i for i in order[:2] for _ in range(2)]
    assert got[:12] == chunk * 3  # the first step's prompts, three steps in a row
    assert got[12:] == [i for i in order[2:4] for _ in range(2)] * 3


def test_num_iterations_trains_several_steps_on_one_generated_batch(tmp_path, tokenizer):
    """num_iterations 2: steps 0, 2, 4 generate and score; steps 1, 3, 5 train on the very same token
    tensors and rewards (the sampler repeats their prompts), without the on-policy mask, and move the
    weights; generated_completions counts only what was generated."""
    args = config(tmp_path, mode="online", per_device_train_batch_size=4, max_steps=6, num_iterations=2)
    trainer = SoftQTrainer(make_model(tokenizer), args, train_dataset=pref_data(8), processing_class=tokenizer,
                           reward_funcs=[good_reward])  # fmt: skip
    steps, built = [], []
    build, get = trainer.build_batch, trainer.get_batch_samples

    def spy_build(examples, train=True):
        built.append(trainer.state.global_step)
        return build(examples, train)

    def spy_get(*a, **kw):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        batches, n = get(*a, **kw)
        steps.append((trainer.state.global_step, batches, before))
        return batches, n

    trainer.build_batch, trainer.get_batch_samples = spy_build, spy_get
    trainer.train()
    assert built == [0, 2, 4]
    assert trainer.generated_completions == 3 * 4
    for (step, fresh, _), (_, reused, before) in zip(steps[::2], steps[1::2]):
        assert "on_policy" in fresh[0] and "on_policy" not in reused[0]
        for key in ("input_ids", "token_rewards", "path_mask"):
            assert torch.equal(fresh[0][key], reused[0][key]), (step, key)
        after = [p.detach() for p in trainer.model.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the reuse step trained
    assert not torch.equal(steps[0][1][0]["input_ids"], steps[2][1][0]["input_ids"])


def test_num_iterations_settings_are_checked(tmp_path):
    from sqlm.errors import SqlmError

    with pytest.raises(SqlmError, match="num_iterations.*>= 1"):
        config(tmp_path, mode="online", num_iterations=0)
    with pytest.raises(SqlmError, match="num_iterations.*mode 'online'.*'mixed'"):
        config(tmp_path, mode="mixed", num_iterations=2)


def test_num_iterations_needs_one_steps_prompts(tmp_path, tokenizer):
    from sqlm.errors import SqlmError

    args = config(tmp_path, mode="online", per_device_train_batch_size=8, num_iterations=2)
    trainer = SoftQTrainer(make_model(tokenizer), args, train_dataset=pref_data(3), processing_class=tokenizer,
                           reward_funcs=[good_reward])  # fmt: skip
    with pytest.raises(SqlmError, match="num_iterations': one step takes 4 prompts, the dataset has 3"):
        trainer.train()


def test_online_batch_must_hold_whole_groups(tmp_path):
    from sqlm.errors import SqlmError

    with pytest.raises(SqlmError, match=r"per_device_train_batch_size.*num_generations' \(2\)"):
        config(tmp_path, mode="online", per_device_train_batch_size=3)
    with pytest.raises(SqlmError, match=r"per_device_train_batch_size' \(3\) must be divisible by 'num_generations'"):
        config(tmp_path, mode="mixed", per_device_train_batch_size=3)
    # the global batch counts, as in GRPO: 3 x 2 accumulation steps = 6 completions
    config(tmp_path, mode="online", per_device_train_batch_size=3, gradient_accumulation_steps=2)
    config(tmp_path, mode="offline", per_device_train_batch_size=3)  # offline batches count rows


def test_guo_mix_reads_the_target_networks_advantage(tmp_path, tokenizer):
    """The reversed terms regress the online V on the target's advantage tau log pi_bar: the trainer's
    loss equals the loss function fed the target network's own log-probs (not the online ones)."""
    from sqlm.forward import model_log_pi, policy_soft_outputs
    from sqlm.losses import LOSSES

    args = config(tmp_path, loss_type="guo_pcl_mix", guo_coefficient=0.3, value_anchor="none", use_reference=False)
    trainer = SoftQTrainer(
        make_model(tokenizer), args, train_dataset=pref_data(2), processing_class=tokenizer, reward_funcs=[good_reward]
    )
    with torch.no_grad():  # a target that differs from the policy
        for p in trainer.target_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = trainer.build_batch([dict(r) for r in trainer.train_dataset])
    loss = trainer.compute_loss(trainer.model, batch)
    start = int(batch["logits_start"])
    mask = batch["path_mask"][:, start:].float()
    rewards = batch["token_rewards"][:, start + 1 :]
    soft, _ = policy_soft_outputs(trainer.model, batch, args.tau)
    log_pi_bar, lse_bar = model_log_pi(trainer.target_model, batch, return_lse=True)
    kw = dict(tau=args.tau, coefficient=0.3)
    want, _ = LOSSES["guo_pcl_mix"](soft.q, soft.v, args.tau * lse_bar, rewards, mask, target_log_pi=log_pi_bar, **kw)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    online, _ = LOSSES["guo_pcl_mix"](soft.q, soft.v, args.tau * lse_bar, rewards, mask, **kw)
    assert not torch.allclose(loss, online, rtol=1e-4)


def test_offline_group_pcl_fits_each_pairs_margin(tmp_path, tokenizer):
    """group_pcl offline: a preference pair is its prompt's group (chosen and rejected share the prompt, so
    V(s_0) cancels), and the loss is each pair's squared margin residual
    (R_c - R_r - tau (log pi(y_c) - log pi(y_r)))^2 / 4, over the batch's path steps: the pair's log-ratio
    gap is driven to the reward gap over tau, not pushed on without end as DPO's logistic loss does."""
    from sqlm.forward import policy_soft_outputs

    tau = 0.5
    args = config(tmp_path, mode="offline", loss_type="group_pcl", tau=tau, use_reference=False,
                  per_device_train_batch_size=4, chosen_score_column="score_chosen",
                  rejected_score_column="score_rejected")  # fmt: skip
    rows = [{"prompt": PROMPTS[i], "chosen": GOOD, "rejected": BAD, "score_chosen": 1.0, "score_rejected": 0.0}
            for i in range(2)]  # fmt: skip
    trainer = SoftQTrainer(make_model(tokenizer), args, train_dataset=Dataset.from_list(rows),
                           processing_class=tokenizer)  # fmt: skip
    batch = trainer.build_batch([dict(r) for r in trainer.train_dataset])
    assert batch["group_ids"].tolist() == [0, 0, 1, 1] and batch["pair_index"].tolist() == [[0, 1], [2, 3]]
    loss = trainer.compute_loss(trainer.model, batch)
    start = int(batch["logits_start"])
    mask = batch["path_mask"][:, start:].float()
    soft, _ = policy_soft_outputs(trainer.model, batch, tau)
    returns = (batch["token_rewards"][:, start + 1 :] * mask).sum(-1)
    log_p = (soft.log_pi * mask).sum(-1)
    assert returns.tolist() == [1.0, 0.0, 1.0, 0.0]
    margin = (returns[0::2] - returns[1::2]) - tau * (log_p[0::2] - log_p[1::2])
    torch.testing.assert_close(loss, (margin.pow(2) / 4).sum() / mask.sum(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["unified_pcl", "pcl", "soft_q"])
def test_sequence_reward_after_the_end_of_turn_reaches_the_loss(tmp_path, tokenizer, loss_type):
    """ChatML ends an assistant turn with ``<|im_end|>\\n``: the completion's last token lies after the
    EOS that ends the path. A score-column reward put there must still reach the loss, as if it sat on
    the EOS itself (it was dropped: step-1 loss 1e-14 on SmolLM2's chat pairs scored 1/0)."""
    eos, newline = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" good")[0])
    args = config(
        tmp_path,
        loss_type=loss_type,
        tau=0.5,
        chosen_score_column="score_chosen",
        rejected_score_column="score_rejected",
    )
    data = pref_data(2).map(lambda r: {"score_chosen": 1.0, "score_rejected": 0.0})
    trainer = SoftQTrainer(make_model(tokenizer), args, train_dataset=data, processing_class=tokenizer)

    def loss_of(tail: list[int]) -> float:
        rows = [dict(r) for r in trainer.train_dataset]
        for r in rows:
            for side in ("chosen", "rejected"):
                ids = [t for t in r[f"{side}_ids"] if t != eos]
                r[f"{side}_ids"] = ids + [eos] + tail
        batch = trainer.build_batch(rows)
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()

    at_eos, after_eos = loss_of([]), loss_of([newline])
    assert at_eos > 1e-3
    assert after_eos == pytest.approx(at_eos, rel=1e-5)


def test_a_reward_on_any_completion_token_moves_the_loss(tmp_path, tokenizer):
    """Dense rewards: a reward on any single completion token, inside the path or after its EOS,
    changes the loss (value_anchor reference at step 0: the loss is 0 without rewards)."""
    eos = tokenizer.eos_token_id
    trainer = SoftQTrainer(
        make_model(tokenizer), config(tmp_path, tau=0.5), train_dataset=pref_data(2), processing_class=tokenizer
    )
    rows = [dict(r) for r in trainer.train_dataset][:1]
    ids = [t for t in rows[0]["chosen_ids"] if t != eos] + [eos, rows[0]["chosen_ids"][0]]
    rows[0]["chosen_ids"] = ids
    for k in range(len(ids)):
        r = dict(rows[0])
        r["chosen_token_rewards"] = [1.0 if j == k else 0.0 for j in range(len(ids))]
        r["rejected_token_rewards"] = [0.0] * len(r["rejected_ids"])
        batch = trainer.build_batch([r])
        with torch.no_grad():
            assert trainer.compute_loss(trainer.model, batch).item() > 1e-4, f"reward on completion token {k}"


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_group_pcl_trains_on_prompt_groups(tmp_path, tokenizer, mode):
    """group_pcl: the batch carries one group id per prompt (an online prompt's completions, a pair's
    two sides), and training moves the policy."""
    trainer = SoftQTrainer(
        make_model(tokenizer),
        config(tmp_path, mode=mode, loss_type="group_pcl", tau=0.5, per_device_train_batch_size=4),
        train_dataset=pref_data(),
        processing_class=tokenizer,
        reward_funcs=[lambda completions, **kw: [len(c) / 10 for c in completions]]
        if mode == "online"
        else [good_reward],
    )
    rows = [dict(r) for r in trainer.train_dataset][:2]
    batch = trainer.build_batch([rows[0], rows[0], rows[1], rows[1]] if mode == "online" else rows)
    ids = batch["group_ids"].tolist()
    assert ids == [0, 0, 1, 1]  # two prompts: two completions each (online) or chosen and rejected
    before = snapshot(trainer.model)
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss)) and out.training_loss > 0
    after = snapshot(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_a_step_unwraps_the_policy_once_not_at_every_loss(tmp_path, tokenizer):
    """accelerate's ``unwrap_model`` reads installed package metadata at every call (about 0.5 ms);
    compute_loss needs the unwrapped policy for the reference and the target, so it is looked up once per
    wrapper, not twice a step (a 15% slower step on the small training benchmark)."""
    trainer = SoftQTrainer(
        make_model(tokenizer),
        config(tmp_path, mode="offline", max_steps=6),
        train_dataset=pref_data(),
        processing_class=tokenizer,
        reward_funcs=[good_reward],
    )
    calls = []
    unwrap = trainer.accelerator.unwrap_model
    trainer.accelerator.unwrap_model = lambda model, *a, **kw: calls.append(1) or unwrap(model, *a, **kw)
    trainer.train()
    assert trainer.state.global_step == 6
    assert len(calls) <= 3, f"unwrap_model called {len(calls)} times in 6 steps"
