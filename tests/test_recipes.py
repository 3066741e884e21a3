"""Every recipe under recipes/ parses into its command's config classes (none is run here).

A recipe's command comes from its path: a folder named ``accelerate`` holds launch configs; a folder
named after a ``sqlm`` command (``dpo``, ``grpo``, ``rloo``, ``online_dpo``, ``reward``, ``eval``,
``pipeline``, ``oracle``, ``generate``) holds that command's recipes; every other recipe (e.g. ``recipes/<model>/sqlm/config_lora.yaml``) is for
``sqlm train``. A command module names its config classes with ``recipe_dataclasses()``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import yaml

from sqlm.cli import COMMANDS
from sqlm.recipe import parse_recipe


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml"))
ACCELERATE_TYPES = {"NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP", "MULTI_XPU", "MULTI_NPU", "XLA"}


def command_of(path: Path) -> str:
    parts = path.relative_to(ROOT / "recipes").parts[:-1]
    if "accelerate" in parts:
        return "accelerate"
    for part in reversed(parts):
        if part in COMMANDS and part != "train":
            return part
    return "train"


def _fallback_dataclasses(command: str, module):
    """Config classes of commands whose module does not (yet) expose ``recipe_dataclasses()``."""
    if command == "dpo" and hasattr(module, "_dataclasses"):
        return module._dataclasses()
    if command == "reward":
        from trl import RewardConfig

        return [module.RewardScriptArguments, RewardConfig]
    if command == "pipeline":
        return [module.PipelineArguments, module.GoldTaskConfig]
    if command == "eval":
        return [module.EvalArguments]
    return None


def dataclasses_for(command: str):
    module = importlib.import_module(COMMANDS[command][0])
    getter = getattr(module, "recipe_dataclasses", None)
    classes = getter() if getter is not None else _fallback_dataclasses(command, module)
    if classes is None:
        pytest.fail(f"command '{command}' exposes no recipe_dataclasses()")
    return classes


@pytest.fixture(autouse=True)
def _restore_environ():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_the_recipes_this_project_documents_exist():
    rel = {str(p.relative_to(ROOT)) for p in RECIPES}
    for name in (
        "recipes/quickstart/sqlm/config.yaml",
        "recipes/qwen2.5-0.5b-instruct/sqlm/config_full.yaml",
        "recipes/qwen2.5-0.5b-instruct/sqlm/config_lora.yaml",
        "recipes/llama-3.2-1b-instruct/sqlm/config_lora.yaml",
        "recipes/quickstart/grpo/config.yaml",
        "recipes/quickstart/rloo/config.yaml",
        "recipes/gold/grpo/config.yaml",
        "recipes/gold/rloo/config.yaml",
        "recipes/qwen2.5-0.5b-instruct/grpo/config_lora.yaml",
        "recipes/qwen2.5-0.5b-instruct/rloo/config_lora.yaml",
        "recipes/llama-3.2-1b-instruct/grpo/config_lora.yaml",
        "recipes/llama-3.2-1b-instruct/rloo/config_lora.yaml",
        "recipes/quickstart/online_dpo/config.yaml",
        "recipes/gold/online_dpo/config.yaml",
        "recipes/accelerate/ddp.yaml",
        "recipes/accelerate/zero2.yaml",
        "recipes/accelerate/zero3.yaml",
        "recipes/accelerate/fsdp.yaml",
        "recipes/accelerate/zero3_multinode.yaml",
        "recipes/accelerate/fsdp2_multinode.yaml",
        "recipes/arithmetic/generate/config_sample.yaml",
        "recipes/arithmetic/generate/config_best_of_n.yaml",
        "recipes/arithmetic/generate/config_best_of_n_checker.yaml",
        "recipes/arithmetic/generate/config_value_beam.yaml",
        "recipes/quickstart/generate/config.yaml",
        "recipes/qwen2.5-0.5b-instruct/sqlm/config_soft_q_zero3.yaml",
        "recipes/qwen2.5-0.5b-instruct/sqlm/config_soft_q_fsdp2.yaml",
        "recipes/llama-3.2-1b-instruct/sqlm/config_soft_q_zero3.yaml",
        "recipes/llama-3.2-1b-instruct/sqlm/config_soft_q_fsdp2.yaml",
        "recipes/smollm2-135m-instruct/sqlm/config_online.yaml",
        "recipes/smollm2-135m-instruct/sqlm/config_mixed.yaml",
        "recipes/smollm2-135m-instruct/sqlm/config_offline.yaml",
        "recipes/smollm2-135m-instruct/dpo/config.yaml",
        "recipes/smollm2-135m-instruct/grpo/config.yaml",
        "recipes/smollm2-135m-instruct/rloo/config.yaml",
        "recipes/smollm2-135m-instruct/reward/config.yaml",
        "recipes/smollm2-135m-instruct/generate/config.yaml",
        "recipes/smollm2-135m-instruct-sentiment/sqlm/config_online.yaml",
        "recipes/smollm2-135m-instruct-sentiment/sqlm/config_mixed.yaml",
        "recipes/smollm2-135m-instruct-sentiment/sqlm/config_offline.yaml",
        "recipes/smollm2-135m-instruct-sentiment/dpo/config.yaml",
        "recipes/smollm2-135m-instruct-sentiment/grpo/config.yaml",
        "recipes/smollm2-135m-instruct-sentiment/rloo/config.yaml",
        "recipes/smollm2-135m-instruct-sentiment/reward/config.yaml",
        "recipes/pipeline/config_real_sentiment.yaml",
        "recipes/pipeline/config_real_reuse.yaml",
        "recipes/pipeline/config_real_offline.yaml",
    ):
        assert name in rel, name


def test_a_recipe_folder_names_its_command():
    assert command_of(ROOT / "recipes/quickstart/sqlm/config.yaml") == "train"
    for command in ("dpo", "grpo", "rloo", "online_dpo", "reward"):
        assert command_of(ROOT / f"recipes/qwen2.5-0.5b-instruct/{command}/config_full.yaml") == command
    assert command_of(ROOT / "recipes/accelerate/ddp.yaml") == "accelerate"
    assert command_of(ROOT / "recipes/arithmetic/generate/config_value_beam.yaml") == "generate"
    # the online baselines parse with their own commands' config classes
    for command in ("grpo", "rloo", "online_dpo"):
        names = {f.name for c in dataclasses_for(command) for f in __import__("dataclasses").fields(c)}
        assert {"temperature", "beta", "reward_funcs", "model_name_or_path"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_parses(path):
    command = command_of(path)
    if command == "accelerate":
        from accelerate.commands.config.config_args import load_config_from_file

        raw = yaml.safe_load(path.read_text())
        assert raw["distributed_type"] in ACCELERATE_TYPES
        config = load_config_from_file(str(path))
        assert config.num_processes >= 1
        return
    classes = dataclasses_for(command)
    flags = []
    names = {f.name for c in classes for f in __import__("dataclasses").fields(c)}
    if {"bf16", "use_cpu"} <= names:  # real-model recipes ask for bf16 on a GPU; parse them on a CPU
        flags = ["--bf16", "false", "--use_cpu", "true"]
    objs = parse_recipe(classes, path, flags)
    if command == "generate":  # a prompts file named by a recipe ships beside it (or comes as a flag)
        args = objs[0]
        if args.prompts_file is not None and not os.path.isabs(args.prompts_file):
            assert (path.parent / args.prompts_file).exists(), f"{path}: prompts file {args.prompts_file} not found"
    if command != "train":
        return
    from sqlm.config import ModelConfig, SoftQConfig

    args, model_args = objs
    assert isinstance(args, SoftQConfig) and isinstance(model_args, ModelConfig)
    # a local data file named by a recipe ships beside it
    name = args.dataset_name or ""
    if name.endswith((".jsonl", ".json", ".csv", ".parquet")) and not os.path.isabs(name):
        assert (path.parent / name).exists(), f"{path}: dataset file {name} not found beside the recipe"
    if model_args.use_peft:
        from sqlm.config import get_peft_config

        assert get_peft_config(model_args) is not None
