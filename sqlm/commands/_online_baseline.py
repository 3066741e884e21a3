"""What ``sqlm grpo`` and ``sqlm rloo`` share: TRL's online trainers on the prompts, reward, model and
budget of a paired sqlm online recipe.

Like for like with ``sqlm train --mode online``:

* **Prompts**: the training rows go through ``sqlm.data.prepare_dataset`` (mode ``online``), the function
  ``sqlm train`` tokenises with, and the trainer generates from those very ``prompt_ids`` (the same
  chat template, ``max_prompt_length`` cut and skipped rows), not from its own tokenisation of the text.
* **Reward**: ``reward_funcs`` takes sqlm's names (``keyword``, ``length``, the ``sqlm.rewards``
  rewarders such as ``terminal`` with ``reward_kwargs``), ``module:function`` behind
  ``allow_code_rewards``, or the folder / hub id of a trained sequence-classification reward model
  (TRL's own model reward; safetensors only). A sqlm rewarder scores a completion exactly as in
  ``sqlm train``: the sum of its per-token rewards. ``reward_scale`` multiplies the total reward, as
  in sqlm (it is folded into TRL's ``reward_weights``).
* **Model**: loaded as ``sqlm dpo`` loads it (``tiny:...`` gives the same cached weights and tokenizer).
* **Budget**: GRPO's and RLOO's ``per_device_train_batch_size`` counts completions, as sqlm's online
  batch: a pair has ``trl_batch = sqlm_batch`` (online DPO counts prompts: half), the same ``num_generations``,
  ``max_completion_length``, ``temperature``, ``max_steps``, ``learning_rate`` and ``seed``.

Every run writes ``run_stats.json`` to ``output_dir``: generated completions and tokens, optimizer
steps and wall time.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..config import accelerator_supports_bf16, get_peft_config
from ..errors import SqlmError
from ..recipe import wants_help
from ._stats import write_run_stats


# keyword arguments TRL adds to a reward function's call that are not dataset columns
_TRL_CALL_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")


@dataclass
class PromptRewardArguments:
    """Data and reward arguments of the online baselines, with the names and meaning of ``sqlm train``'s
    (the generation keys are TRL's config keys, as in sqlm's recipes)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompts (prompt-only, prompt-completion or preference data; only the prompts are used): a hub "
            "id, a local folder, or a .json/.jsonl/.parquet/.csv file (relative paths are also looked up beside "
            "the recipe)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split to evaluate on; None = none."})
    dataset_column_map: dict | str | None = field(
        default=None, metadata={"help": "Rename dataset columns to TRL's names (prompt, ...) before use."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Maximum prompt tokens; longer prompts keep their end (as sqlm train)."}
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenizing the dataset."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use; defaults to model_name_or_path."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions, as in sqlm train: a built-in ('keyword', 'length'), a sqlm rewarder "
            "('terminal', 'abc', ... with reward_kwargs), 'module:function' (needs allow_code_rewards), or the "
            "folder / hub id of a sequence-classification reward model (scored by TRL)."
        },
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments per reward function name, e.g. {terminal: {reward_model: out/rm}}."},
    )
    allow_code_rewards: bool = field(
        default=False,
        metadata={"help": "Allow 'module:function' reward functions named in a recipe to be imported (runs code)."},
    )
    reward_scale: float = field(
        default=1.0,
        metadata={
            "help": "Multiply the total reward by this factor, as sqlm train's reward_scale (folded into "
            "TRL's reward_weights)."
        },
    )


@dataclass
class OnlineScriptArguments(PromptRewardArguments):
    """:class:`PromptRewardArguments` plus sqlm's ``max_length`` (``sqlm grpo`` / ``sqlm rloo``; the
    online DPO config has its own ``max_length``)."""

    max_length: int | None = field(
        default=1024,
        metadata={"help": "As sqlm train: rows whose prompt alone has this many tokens are dropped."},
    )


class AutoBf16:
    """Mixin for a TRL config class: ``bf16`` left unset means on only when a bf16-capable accelerator
    is present, as ``SoftQConfig`` and ``SqlmDPOConfig`` (TRL's default turns it on, which fails on a CPU)."""

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = (not self.fp16) and (not self.use_cpu) and accelerator_supports_bf16()
        super().__post_init__()


# ----------------------------------------------------------------------------- rewards


