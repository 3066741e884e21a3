"""sqlm.recipe: YAML defaults + CLI overrides, with errors that name the key, file or line."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sqlm.errors import SqlmError
from sqlm.recipe import load_yaml, parse_recipe


BAD = Path(__file__).parent / "bad_inputs"


@dataclass
class Args:
    learning_rate: float = field(default=1e-3, metadata={"help": "lr"})
    tau: float = field(default=1.0, metadata={"help": "temperature"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    steps: int = field(default=3, metadata={"help": "steps"})
    name: str | None = field(default=None, metadata={"help": "name"})


def test_yaml_defaults_and_cli_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 0.5\nsteps: 7\n")
    (args,) = parse_recipe([Args], recipe, ["--steps", "9", "--name", "x"])
    assert args.learning_rate == 0.5  # from the recipe
    assert args.steps == 9  # the flag wins
    assert args.name == "x"


def test_env_block_sets_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SQLM_TEST_VAR", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("env:\n  SQLM_TEST_VAR: hello\nsteps: 2\n")
    parse_recipe([Args], recipe)
    import os

    assert os.environ["SQLM_TEST_VAR"] == "hello"


@pytest.mark.parametrize(
    "fname, needle",
    [
        ("malformed.yaml", "line 2"),
        ("unknown_key.yaml", "did you mean 'learning_rate'"),
        ("wrong_type.yaml", "key 'tau'"),
        ("not_mapping.yaml", "must be a YAML mapping"),
        ("non_utf8.yaml", "not UTF-8"),
        ("does_not_exist.yaml", "not found"),
    ],
)
def test_bad_recipes_name_the_problem(fname, needle):
    with pytest.raises(SqlmError) as e:
        parse_recipe([Args], BAD / fname)
    assert needle in str(e.value)
    assert fname in str(e.value) or "key" in str(e.value)


def test_unknown_flag_names_closest_key():
    with pytest.raises(SqlmError, match="unknown key 'stpes'.*did you mean 'steps'"):
        parse_recipe([Args], None, ["--stpes", "3"])


def test_bad_flag_value_is_an_error_not_a_usage_dump():
    with pytest.raises(SqlmError):
        parse_recipe([Args], None, ["--steps", "many"])


def test_safe_loader_refuses_python_tags(tmp_path):
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("steps: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SqlmError, match="not valid YAML"):
        load_yaml(recipe)


QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart"
COMMAND_RECIPES = {"train": "sqlm", "dpo": "dpo", "grpo": "grpo", "rloo": "rloo", "online_dpo": "online_dpo",
                   "reward": "reward"}  # fmt: skip


@pytest.mark.parametrize("command", COMMAND_RECIPES)
def test_report_to_a_tracker_that_is_not_installed_is_one_line_before_any_model(
    command, tmp_path, capsys, monkeypatch
):
    """report_to: tensorboard without tensorboard stopped with a 30-line traceback once the model had
    loaded; every command now says so in one line when it reads the recipe."""
    from transformers.integrations import integration_utils

    from sqlm import loading
    from sqlm.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: False)
    for name in ("load_model", "load_model_and_tokenizer", "load_pretrained"):
        monkeypatch.setattr(loading, name, no_model)
    recipe = QUICKSTART / COMMAND_RECIPES[command] / "config.yaml"
    out = tmp_path / "out"
    assert main([command, str(recipe), "--report_to", "tensorboard", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "key 'report_to' names 'tensorboard', which is not installed: pip install tensorboard" in err
    assert "pip install 'sqlm[trackers]'" in err and not out.exists()


def test_report_to_checks(monkeypatch):
    from transformers.integrations import integration_utils

    from sqlm.recipe import check_report_to

    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: True)
    check_report_to(["tensorboard"])  # installed
    check_report_to("none")
    check_report_to([])  # "none" / "all" after transformers read them
    with pytest.raises(SqlmError, match=r"names 'wandb', which is not installed: pip install wandb"):
        check_report_to(["tensorboard", "wandb"])
    with pytest.raises(SqlmError, match=r"key 'report_to' must be one of .*did you mean 'tensorboard'\?"):
        check_report_to("tensorbord")
