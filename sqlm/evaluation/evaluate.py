"""Scoring models against a reference on held-out prompts (``sqlm eval``, :mod:`sqlm.commands.eval`).

For each model (``METHOD@PARAM=PATH``, e.g. ``dpo@0.1=outputs/dpo-b0.1``; or ``NAME=PATH``):

* **gold reward**: mean +- standard error of the gold scorer over sampled completions;
* **KL(pi || pi_ref)**: per completion, the exact per-token KL (full-vocabulary sum at every
  step) summed along the sampled completion; mean +- standard error (an unbiased estimate of the
  sequence KL, ``sqlm.evaluation.metrics``);
* **win rate** against the DPO model (the ``dpo`` entry with the same ``PARAM``, else the nearest):
  ``P(gold_model > gold_dpo) + 1/2 P(tie)`` over paired samples (same prompt, same sample index);
* **distinct-1/2** and **mean length** (completion tokens, EOS excluded).

All models sample with the same seed (common random numbers), from ``softmax(logits)`` at
temperature 1. Writes ``results.json``, ``report.md`` and ``frontier.png`` (gold reward against
KL, one curve per method over its sweep of tau/beta, as Figure 2 of the DPO paper;
:mod:`sqlm.evaluation.evaluate_report`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import SqlmError
from ..loading import load_policy


@dataclass
class ModelSpec:
    """One model to evaluate: ``method`` names its curve on the frontier, ``param`` is its tau/beta."""

    name: str
    path: str
    method: str
    param: float | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``METHOD@PARAM=PATH`` or ``NAME=PATH``."""
        if "=" not in text:
            raise SqlmError(f"model entry '{text}' must be METHOD@PARAM=PATH or NAME=PATH")
        name, path = text.split("=", 1)
        method, param = name, None
        if "@" in name:
            method, p = name.split("@", 1)
            try:
                param = float(p)
            except ValueError:
                raise SqlmError(f"model entry '{text}': '{p}' after '@' must be a number (tau or beta)") from None
        if not method or not path:
            raise SqlmError(f"model entry '{text}' must be METHOD@PARAM=PATH or NAME=PATH")
        return cls(name=name, path=path, method=method, param=param)


# ----------------------------------------------------------------------------- loading


def _is_prompt(value) -> bool:
    """A non-empty text, or a conversation: a non-empty list of ``{role, content}`` messages."""
    if isinstance(value, str):
        return bool(value)
    return bool(value) and isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def load_prompt_rows(path: str) -> list[dict]:
    """The rows of a prompts file (a .json list or .jsonl lines), each ``{"prompt": ..., **columns}``:
    the prompt is a text or, as ``sqlm train`` takes it, a conversation (a list of ``{role, content}``
    messages); a row may be a bare prompt. Other columns (e.g. ``answer``) go to a gold or reward
    function as keyword arguments, as TRL passes a dataset's columns."""
    p = Path(path)
    if not p.is_file():
        raise SqlmError(f"prompts_file not found: {path}")
    text = p.read_text()
    try:
        data = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if p.suffix == ".jsonl"
            else json.loads(text)
        )
    except json.JSONDecodeError as e:
        raise SqlmError(f"prompts_file {path} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise SqlmError(f"prompts_file {path} must hold a non-empty list of prompts or rows with a 'prompt'")
    rows = []
    for i, r in enumerate(data):
        row = dict(r) if isinstance(r, dict) else {"prompt": r}
        if not _is_prompt(row.get("prompt")):
            raise SqlmError(
                f"row {i} of prompts_file {path}: 'prompt' must be a non-empty text or a list of "
                f"{{role, content}} messages, got {str(row.get('prompt'))[:60]!r}"
            )
        rows.append(row)
    return rows


def prompt_columns(rows: list[dict]) -> dict[str, list]:
    """``{column: one value per row}`` of the rows' columns besides ``prompt`` (None where a row lacks one)."""
    names = dict.fromkeys(k for r in rows for k in r if k != "prompt")
    return {k: [r.get(k) for r in rows] for k in names}


def prompt_text(prompt) -> str:
    """A prompt for reading in a report: a text as it is, a conversation's last message."""
    return prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))


REWARD_ARGS = ("prompts", "completions", "completion_ids")
"""What TRL gives every reward function besides the dataset's columns."""


def _parameters(fn) -> tuple[list, bool]:
    """``(named parameters, takes **kwargs)`` of ``fn`` (``([], True)`` when it cannot be read)."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return [], True
    return params, any(p.kind is p.VAR_KEYWORD for p in params)


def check_reward_function(fn, name: str, columns, where: str) -> None:
    """One line, before anything is decoded, when ``fn`` requires an argument that neither TRL's
    reward arguments (:data:`REWARD_ARGS`) nor the ``columns`` of ``where`` give."""
    params, _ = _parameters(fn)
    given = {*REWARD_ARGS, *columns}
    for p in params:
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in given:
            have = ", ".join(["prompt", *columns])
            raise SqlmError(f"gold function '{name}' needs a column '{p.name}', which {where} lacks (columns: {have})")


def call_reward_function(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with only the keyword arguments ``fn`` takes (all of them when it takes
    ``**kwargs``, as TRL's reward functions do)."""
    params, takes_all = _parameters(fn)
    if not takes_all:
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    return fn(*args, **kwargs)