class SqlmRewardFunction:
    """A sqlm rewarder as a TRL reward function: each completion's reward is the sum of the rewarder's
    per-token rewards (what ``sqlm train`` adds up along the path). The prompts are the
    ``prompt_ids`` column (sqlm's tokens); other dataset columns reach the rewarder as in sqlm."""

    def __init__(self, rewarder, pad_token_id: int):
        self.rewarder, self.pad_token_id = rewarder, pad_token_id
        self.__name__ = rewarder.name

    def __call__(self, prompts, completions, completion_ids, prompt_ids=None, **kwargs) -> list[float]:
        from ..columns import TEXT_COLUMNS, TOKEN_COLUMNS
        from ..data.trajectories import Trajectory
        from ..rewards.scoring import score_trajectories

        if prompt_ids is None:
            raise SqlmError(
                f"reward '{self.__name__}' got no prompt_ids column (the dataset was not prepared by sqlm)"
            )
        skip = set(_TRL_CALL_KWARGS) | set(TOKEN_COLUMNS) | set(TEXT_COLUMNS)
        columns = {k: v for k, v in kwargs.items() if k not in skip and isinstance(v, list) and len(v) == len(prompts)}
        trajectories = [
            Trajectory(
                prompt_ids=list(prompt_ids[i]),
                completion_ids=list(completion_ids[i]),
                prompt=prompts[i],
                completion=completions[i],
                columns={k: v[i] for k, v in columns.items()},
                source="online",
            )
            for i in range(len(prompts))
        ]
        rewards, _ = score_trajectories(trajectories, [self.rewarder], [1.0], self.pad_token_id)
        return [float(r.sum()) for r in rewards]


def _is_sqlm_reward(name: str) -> bool:
    from ..rewards.builtin import BUILTIN_REWARDS
    from ..rewards.registry import NAMES

    return name in BUILTIN_REWARDS or name in NAMES or ":" in name


