"""The one registry of reward names: every name in one message, and `module:function` rewards found
beside the recipe or in the current directory (only with allow_code_rewards)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from sqlm import cli
from sqlm.commands.train import build_trainer, parse_train_args
from sqlm.data import Trajectory
from sqlm.errors import SqlmError
from sqlm.rewards import build_rewarder
from sqlm.rewards.registry import NAMES, resolve_reward_funcs
from sqlm.rewards.scoring import score_trajectories


ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart" / "sqlm" / "config.yaml"
REVIEWS = ROOT / "recipes" / "quickstart" / "reviews.jsonl"

RECIPE = """model_name_or_path: tiny:vocab_size=384,hidden_size=32,num_hidden_layers=1
dataset_name: {data}
max_length: 64
reward_funcs: ['{module}:polite']
allow_code_rewards: true
max_steps: 1
report_to: none
"""

REWARD_MODULE = """
def polite(prompts, completions, **kwargs):
    return [float("please" in str(c)) for c in completions]
"""


def _assert_lists_every_name(message: str) -> None:
    assert "unknown rewarder 'keywords'" in message
    assert "did you mean 'keyword'" in message
    for name in NAMES:
        assert f"{name}," in message or f"{name};" in message, (name, message)
    assert {"keyword", "length", "terminal", "abc", "weighted"} <= set(NAMES)
    assert "module:function" in message


def test_unknown_reward_lists_builtins_with_did_you_mean():
    with pytest.raises(SqlmError) as e:
        resolve_reward_funcs(["keywords"])
    _assert_lists_every_name(str(e.value))


def test_unknown_reward_flag_is_a_config_error(tmp_path):
    with pytest.raises(SqlmError, match="key 'reward_funcs'") as e:
        parse_train_args([str(QUICKSTART), "--reward_funcs", "keywords", "--output_dir", str(tmp_path / "o")])
    _assert_lists_every_name(str(e.value))


def test_unknown_reward_flag_on_the_command_line_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SQLM_CACHE", str(tmp_path / "cache"))
    assert cli.main(["train", str(QUICKSTART), "--reward_funcs", "keywords", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "did you mean 'keyword'" in err and "length" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_builtins_build_by_name_like_any_rewarder():
    kw = {"words": ["good"], "penalty_words": ["bad"]}
    (resolved,) = resolve_reward_funcs(["keyword"], {"keyword": kw})
    built = build_rewarder("keyword", **kw)
    mixed = build_rewarder("weighted", components=[{"name": "keyword", "weight": 2.0, **kw}])
    t = [Trajectory(prompt_ids=[1], completion_ids=[2, 3], completion=" good good bad")]
    for rewarder, expected in ((resolved, 1.0), (built, 1.0), (mixed, 2.0)):
        r, _ = score_trajectories(t, [rewarder], None, pad_token_id=0)
        assert r[0].tolist() == [0.0, expected]
    with pytest.raises(SqlmError, match="rewarder 'length'.*unexpected keyword"):
        build_rewarder("length", words=["good"])


# ----------------------------------------------------------------------------- module:function beside the recipe


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder with a reward module and a recipe naming it; sys.path as under the `sqlm` console
    script (neither the current directory nor the folder on it)."""
    folder = tmp_path / "project"
    folder.mkdir()
    module = f"polite_rewards_{os.getpid()}"
    (folder / f"{module}.py").write_text(REWARD_MODULE)
    recipe = RECIPE.format(data=REVIEWS, module=module)
    (folder / "recipe.yaml").write_text(recipe)
    (folder / "missing.yaml").write_text(recipe.replace(f"{module}:polite", "no_such_module_q:polite"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("SQLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(folder))])
    monkeypatch.delitem(sys.modules, module, raising=False)
    return folder, elsewhere, module


def _trainer_rewarder(recipe: str, out: Path):
    args, model_args, recipe_dir = parse_train_args([recipe, "--output_dir", str(out), "--use_cpu", "true"])
    trainer = build_trainer(args, model_args, recipe_dir)
    (rewarder,) = trainer.rewarders
    return rewarder


@pytest.mark.parametrize("where", ["elsewhere", "recipe folder"])
def test_code_reward_is_found_beside_the_recipe(user_folder, monkeypatch, where):
    folder, elsewhere, module = user_folder
    path_before = list(sys.path)
    if where == "elsewhere":
        monkeypatch.chdir(elsewhere)
        recipe = str(folder / "recipe.yaml")
    else:
        monkeypatch.chdir(folder)
        recipe = "recipe.yaml"
    rewarder = _trainer_rewarder(recipe, elsewhere / "out")
    assert rewarder.name == f"{module}:polite" and rewarder.fn.__module__ == module
    t = [Trajectory(prompt_ids=[1], completion_ids=[2, 3], completion="yes please")]
    assert score_trajectories(t, [rewarder], None, pad_token_id=0)[0][0].tolist() == [0.0, 1.0]
    assert sys.path == path_before  # the lookup leaves the import path as it was


def test_code_reward_in_the_current_directory(user_folder, monkeypatch):
    folder, elsewhere, module = user_folder
    monkeypatch.chdir(folder)
    (fn,) = resolve_reward_funcs([f"{module}:polite"], allow_code=True)
    assert fn.fn.__module__ == module


def test_code_reward_still_needs_allow_code(user_folder):
    folder, _, module = user_folder
    with pytest.raises(SqlmError, match="allow_code_rewards"):
        resolve_reward_funcs([f"{module}:polite"], search_dirs=[str(folder)])
    assert module not in sys.modules  # nothing was imported


def test_missing_code_reward_says_where_it_looked(user_folder, monkeypatch):
    folder, elsewhere, _ = user_folder
    monkeypatch.chdir(elsewhere)
    with pytest.raises(SqlmError) as e:
        _trainer_rewarder(str(folder / "missing.yaml"), elsewhere / "out")
    message = str(e.value)
    assert "could not import reward function 'no_such_module_q:polite'" in message
    assert f"looked in {folder.resolve()}, {elsewhere.resolve()} and the Python path" in message
