"""Scaling out: the LoRA target network as a second adapter, precomputed reference log-probs, the
vLLM generation switch, and the checks that run before any model is loaded."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from datasets import Dataset

# the tiny task, model and config of the trainer tests (tests/ is on sys.path: pytest rootdir import)
from test_trainer import BAD, GOOD, PROMPTS, config, good_reward, make_model, pref_data

from sqlm.config import SoftQConfig
from sqlm.forward import TARGET_ADAPTER, model_values
from sqlm.tiny import train_tokenizer
from sqlm.trainer import SoftQTrainer


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [p + GOOD for p in PROMPTS] + [p + BAD for p in PROMPTS]
    return train_tokenizer(texts * 4, vocab_size=300)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def adapter_params(model, adapter):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


# ----------------------------------------------------------------------------- LoRA target adapter


def lora_trainer(tmp_path, tokenizer, monkeypatch=None, **kw):
    kw = {"loss_type": "soft_q", "target_model_mixup_alpha": 0.3, **kw}
    return SoftQTrainer(
        make_model(tokenizer),
        config(tmp_path, **kw),
        train_dataset=pref_data(),
        processing_class=tokenizer,
        reward_funcs=[good_reward],
        peft_config=lora(),
    )


def test_lora_target_is_an_adapter_on_the_same_base(tmp_path, tokenizer, monkeypatch):
    import sqlm.target as target_module

    copied = []
    real_deepcopy = copy.deepcopy

    def spy(obj, *a, **k):
        if isinstance(obj, torch.nn.Module):
            copied.append(type(obj).__name__)
        return real_deepcopy(obj, *a, **k)

    monkeypatch.setattr(target_module.copy, "deepcopy", spy)
    base_count = sum(p.numel() for p in make_model(tokenizer).parameters())
    trainer = lora_trainer(tmp_path, tokenizer)
    assert copied == [], f"a model was deep-copied: {copied}"
    assert trainer.target_model is None and trainer.has_target
    model = trainer.model
    assert set(model.peft_config) == {"default", TARGET_ADAPTER} and model.active_adapter == "default"
    policy, target = adapter_params(model, "default"), adapter_params(model, TARGET_ADAPTER)
    n_adapter = sum(p.numel() for p in policy.values())
    assert n_adapter > 0
    # the whole model = one base + two adapters: no second copy of the base
    assert sum(p.numel() for p in model.parameters()) == base_count + 2 * n_adapter
    # the target starts as the policy adapter, frozen; only the policy adapter trains
    for n, t in target.items():
        assert torch.equal(t, policy[n.replace(f".{TARGET_ADAPTER}.", ".default.")])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(policy)


def test_lora_target_adapter_moves_by_exactly_the_polyak_rule(tmp_path, tokenizer):
    alpha = 0.3
    trainer = lora_trainer(tmp_path, tokenizer, max_steps=3, target_model_mixup_alpha=alpha)
    model = trainer.model
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    calls = []
    update = trainer.update_target_model

    def checked_update():
        before_t = adapter_params(model, TARGET_ADAPTER)
        policy = adapter_params(model, "default")
        update()
        calls.append((before_t, policy, adapter_params(model, TARGET_ADAPTER)))

    trainer.update_target_model = checked_update
    trainer.train()
    assert len(calls) == 3
    for before_t, policy, after_t in calls:
        assert set(after_t) == set(before_t) and len(after_t) == len(policy)
        for n, t in after_t.items():
            p = policy[n.replace(f".{TARGET_ADAPTER}.", ".default.")]
            assert torch.equal(t, before_t[n].mul(1 - alpha).add(p, alpha=alpha)), n
    last_policy, last_target = calls[-1][1], calls[-1][2]
    assert any(
        not torch.equal(t, last_policy[n.replace(f".{TARGET_ADAPTER}.", ".default.")]) for n, t in last_target.items()
    ), "the target should lag the policy"
    for n, p in model.named_parameters():  # the frozen base never moved
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n


def _merged_copy(base, peft_model, adapter):
    """The base model with ``adapter``'s LoRA deltas added to its weights by hand: W + s * B @ A."""
    merged = copy.deepcopy(base)
    weights = dict(merged.named_parameters())
    params = dict(peft_model.named_parameters())
    scale = peft_model.peft_config[adapter].lora_alpha / peft_model.peft_config[adapter].r
    with torch.no_grad():
        for n in params:
            if n.endswith(f"lora_A.{adapter}.weight"):
                layer = n[: -len(f".lora_A.{adapter}.weight")].removeprefix("base_model.model.")
                a, b = params[n], params[n.replace("lora_A", "lora_B")]
                weights[layer + ".weight"].add_(scale * b @ a)
    return merged