def gold_scorer(spec: str, columns=None, where: str = "the prompts file", search_dirs=()):
    """``texts -> scores``: the built-in sentiment scorer, or a TRL-style reward function, called as
    TRL calls one: ``prompts``, ``completions`` (an assistant message list after a conversational
    prompt), ``completion_ids`` and the prompts' other columns. With ``columns`` (the names the
    prompts file has), a function that needs a column ``where`` lacks is an error now, before any
    decoding."""
    if spec == "sentiment":
        from .gold import gold_reward

        return gold_reward
    from ..decoding.inputs import as_completion
    from ..rewards.registry import import_callable

    fn = import_callable(spec, search_dirs)
    if columns is not None:
        check_reward_function(fn, spec, list(columns), where)

    def score(texts, prompts=None, **kwargs):
        prompts = [""] * len(texts) if prompts is None else list(prompts)
        completions = [as_completion(p, t) for p, t in zip(prompts, texts)]
        values = call_reward_function(fn, prompts=prompts, completions=completions, **kwargs)
        return [None if x is None else float(x) for x in values]  # None: TRL's "does not apply"

    return score


def gold_scores(gold, texts: list[str], prompts: list, **kwargs) -> list[float]:
    """``gold(texts, prompts=..., **kwargs)`` (``completion_ids``, the prompts' columns), with only
    the keyword arguments the scorer takes."""
    return list(call_reward_function(gold, texts, prompts=prompts, **kwargs))


# ----------------------------------------------------------------------------- scoring


