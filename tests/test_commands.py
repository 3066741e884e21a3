"""The command layer: one module per command, the lazy public API, the shared model keys, errors under
a launcher, and the shared loading / checkpoint / dataset helpers the commands stand on."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from sqlm import cli
from sqlm.errors import SqlmError


ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINING_COMMANDS = ("train", "reward", "dpo")


def _fresh_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_import_sqlm_and_help_load_neither_torch_nor_transformers():
    out = _fresh_python(
        "import sys, io, contextlib, sqlm, sqlm.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert sqlm.cli.main(['--help']) == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))\n"
    )
    assert out.strip() == "[]"


def test_public_api_resolves_lazily_to_the_library_objects():
    import sqlm
    from sqlm import (  # noqa: F401 -- each name must import
        LOSSES,
        SoftQConfig,
        SoftQTrainer,
        TokenMDP,
        advantage_pcl_loss,
        build_rewarder,
        config,
        losses,
        multistep_pcl_loss,
        oracle,
        pcl_loss,
        rewards,
        soft_q_loss,
        solve,
        trainer,
        unified_pcl_loss,
    )

    assert SoftQConfig is config.SoftQConfig and SoftQTrainer is trainer.SoftQTrainer
    assert LOSSES is losses.LOSSES and unified_pcl_loss is losses.unified_pcl_loss
    assert build_rewarder is rewards.build_rewarder
    assert TokenMDP is oracle.TokenMDP and solve is oracle.solve
    assert set(sqlm.__all__) - {"__version__"} <= set(dir(sqlm))
    for name in sqlm.__all__:
        getattr(sqlm, name)
    with pytest.raises(AttributeError):
        sqlm.no_such_name  # noqa: B018


@pytest.mark.parametrize("command", ["train", "reward", "dpo", "eval", "pipeline"])
def test_each_command_is_a_module_of_sqlm_commands(command):
    module_name = cli.COMMANDS[command][0]
    assert module_name == f"sqlm.commands.{command}"
    module = importlib.import_module(module_name)
    assert callable(module.main)
    assert all(dataclasses.is_dataclass(c) for c in module.recipe_dataclasses())


@pytest.mark.parametrize(
    "module",
    [
        "sqlm.rewards.train",
        "sqlm.evaluation.evaluate",
        "sqlm.evaluation.gold",
        "sqlm.trainer",
        "sqlm.data",
        "sqlm.oracle",
    ],
)
def test_library_modules_have_no_main(module):
    assert not hasattr(importlib.import_module(module), "main")


def test_the_library_never_imports_the_commands():
    pattern = re.compile(r"^\s*(from|import)\s+(sqlm\.commands|\.+commands)\b", re.M)
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "sqlm").rglob("*.py")
        if "commands" not in p.relative_to(ROOT / "sqlm").parts[:-1]
        and p.name != "cli.py"
        and pattern.search(p.read_text(encoding="utf-8"))
    ]
    assert offenders == []


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_every_training_command_takes_the_model_keys_of_trl_model_config(command):
    """dtype, model_revision, attn_implementation, use_peft, lora_*: the same keys, read the same way."""
    from trl import ModelConfig

    from sqlm.loading import model_init_kwargs
    from sqlm.recipe import parse_recipe

    module = importlib.import_module(f"sqlm.commands.{command}")
    classes = module.recipe_dataclasses()
    names = {f.name for c in classes for f in dataclasses.fields(c)}
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= names
    flags = [
        "--model_name_or_path",
        "some/model",
        "--dtype",
        "bfloat16",
        "--model_revision",
        "v1",
        "--attn_implementation",
        "sdpa",
        "--output_dir",
        "out",
        "--use_cpu",
        "true",
        "--bf16",
        "false",
    ]
    objs = parse_recipe(classes, None, flags)
    model_args = next(o for o in objs if hasattr(o, "lora_r"))
    config = next(o for o in objs if hasattr(o, "model_init_kwargs"))
    kwargs = model_init_kwargs(config, model_args)
    assert kwargs["dtype"] == "bfloat16" and kwargs["revision"] == "v1" and kwargs["attn_implementation"] == "sdpa"
    assert kwargs["use_safetensors"] is True and kwargs["trust_remote_code"] is False


def test_reward_lora_defaults_target_a_sequence_classifier():
    from sqlm.commands.reward import RewardScriptArguments
    from sqlm.config import get_peft_config

    peft = get_peft_config(RewardScriptArguments(use_peft=True, lora_r=4, lora_target_modules=["q_proj"]))
    assert peft.task_type == "SEQ_CLS" and peft.r == 4 and set(peft.modules_to_save) >= {"score"}


def test_train_help_names_recipes_that_exist(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    paths = re.findall(r"recipes/[\w./-]+\.yaml", out)
    assert paths, out
    for p in paths:
        assert (ROOT / p).is_file(), p


@pytest.mark.parametrize(
    ("env", "main"),
    [
        ({}, True),
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"RANK": "1", "LOCAL_RANK": "1"}, False),
        ({"RANK": "2", "LOCAL_RANK": "0"}, False),  # first process of the second node
        ({"LOCAL_RANK": "1"}, False),
        ({"LOCAL_RANK": "0"}, True),
        ({"RANK": ""}, True),
    ],
)
def test_main_process_is_global_rank_zero(env, main):
    assert cli.is_main_process(env) is main


def test_errors_print_once_under_a_launcher_and_every_rank_exits_2(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "missing.yaml")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.main(["train", missing]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.main(["train", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sqlm train: error:") and err.count("\n") == 1 and "not found" in err


def test_split_argv_takes_the_recipe_positionally_or_by_config():
    from sqlm.recipe import split_argv

    assert split_argv(["--config", "r.yaml", "--tau", "1"]) == ("r.yaml", ["--tau", "1"])
    assert split_argv(["r.yaml", "--tau", "1"]) == ("r.yaml", ["--tau", "1"])
    assert split_argv(["--tau", "1"]) == (None, ["--tau", "1"])
    with pytest.raises(SqlmError, match="--config"):
        split_argv(["--config"])


# ----------------------------------------------------------------------------- loading


def test_model_init_kwargs_refuse_pickles_and_read_json_strings():
    from types import SimpleNamespace

    from sqlm.loading import model_init_kwargs

    args = SimpleNamespace(trust_remote_code=False, model_init_kwargs='{"low_cpu_mem_usage": true}')
    assert model_init_kwargs(args) == {"trust_remote_code": False, "low_cpu_mem_usage": True, "use_safetensors": True}
    with pytest.raises(SqlmError, match="use_safetensors"):
        model_init_kwargs(SimpleNamespace(trust_remote_code=False, model_init_kwargs={"use_safetensors": False}))
    with pytest.raises(SqlmError, match="model_init_kwargs"):
        model_init_kwargs(SimpleNamespace(trust_remote_code=False, model_init_kwargs="[1, 2]"))


def test_load_policy_reads_safetensors_only(tmp_path):
    from sqlm.loading import load_policy
    from sqlm.tiny import tiny_model_for_tokenizer, train_tokenizer

    tok = train_tokenizer(["a good film", "a bad book"] * 4, vocab_size=270)
    model = tiny_model_for_tokenizer(
        tok, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    model.save_pretrained(tmp_path / "ok")
    tok.save_pretrained(tmp_path / "ok")
    loaded, _ = load_policy(tmp_path / "ok")
    assert not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters()))

    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled)
    tok.save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(SqlmError, match=f"could not load model '{pickled}'"):
        load_policy(pickled)
    with pytest.raises(SqlmError, match="not found"):
        load_policy(tmp_path / "absent")


# ----------------------------------------------------------------------------- checkpoints


def test_aux_state_round_trip_and_missing_target(tmp_path):
    from sqlm.checkpoint import STATE_FILE, load_aux_state, save_aux_state
    from sqlm.target import TARGET_FILE, CopyTarget, NoTarget

    torch.manual_seed(0)
    target = torch.nn.Linear(3, 2)
    save_aux_state(tmp_path / "c", counters={"mix_credit": 0.5})
    CopyTarget(target, names=["weight"]).save(str(tmp_path / "c"))
    assert (tmp_path / "c" / TARGET_FILE).is_file() and (tmp_path / "c" / STATE_FILE).is_file()
    other = torch.nn.Linear(3, 2)
    CopyTarget(other, names=["weight"]).load(str(tmp_path / "c"))
    counters = load_aux_state(tmp_path / "c")
    assert counters == {"mix_credit": 0.5}
    assert torch.equal(other.weight, target.weight) and not torch.equal(other.bias, target.bias)
    NoTarget().load(str(tmp_path / "c"))  # no target network: nothing to restore
    with pytest.raises(SqlmError, match=TARGET_FILE):
        CopyTarget(other, names=["weight"]).load(str(tmp_path / "empty"))


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    from sqlm.checkpoint import clear_partial, is_complete, latest_complete_checkpoint, mark_complete, rotate

    for step in (1, 2, 3):
        folder = tmp_path / f"checkpoint-{step}"
        clear_partial(folder)
        folder.mkdir()
        (folder / "w.txt").write_text(str(step))
        mark_complete(folder, step)
        rotate(tmp_path, 2)
        assert is_complete(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-3"
    (tmp_path / "checkpoint-3" / "junk").write_text("half-written")
    clear_partial(tmp_path / "checkpoint-3")
    assert not (tmp_path / "checkpoint-3").exists()


# ----------------------------------------------------------------------------- datasets


def test_one_loader_serves_the_optional_test_split_and_saved_datasets(tmp_path):
    from types import SimpleNamespace

    import datasets

    from sqlm.data import load_split, load_train_eval

    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(10)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = SimpleNamespace(
        dataset_name="pairs.jsonl",
        dataset_config=None,
        dataset_train_split="train",
        dataset_test_split="test",
        max_train_samples=None,
        max_eval_samples=3,
        eval_fraction=0.2,
    )
    # a file has one split: no test split, so eval_fraction holds out 2 rows (then max_eval_samples)
    train, evals = load_train_eval(args, str(tmp_path), optional_test_split=True)
    assert len(train) == 8 and len(evals) == 2
    args.eval_fraction = 0.0
    assert load_train_eval(args, str(tmp_path), optional_test_split=True)[1] is None

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:6]), "test": datasets.Dataset.from_list(rows[6:])}
    ).save_to_disk(str(saved))
    assert len(load_split(str(saved), "test")) == 4
    assert load_split(str(saved), "validation", missing_ok=True) is None
    with pytest.raises(SqlmError, match="validation"):
        load_split(str(saved), "validation")
