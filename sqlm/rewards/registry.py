"""Rewards by name, so recipes can choose them: the one registry of reward names.

``build_rewarder("abc", reward_model="out/rm", beta=0.8)`` or, for a mix,
``build_rewarder("weighted", components=[{"name": "abc", "weight": 0.5, "reward_model": "out/rm"},
{"name": "implicit", "weight": 0.5, "model": "out/dpo", "ref_model": "Qwen/..."}])``. In a recipe the
same is a list of mappings (see :func:`rewarder_from_spec`). :func:`resolve_rewarders` turns a
config's ``reward_funcs`` (names, ``module:function`` paths, rewarders or callables) into the
trainer's rewarders and weights.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import SqlmError
from .base import CallableRewarder, TokenRewarder, WeightedSum, as_rewarder
from .builtin import BUILTIN_REWARDS
from .loading import load_causal_lm, load_reward_model
from .models import ABCRewarder, ImplicitRewarder, PrefixRewarder, TerminalRewarder, UniformRewarder


# the reward fitted by the trainer on its own training pairs (:mod:`sqlm.rewards.auto`)
AUTO_REWARD = "bradley_terry"
REWARD_MODEL_REWARDERS = {
    "terminal": TerminalRewarder,
    "uniform": UniformRewarder,
    "abc": ABCRewarder,
    "prefix": PrefixRewarder,
}
NAMES = (*BUILTIN_REWARDS, *REWARD_MODEL_REWARDERS, "implicit", "callable", "weighted", AUTO_REWARD)


def unknown_name_error(name: Any) -> str | None:
    """None for a known reward name, else the one-line message listing every known name, with a
    "did you mean" when one is close."""
    if isinstance(name, str) and name in NAMES:
        return None
    close = difflib.get_close_matches(str(name), NAMES, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (
        f"unknown rewarder '{name}' (known: {', '.join(NAMES)}; or 'module:function' with "
        f"allow_code_rewards: true){hint}"
    )


def import_callable(path: str, search_dirs: Sequence[str | os.PathLike] = ()) -> Callable[..., Any]:
    """``"package.module:function"`` (or ``"package.module.function"``) to the function.

    The module is looked up in ``search_dirs`` (e.g. the recipe's folder), then the current
    directory, then the Python path; the error names the folders it looked in."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    dirs = list(dict.fromkeys(str(Path(d).resolve()) for d in (*search_dirs, os.getcwd()) if d))
    saved = list(sys.path)
    sys.path[:0] = dirs
    importlib.invalidate_caches()
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        where = f"looked in {', '.join(dirs)} and the Python path"
        raise SqlmError(f"could not import reward function '{path}': {e} ({where})") from None
    finally:
        sys.path[:] = saved
    if not callable(fn):
        raise SqlmError(f"reward function '{path}' is not callable")
    return fn


def default_device() -> torch.device:
    """This process's accelerator (``cuda:<current>``, which accelerate sets per process) or CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _loaded(kind: str, path: str, models: dict, eager: bool = False, dtype="float32", device=None):
    """A model loaded once per build (several components may name the same path)."""
    key = (kind, path, eager, str(dtype), str(device))
    if key not in models:
        if kind == "rm":
            model, tok = load_reward_model(path, eager_attention=eager, dtype=dtype)
        else:
            model, tok = load_causal_lm(path, dtype=dtype)
        models[key] = (model.to(device or default_device()), tok)
    return models[key]


def _reward_model_rewarder(name: str, kwargs: dict, models: dict, load: dict) -> TokenRewarder:
    """``terminal`` / ``uniform`` / ``abc`` / ``prefix`` (see :func:`build_rewarder`); ``load``: dtype and device."""
    cls = REWARD_MODEL_REWARDERS[name]
    rm = kwargs.pop("reward_model", None)
    if rm is None:
        raise SqlmError(f"rewarder '{name}' needs reward_model (a path or a loaded model)")
    if isinstance(rm, str):
        rm, tok = _loaded("rm", rm, models, eager=cls.needs_attention, **load)
        kwargs.setdefault("tokenizer", tok)
    tokenizer = kwargs.pop("tokenizer", None)
    return cls(rm, tokenizer, **kwargs)


def _implicit_rewarder(kwargs: dict, models: dict, load: dict) -> TokenRewarder:
    """``implicit`` (see :func:`build_rewarder`); ``load``: dtype and device of the models given as paths."""
    model, ref = kwargs.pop("model", None), kwargs.pop("ref_model", None)
    if model is None or ref is None:
        raise SqlmError("rewarder 'implicit' needs model and ref_model (paths or loaded causal LMs)")
    if isinstance(model, str):
        model, tok = _loaded("lm", model, models, **load)
        kwargs.setdefault("tokenizer", tok)
    if isinstance(ref, str):
        ref, _ = _loaded("lm", ref, models, **load)
    tokenizer = kwargs.pop("tokenizer", None)
    return ImplicitRewarder(model, ref, tokenizer, **kwargs)


def _callable_rewarder(kwargs: dict, search_dirs: Sequence[str]) -> TokenRewarder:
    """``callable`` (see :func:`build_rewarder`): a string ``fn`` is looked up in ``search_dirs`` first."""
    fn = kwargs.pop("fn", None)
    if fn is None:
        raise SqlmError("rewarder 'callable' needs fn (a function or 'module:function')")
    if isinstance(fn, str):
        fn = import_callable(fn, search_dirs)
    kwargs.pop("policy_tokenizer", None)
    return CallableRewarder(fn, name=kwargs.pop("label", None), **kwargs)


def build_rewarder(
    name: str, _models: dict | None = None, _search_dirs: Sequence[str] = (), **kwargs: Any
) -> TokenRewarder:
    """A :class:`TokenRewarder` by name.

    - ``keyword`` / ``length``: the built-in sequence rewards of :mod:`sqlm.rewards.builtin`, with
      their arguments (``words``, ``penalty_words``, ``per_hit``; ``target``, ``scale``).
    - ``terminal`` / ``uniform`` / ``abc`` / ``prefix``: ``reward_model`` (a path or a loaded
      ``*ForSequenceClassification``), ``tokenizer`` (its tokenizer; loaded with a path),
      ``policy_tokenizer`` (when the policy's differs), ``beta`` (abc, default 0.8),
      ``baseline`` (prefix: ``"prompt"`` or ``"zero"``), ``padding_side``, ``batch_size``,
      ``max_length``.
      Models given as paths load once per build, in ``dtype`` (default ``"float32"``) on ``device``
      (default: this process's GPU if there is one, else the CPU).
    - ``implicit``: ``model`` and ``ref_model`` (paths or causal LMs), ``tokenizer``, ``beta``
      (DPO's, default 0.1), ``policy_tokenizer``.
    - ``callable``: ``fn`` (a function or ``"module:function"``) with TRL's reward-function
      signature; a string is looked up in ``_search_dirs`` and the current directory first.
    - ``weighted``: ``components``, a list of mappings each with ``name``, optional ``weight``
      (default 1) and that rewarder's arguments; other keyword arguments (e.g.
      ``policy_tokenizer``) are shared by all components.
    """
    models = {} if _models is None else _models
    if not isinstance(name, str) or name not in NAMES:
        raise SqlmError(unknown_name_error(name))
    if name == AUTO_REWARD:
        raise SqlmError(
            f"rewarder '{AUTO_REWARD}' is fitted by the trainer on its training pairs: use it in "
            "reward_funcs of sqlm train"
        )
    try:
        if name in BUILTIN_REWARDS:
            kwargs.pop("policy_tokenizer", None)
            return CallableRewarder(BUILTIN_REWARDS[name](**kwargs), name=name)
        load = {"dtype": kwargs.pop("dtype", "float32"), "device": kwargs.pop("device", None)}
        if name in REWARD_MODEL_REWARDERS:
            return _reward_model_rewarder(name, kwargs, models, load)
        if name == "implicit":
            return _implicit_rewarder(kwargs, models, load)
        if name == "callable":
            return _callable_rewarder(kwargs, _search_dirs)
        components = kwargs.pop("components", None)
        if not components:
            raise SqlmError("rewarder 'weighted' needs components: a list of {name: ..., weight: ...}")
        return rewarder_from_spec(components, _models=models, _search_dirs=_search_dirs, **kwargs)
    except TypeError as e:  # an unknown keyword for this rewarder
        raise SqlmError(f"rewarder '{name}': {e}") from None


def rewarder_from_spec(
    spec: Any, _models: dict | None = None, _search_dirs: Sequence[str] = (), **shared: Any
) -> TokenRewarder:
    """A rewarder from a recipe value: a name, a mapping ``{name: ..., ...}`` or a list of
    mappings (a weighted sum, each with an optional ``weight``). ``shared`` keyword arguments
    (e.g. ``policy_tokenizer``) go to every component that takes them."""
    models = {} if _models is None else _models
    if isinstance(spec, TokenRewarder):
        return spec
    if isinstance(spec, str):
        return build_rewarder(spec, _models=models, _search_dirs=_search_dirs, **shared)
    if isinstance(spec, dict):
        spec = dict(spec)
        if "name" not in spec:
            raise SqlmError(f"rewarder mapping needs a 'name' key, got keys {sorted(spec)}")
        spec.pop("weight", None)
        name = spec.pop("name")
        args = {**shared, **spec} if name != "callable" else {**spec}
        return build_rewarder(name, _models=models, _search_dirs=_search_dirs, **args)
    if isinstance(spec, (list, tuple)):
        parts, weights = [], []
        for i, item in enumerate(spec):
            if not isinstance(item, (dict, str)):
                raise SqlmError(f"rewarder list item {i} must be a name or a mapping, got {type(item).__name__}")
            weights.append(float(item.get("weight", 1.0)) if isinstance(item, dict) else 1.0)
            parts.append(rewarder_from_spec(item, _models=models, _search_dirs=_search_dirs, **shared))
        return parts[0] if len(parts) == 1 and weights[0] == 1.0 else WeightedSum(parts, weights)
    raise SqlmError(f"a rewarder is a name, a mapping or a list of mappings, got {type(spec).__name__}")


# ----------------------------------------------------------------------------- recipe names -> rewarders


def resolve_reward_funcs(
    names: Sequence[str] | None,
    kwargs: dict[str, dict] | None = None,
    allow_code: bool = False,
    policy_tokenizer=None,
    search_dirs: Sequence[str] = (),
) -> list[TokenRewarder]:
    """Rewarders from recipe names, each with its ``kwargs[name]``:

    - ``module:function`` -- imported only when ``allow_code`` (the recipe's ``allow_code_rewards``),
      looked up in ``search_dirs`` (the recipe's folder), the current directory and the Python path;
      the function has TRL's reward signature, or is a factory when kwargs are given for it;
    - any other name: :func:`build_rewarder` (``policy_tokenizer`` is passed along; its ``callable``
      rewarder, alone or inside ``weighted``, also needs ``allow_code`` when it names a function by
      a string).
    """
    kwargs = kwargs or {}
    unknown = [k for k in kwargs if k not in (names or [])]
    if unknown:
        raise SqlmError(f"reward_kwargs names {unknown}, which are not in reward_funcs {list(names or [])}")
    out: list[TokenRewarder] = []
    for name in names or []:
        kw = dict(kwargs.get(name) or {})
        if ":" in name:
            if not allow_code:
                raise SqlmError(
                    f"reward function '{name}' imports Python code; set allow_code_rewards: true in the "
                    "recipe to allow it"
                )
            fn = import_callable(name, search_dirs)
            r = as_rewarder(fn(**kw) if kw else fn)
        else:
            if not allow_code and _names_code(name, kw):
                raise SqlmError(
                    f"reward function '{name}' imports Python code by name; set allow_code_rewards: true "
                    "in the recipe to allow it"
                )
            if policy_tokenizer is not None and name != "callable":
                kw.setdefault("policy_tokenizer", policy_tokenizer)
            r = build_rewarder(name, _search_dirs=search_dirs, **kw)
        r.name = name
        out.append(r)
    return out


def _names_code(name: str, kw: dict) -> bool:
    if name == "callable":
        return isinstance(kw.get("fn"), str)
    if name == "weighted":
        return any(isinstance(c, dict) and _names_code(str(c.get("name")), c) for c in kw.get("components") or [])
    return False


def resolve_rewarders(
    args, tokenizer, reward_funcs=None, search_dirs: Sequence[str] = (), reward_kwargs: dict | None = None
) -> tuple[list[TokenRewarder], list[float]]:
    """A trainer's rewarders and their weights, from ``reward_funcs`` (default ``args.reward_funcs``):
    names are resolved with ``args.reward_kwargs`` / ``args.allow_code_rewards`` (see
    :func:`resolve_reward_funcs`), rewarders and TRL-style callables are used as they are.
    ``tokenizer`` is the policy's; ``reward_kwargs`` replaces ``args.reward_kwargs`` when given."""
    if reward_funcs is None:
        reward_funcs = args.reward_funcs
    if reward_funcs is not None and not isinstance(reward_funcs, (list, tuple)):
        reward_funcs = [reward_funcs]
    funcs = list(reward_funcs or [])
    names = [r for r in funcs if isinstance(r, str)]
    kwargs = args.reward_kwargs if reward_kwargs is None else reward_kwargs
    named = iter(resolve_reward_funcs(names, kwargs, args.allow_code_rewards, tokenizer, search_dirs))
    rewarders = [next(named) if isinstance(r, str) else as_rewarder(r) for r in funcs]
    weights = list(args.reward_weights or [1.0] * len(rewarders))
    if len(weights) != len(rewarders):
        raise SqlmError(f"got {len(weights)} reward_weights for {len(rewarders)} reward functions")
    return rewarders, weights