def _reward_model(name: str, trust_remote_code: bool):
    """A sequence-classification reward model (safetensors only) and its tokenizer, for TRL to score."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..data.sources import one_line
    from ..gguf import resolve_model_path

    name = resolve_model_path(name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=1, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SqlmError(f"could not load the reward model '{name}' named in reward_funcs: {one_line(e)}") from None
    return model.eval(), tokenizer


def build_reward_funcs(script_args: PromptRewardArguments, tokenizer, trust_remote_code: bool = False):
    """``(reward_funcs, reward_processing_classes)`` for a TRL online trainer from the recipe's
    ``reward_funcs`` / ``reward_kwargs`` / ``allow_code_rewards`` (see the module docstring)."""
    from ..config import as_mapping
    from ..rewards.registry import resolve_reward_funcs

    names = list(script_args.reward_funcs or [])
    if not names:
        raise SqlmError("set reward_funcs (e.g. [keyword], [terminal] with reward_kwargs, or a reward model folder)")
    kwargs = as_mapping(script_args.reward_kwargs, "reward_kwargs") or {}
    sqlm_names = [n for n in names if _is_sqlm_reward(n)]
    for n in names:
        if n not in sqlm_names and not (Path(n).is_dir() or n.count("/") == 1):
            raise SqlmError(
                f"unknown reward function '{n}' in reward_funcs: not a sqlm reward, 'module:function', a reward "
                "model folder or a hub id"
            )
    models = [n for n in kwargs if n in names and n not in sqlm_names]
    if models:
        raise SqlmError(f"reward_kwargs names the reward model(s) {models}; a reward model folder takes no kwargs")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    resolved = iter(resolve_reward_funcs(sqlm_names, kwargs, script_args.allow_code_rewards, tokenizer))
    funcs, processing = [], []
    for n in names:
        if n in sqlm_names:
            funcs.append(SqlmRewardFunction(next(resolved), pad))
            processing.append(None)
        else:
            model, tok = _reward_model(n, trust_remote_code)
            funcs.append(model)
            processing.append(tok)
    return funcs, processing


def scaled_reward_weights(weights: list[float] | None, scale: float, n: int) -> list[float] | None:
    """TRL's ``reward_weights`` with sqlm's ``reward_scale`` folded in: ``scale * sum_k w_k r_k`` (None
    when there is nothing to change)."""
    if scale == 1.0:
        return weights
    if weights is not None and len(weights) != n:
        raise SqlmError(f"reward_weights has {len(weights)} values for {n} reward_funcs")
    return [scale * w for w in (weights if weights is not None else [1.0] * n)]


# ----------------------------------------------------------------------------- data and trainer


def prompt_dataset(
    dataset, tokenizer, script_args: PromptRewardArguments, max_length: int | None, name: str = "train"
):
    """The rows with sqlm's ``prompt_ids`` (``sqlm.data.prepare_dataset`` in online mode, as ``sqlm
    train --mode online`` prepares them); the text columns stay for the reward functions."""
    from ..config import as_mapping
    from ..data.prepare import prepare_dataset

    args = SimpleNamespace(
        mode="online",
        dataset_column_map=as_mapping(script_args.dataset_column_map, "dataset_column_map"),
        chosen_score_column=None,
        rejected_score_column=None,
        max_length=max_length,
        max_prompt_length=script_args.max_prompt_length,
        max_completion_length=None,
        dataset_num_proc=script_args.dataset_num_proc,
    )
    return prepare_dataset(dataset, tokenizer, args, mode="online", name=name)


def make_trainer_class(base: type) -> type:
    """``base`` (``GRPOTrainer`` or ``RLOOTrainer``) generating from the dataset's ``prompt_ids``
    (sqlm's tokens) and counting what it generates in training."""

    class Trainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.generated_completions = 0
            self.generated_tokens = 0
            self._rows = None

        def _generate_and_score_completions(self, inputs):
            self._rows = inputs
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self._rows = None

        def _tokenize_prompts(self, prompts):
            rows = self._rows
            if rows is None or len(rows) != len(prompts) or any("prompt_ids" not in r for r in rows):
                return super()._tokenize_prompts(prompts)
            return [list(r["prompt_ids"]) for r in rows], None, {}

        def _generate(self, prompts):
            out = super()._generate(prompts)
            if self.model.training:
                completion_ids = out[1]
                self.generated_completions += len(completion_ids)
                self.generated_tokens += sum(len(c) for c in completion_ids)
            return out

    Trainer.__name__ = Trainer.__qualname__ = f"Sqlm{base.__name__}"
    return Trainer


def build_trainer(trainer_cls: type, script_args, config, model_args, recipe: str | None = None):
    """A ready ``trainer_cls`` (made by :func:`make_trainer_class`, or ``sqlm online_dpo``'s) from the
    parsed recipe."""
    from ..config import as_mapping
    from ..data.sources import load_train_eval
    from ..loading import check_model_args, load_model_and_tokenizer

    if script_args.dataset_name is None:
        raise SqlmError("set dataset_name (the prompts: a hub id or a local .jsonl/.json/.parquet/.csv)")
    check_model_args(model_args, "the online baselines")
    if config.temperature != 1.0:
        import logging

        logging.getLogger(__name__).warning(
            "temperature %s: sqlm samples at 1.0 (the soft policy); this run is not paired", config.temperature
        )
    train, evaluation = load_train_eval(script_args, str(Path(recipe).resolve().parent) if recipe else None)
    column_map = as_mapping(script_args.dataset_column_map, "dataset_column_map")
    model, tokenizer = load_model_and_tokenizer(
        model_args, config, train, column_map, script_args.tokenizer_name_or_path
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    funcs, processing = build_reward_funcs(script_args, tokenizer, bool(getattr(config, "trust_remote_code", False)))
    config.reward_weights = scaled_reward_weights(config.reward_weights, script_args.reward_scale, len(funcs))
    max_length = getattr(script_args, "max_length", getattr(config, "max_length", None))
    train = prompt_dataset(train, tokenizer, script_args, max_length, "train")
    if evaluation is not None:
        evaluation = prompt_dataset(evaluation, tokenizer, script_args, max_length, "eval")
    try:
        return trainer_cls(
            model=model,
            reward_funcs=funcs,
            args=config,
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=tokenizer,
            reward_processing_classes=processing,
            peft_config=get_peft_config(model_args),
        )
    except ValueError as e:  # TRL's checks of the batch / generation settings
        raise SqlmError(str(e).splitlines()[0]) from None


def parse(dataclass_types, argv: list[str]):
    from ..recipe import parse_recipe, split_argv

    recipe, overrides = split_argv(argv)
    try:
        script_args, config, model_args = parse_recipe(dataclass_types, recipe, overrides)
    except ValueError as e:  # a TRL config's own checks (__post_init__)
        raise SqlmError(f"invalid settings in {recipe or 'the arguments'}: {str(e).splitlines()[0]}") from None
    return recipe, script_args, config, model_args


def main(name: str, dataclass_types, trainer_cls, doc: str, argv: list[str] | None) -> int:
    """``sqlm <name> RECIPE.yaml [--key value ...]``: parse, train, save the model and ``run_stats.json``.
    ``trainer_cls()`` gives the trainer class (imported only when the command runs)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(argv or [])
    if not argv or wants_help(argv):
        print(f"usage: sqlm {name} RECIPE.yaml [--key value ...]\n\n{doc}")
        return 0
    start = time.time()
    # TRL 1.16 reads transformers' deprecated alias at every generation step: one FutureWarning a run
    # that a user can do nothing about
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    recipe, script_args, config, model_args = parse(dataclass_types, argv)
    trainer = build_trainer(trainer_cls(), script_args, config, model_args, recipe)
    t = time.time()
    trainer.train()
    train_seconds = time.time() - t
    out = Path(config.output_dir)
    trainer.save_model(str(out))
    stats = write_run_stats(trainer, name, train_seconds, out, total_seconds=time.time() - start)
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(out)
        print(
            f"sqlm {name}: {stats['optimizer_steps']} optimizer steps, {stats['generated_completions']} completions "
            f"({stats['generated_tokens']} tokens) generated, {train_seconds:.1f}s training; saved to {out}"
        )
    return 0
