"""SoftQConfig / ModelConfig: help on every field, CPU defaults, validation, recipe parsing."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import TrainingArguments

from sqlm.config import TRAIN_DATACLASSES, ModelConfig, SoftQConfig, get_peft_config
from sqlm.errors import SqlmError
from sqlm.losses import LOSSES
from sqlm.recipe import parse_recipe


def cfg(**kw):
    return SoftQConfig(output_dir="unused", report_to="none", **kw)


def test_every_field_has_help():
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f for f in dataclasses.fields(SoftQConfig) if f.name not in base]
    assert len(own) > 30
    for f in dataclasses.fields(SoftQConfig):
        assert f.metadata.get("help"), f"SoftQConfig.{f.name} has no help"
    for name in (
        "max_length",
        "max_prompt_length",
        "max_completion_length",
        "num_generations",
        "temperature",
        "beta",
        "model_init_kwargs",
        "dataset_name",
        "disable_dropout",
    ):
        assert name in {f.name for f in own} | base, name


def test_defaults_run_on_cpu():
    c = cfg()
    assert c.bf16 is False  # no accelerator here
    assert not c.gradient_checkpointing and not c.activation_checkpointing
    assert c.remove_unused_columns is False
    assert c.loss_type in LOSSES and c.mode == "offline" and c.temperature == 1.0
    assert not c.uses_target_model and not c.uses_value_head
    assert cfg(loss_type="soft_q").uses_target_model and cfg(loss_type="pcl").uses_value_head


def test_beta_is_tau():
    assert cfg(beta=0.3).tau == 0.3


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"loss_type": "ppo"}, "loss_type"),
        ({"tau": 0.0}, "tau"),
        ({"gamma": 1.5}, "gamma"),
        ({"mode": "offpolicy"}, "mode"),
        ({"reduction": "sum"}, "reduction"),
        ({"loss_type": "pcl", "value_head": False}, "value_head"),
        ({"loss_type": "unified_pcl", "value_head": True}, "value_head"),
        ({"mix_ratio": 2.0}, "mix_ratio"),
        ({"loss_type": "guo_pcl_mix", "guo_coefficient": 1.5}, "guo_coefficient"),
        ({"mode": "online", "max_completion_length": None}, "max_completion_length"),
        ({"reward_funcs": ["keyword"], "reward_weights": [1.0, 2.0]}, "reward_weights"),
        ({"reward_kwargs": "[1, 2]"}, "reward_kwargs"),
        ({"target_model_mixup_alpha": 0.0}, "target_model_mixup_alpha"),
        ({"replay_priority": -1.0}, "replay_priority"),
        ({"replay_priority": float("nan")}, "replay_priority"),
    ],
)
def test_invalid_values_name_the_key(kw, key):
    with pytest.raises(SqlmError, match=f"'{key}'"):
        cfg(**kw)


def test_recipe_parses_and_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model_name_or_path: tiny\nloss_type: soft_q\ntau: 0.2\nreward_funcs: [keyword]\n"
        "reward_kwargs:\n  keyword:\n    words: [good]\nlora_target_modules: [q_proj]\noutput_dir: out\n"
    )
    args, model_args = parse_recipe(TRAIN_DATACLASSES, recipe, ["--tau", "0.5", "--mode", "mixed"])
    assert isinstance(args, SoftQConfig) and isinstance(model_args, ModelConfig)
    assert args.tau == 0.5 and args.mode == "mixed" and args.loss_type == "soft_q"
    assert args.reward_kwargs == {"keyword": {"words": ["good"]}}
    assert model_args.lora_target_modules == ["q_proj"]


def test_unknown_key_names_the_closest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss_typ: soft_q\n")
    with pytest.raises(SqlmError, match="'loss_typ'.*'loss_type'"):
        parse_recipe(TRAIN_DATACLASSES, recipe)
    with pytest.raises(SqlmError, match="'rollout_lenght'.*'rollout_length'"):
        parse_recipe(TRAIN_DATACLASSES, None, ["--rollout_lenght", "4"])


def test_peft_config_from_model_args():
    assert get_peft_config(ModelConfig()) is None
    lora = get_peft_config(ModelConfig(use_peft=True, lora_r=4, lora_target_modules=["all-linear"]))
    assert lora.r == 4 and lora.target_modules == "all-linear"
    lora = get_peft_config(ModelConfig(use_peft=True, lora_target_modules=["q_proj", "v_proj"]))
    assert set(lora.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("learning_rate", -1e-4, "must be > 0"),
        ("learning_rate", 0.0, "must be > 0"),
        ("learning_rate", float("nan"), "must be a finite number"),
        ("per_device_train_batch_size", 0, "must be >= 1"),
        ("per_device_eval_batch_size", -2, "must be >= 1"),
        ("gradient_accumulation_steps", 0, "must be >= 1"),
        ("max_steps", 0, "must be >= 1, or -1"),
        ("max_steps", -5, "must be >= 1, or -1"),
        ("num_train_epochs", 0.0, "must be > 0"),
        ("num_train_epochs", float("inf"), "must be a finite number"),
        ("warmup_steps", -1, "must be a whole number of steps >= 0 or a ratio in [0, 1)"),
        ("warmup_steps", 2.5, "must be a whole number of steps >= 0 or a ratio in [0, 1)"),
        ("logging_steps", 0, "must be a whole number of steps >= 1 or a fraction"),
        ("logging_steps", 2.5, "must be a whole number of steps >= 1 or a fraction"),
        ("save_steps", -1, "must be a whole number of steps >= 1 or a fraction"),
        ("weight_decay", -0.1, "must be >= 0"),
        ("max_grad_norm", -1.0, "must be >= 0"),
        ("adam_beta2", 1.0, "must be in [0, 1)"),
        ("adam_epsilon", 0.0, "must be > 0"),
        ("max_length", 0, "must be >= 1 or null"),
        ("max_prompt_length", -3, "must be >= 1 or null"),
        ("max_completion_length", 0, "must be >= 1 or null"),
        ("dataset_test_size", 0.0, "must be a fraction in (0, 1) or a whole number of rows"),
        ("dataset_test_size", 2.5, "must be a fraction in (0, 1) or a whole number of rows"),
    ],
)
def test_training_argument_ranges_are_one_line_errors(key, value, needle):
    # a negative learning rate used to be a torch traceback
    with pytest.raises(SqlmError, match=rf"^key '{key}' {__import__('re').escape(needle)}"):
        cfg(**{key: value})


def test_training_argument_ranges_accept_the_usual_values():
    c = cfg(
        learning_rate=1e-6,
        max_steps=-1,
        num_train_epochs=0.5,
        warmup_steps=0.1,
        logging_steps=0.25,
        eval_steps=None,
        dataset_test_size=0.1,
    )
    assert c.warmup_steps == 0.1 and c.dataset_test_size == 0.1
    assert cfg(warmup_steps=10, save_strategy="no", save_steps=0).warmup_steps == 10
    assert cfg(dataset_test_size=20).dataset_test_size == 20


@pytest.mark.parametrize(
    "kw,hint",
    [
        ({"mode": "onlne"}, "did you mean 'online'?"),
        ({"loss_type": "softq"}, "did you mean 'soft_q'?"),
        ({"reduction": "tokens"}, "did you mean 'token'?"),
        ({"nan_policy": "skp"}, "did you mean 'skip'?"),
    ],
)
def test_a_bad_choice_in_a_recipe_names_the_closest(kw, hint):
    with pytest.raises(SqlmError, match=__import__("re").escape(hint)):
        cfg(**kw)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--mode", "onlne"], "key 'mode' must be one of offline, online, mixed, got 'onlne'; did you mean 'online'?"),
        (["--mode=onlne"], "key 'mode' must be one of offline, online, mixed, got 'onlne'; did you mean 'online'?"),
        (["--loss_type", "softq"], "got 'softq'; did you mean 'soft_q'?"),
        (["--lr_scheduler_type", "cosin"], "did you mean 'cosine'?"),
        (["--learning_rate", "fast"], "flag --learning_rate: invalid float value: 'fast'"),
        (["--use_peft", "maybe"], "flag --use_peft: Truthy value expected"),
        (["--mode"], "flag --mode: expected one argument"),
        (["--warmup_ratio", "0.1"], "unknown key 'warmup_ratio' in the command-line flags; use warmup_steps"),
    ],
)
def test_a_bad_flag_is_one_line_without_usage(capsys, flags, message):
    # argparse used to print its whole usage (157 lines) before the error
    with pytest.raises(SqlmError) as e:
        parse_recipe(TRAIN_DATACLASSES, None, ["--output_dir", "unused", *flags])
    assert message in str(e.value) and "\n" not in str(e.value)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_merge_adapter_without_peft_is_an_error():
    from sqlm.config import check_train_args

    args, model_args = parse_recipe(TRAIN_DATACLASSES, None, ["--output_dir", "unused", "--merge_adapter", "true"])
    with pytest.raises(SqlmError, match="key 'merge_adapter' needs use_peft: true"):
        check_train_args(args, model_args)
    args, model_args = parse_recipe(
        TRAIN_DATACLASSES, None, ["--output_dir", "unused", "--merge_adapter", "true", "--use_peft", "true"]
    )
    check_train_args(args, model_args)


def test_pin_memory_is_off_without_an_accelerator(recwarn):
    import torch

    assert cfg(use_cpu=True).dataloader_pin_memory is False
    assert cfg().dataloader_pin_memory is torch.cuda.is_available()
    assert cfg(use_cpu=True, dataloader_pin_memory=True).dataloader_pin_memory is False  # transformers: use_cpu wins
    if not torch.cuda.is_available():  # pinning on a CPU run warns once per data loader
        loader = torch.utils.data.DataLoader([1, 2], pin_memory=cfg().dataloader_pin_memory)
        list(loader)
        assert not [w for w in recwarn if "pin_memory" in str(w.message)]


def test_group_pcl_online_needs_two_completions_per_prompt():
    from sqlm.config import SoftQConfig
    from sqlm.errors import SqlmError

    with pytest.raises(SqlmError, match="key 'num_generations' must be >= 2 for loss_type 'group_pcl'"):
        SoftQConfig(output_dir="/tmp/x", use_cpu=True, loss_type="group_pcl", mode="online", num_generations=1)
    SoftQConfig(output_dir="/tmp/x", use_cpu=True, loss_type="group_pcl", mode="offline", num_generations=1)


def test_loss_type_auto_is_group_pcl_when_the_policy_samples_groups():
    from sqlm.config import SoftQConfig

    def loss(**kw):
        return SoftQConfig(output_dir="/tmp/x", use_cpu=True, **kw).loss_type

    assert loss() == "unified_pcl"  # offline
    assert loss(mode="online") == loss(mode="mixed") == "group_pcl"
    assert loss(mode="online", num_generations=1, per_device_train_batch_size=1) == "unified_pcl"
    assert loss(mode="online", loss_type="soft_q") == "soft_q"


def test_group_scale_is_a_choice_of_group_pcl_only():
    from sqlm.errors import SqlmError

    kw = dict(output_dir="/tmp/x", use_cpu=True, mode="online", num_generations=2)
    assert SoftQConfig(**kw, group_scale="group").loss_type == "group_pcl"  # auto online: group_pcl
    with pytest.raises(SqlmError, match="key 'group_scale' applies to loss_type 'group_pcl' only, not 'unified_pcl'"):
        SoftQConfig(**kw, loss_type="unified_pcl", group_scale="batch")
    with pytest.raises(SqlmError, match="group_scale"):
        SoftQConfig(**kw, group_scale="rank")
