"""YAML recipes and command-line overrides, with TRL's parser semantics.

A recipe is a YAML mapping whose keys are the fields of the command's config dataclasses (the same
names as TRL's configs). Flags on the command line override the recipe (``--key value``). Recipes
are read with ``yaml.safe_load`` only. Unknown keys, wrong types and malformed YAML raise
:class:`sqlm.errors.SqlmError` naming the key (and the closest valid key).
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


def unknown_key_error(key: str, valid: Sequence[str], where: str) -> SqlmError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return SqlmError(f"unknown key '{key}' in {where}{hint}")


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
    try:
        outputs = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    except SystemExit:
        raise SqlmError(f"could not parse the flags {' '.join(args)}") from None
    except (ValueError, TypeError) as e:
        raise SqlmError(f"invalid value in {where}: {e}") from None
    *objs, remaining = outputs
    if remaining:
        raise SqlmError(f"unexpected command-line arguments: {' '.join(remaining)}")
    for obj in objs:
        check_types(obj, where)
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
