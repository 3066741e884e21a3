"""`sqlm reward`: the tiny offline recipe trains a reward model that ranks held-out pairs; the
real-model recipes parse."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from sqlm.commands.reward import RewardScriptArguments, _check_pad
from sqlm.errors import SqlmError
from sqlm.recipe import parse_recipe


ROOT = Path(__file__).resolve().parents[1]
RECIPES = [
    ROOT / "recipes/quickstart/reward/config.yaml",
    ROOT / "recipes/qwen2.5-0.5b-instruct/reward/config_full.yaml",
    ROOT / "recipes/llama-3.2-1b-instruct/reward/config_lora.yaml",
]


def test_tiny_recipe_trains_a_model_that_ranks_held_out_pairs(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sqlm.rewards.toy import toy_gold_reward, toy_preference_rows

    out = tmp_path / "rm"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sqlm.cli",
            "reward",
            str(RECIPES[0]),
            "--output_dir",
            str(out),
            "--num_train_epochs",
            "2",
            "--disable_tqdm",
            "true",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    report = json.loads((out / "reward_eval.json").read_text())
    assert report["train_pairs"] == 512

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1
    held_out = toy_preference_rows(100, seed=12345)  # a seed the recipe never used
    wins = 0
    with torch.no_grad():
        for row in held_out:
            assert toy_gold_reward(row["chosen"]) > toy_gold_reward(row["rejected"])
            scores = []
            for side in ("chosen", "rejected"):
                ids = tok(row["prompt"] + row[side] + tok.eos_token, return_tensors="pt")["input_ids"]
                scores.append(model(input_ids=ids).logits[0, 0].item())  # one row, no padding
            wins += scores[0] > scores[1]
    accuracy = wins / len(held_out)
    assert accuracy > 0.6, accuracy


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.parent.name)
def test_reward_recipes_parse(recipe):
    from trl import RewardConfig

    script, config = parse_recipe(
        [RewardScriptArguments, RewardConfig], recipe, ["--use_cpu", "true", "--bf16", "false"]
    )
    assert script.tiny or script.model_name_or_path and script.dataset_name
    assert config.output_dir
    if "llama" in str(recipe):
        assert script.tokenizer_pad_token and script.use_peft


def test_unknown_recipe_key_is_one_line_error(tmp_path, capsys):
    from sqlm.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("tiny: true\nlearning_rat: 0.1\n")
    assert main(["reward", str(bad)]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_pad_equal_to_eos_is_refused():
    from sqlm.rewards.toy import toy_tokenizer

    tok = toy_tokenizer()
    tok.pad_token = tok.eos_token
    with pytest.raises(SqlmError, match="tokenizer_pad_token"):
        _check_pad(tok, RewardScriptArguments())
    _check_pad(tok, RewardScriptArguments(tokenizer_pad_token="<unk>"))
    assert tok.pad_token == "<unk>"


def test_heldout_warning_gives_the_standard_error():
    from sqlm.rewards.train import MIN_HELDOUT_PAIRS, heldout_warning

    msg = heldout_warning(0.5, 4, "hold out more")
    assert "only 4 pairs" in msg and "standard error is 0.25 at chance" in msg and msg.endswith("hold out more")
    assert "\n" not in msg
    assert heldout_warning(0.5, MIN_HELDOUT_PAIRS, "x") is None
    assert "inf" in heldout_warning(0.0, 0, "x")


def test_small_held_out_set_is_reported_with_its_size_and_a_warning(tmp_path, capsys, caplog):
    """4 held-out pairs: an accuracy of 0.5 or 1.0 there says nothing; the command says how many pairs
    it read and warns with the binomial standard error."""
    from sqlm.cli import main

    flags = ["--output_dir", str(tmp_path / "rm"), "--tiny_train_size", "32", "--tiny_eval_size", "4",
             "--num_train_epochs", "1", "--disable_tqdm", "true", "--logging_steps", "100"]  # fmt: skip
    with caplog.at_level("WARNING"):
        assert main(["reward", str(RECIPES[0]), *flags]) == 0
    assert re.search(
        r"held-out accuracy \(chosen scored above rejected\): [0-9.]+ on 4 pairs", capsys.readouterr().out
    )
    assert any("on only 4 pairs" in r.message and "standard error is 0.25" in r.message for r in caplog.records)
