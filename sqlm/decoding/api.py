"""The public entry points: :func:`decode` (and its shorthands :func:`sample`, :func:`best_of_n`,
:func:`value_beam`) over many prompts in batches, and :func:`score_completions`, which reads the
model's quantities along given completions. What each strategy does is in :mod:`sqlm.decoding`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import SqlmError
from .arguments import VALUE_ANCHORS, DecodingArguments, check_at_least, check_choice, check_reference, rewarder_for
from .engine import Compute, Draws, Engine, Finished
from .inputs import prompt_token_ids, reward_fn_of, special_ids
from .strategies import beam_batch, candidate_scores, rank, sample_batch


@dataclass
class DecodeResult:
    """``rows``: one dict per prompt and return index (JSONL-ready); ``compute``: what it cost."""

    rows: list[dict]
    compute: Compute
    settings: dict = field(default_factory=dict)

    def write_jsonl(self, path: str | os.PathLike) -> Path:
        """Write ``rows`` as JSON lines (parent folders created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        tmp.replace(path)
        return path


@dataclass
class _Batches:
    """What every batch of one :func:`decode` call shares."""

    args: DecodingArguments
    new_engine: Callable[[], Engine]  # a fresh engine (and caches) per batch, all counting into one Compute
    draws: Draws
    reward_fn: Callable[[list[Finished]], list[float]] | None
    tokenizer: Any
    eos_ids: list[int]
    keep_candidates: bool


def _row(f: Finished, tokenizer, eos_ids, tau: float) -> dict:
    n = len(f.tokens) - (1 if f.tokens and f.tokens[-1] in eos_ids else 0)
    return {
        "completion": tokenizer.decode(f.tokens, skip_special_tokens=True) if tokenizer is not None else None,
        "completion_ids": list(f.tokens),
        "logprob": f.logp,
        "ref_logprob": f.ref_logp,
        "implicit": f.implicit(tau),
        "length": n,
        "truncated": f.truncated,
    }


def _decode_batch(job: _Batches, batch_ids, owners) -> list:
    """The rows of one batch of prompt instances under ``job.args.strategy``."""
    args, engine = job.args, job.new_engine()
    tau, tok, eos_ids = engine.tau, job.tokenizer, job.eos_ids
    if args.strategy == "value_beam":
        rows = []
        for best in beam_batch(engine, batch_ids, owners, args, job.draws, job.reward_fn):
            row = _row(best, tok, eos_ids, tau)
            row.update(score=best.score, reward=best.reward, beam_score=args.beam_score)
            rows.append(row)
        return rows
    n = args.best_of if args.strategy == "best_of_n" else 1
    groups = sample_batch(engine, batch_ids, owners, n, args.temperature, job.draws)
    if args.strategy == "sample":
        return [{**_row(c[0], tok, eos_ids, tau), "score": c[0].logp} for c in groups]
    rows = []
    for cands, scores in zip(groups, candidate_scores(args, tau, owners, groups, job.draws, job.reward_fn)):
        best = rank(scores, [f.slot for f in cands])[0]
        row = _row(cands[best], tok, eos_ids, tau)
        row.update(score=scores[best], scorer=args.scorer, best_of=n, chosen=best, candidate_scores=scores)
        if job.keep_candidates:
            row["candidates"] = [{**_row(f, tok, eos_ids, tau), "score": sc} for f, sc in zip(cands, scores)]
        rows.append(row)
    return rows


def _decode_all(job: _Batches, inst_ids: list[list[int]], batch_size: int, progress: bool) -> list[dict]:
    """Every prompt instance, ``batch_size`` at a time, in order."""
    from tqdm.auto import tqdm

    rows: list[dict] = []
    bar = tqdm(total=len(inst_ids), desc=job.args.strategy, disable=not progress, leave=False, unit="prompt")
    for start in range(0, len(inst_ids), batch_size):
        owners = list(range(start, min(start + batch_size, len(inst_ids))))
        rows += _decode_batch(job, [inst_ids[o] for o in owners], owners)
        bar.update(len(owners))
    bar.close()
    return rows


@contextmanager
def _eval_mode(*models) -> Iterator[None]:
    """The models (None skipped) in eval mode, their train/eval mode restored afterwards."""
    models = tuple(m for m in models if m is not None)
    states = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, s in zip(models, states):
            m.train(s)


def _checked_rewarder(args: DecodingArguments, rewarder, tokenizer):
    """The rewarder a strategy calls: the one given, else ``args.reward_funcs``'; an error where
    ``scorer: reward_model`` has none."""
    from ..rewards.base import as_rewarder

    if rewarder is None and (args.needs_rewarder() or args.strategy == "value_beam"):
        rewarder = rewarder_for(args, tokenizer)
    if args.needs_rewarder() and rewarder is None:
        raise SqlmError("scorer 'reward_model' needs reward_funcs (a rewarder name or 'module:function')")
    if rewarder is not None and args.strategy != "sample":
        rewarder = as_rewarder(rewarder)
    return rewarder


def _prompt_ids(prompts, prompt_ids, tokenizer) -> tuple[list[list[int]], list[Any]]:
    """Each prompt's token ids (``prompt_ids``, else tokenised ``prompts``) and its text (or None)."""
    if prompt_ids is None:
        if prompts is None or tokenizer is None:
            raise SqlmError("give prompts and a tokenizer, or prompt_ids")
        prompt_ids = prompt_token_ids(prompts, tokenizer)
    prompt_ids = [list(p) for p in prompt_ids]
    texts = list(prompts) if prompts is not None else [None] * len(prompt_ids)
    if not prompt_ids:
        raise SqlmError("no prompts to decode")
    return prompt_ids, texts


@torch.no_grad()
def decode(
    model,
    tokenizer,
    prompts: Sequence[Any] | None,
    args: DecodingArguments | None = None,
    *,
    ref_model=None,
    rewarder=None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    num_return_sequences: int = 1,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    keep_candidates: bool = False,
    progress: bool = False,
    columns: dict[str, Sequence[Any]] | None = None,
) -> DecodeResult:
    """Decode every prompt with ``args.strategy`` (see :mod:`sqlm.decoding`).

    ``prompts`` are texts or conversations (lists of ``{role, content}`` messages), tokenised as
    ``sqlm train`` tokenises them (:func:`prompt_token_ids`), or None with ``prompt_ids``; ``rewarder``
    is a :class:`sqlm.rewards.TokenRewarder` or TRL-style function (default: ``args.reward_funcs``),
    which also gets ``columns`` (the prompts' other dataset columns, one value per prompt).
    ``batch_size`` prompts are decoded together, each with its samples or beams as rows of one batch.
    ``num_return_sequences`` independent results per prompt (each its own samples or beams).
    Returns one row per prompt and return index, in prompt order: the completion, its ``score``
    under the strategy, ``logprob = sum log pi(y_t|s_t)`` and, when the reference ran,
    ``ref_logprob`` and ``implicit = tau (logprob - ref_logprob)``. With ``keep_candidates`` a
    best-of-N row also lists every candidate with its score.
    """
    args = args if args is not None else DecodingArguments()
    nrs = num_return_sequences
    for key, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("num_return_sequences", nrs)):
        check_at_least(key, value, 1)
    check_reference(args, ref_model)
    rewarder = _checked_rewarder(args, rewarder, tokenizer)
    prompt_ids, texts = _prompt_ids(prompts, prompt_ids, tokenizer)
    eos_ids, pad = special_ids(tokenizer, model, eos_token_id, pad_token_id)
    ref = ref_model if args.needs_reference() else None
    compute = Compute(prompts=len(prompt_ids) * nrs)
    instances = range(len(prompt_ids) * nrs)  # each prompt nrs times in a row
    inst_ids = [prompt_ids[i // nrs] for i in instances]
    inst_texts = [texts[i // nrs] for i in instances]
    inst_columns = {k: [v[i // nrs] for i in instances] for k, v in (columns or {}).items()}
    reward_fn = None
    if rewarder is not None and args.strategy != "sample":
        reward_fn = reward_fn_of(rewarder, tokenizer, pad, inst_ids, inst_texts, compute, inst_columns)
    new_engine = partial(Engine, model, ref, tau=float(args.tau), anchor=args.value_anchor, eos_ids=eos_ids,
                         pad_id=pad, max_new_tokens=max_new_tokens, compute=compute)  # fmt: skip
    job = _Batches(args, new_engine, Draws(seed), reward_fn, tokenizer, eos_ids, keep_candidates)
    with _eval_mode(model, ref):
        rows = _decode_all(job, inst_ids, batch_size, progress)
    for i, row in enumerate(rows):
        row.update(prompt=inst_texts[i], prompt_index=i // nrs, return_index=i % nrs, strategy=args.strategy)
    settings = {**asdict(args), "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed,
                "num_return_sequences": nrs, "label": args.label()}  # fmt: skip
    return DecodeResult(rows=rows, compute=compute, settings=settings)


def sample(model, tokenizer, prompts, *, temperature: float = 1.0, **kwargs) -> DecodeResult:
    """:func:`decode` with ``strategy='sample'``."""
    return decode(model, tokenizer, prompts, DecodingArguments(strategy="sample", temperature=temperature), **kwargs)


def best_of_n(model, tokenizer, prompts, *, n: int = 4, scorer: str = "implicit", tau: float = 1.0,
              temperature: float = 1.0, **kwargs) -> DecodeResult:  # fmt: skip
    """:func:`decode` with ``strategy='best_of_n'`` (``n`` is the key ``best_of``)."""
    args = DecodingArguments(strategy="best_of_n", best_of=n, scorer=scorer, tau=tau, temperature=temperature)
    return decode(model, tokenizer, prompts, args, **kwargs)


def value_beam(model, tokenizer, prompts, *, num_beams: int = 4, num_candidates: int = 2, chunk_length: int = 8,
               beam_score: str = "soft", tau: float = 1.0, temperature: float = 1.0,
               value_anchor: str = "reference", **kwargs) -> DecodeResult:  # fmt: skip
    """:func:`decode` with ``strategy='value_beam'``."""
    args = DecodingArguments(
        strategy="value_beam", num_beams=num_beams, num_candidates=num_candidates, chunk_length=chunk_length,
        beam_score=beam_score, tau=tau, temperature=temperature, value_anchor=value_anchor,
    )  # fmt: skip
    return decode(model, tokenizer, prompts, args, **kwargs)


@torch.no_grad()
def score_completions(
    model,
    ref_model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    tau: float,
    value_anchor: str = "reference",
    eos_token_id: int | Sequence[int],
    pad_token_id: int = 0,
    batch_size: int = 64,
) -> dict[str, list]:
    """Given completions, read step by step (KV cache, one step of logits at a time): per completion
    ``logprob = sum_t log pi``, ``ref_logprob``, ``implicit = tau (logprob - ref_logprob)`` and the
    model's estimate of the final reward ``reward = Q(s_T,a_T) - tau log pi_ref(a_T|s_T)``, and the
    critic along it, ``values = [V(s_0), ..., V(s_T)]`` (the state of each action taken). A
    completion ends at its first EOS (what follows is ignored) or its last token."""
    check_choice("value_anchor", value_anchor, VALUE_ANCHORS)
    if len(prompt_ids) != len(completion_ids):
        raise SqlmError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if any(len(c) == 0 for c in completion_ids):
        raise SqlmError("every completion must have at least one token")
    eos_ids = [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]
    compute = Compute(prompts=len(prompt_ids))
    out: list[Finished | None] = [None] * len(prompt_ids)
    values: list[list[float]] = [[] for _ in prompt_ids]
    for start in range(0, len(prompt_ids), batch_size):
        owners = list(range(start, min(start + batch_size, len(prompt_ids))))
        longest = max(len(completion_ids[o]) for o in owners)
        engine = Engine(model, ref_model, tau=tau, anchor=value_anchor, eos_ids=eos_ids, pad_id=pad_token_id,
                        max_new_tokens=longest, compute=compute)  # fmt: skip
        _read_along(engine, [prompt_ids[o] for o in owners], owners, completion_ids, out, values)
    return {
        "logprob": [f.logp for f in out],
        "ref_logprob": [f.ref_logp for f in out],
        "implicit": [f.implicit(tau) for f in out],
        "reward": [f.reward_estimate(tau) for f in out],
        "length": [len(f.tokens) for f in out],
        "values": values,
    }


def _read_along(engine: Engine, batch_ids, owners, completion_ids, out: list, values: list[list[float]]) -> None:
    """Step one batch along its given completions: each one's :class:`Finished` into ``out`` and the
    critic at each state into ``values`` (both indexed by owner)."""
    rows = engine.start(batch_ids, owners)
    while len(rows):
        t = len(rows.tokens[0])
        more = torch.tensor([len(completion_ids[int(o)]) > t for o in rows.owner], dtype=torch.bool)
        for i in (~more).nonzero().flatten().tolist():  # ran out of tokens without an EOS
            out[int(rows.owner[i])] = rows.finish(i, truncated=True)
        rows = engine.select(rows, more.nonzero().flatten())
        if not len(rows):
            break
        tok = torch.tensor([completion_ids[int(o)][t] for o in rows.owner], dtype=torch.long)
        for o, v in zip(rows.owner.tolist(), engine.values(rows).tolist()):
            values[o].append(v)
        rows, fin = engine.advance(rows, tok)
        for f in fin:
            out[f.owner] = f
