"""``sqlm generate RECIPE.yaml [--key value ...]``: decode prompts with a trained model, using its own
values (``strategy``: ``sample``, ``best_of_n``, ``value_beam``; :mod:`sqlm.decoding` states every
score exactly), and write one JSON line per prompt with its completion, score and the compute spent.

    sqlm generate recipes/arithmetic/generate/config_value_beam.yaml --model_name_or_path OUT/sqlm \\
        --ref_model BASE --prompts_file DATA/eval_prompts.json
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SqlmError
from ..recipe import split_argv, wants_help


@dataclass
class GenerateArguments:
    """Arguments of ``sqlm generate`` besides the strategy (:class:`sqlm.decoding.DecodingArguments`)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "The trained model (a local folder)."})
    ref_model: str | None = field(
        default=None,
        metadata={"help": "The reference pi_ref the model was trained against (needed by 'implicit' and 'soft')."},
    )
    prompts_file: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: .json list or .jsonl rows with a 'prompt' column, each a text or a conversation "
            "(a list of {role, content} messages, through the chat template as sqlm train does); other columns go "
            "to the gold and reward functions (a relative path not found in the current folder is looked up "
            "beside the recipe)."
        },
    )
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    num_return_sequences: int = field(
        default=1, metadata={"help": "Independent results per prompt (each with its own samples or beams)."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Completion length limit (tokens)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts decoded together (with their samples or beams)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (one generator per prompt, batch-independent)."})
    keep_candidates: bool = field(
        default=False, metadata={"help": "best_of_n: also write every candidate with its score."}
    )
    gold: str | None = field(
        default=None,
        metadata={
            "help": "Optional 'module:function' (TRL reward signature) to score the results, e.g. the checker; it "
            "gets the prompts, completions, completion_ids and the prompts file's other columns (e.g. answer)."
        },
    )
    output_file: str = field(
        default="outputs/generate/completions.jsonl", metadata={"help": "Where the JSON lines go."}
    )


def recipe_dataclasses():
    """The config classes a ``sqlm generate`` recipe parses into."""
    from ..decoding.arguments import DecodingArguments

    return (GenerateArguments, DecodingArguments)


def _print_help() -> None:
    """``sqlm generate --help``: the usage line, every recipe key with its help and the strategies' docs."""
    import dataclasses

    from .. import decoding

    keys = [
        f"  {f.name:<22} {f.metadata.get('help', '')}" for c in recipe_dataclasses() for f in dataclasses.fields(c)
    ]
    print(
        "usage: sqlm generate RECIPE.yaml [--key value ...]\n\nkeys:\n"
        + "\n".join(keys)
        + "\n\n"
        + (decoding.__doc__ or "")
    )


def _check_arguments(args: GenerateArguments) -> None:
    """The keys ``sqlm generate`` cannot run without, and ``num_prompts``'s range."""
    if args.model_name_or_path is None:
        raise SqlmError("set model_name_or_path: the model to decode with")
    if args.prompts_file is None:
        raise SqlmError("set prompts_file: prompts (.json list or .jsonl with 'prompt')")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise SqlmError(f"key 'num_prompts' must be >= 1, got {args.num_prompts}")


def _prompts_path(prompts_file: str, recipe: str | None) -> Path:
    """``prompts_file`` as given, or beside the recipe when it is relative and not in the current folder."""
    prompts_file = Path(prompts_file)
    if recipe and not prompts_file.is_absolute() and not prompts_file.is_file():
        beside = Path(recipe).resolve().parent / prompts_file  # a prompts file shipped beside the recipe
        prompts_file = beside if beside.is_file() else prompts_file
    return prompts_file


def _score_gold(gold, rows: list[dict], columns: dict[str, list]) -> float:
    """Score every row with the gold function (into its ``gold``); returns the mean over the scored rows."""
    from ..evaluation.evaluate import gold_scores

    golds = gold_scores(
        gold, [r["completion"] for r in rows], [r["prompt"] for r in rows],
        completion_ids=[r["completion_ids"] for r in rows],
        **{k: [v[r["prompt_index"]] for r in rows] for k, v in columns.items()},
    )  # fmt: skip
    for r, g in zip(rows, golds):
        r["gold"] = None if g is None else float(g)
    vals = [r["gold"] for r in rows if r["gold"] is not None]
    return sum(vals) / max(len(vals), 1)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(argv or [])
    if wants_help(argv):
        _print_help()
        return 0
    from ..decoding.api import decode
    from ..decoding.arguments import check_reference, rewarder_for
    from ..evaluation.evaluate import gold_scorer, load_prompt_rows, prompt_columns
    from ..loading import load_policy
    from ..recipe import parse_recipe

    recipe, overrides = split_argv(argv)
    args, dec = parse_recipe(recipe_dataclasses(), recipe, overrides)
    _check_arguments(args)
    check_reference(dec, None if args.ref_model is None else args.ref_model)
    prompts_file = _prompts_path(args.prompts_file, recipe)
    rows = load_prompt_rows(str(prompts_file))[: args.num_prompts]
    prompts, columns = [r["prompt"] for r in rows], prompt_columns(rows)
    search = [str(Path(recipe).resolve().parent)] if recipe else []
    # the gold function's signature against the prompts' columns, before any model loads
    gold = gold_scorer(args.gold, columns, f"prompts_file {prompts_file}", search) if args.gold else None
    model, tokenizer = load_policy(args.model_name_or_path)
    ref = load_policy(args.ref_model)[0] if args.ref_model is not None else None
    rewarder = rewarder_for(dec, tokenizer, search) if dec.reward_funcs else None
    t0 = time.time()
    result = decode(
        model, tokenizer, prompts, dec, ref_model=ref, rewarder=rewarder, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed, num_return_sequences=args.num_return_sequences,
        keep_candidates=args.keep_candidates, progress=True, columns=columns,
    )  # fmt: skip
    wall = time.time() - t0
    summary = {"label": dec.label(), "wall_time_s": round(wall, 2), **result.compute.as_dict()}
    if gold is not None:
        summary["gold"] = _score_gold(gold, result.rows, columns)
    path = result.write_jsonl(args.output_file)
    Path(path.with_suffix(".summary.json")).write_text(json.dumps({**summary, "settings": result.settings}, indent=1))
    gold = f", gold {summary['gold']:.3f}" if "gold" in summary else ""
    print(
        f"sqlm generate: {len(result.rows)} completions ({dec.label()}{gold}) to {path}; "
        f"{summary['tokens_generated_per_prompt']:.1f} tokens generated and {summary['forward_tokens_per_prompt']:.1f} "
        f"token positions run per prompt, {summary['forward_passes']} forward passes, {wall:.1f} s"
    )
    return 0