def score_model(
    model,
    ref_model,
    tokenizer,
    prompts: list,
    *,
    gold,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 24,
    seed: int = 0,
    batch_size: int = 64,
    desc: str = "sampling",
    progress: bool = True,
    decoding=None,
    rewarder=None,
    columns: dict[str, list] | None = None,
) -> dict:
    """Sample (or decode with ``decoding``, a :class:`sqlm.decoding.DecodingArguments`), then per
    completion: gold score, exact sequence KL, sampled log-ratio, length, text; with ``decoding``
    also the strategy's ``score`` per completion and its ``compute`` (:class:`sqlm.decoding.Compute`).
    ``prompts`` are texts or conversations (tokenised as ``sqlm train`` does); ``columns`` (one value
    per prompt) go to the gold scorer and the rewarder."""
    from ..decoding.inputs import prompt_token_ids
    from .gold import completion_text
    from .sampling import exact_sequence_kl, sample_k_per_prompt

    out = {}
    if decoding is None:
        flat, comps = sample_k_per_prompt(
            model, tokenizer, prompts, samples_per_prompt, max_new_tokens=max_new_tokens, seed=seed,
            batch_size=batch_size, desc=desc, progress=progress,
        )  # fmt: skip
    else:
        from ..decoding.api import decode

        res = decode(
            model, tokenizer, prompts, decoding, ref_model=ref_model, rewarder=rewarder,
            max_new_tokens=max_new_tokens, batch_size=max(1, batch_size // _rows_per_prompt(decoding)), seed=seed,
            num_return_sequences=samples_per_prompt, progress=progress, columns=columns,
        )  # fmt: skip
        ids = prompt_token_ids(prompts, tokenizer)
        flat = [ids[r["prompt_index"]] for r in res.rows]
        comps = [r["completion_ids"] for r in res.rows]
        out = {"score": [r["score"] for r in res.rows], "compute": res.compute.as_dict(), "label": decoding.label()}
    kl, ratio = exact_sequence_kl(
        model, ref_model, flat, comps, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size
    )
    texts = [completion_text(tokenizer, c) for c in comps]
    lengths = [len(c) - (1 if c and c[-1] == tokenizer.eos_token_id else 0) for c in comps]
    flat_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    flat_columns = {k: [v for v in vals for _ in range(samples_per_prompt)] for k, vals in (columns or {}).items()}
    gold_values = gold_scores(gold, texts, flat_prompts, completion_ids=comps, **flat_columns)
    return {"gold": gold_values, "kl": kl, "log_ratio": ratio, "length": lengths, "texts": texts, **out}


def _rows_per_prompt(decoding) -> int:
    """Rows one prompt occupies in a decoding batch (its samples or beam candidates)."""
    if decoding.strategy == "best_of_n":
        return decoding.best_of
    if decoding.strategy == "value_beam":
        return decoding.num_beams * decoding.num_candidates
    return 1


def summarize(samples: dict) -> dict:
    from .metrics import distinct_n, mean_se

    g, gse = mean_se(samples["gold"])
    k, kse = mean_se(samples["kl"])
    r, _ = mean_se(samples["log_ratio"])
    return {
        "gold": g,
        "gold_se": gse,
        "kl": k,
        "kl_se": kse,
        "kl_sampled": r,
        "distinct1": distinct_n(samples["texts"], 1),
        "distinct2": distinct_n(samples["texts"], 2),
        "length": sum(samples["length"]) / max(len(samples["length"]), 1),
        "n": len(samples["gold"]),
    }


def baseline_for(spec: ModelSpec, specs: list[ModelSpec], method: str) -> ModelSpec | None:
    """The ``method`` model with the same param as ``spec`` (else the nearest param)."""
    cands = [s for s in specs if s.method == method]
    if not cands:
        return None
    if spec.param is None:
        return cands[0]
    return min(cands, key=lambda s: abs(math.log((s.param or 1e-9) / spec.param)) if s.param else 1e9)


def _score_spec(spec: ModelSpec, ref_model, tokenizer, prompts: list, decoding, rewarder, kw: dict) -> dict:
    """:func:`score_model` on ``spec``'s model (the reference's own for ``reference``), decoding at its ``PARAM``."""
    model = ref_model if spec.method == "reference" else load_policy(spec.path)[0]
    if model.get_input_embeddings().weight.shape[0] != ref_model.get_input_embeddings().weight.shape[0]:
        raise SqlmError(f"model '{spec.name}' ({spec.path}) and the reference have different vocabularies")
    dec = decoding
    if dec is not None and spec.param is not None:
        import dataclasses

        dec = dataclasses.replace(dec, tau=spec.param)
    return score_model(
        model, ref_model, tokenizer, prompts, desc=f"sampling {spec.name}", decoding=dec, rewarder=rewarder, **kw
    )


def _result_row(
    spec: ModelSpec,
    specs: list[ModelSpec],
    per_sample: dict,
    prompts: list,
    samples_per_prompt: int,
    baseline_method: str,
) -> dict:
    """One row of :func:`evaluate_models`: ``spec``'s metrics, its win rate against its baseline and three examples."""
    from .metrics import win_rate

    row = {"name": spec.name, "method": spec.method, "param": spec.param, "path": spec.path}
    row.update(summarize(per_sample[spec.name]))
    if "compute" in per_sample[spec.name]:
        row.update(decoding=per_sample[spec.name]["label"], compute=per_sample[spec.name]["compute"])
    base = baseline_for(spec, list(specs), baseline_method)
    if base is not None:
        w, wse = win_rate(per_sample[spec.name]["gold"], per_sample[base.name]["gold"])
        row.update(win_rate=w, win_se=wse, win_vs=base.name)
    else:
        row.update(win_rate=None, win_se=None, win_vs=None)
    row["examples"] = [
        {
            "prompt": prompts[i // samples_per_prompt],
            "completion": per_sample[spec.name]["texts"][i],
            "gold": per_sample[spec.name]["gold"][i],
        }
        for i in range(min(3, len(per_sample[spec.name]["texts"])))
    ]
    return row


def evaluate_models(
    specs: list[ModelSpec],
    ref_path: str,
    prompts: list,
    *,
    gold=None,
    baseline_method: str = "dpo",
    samples_per_prompt: int = 1,
    max_new_tokens: int = 24,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    cache: dict | None = None,
    decoding=None,
    rewarder=None,
    columns: dict[str, list] | None = None,
) -> dict:
    """Score every model and the reference; returns ``{"rows": [...], "settings": {...}}``.

    Each row has ``name, method, param, path`` and the :func:`summarize` metrics, plus ``win_rate``
    / ``win_se`` against ``baseline_method`` (``None`` without one). ``cache`` maps a model name to
    the per-sample results of an earlier call (reused, then updated).

    With ``decoding`` (a :class:`sqlm.decoding.DecodingArguments`) every model, the reference
    included, decodes with that strategy instead of plain sampling, at its own ``tau`` (a model's
    ``PARAM``; the recipe's ``tau`` where it has none); each row then also carries the strategy
    (``decoding``) and what it cost (``compute``: tokens generated, forward passes and token
    positions, per prompt and in total). ``rewarder`` serves the ``reward_model`` scorer. ``prompts``
    are texts or conversations; ``columns`` (one value per prompt) go to ``gold`` and ``rewarder``.
    """
    gold = gold or gold_scorer("sentiment")
    ref_model, tokenizer = load_policy(ref_path)
    cache = {} if cache is None else cache
    per_sample: dict[str, dict] = {}
    all_specs = [ModelSpec(name="reference", path=ref_path, method="reference", param=None)] + list(specs)
    kw = dict(
        gold=gold,
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        columns=columns,
    )
    for spec in all_specs:
        if spec.name not in cache:
            cache[spec.name] = _score_spec(spec, ref_model, tokenizer, prompts, decoding, rewarder, kw)
        per_sample[spec.name] = cache[spec.name]
    rows = [_result_row(spec, specs, per_sample, prompts, samples_per_prompt, baseline_method) for spec in all_specs]
    settings = dict(
        ref_model=ref_path,
        num_prompts=len(prompts),
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        seed=seed,
        baseline_method=baseline_method,
        decoding=None if decoding is None else decoding.label(),
    )
    return {"rows": rows, "settings": settings}
