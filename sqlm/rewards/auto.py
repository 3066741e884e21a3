"""``reward_funcs: [bradley_terry]``: a reward learned from the training pairs themselves.

Preference pairs alone carry no reward for sqlm's losses. With this opt-in, the trainer first fits a
Bradley-Terry reward model on the training pairs (TRL's ``RewardTrainer``, loss
``-log sigmoid(R(x, y_chosen) - R(x, y_rejected))``, as ``sqlm reward``), starting from the
policy's own initial weights with a one-output score head, and then scores paths with it through a
token rewarder (``terminal`` by default, or ``abc`` / ``uniform`` / ``prefix``). A split of the pairs
(``test_size``, drawn with a fixed seed) is held out of the fit and the model's accuracy on it
(chosen scored above rejected) is reported with their number, and a warning when they are too few to
read (:func:`sqlm.rewards.train.heldout_warning`).

The fitted model is cached under ``reward_cache_dir`` (default ``$SQLM_CACHE/rewards``) in
``bradley_terry/<key>``, where the key hashes the pairs, the initial weights, the tokenizer and the
settings below, so a rerun of the same recipe reuses it.

Settings (``reward_kwargs: {bradley_terry: {...}}``): ``rewarder`` (default ``terminal``),
``test_size`` (fraction of the pairs held out, default 0.1), ``num_train_epochs`` (default 1),
``learning_rate`` and ``per_device_train_batch_size`` (default: the policy's), ``max_length``
(default: the policy's), ``tokenizer_pad_token`` (as ``sqlm reward``'s: the reward model's pad token,
needed when the policy pads with its EOS; the policy's own tokenizer is left alone); the rewarder's
own keys (e.g. ``beta`` of ``abc``, ``batch_size``) go to it, and any other key is an error.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import json
import logging
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import SqlmError
from .registry import AUTO_REWARD, REWARD_MODEL_REWARDERS, build_rewarder


logger = logging.getLogger(__name__)

FIT_VERSION = 1
SPLIT_SEED = 0  # the held-out pairs are the same on every run, whatever the training seed
REWARDERS = ("terminal", "abc", "uniform", "prefix")


@dataclass
class AutoRewardSettings:
    rewarder: str = "terminal"
    test_size: float = 0.1
    num_train_epochs: float = 1.0
    learning_rate: float | None = None
    per_device_train_batch_size: int | None = None
    max_length: int | None = None
    tokenizer_pad_token: str | None = None
    rewarder_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any] | None, args) -> AutoRewardSettings:
        """The settings from ``reward_kwargs.bradley_terry`` (defaults from ``args``, the policy's
        config); a key neither these settings nor the rewarder take is an error."""
        if kwargs is not None and not isinstance(kwargs, dict):
            raise SqlmError(f"reward_kwargs.{AUTO_REWARD} must be a mapping, got {type(kwargs).__name__} {kwargs!r}")
        kw = dict(kwargs or {})
        own = [f.name for f in fields(cls) if f.name != "rewarder_kwargs"]
        s = cls(**{k: kw.pop(k) for k in own if k in kw}, rewarder_kwargs=kw)
        if s.rewarder not in REWARDERS:
            raise SqlmError(
                f"reward_kwargs.{AUTO_REWARD}.rewarder must be one of {', '.join(REWARDERS)}, got {s.rewarder!r}"
            )
        takes = rewarder_keys(s.rewarder)
        for key in kw:
            if key not in takes:
                close = difflib.get_close_matches(key, [*own, *takes], n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise SqlmError(
                    f"unknown key '{key}' in reward_kwargs.{AUTO_REWARD} (known: {', '.join(own)}; rewarder "
                    f"'{s.rewarder}' also takes {', '.join(sorted(takes))}){hint}"
                )
        if not 0 < s.test_size < 1:
            raise SqlmError(f"reward_kwargs.{AUTO_REWARD}.test_size must be a fraction in (0, 1), got {s.test_size!r}")
        s.learning_rate = float(s.learning_rate if s.learning_rate is not None else args.learning_rate)
        s.per_device_train_batch_size = int(s.per_device_train_batch_size or args.per_device_train_batch_size)
        s.max_length = s.max_length if s.max_length is not None else args.max_length
        return s

    def fit_settings(self) -> dict[str, Any]:
        """What changes the fitted model (the rewarder that reads it does not; the pad token is part of
        the tokenizer's fingerprint in :func:`fit_key`)."""
        return {k: getattr(self, k) for k in ("test_size", "num_train_epochs", "learning_rate",
                                              "per_device_train_batch_size", "max_length")}  # fmt: skip


def rewarder_keys(rewarder: str) -> set[str]:
    """The keys of ``reward_kwargs.bradley_terry`` that go to its token rewarder: the keyword arguments
    of that rewarder class and ``build_rewarder``'s ``dtype`` / ``device`` (the reward model, its
    tokenizer, the policy's tokenizer and ``max_length`` are set by the fit)."""
    keys = {"dtype", "device"}
    for klass in REWARD_MODEL_REWARDERS[rewarder].__mro__:
        if "__init__" in vars(klass):
            params = inspect.signature(vars(klass)["__init__"]).parameters.values()
            keys |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return keys - {"self", "reward_model", "tokenizer", "policy_tokenizer", "max_length"}


def reward_tokenizer(tokenizer, pad_token: str | None):
    """The tokenizer the reward model is fitted with: the policy's, or with ``pad_token`` a copy of it
    that pads with that token (the policy keeps its own padding); its pad token must not be EOS."""
    from .train import check_pad_token

    tok = copy.deepcopy(tokenizer) if pad_token is not None else tokenizer
    try:
        check_pad_token(tok, pad_token, key=f"reward_kwargs.{AUTO_REWARD}.tokenizer_pad_token")
    except SqlmError as e:
        raise SqlmError(f"reward_funcs '{AUTO_REWARD}': {e}") from None
    return tok


def pairs_only(dataset):
    """The preference columns the reward model is fitted on (``prompt`` when present)."""
    cols = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
    if "chosen" not in cols or "rejected" not in cols:
        raise SqlmError(
            f"reward_funcs '{AUTO_REWARD}' fits a reward model on preference pairs, but the training data has "
            f"no chosen/rejected columns (columns: {dataset.column_names})"
        )
    return dataset.select_columns(cols)


def fit_key(pairs, policy, tokenizer, settings: AutoRewardSettings) -> str:
    from .cache import dataset_fingerprint
    from .loading import model_fingerprint, tokenizer_fingerprint

    desc = {
        "version": FIT_VERSION,
        "data": dataset_fingerprint(pairs),
        "init": model_fingerprint(policy),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings.fit_settings(),
    }
    return hashlib.blake2b(json.dumps(desc, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def init_reward_model(policy):
    """A sequence classifier with one output on the policy's architecture and initial weights (the
    score head is new)."""
    from transformers import AutoModelForSequenceClassification

    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    config = base.config.__class__.from_dict(base.config.to_dict())
    config.num_labels = 1
    try:
        rm = AutoModelForSequenceClassification.from_config(config)
    except ValueError as e:
        raise SqlmError(
            f"reward_funcs '{AUTO_REWARD}': no sequence-classification model for {type(base).__name__} ({e})"
        ) from None
    missing, _ = rm.load_state_dict(base.state_dict(), strict=False)
    if any(not k.startswith("score") for k in missing):
        raise SqlmError(
            f"reward_funcs '{AUTO_REWARD}': the policy's weights do not fit a sequence classifier "
            f"(missing {[k for k in missing if not k.startswith('score')][:3]})"
        )
    return rm.to(next(base.parameters()).dtype)


def fit_reward_model(rm, tokenizer, train, evaluation, settings: AutoRewardSettings, args, out: Path) -> dict:
    """Fit ``rm`` on ``train`` with ``sqlm reward``'s :func:`sqlm.rewards.train.train_reward_model`
    (TRL's ``RewardTrainer``), save it to ``out`` and return ``{"train_pairs", "eval_pairs",
    "eval_accuracy"}`` (``evaluation``: the held-out pairs)."""
    from trl import RewardConfig

    from .train import train_reward_model

    config = RewardConfig(
        output_dir=str(out),
        num_train_epochs=settings.num_train_epochs,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        max_length=settings.max_length,
        lr_scheduler_type="constant",
        use_cpu=args.use_cpu,
        bf16=bool(args.bf16),
        activation_checkpointing=False,
        dataloader_pin_memory=False,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        seed=SPLIT_SEED,
    )
    _, report = train_reward_model(rm, tokenizer, train, evaluation, config)  # writes out/reward_eval.json
    return report


def bradley_terry_rewarder(policy, tokenizer, train_dataset, args, cache_root: str | os.PathLike):
    """``(rewarder, report)``: the token rewarder on a Bradley-Terry reward model fitted on the pairs
    of ``train_dataset`` (or loaded from the cache). ``report`` has ``eval_accuracy`` and
    ``eval_pairs`` (the held-out pairs), ``path`` and ``fitted`` (False: from the cache)."""
    from accelerate import PartialState

    from .train import MIN_HELDOUT_PAIRS, heldout_warning

    settings = AutoRewardSettings.from_kwargs((args.reward_kwargs or {}).get(AUTO_REWARD), args)
    rm_tokenizer = reward_tokenizer(tokenizer, settings.tokenizer_pad_token)
    pairs = pairs_only(train_dataset)
    if len(pairs) < 4:
        raise SqlmError(
            f"reward_funcs '{AUTO_REWARD}' needs at least 4 training pairs (a split is held out), got {len(pairs)}"
        )
    path = Path(cache_root) / AUTO_REWARD / fit_key(pairs, policy, rm_tokenizer, settings)
    done = path / "reward_eval.json"
    fitted = False
    if not done.is_file():
        if PartialState().num_processes > 1:
            raise SqlmError(
                f"reward_funcs '{AUTO_REWARD}': fit the reward model once in a single process (the same "
                f"recipe without accelerate launch); it is then cached in {path.parent}"
            )
        split = pairs.train_test_split(test_size=settings.test_size, seed=SPLIT_SEED)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fit_reward_model(init_reward_model(policy), rm_tokenizer, split["train"], split["test"], settings, args, tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)  # complete or absent: a killed fit leaves only a .tmp folder
        fitted = True
    report = json.loads(done.read_text())
    fix = f"hold out at least {MIN_HELDOUT_PAIRS} pairs (reward_kwargs.{AUTO_REWARD}.test_size, now {settings.test_size})"
    if PartialState().is_main_process and (msg := heldout_warning(report["eval_accuracy"], report["eval_pairs"], fix)):
        logger.warning("reward_funcs '%s': %s", AUTO_REWARD, msg)
    rewarder = build_rewarder(settings.rewarder, reward_model=str(path), policy_tokenizer=tokenizer,
                              **settings.rewarder_kwargs)  # fmt: skip
    rewarder.name = AUTO_REWARD
    return rewarder, {**report, "path": str(path), "fitted": fitted}