def test_lora_target_values_equal_a_manual_merge(tmp_path, tokenizer):
    trainer = lora_trainer(tmp_path, tokenizer, max_steps=2, learning_rate=5e-2)
    base = make_model(tokenizer)  # the same seed: the frozen base's weights
    trainer.train()
    model = trainer.model
    model.train()
    batch = trainer._prepare_inputs(trainer.build_batch([dict(r) for r in trainer.train_dataset.select(range(2))]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    got = trainer.target_values(model, batch)
    expected = model_values(_merged_copy(base, model, TARGET_ADAPTER), batch, trainer.args.tau)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    policy_v = model_values(_merged_copy(base, model, "default"), batch, trainer.args.tau)
    assert not torch.allclose(got, policy_v, atol=1e-4)  # the target adapter, not the policy's, was active
    # the policy adapter is back: active, trainable, and the model in train mode
    assert model.active_adapter == "default" and model.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    soft_policy = model_values(model, batch, trainer.args.tau)
    torch.testing.assert_close(soft_policy, policy_v, rtol=1e-5, atol=1e-5)
    # and the reference is still the base with every adapter disabled
    from sqlm.forward import model_log_pi

    torch.testing.assert_close(trainer.reference_log_pi(model, batch), model_log_pi(base, batch), rtol=1e-5, atol=1e-5)


def test_lora_target_adapter_resumes_exactly_and_stays_out_of_the_saved_adapter(tmp_path, tokenizer):
    """Checkpoints keep the target adapter in target_model.safetensors, which resume reads; the saved
    model (output_dir, and each checkpoint's adapter) is the policy adapter alone, what a user loads."""
    from peft import PeftModel

    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=5e-3)
    full = lora_trainer(tmp_path, tokenizer, **kw)
    full.train()
    full.save_model()
    out = tmp_path / "out"
    ckpt = out / "checkpoint-2"
    assert (ckpt / "target_model.safetensors").exists()
    for folder in (out, ckpt):
        assert (folder / "adapter_model.safetensors").exists()
        assert not (folder / TARGET_ADAPTER).exists(), f"{folder} holds the target adapter"
    loaded = PeftModel.from_pretrained(make_model(tokenizer), out)
    assert set(loaded.peft_config) == {"default"}
    trained = adapter_params(full.model, "default")
    got = adapter_params(loaded, "default")
    assert got.keys() == trained.keys()
    for n, v in trained.items():
        assert torch.equal(got[n], v), n
    resumed = lora_trainer(tmp_path, tokenizer, **{**kw, "output_dir": str(tmp_path / "r")})
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert {n for n, p in resumed.model.named_parameters() if p.requires_grad} == set(
        adapter_params(resumed.model, "default")
    )


# ----------------------------------------------------------------------------- precomputed reference


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _module_copies(monkeypatch):
    import sqlm.target as target_module

    copied = []
    real_deepcopy = copy.deepcopy

    def spy(obj, *a, **k):
        if isinstance(obj, torch.nn.Module):
            copied.append(type(obj).__name__)
        return real_deepcopy(obj, *a, **k)

    monkeypatch.setattr(target_module.copy, "deepcopy", spy)
    return copied


@pytest.mark.parametrize(
    "mode,loss_type,peft",
    [("offline", "unified_pcl", False), ("offline", "soft_q", True), ("mixed", "soft_q", False)],
)
def test_precomputed_reference_gives_the_same_losses(tmp_path, tokenizer, monkeypatch, mode, loss_type, peft):
    monkeypatch.setenv("SQLM_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": PROMPTS[i % 4], "chosen": GOOD if i % 3 else " good.", "rejected": BAD} for i in range(8)]
    kw = dict(mode=mode, loss_type=loss_type, max_steps=3, eval_strategy="no", mix_ratio=0.5)

    def run(precompute):
        copied = _module_copies(monkeypatch)
        trainer = SoftQTrainer(
            make_model(tokenizer),
            config(tmp_path / str(precompute), precompute_ref_log_probs=precompute, **kw),
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(rows[:3]),
            processing_class=tokenizer,
            reward_funcs=[good_reward],
            peft_config=lora() if peft else None,
        )
        trainer.train()
        monkeypatch.undo()
        monkeypatch.setenv("SQLM_CACHE", str(tmp_path / "cache"))
        return trainer, copied, trainer.evaluate()["eval_loss"]

    live, _, live_eval = run(False)
    pre, copied, pre_eval = run(True)
    assert "chosen_ref_log_probs" in pre.train_dataset.column_names
    assert "rejected_ref_logsumexp" in pre.eval_dataset.column_names
    if mode == "offline":  # no reference model is held, and none was ever copied
        assert pre.ref_model is None and not pre.reference.peft_base and copied == []
    else:  # mixed: the online samples still need the live reference
        assert pre.ref_model is not None
    assert len(_losses(live)) == 3
    torch.testing.assert_close(torch.tensor(_losses(pre)), torch.tensor(_losses(live)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(pre_eval), torch.tensor(live_eval), rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(live.model.named_parameters(), pre.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def test_precomputed_reference_columns_are_cached(tmp_path, tokenizer, monkeypatch):
    from sqlm import reference

    monkeypatch.setenv("SQLM_CACHE", str(tmp_path / "cache"))
    args = config(tmp_path, precompute_ref_log_probs=True, max_steps=1)
    first = SoftQTrainer(make_model(tokenizer), args, train_dataset=pref_data(), processing_class=tokenizer)

    def fail(*a, **k):
        raise AssertionError("recomputed although nothing changed")

    monkeypatch.setattr(reference, "compute_ref_columns", fail)
    again = SoftQTrainer(make_model(tokenizer), args, train_dataset=pref_data(), processing_class=tokenizer)
    for c in ("chosen_ref_log_probs", "chosen_ref_logsumexp", "rejected_ref_log_probs", "rejected_ref_logsumexp"):
        assert again.train_dataset[c] == first.train_dataset[c]
    with pytest.raises(AssertionError, match="recomputed"):  # other reference weights: a new key
        SoftQTrainer(make_model(tokenizer, seed=1), args, train_dataset=pref_data(), processing_class=tokenizer)


def test_precompute_ref_log_probs_with_online_mode_names_both_keys(tmp_path):
    from sqlm.errors import SqlmError

    with pytest.raises(SqlmError, match=r"'precompute_ref_log_probs'.*mode is 'online'"):
        config(tmp_path, precompute_ref_log_probs=True, mode="online")
    with pytest.raises(SqlmError, match=r"'precompute_ref_log_probs' needs use_reference"):
        config(tmp_path, precompute_ref_log_probs=True, use_reference=False)


# ----------------------------------------------------------------------------- vLLM generation


def test_use_vllm_without_vllm_or_gpu_is_one_line_naming_what_is_missing(tmp_path, monkeypatch):
    import sqlm.config as config_module
    from sqlm.errors import SqlmError

    kw = dict(mode="online", use_vllm=True)
    monkeypatch.setattr(config_module, "_vllm_available", lambda: False)
    with pytest.raises(
        SqlmError, match=r"^key 'use_vllm' needs the vllm package .* and a CUDA GPU, but use_cpu is true"
    ) as e:
        config(tmp_path, **kw)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(config_module, "_vllm_available", lambda: True)
    monkeypatch.setattr(config_module, "_cuda_available", lambda: False)
    with pytest.raises(SqlmError, match=r"^key 'use_vllm' needs a CUDA GPU, and none is visible") as e:
        config(tmp_path, **{**kw, "use_cpu": False})
    assert "vllm package" not in str(e.value)
    monkeypatch.setattr(config_module, "_vllm_available", lambda: False)
    monkeypatch.setattr(config_module, "_cuda_available", lambda: True)
    with pytest.raises(SqlmError, match=r"^key 'use_vllm' needs the vllm package \(pip install 'trl\[vllm\]'\)") as e:
        config(tmp_path, **{**kw, "use_cpu": False})
    assert "GPU" not in str(e.value)
    with pytest.raises(SqlmError, match=r"key 'use_vllm' is for mode 'online' or 'mixed'"):
        config(tmp_path, use_vllm=True, mode="offline")


def test_on_this_machine_use_vllm_fails_before_any_model_is_loaded(tmp_path):
    from sqlm.commands.train import run
    from sqlm.errors import SqlmError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model_name_or_path: /nonexistent/model\ndataset_name: /nonexistent.jsonl\nmode: online\n"
        f"use_vllm: true\nuse_cpu: true\noutput_dir: {tmp_path / 'o'}\nreport_to: none\n"
    )
    with pytest.raises(SqlmError, match="key 'use_vllm' needs .*CUDA GPU"):
        run([str(recipe)])


class FakeVLLMGeneration:
    """Stands in for TRL's VLLMGeneration: returns fixed token ids, with tokens after the EOS."""

    def __init__(self, completion):
        self.completion, self.syncs, self.calls = completion, 0, []

    def sync_weights(self):
        self.syncs += 1

    def generate(self, prompts, images, num_generations):
        self.calls.append((len(prompts), num_generations))
        return prompts, [list(self.completion) for _ in prompts], None, None


def test_vllm_tokens_are_exactly_what_the_loss_trains_on(tmp_path, tokenizer):
    trainer = SoftQTrainer(
        make_model(tokenizer),
        config(tmp_path, mode="online", max_steps=2, loss_type="soft_q", per_device_train_batch_size=4),
        train_dataset=pref_data(),
        processing_class=tokenizer,
        reward_funcs=[good_reward],
    )
    good = tokenizer(GOOD, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    fake = FakeVLLMGeneration(good + [eos] + good)  # what follows the EOS must be dropped
    trainer.vllm_generation = fake
    trainer.args.vllm_mode = "colocate"
    batches = []
    build = trainer.build_batch

    def spy(examples, train=True):
        batch = build(examples, train)
        batches.append(batch)
        return batch

    trainer.build_batch = spy
    trainer.train()
    # one push per optimizer step; 2 prompts x 2 completions, the sampler repeats each prompt: one per entry
    assert fake.syncs == 2 and fake.calls == [(4, 1), (4, 1)]
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["completion_mask"]):
            assert ids[mask.bool()].tolist() == good + [eos]
    logged = {k for h in trainer.state.log_history for k in h}
    assert "generation/vllm_colocate/seconds" in logged and "generation/hf/seconds" not in logged


def test_hf_generation_is_named_in_the_logs(tmp_path, tokenizer):
    trainer = SoftQTrainer(
        make_model(tokenizer),
        config(tmp_path, mode="online", max_steps=1),
        train_dataset=pref_data(),
        processing_class=tokenizer,
        reward_funcs=[good_reward],
    )
    trainer.train()
    logged = {k for h in trainer.state.log_history for k in h}
    assert {"generation/hf/seconds", "generation/hf/tokens_per_second"} <= logged


# ----------------------------------------------------------------------------- ZeRO-3 / FSDP checks before loading


@pytest.mark.parametrize(
    "env,kw,match",
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {"loss_type": "soft_q"}, r"needs FSDP2"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            {"precompute_ref_log_probs": True},
            r"'precompute_ref_log_probs' is not supported under DeepSpeed ZeRO-3",
        ),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
            {"precompute_ref_log_probs": True},
            r"'precompute_ref_log_probs' is not supported under FSDP2",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            {"reward_funcs": ["keyword", "terminal"], "reward_kwargs": {"terminal": {"reward_model": "rm"}}},
            r"key 'reward_funcs': 'terminal' loads a model, which is not supported under DeepSpeed ZeRO-3",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            {"reward_funcs": ["bradley_terry"]},
            r"'bradley_terry' loads a model, which is not supported under DeepSpeed ZeRO-3",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            {
                "reward_funcs": ["weighted"],
                "reward_kwargs": {
                    "weighted": {"components": [{"name": "length"}, {"name": "abc", "reward_model": "rm"}]}
                },
            },
            r"'weighted/abc' loads a model, which is not supported under DeepSpeed ZeRO-3",
        ),
    ],
)
def test_unsupported_sharding_is_refused_by_the_config(tmp_path, monkeypatch, env, kw, match):
    from sqlm.errors import SqlmError

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SqlmError, match=match) as e:
        SoftQConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "env",
    [
        {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
        {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
    ],
)
def test_a_target_network_is_accepted_under_fsdp2_and_zero3(tmp_path, monkeypatch, env):
    args = SoftQConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", loss_type="soft_q")
    for k, v in env.items():  # (TrainingArguments itself needs the deepspeed package to be built under ZeRO-3)
        monkeypatch.setenv(k, v)
    args._check_engine()  # no error
    assert args.uses_target_model and args.sharding_engine() in (("fsdp", 2), ("deepspeed", 3))


@pytest.mark.parametrize(
    "env",
    [
        {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
        {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    ],
)
def test_a_reward_model_is_accepted_under_fsdp2_and_zero2(tmp_path, monkeypatch, env):
    args = SoftQConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        reward_funcs=["terminal"],
        reward_kwargs={"terminal": {"reward_model": "rm"}},
    )
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args._check_engine()  # no error: the reward model loads whole on each process
    assert args.model_reward_funcs() == ["terminal"]


def test_fsdp_that_accelerate_does_not_enable_is_an_error(tmp_path, tokenizer, monkeypatch):
    """accelerate enables FSDP only on accelerators (accelerate/state.py: the FSDP switch is in the
    MULTI_GPU/MULTI_XPU/... branch): on CPU, or without a launcher, it trains unsharded without a word.
    The trainer says so before any step."""
    from sqlm.errors import SqlmError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(SqlmError, match="asks for FSDP2, but accelerate runs it unsharded") as e:
        SoftQTrainer(
            make_model(tokenizer),
            config(tmp_path, loss_type="soft_q"),
            train_dataset=pref_data(),
            processing_class=tokenizer,
            reward_funcs=[good_reward],
        )
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- memory accounting


def _bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_memory_parameter_formula_matches_a_built_model():
    from peft import LoraConfig, get_peft_model

    from sqlm.tiny import tiny_causal_lm

    bench = _bench()
    shape = bench.Shape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=300, tied=True, qkv_bias=True)
    model = tiny_causal_lm(
        300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    assert shape.params() == sum(p.numel() for p in model.parameters())
    lora = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    assert shape.lora_params(16) == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)


def test_bench_memory_formulas():
    bench = _bench()
    shape = bench.SHAPES["7B"]
    p = shape.params()
    assert 6.7e9 < p < 6.8e9  # Llama-2-7B
    assert bench.formula_gb(shape, "ddp") == pytest.approx(20 * p / 1e9)
    assert bench.formula_gb(shape, "zero3") == pytest.approx(20 * p / 8 / 1e9)
    assert bench.formula_gb(shape, "ddp_precomputed_reference") == pytest.approx(18 * p / 1e9)
    # the adapter target saves one whole bf16 copy of the base
    saved = bench.formula_gb(shape, "lora_ddp_target_copy") - bench.formula_gb(shape, "lora_ddp_adapter_target")
    assert saved == pytest.approx(2 * p / 1e9)
    table = bench.formula_table()
    assert "| ZeRO-3, full fine-tune | 16.8 fits | 172.4 does not fit |" in table


def test_bench_memory_trainer_row_runs(tmp_path):
    """The measured rows run the trainer (one process here): the accounting sees every part of a soft_q run."""
    bench = _bench()
    got = bench.run_trainer_row("ddp", bench.SMALL, str(tmp_path))
    state = got["state"]
    assert got["world"] == 1 and got["peak_rss_mb"] > 0
    assert state["policy"] > 0 and state["reference"] == state["policy"] and state["target"] == state["policy"]
    assert state["grads"] == state["policy"] and state["optimizer"] == 2 * state["policy"]  # Adam: m and v
