"""The strategies on one batch of prompts (:mod:`sqlm.decoding` states each): ``n`` samples per prompt,
the best-of-N scorers, and value-guided beam search with its scores (:func:`beam_score`, the one
formula for live and finished beams)."""

from __future__ import annotations

import torch

from .arguments import DecodingArguments
from .engine import Draws, Engine, Finished, Rows, choose


def sample_batch(engine: Engine, prompt_ids, owners, n: int, temperature: float, draws: Draws) -> list[list]:
    """``n`` completions per prompt: a list of :class:`Finished` per prompt, in draw order."""
    rows = engine.start(prompt_ids, owners)
    rows = engine.select(rows, torch.arange(len(prompt_ids)).repeat_interleave(n))
    rows.slot = torch.arange(n).repeat(len(prompt_ids))
    out: dict[int, list[Finished]] = {int(o): [] for o in owners}
    while len(rows):
        rows, fin = engine.advance(rows, choose(rows, temperature, draws))
        for f in fin:
            out[f.owner].append(f)
    return [sorted(out[int(o)], key=lambda f: f.slot) for o in owners]


def rank(scores: list[float], slots: list[int]) -> list[int]:
    """Indices by score, best first; ties by slot (earlier first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], slots[i]))


# ----------------------------------------------------------------------------- best-of-N


def candidate_scores(args: DecodingArguments, tau: float, owners, groups: list[list[Finished]], draws: Draws,
                     reward_fn) -> list[list[float]]:  # fmt: skip
    """Each prompt's candidates (``groups``, one list per owner) scored by ``args.scorer``; the rewarder
    is called once for the whole batch, the random control draws from each owner's generator."""
    if args.scorer == "reward_model":
        n = args.best_of
        flat = reward_fn([f for cands in groups for f in cands])
        return [[float(x) for x in flat[i * n : (i + 1) * n]] for i in range(len(groups))]
    if args.scorer == "implicit":
        return [[f.implicit(tau) for f in cands] for cands in groups]
    if args.scorer == "likelihood":
        return [[tau * f.logp for f in cands] for cands in groups]
    return [
        torch.rand(len(cands), generator=draws.gen(o), dtype=torch.float64).tolist()
        for o, cands in zip(owners, groups)
    ]


# ----------------------------------------------------------------------------- value-guided beam search


def beam_score(kind: str, tau: float, logp, ref_logp, value):
    """The ``beam_score`` ``kind`` of a prefix from its sums ``logp = sum log pi``, ``ref_logp = sum log
    pi_ref`` and ``value``: ``V(s_k)`` of an unfinished prefix, ``R(y)`` of a finished one (floats, or
    tensors over rows alike)."""
    if kind == "soft":
        return tau * ref_logp + value
    if kind == "value":
        return value
    return tau * logp


def beam_batch(engine: Engine, prompt_ids, owners, args: DecodingArguments, draws: Draws, reward_fn) -> list:
    """:mod:`value_beam <sqlm.decoding>` on a batch of prompts: the best finished completion of each
    (a :class:`Finished` with its ``score``; ``reward`` is set on it too)."""
    rows = engine.start(prompt_ids, owners)
    if args.temperature > 0 and args.num_beams > 1:  # sampled candidates differ: start from num_beams copies
        rows = engine.select(rows, torch.arange(len(prompt_ids)).repeat_interleave(args.num_beams))
        rows.slot = torch.arange(args.num_beams).repeat(len(prompt_ids))
    pools: dict[int, list[Finished]] = {int(o): [] for o in owners}
    while len(rows):
        rows, fin = _expand(engine, rows, args, draws)
        _score_finished(engine, fin, args, reward_fn)
        _pool(pools, fin, args.num_beams)
        if not len(rows):
            break
        rows = _prune(engine, rows, args)
    return [max(pools[int(o)], key=lambda f: f.score) if pools[int(o)] else None for o in owners]


def _expand(engine: Engine, rows: Rows, args: DecodingArguments, draws: Draws) -> tuple[Rows, list[Finished]]:
    """One round: every live beam's ``num_candidates`` continuations, each run to the end of its chunk;
    the rows still live and those that finished."""
    k, temp = args.num_candidates, float(args.temperature)
    fin: list[Finished] = []
    if temp > 0:
        n = len(rows)
        rows = engine.select(rows, torch.arange(n).repeat_interleave(k))
        rows.slot = rows.slot * k + torch.arange(k).repeat(n)
        steps = args.chunk_length
    else:  # the k most likely next tokens of each beam (zero-probability ones dropped), then greedy
        vals, top = rows.z.topk(min(k, rows.z.shape[1]), dim=-1)
        r_idx, c_idx = torch.isfinite(vals).nonzero(as_tuple=True)
        slots = rows.slot[r_idx] * vals.shape[1] + c_idx
        rows = engine.select(rows, r_idx)
        rows.slot = slots
        rows, fin = engine.advance(rows, top[r_idx, c_idx])
        steps = args.chunk_length - 1
    for _ in range(steps):
        if not len(rows):
            break
        rows, more = engine.advance(rows, choose(rows, temp, draws))
        fin += more
    return rows, fin


def _score_finished(engine: Engine, fin: list[Finished], args: DecodingArguments, reward_fn) -> None:
    """Set ``reward`` (the rewarder's, else the model's own estimate) and ``score`` on finished beams."""
    rewards = reward_fn(fin) if reward_fn is not None else [f.reward_estimate(engine.tau) for f in fin]
    for f, r in zip(fin, rewards):
        f.reward = float(r)
        f.score = beam_score(args.beam_score, engine.tau, f.logp, f.ref_logp or 0.0, f.reward)


def _pool(pools: dict[int, list[Finished]], fin: list[Finished], width: int) -> None:
    """Add the finished beams to their owner's pool (one per completion), which keeps its ``width`` best."""
    for f in fin:
        pool = pools[f.owner]
        if all(g.tokens != f.tokens for g in pool):
            pool.append(f)
        order = rank([g.score for g in pool], [g.slot for g in pool])
        pools[f.owner] = [pool[i] for i in order[:width]]


def _prune(engine: Engine, rows: Rows, args: DecodingArguments) -> Rows:
    """The ``num_beams`` best distinct live rows of each owner, by score, their rank as their slot."""
    live = beam_score(args.beam_score, engine.tau, rows.logp, rows.ref_logp, engine.values(rows))
    keep: list[int] = []
    ranks: list[int] = []
    _, counts = torch.unique_consecutive(rows.owner, return_counts=True)
    start = 0
    for c in counts.tolist():  # rows of one owner are contiguous
        best = _best_distinct(rows, list(range(start, start + c)), live, args.num_beams)
        keep += best
        ranks += range(len(best))
        start += c
    rows = engine.select(rows, torch.tensor(keep, dtype=torch.long))
    rows.slot = torch.tensor(ranks, dtype=torch.long)
    return rows


def _best_distinct(rows: Rows, idx: list[int], live: torch.Tensor, width: int) -> list[int]:
    """Up to ``width`` of the rows ``idx`` with the highest ``live`` scores, no two with the same tokens."""
    order = rank([float(live[i]) for i in idx], [int(rows.slot[i]) for i in idx])
    seen: set[tuple[int, ...]] = set()
    out: list[int] = []
    for j in order:
        key = tuple(rows.tokens[idx[j]])
        if key in seen:
            continue
        seen.add(key)
        out.append(idx[j])
        if len(seen) == width:
            break
    return out
