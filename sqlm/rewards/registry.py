"""Rewarders by name, so recipes can choose them.

``build_rewarder("abc", reward_model="out/rm", beta=0.8)`` or, for a mix,
``build_rewarder("weighted", components=[{"name": "abc", "weight": 0.5, "reward_model": "out/rm"},
{"name": "implicit", "weight": 0.5, "model": "out/dpo", "ref_model": "Qwen/..."}])``. In a recipe the
same is a list of mappings (see :func:`rewarder_from_spec`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from ..errors import SqlmError
from .base import CallableRewarder, TokenRewarder, WeightedSum
from .models import (
    ABCRewarder,
    ImplicitRewarder,
    PrefixRewarder,
    TerminalRewarder,
    UniformRewarder,
    load_causal_lm,
    load_reward_model,
)

REWARD_MODEL_REWARDERS = {
    "terminal": TerminalRewarder,
    "uniform": UniformRewarder,
    "abc": ABCRewarder,
    "prefix": PrefixRewarder,
}
NAMES = (*REWARD_MODEL_REWARDERS, "implicit", "callable", "weighted")


def import_callable(path: str) -> Callable[..., Any]:
    """``"package.module:function"`` (or ``"package.module.function"``) to the function."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise SqlmError(f"could not import reward function '{path}': {e}") from None
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


def build_rewarder(name: str, _models: dict | None = None, **kwargs: Any) -> TokenRewarder:
    """A :class:`TokenRewarder` by name.

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
      signature.
    - ``weighted``: ``components``, a list of mappings each with ``name``, optional ``weight``
      (default 1) and that rewarder's arguments; other keyword arguments (e.g.
      ``policy_tokenizer``) are shared by all components.
    """
    models = {} if _models is None else _models
    if not isinstance(name, str) or name not in NAMES:
        import difflib

        close = difflib.get_close_matches(str(name), NAMES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SqlmError(f"unknown rewarder '{name}' (known: {', '.join(NAMES)}){hint}")
    try:
        load = {"dtype": kwargs.pop("dtype", "float32"), "device": kwargs.pop("device", None)}
        if name in REWARD_MODEL_REWARDERS:
            cls = REWARD_MODEL_REWARDERS[name]
            rm = kwargs.pop("reward_model", None)
            if rm is None:
                raise SqlmError(f"rewarder '{name}' needs reward_model (a path or a loaded model)")
            if isinstance(rm, str):
                rm, tok = _loaded("rm", rm, models, eager=cls.needs_attention, **load)
                kwargs.setdefault("tokenizer", tok)
            tokenizer = kwargs.pop("tokenizer", None)
            return cls(rm, tokenizer, **kwargs)
        if name == "implicit":
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
        if name == "callable":
            fn = kwargs.pop("fn", None)
            if fn is None:
                raise SqlmError("rewarder 'callable' needs fn (a function or 'module:function')")
            if isinstance(fn, str):
                fn = import_callable(fn)
            kwargs.pop("policy_tokenizer", None)
            return CallableRewarder(fn, name=kwargs.pop("label", None), **kwargs)
        components = kwargs.pop("components", None)
        if not components:
            raise SqlmError("rewarder 'weighted' needs components: a list of {name: ..., weight: ...}")
        return rewarder_from_spec(components, _models=models, **kwargs)
    except TypeError as e:  # an unknown keyword for this rewarder
        raise SqlmError(f"rewarder '{name}': {e}") from None


def rewarder_from_spec(spec: Any, _models: dict | None = None, **shared: Any) -> TokenRewarder:
    """A rewarder from a recipe value: a name, a mapping ``{name: ..., ...}`` or a list of
    mappings (a weighted sum, each with an optional ``weight``). ``shared`` keyword arguments
    (e.g. ``policy_tokenizer``) go to every component that takes them."""
    models = {} if _models is None else _models
    if isinstance(spec, TokenRewarder):
        return spec
    if isinstance(spec, str):
        return build_rewarder(spec, _models=models, **shared)
    if isinstance(spec, dict):
        spec = dict(spec)
        if "name" not in spec:
            raise SqlmError(f"rewarder mapping needs a 'name' key, got keys {sorted(spec)}")
        spec.pop("weight", None)
        name = spec.pop("name")
        args = {**shared, **spec} if name != "callable" else {**spec}
        return build_rewarder(name, _models=models, **args)
    if isinstance(spec, (list, tuple)):
        parts, weights = [], []
        for i, item in enumerate(spec):
            if not isinstance(item, (dict, str)):
                raise SqlmError(f"rewarder list item {i} must be a name or a mapping, got {type(item).__name__}")
            weights.append(float(item.get("weight", 1.0)) if isinstance(item, dict) else 1.0)
            parts.append(rewarder_from_spec(item, _models=models, **shared))
        return parts[0] if len(parts) == 1 and weights[0] == 1.0 else WeightedSum(parts, weights)
    raise SqlmError(f"a rewarder is a name, a mapping or a list of mappings, got {type(spec).__name__}")
