"""YAML recipes and command-line overrides, with TRL's parser semantics.

A recipe is a YAML mapping whose keys are the fields of the command's config dataclasses (the same
names as TRL's configs). Flags on the command line override the recipe (``--key value``). Recipes
are read with ``yaml.safe_load`` only. Unknown keys, wrong types, malformed YAML and a ``report_to``
tracker that is not installed raise :class:`sqlm.errors.SqlmError` naming the key (and the closest
valid key).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import SqlmError


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only: no Python tags) that also rejects a key given twice in
    one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (first at line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file into a dict (safe loader); errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise SqlmError(f"recipe file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SqlmError(f"recipe {p} is not UTF-8 text: {e}") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise SqlmError(f"recipe {p} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SqlmError(f"recipe {p} must be a YAML mapping of key: value, got {type(data).__name__}")
    return data


def field_names(dataclass_types: Sequence[type]) -> list[str]:
    return [f.name for dc in dataclass_types for f in dataclasses.fields(dc) if f.init]


# keys of older TRL / transformers versions that users still write, and what replaced them
RENAMED_KEYS = {
    "warmup_ratio": "warmup_steps (transformers 5 merged them: a value in [0, 1) is a ratio of the steps)",
    "evaluation_strategy": "eval_strategy",
    "max_new_tokens": "max_completion_length",
}


def _did_you_mean(value: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_key_error(key: str, valid: Sequence[str], where: str) -> SqlmError:
    if key == "gguf_file":
        return SqlmError(
            f"unknown key 'gguf_file' in {where}; name the GGUF model in model_name_or_path (a path ending in "
            ".gguf, or a packaged short name such as smollm2-135m-instruct), or put gguf_file under model_init_kwargs"
        )
    if key in RENAMED_KEYS and RENAMED_KEYS[key].split()[0] in valid:
        return SqlmError(f"unknown key '{key}' in {where}; use {RENAMED_KEYS[key]}")
    return SqlmError(f"unknown key '{key}' in {where}{_did_you_mean(key, valid)}")


def choice_error(key: str, value: Any, choices: Sequence[Any]) -> SqlmError:
    """The one-line error of a value that is not one of a key's choices, with the closest choice."""
    names = [str(getattr(c, "value", c)) for c in choices]
    return SqlmError(f"key '{key}' must be one of {', '.join(names)}, got {value!r}{_did_you_mean(str(value), names)}")


# report_to integrations -> (transformers' check that the package is installed, what to pip install)
TRACKERS = {
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "wandb": ("is_wandb_available", "wandb"),
    "trackio": ("is_trackio_available", "trackio"),
    "mlflow": ("is_mlflow_available", "mlflow"),
    "comet_ml": ("is_comet_available", "comet_ml"),
    "neptune": ("is_neptune_available", "neptune"),
    "clearml": ("is_clearml_available", "clearml"),
    "swanlab": ("is_swanlab_available", "swanlab"),
    "dvclive": ("is_dvclive_available", "dvclive"),
    "codecarbon": ("is_codecarbon_available", "codecarbon"),
}
TRACKERS_EXTRA = ("tensorboard", "wandb", "trackio")  # pip install 'sqlm[trackers]'


def check_report_to(report_to: str | Sequence[str] | None) -> None:
    """Each tracker ``report_to`` names must be one transformers knows and be installed: checked when
    the recipe is read, before any model loads (transformers fails only when the Trainer starts)."""
    from transformers.integrations import integration_utils

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    known = ("none", "all", *integration_utils.INTEGRATION_TO_CALLBACK)
    for name in names:
        if name not in known:
            raise choice_error("report_to", name, known)
        if name in TRACKERS and not getattr(integration_utils, TRACKERS[name][0])():
            package = TRACKERS[name][1]
            extra = (
                f" (or pip install 'sqlm[trackers]' for {', '.join(TRACKERS_EXTRA)})" if name in TRACKERS_EXTRA else ""
            )
            raise SqlmError(
                f"key 'report_to' names '{name}', which is not installed: pip install {package}{extra}, "
                "or set report_to: none"
            )


class _FlagError(Exception):
    pass


def _raise_flag_error(message: str):
    raise _FlagError(message)


def _flag_message(message: str) -> str:
    """argparse's "argument --max_steps/--max-steps: invalid int value: 'x'" -> "flag --max_steps: ..."."""
    import re

    message = " ".join(message.split())
    m = re.match(r"argument (--[\w]+)(?:/--[\w-]+)?: (.*)", message)
    return f"flag {m.group(1)}: {m.group(2)}" if m else f"invalid command-line flags: {message}"


