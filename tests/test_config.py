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
    for name in ("max_length", "max_prompt_length", "max_completion_length", "num_generations",
                 "temperature", "beta", "model_init_kwargs", "dataset_name", "disable_dropout"):
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
        ({"mode": "online", "max_completion_length": None}, "max_completion_length"),
        ({"reward_funcs": ["keyword"], "reward_weights": [1.0, 2.0]}, "reward_weights"),
        ({"reward_kwargs": "[1, 2]"}, "reward_kwargs"),
        ({"target_model_mixup_alpha": 0.0}, "target_model_mixup_alpha"),
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
