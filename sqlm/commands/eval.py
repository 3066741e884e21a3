"""``sqlm eval RECIPE.yaml [--key value ...]``: score models against a reference on held-out prompts.

Gold reward, KL(pi || pi_ref), win rate against DPO, distinct-1/2 and length of each model
(``METHOD@PARAM=PATH``), written to ``results.json``, ``report.md`` and ``frontier.png`` in
``output_dir``; what each number is: :mod:`sqlm.evaluation.evaluate`.

Every model decodes with the recipe's ``strategy`` (``sample``, ``best_of_n``, ``value_beam`` and
their keys, :mod:`sqlm.decoding`) at its own tau (``PARAM``), and the report adds what each spent
(tokens generated, forward passes), so strategies compare at equal compute. Prompts are texts or
conversations (lists of ``{role, content}`` messages, through the chat template as ``sqlm train``
does). A ``gold`` reward function is called as TRL calls one: each completion's prompt
(``sqlm.evaluation.arithmetic:arith_reward`` needs it), the completion (an assistant message list
after a conversation), its token ids and the prompts file's other columns (e.g. ``answer``); one
that needs a column the file lacks stops before anything is decoded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SqlmError
from ..recipe import split_argv, wants_help


@dataclass
class EvalArguments:
    """Arguments of ``sqlm eval``."""

    models: list[str] = field(
        default_factory=list,
        metadata={"help": "Models to score, each METHOD@PARAM=PATH (e.g. dpo@0.1=out/dpo) or NAME=PATH."},
    )
    ref_model: str | None = field(default=None, metadata={"help": "The reference policy pi_ref (path)."})
    prompts_file: str | None = field(
        default=None, metadata={"help": "Held-out prompts: .json list of strings or .jsonl with a 'prompt' column."}
    )
    gold: str = field(
        default="sentiment",
        metadata={"help": "Gold reward: 'sentiment' (VADER compound) or 'module:function' (TRL signature)."},
    )
    baseline_method: str = field(default="dpo", metadata={"help": "Method the win rates are measured against."})
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    samples_per_prompt: int = field(default=1, metadata={"help": "Completions sampled per prompt and model."})
    max_new_tokens: int = field(default=24, metadata={"help": "Completion length limit (tokens)."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per sampling / scoring batch."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (shared by all models)."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where report.md and frontier.png go."})
    title: str = field(default="Gold reward vs KL", metadata={"help": "Title of the report and the plot."})


def recipe_dataclasses():
    """The config classes a ``sqlm eval`` recipe parses into: its own and the decoding strategy's
    (``strategy: sample`` by default; see :mod:`sqlm.decoding`)."""
    from ..decoding.arguments import DecodingArguments

    return (EvalArguments, DecodingArguments)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(argv or [])
    if wants_help(argv):
        from ..evaluation import evaluate

        print("usage: sqlm eval RECIPE.yaml [--key value ...]\n\n" + (evaluate.__doc__ or ""))
        return 0
    from ..evaluation.evaluate import ModelSpec, evaluate_models, gold_scorer, load_prompt_rows, prompt_columns
    from ..evaluation.evaluate_report import write_report
    from ..recipe import parse_recipe

    recipe, overrides = split_argv(argv)
    args, decoding = parse_recipe(recipe_dataclasses(), recipe, overrides)
    if not args.models:
        raise SqlmError("set models: a list of METHOD@PARAM=PATH entries")
    if args.ref_model is None:
        raise SqlmError("set ref_model: the reference policy the KL is measured against")
    if args.prompts_file is None:
        raise SqlmError("set prompts_file: held-out prompts (.json list or .jsonl with 'prompt')")
    specs = [ModelSpec.parse(m) for m in args.models]
    rows = load_prompt_rows(args.prompts_file)[: args.num_prompts]
    prompts, columns = [r["prompt"] for r in rows], prompt_columns(rows)
    search = [str(Path(recipe).resolve().parent)] if recipe else []
    # the gold function's signature against the prompts' columns, before any model loads
    gold = gold_scorer(args.gold, columns, f"prompts_file {args.prompts_file}", search)
    rewarder = None
    if decoding.reward_funcs:
        from ..decoding.arguments import rewarder_for
        from ..loading import load_policy

        rewarder = rewarder_for(decoding, load_policy(args.ref_model)[1], search)
    results = evaluate_models(
        specs,
        args.ref_model,
        prompts,
        gold=gold,
        baseline_method=args.baseline_method,
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        decoding=decoding,
        rewarder=rewarder,
        columns=columns,
    )
    report = write_report(results, args.output_dir, title=args.title)
    print(f"sqlm eval: report at {report}")
    return 0