def check_flag_choices(parser, args: Sequence[str]) -> None:
    """Reject a flag value outside its key's choices (``--mode onlne``) with :func:`choice_error`,
    before argparse would print its whole usage."""
    actions = parser._option_string_actions
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        action = actions.get(flag) if arg.startswith("--") else None
        if action is not None and action.choices is not None and action.nargs in (None, "?"):
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    i += 1
                    continue
                value = args[i + 1]
                i += 1
            try:
                converted = action.type(value) if action.type is not None else value
            except (TypeError, ValueError):
                converted = value
            if converted not in action.choices:
                raise choice_error(action.dest, value, list(action.choices))
        i += 1


def _allowed_types(annotation: Any) -> tuple[type, ...] | None:
    """The plain Python types a field accepts, or None when not checkable."""
    if isinstance(annotation, str):
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out: list[type] = []
        for arg in typing.get_args(annotation):
            if arg is type(None):
                out.append(type(None))
                continue
            sub = _allowed_types(arg)
            if sub is None:
                return None
            out.extend(sub)
        return tuple(out)
    if origin is typing.Literal:
        return tuple({type(a) for a in typing.get_args(annotation)})
    if origin in (list, tuple, dict):
        return (origin,)
    if annotation is float:
        return (float, int)
    if annotation in (int, str, bool):
        return (annotation,)
    return None


def _check_value(key: str, value: Any, annotation: Any, where: str) -> None:
    allowed = _allowed_types(annotation)
    if allowed is None or value is None and type(None) in allowed:
        return
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    elif isinstance(value, str) and str not in allowed:
        # YAML reads 1e-4 as a string; argparse converts it like a flag value
        ok = False
        for t in allowed:
            if t in (int, float):
                try:
                    t(value)
                    ok = True
                except ValueError:
                    pass
    else:
        ok = isinstance(value, allowed)
    if not ok:
        names = " or ".join(sorted({t.__name__ for t in allowed}))
        raise SqlmError(f"key '{key}' in {where} must be {names}, got {type(value).__name__} {value!r}")


def check_types(obj: Any, where: str) -> None:
    """Reject values whose type does not match the dataclass annotation (YAML values bypass argparse)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.init:
            _check_value(f.name, getattr(obj, f.name), hints.get(f.name, f.type), where)


def parse_recipe(
    dataclass_types: Sequence[type],
    recipe: str | os.PathLike | None,
    overrides: Sequence[str] = (),
) -> tuple[Any, ...]:
    """Build the dataclasses from ``recipe`` (YAML defaults) and ``overrides`` (CLI flags win).

    Mirrors ``trl.TrlParser.parse_args_and_config``: recipe values become parser defaults, an
    ``env:`` mapping sets environment variables, and flags parse with the dataclasses' types.
    """
    from transformers import HfArgumentParser

    config = load_yaml(recipe) if recipe is not None else {}
    where = f"recipe {recipe}" if recipe is not None else "the arguments"
    env = config.pop("env", {}) or {}
    if not isinstance(env, dict):
        raise SqlmError(f"key 'env' in {where} must be a mapping of NAME: value")
    valid = field_names(dataclass_types)
    for key in config:
        if key not in valid:
            raise unknown_key_error(str(key), valid, where)
    hints = {}
    for dc in dataclass_types:
        hints.update({f.name: typing.get_type_hints(dc).get(f.name, f.type) for f in dataclasses.fields(dc)})
    for key, value in config.items():
        _check_value(key, value, hints[key], where)
    for key, value in env.items():
        os.environ[str(key)] = str(value)

    parser = HfArgumentParser(list(dataclass_types))
    parser.error = _raise_flag_error  # one line, not argparse's usage dump and exit
    for action in parser._actions:
        if action.dest in config:
            action.default = config[action.dest]
            action.required = False
    # flags that argparse rejects become SqlmError, not a usage dump
    args = list(overrides)
    for arg in args:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            if key not in valid:
                raise unknown_key_error(key, valid, "the command-line flags")
    check_flag_choices(parser, args)
    try:
        outputs = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    except _FlagError as e:
        raise SqlmError(_flag_message(str(e))) from None
    except SystemExit:
        raise SqlmError(f"could not parse the flags {' '.join(args)}") from None
    except (ValueError, TypeError) as e:
        raise SqlmError(f"invalid value in {where}: {e}") from None
    *objs, remaining = outputs
    if remaining:
        raise SqlmError(f"unexpected command-line arguments: {' '.join(remaining)}")
    for obj in objs:
        check_types(obj, where)
        if hasattr(obj, "report_to"):  # the training config of every command
            check_report_to(obj.report_to)
    return tuple(objs)


def split_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[RECIPE] [--config RECIPE] [--key value ...]`` -> (recipe, overrides)."""
    argv = list(argv)
    recipe = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SqlmError("--config needs a recipe path")
        recipe = argv[i + 1]
        del argv[i : i + 2]
    elif any(a.startswith("--config=") for a in argv):
        i = next(i for i, a in enumerate(argv) if a.startswith("--config="))
        recipe = argv.pop(i).split("=", 1)[1]
    if recipe is None and argv and not argv[0].startswith("-"):
        recipe = argv.pop(0)
    return recipe, argv


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)
