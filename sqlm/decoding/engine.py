"""The lockstep engine: a policy (and its reference) stepped one token per row per call with their KV
caches, the rows of partial completions it steps, the random draws, and what it all cost
(:class:`Compute`). The strategies (:mod:`sqlm.decoding.strategies`) are built on it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import SqlmError
from ..fused import accepts_logits_to_keep


@dataclass
class Compute:
    """What a decoding run spent. Token positions exclude padding; a prompt's positions count once
    (its KV cache is shared by its samples or beams)."""

    prompts: int = 0
    tokens_generated: int = 0
    policy_forward_passes: int = 0
    policy_forward_tokens: int = 0
    reference_forward_passes: int = 0
    reference_forward_tokens: int = 0
    reward_calls: int = 0
    reward_sequences: int = 0

    @property
    def forward_passes(self) -> int:
        return self.policy_forward_passes + self.reference_forward_passes

    @property
    def forward_tokens(self) -> int:
        return self.policy_forward_tokens + self.reference_forward_tokens

    def add(self, other: Compute) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, float]:
        """Totals, plus per-prompt means of tokens generated and token positions processed."""
        out: dict[str, float] = {**asdict(self), "forward_passes": self.forward_passes}
        out["forward_tokens"] = self.forward_tokens
        n = max(self.prompts, 1)
        out["tokens_generated_per_prompt"] = self.tokens_generated / n
        out["forward_tokens_per_prompt"] = self.forward_tokens / n
        return out


def cache_of(output):
    """The KV cache of a model output (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to one width: ``(ids, attention mask)`` ``[B, W]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Rows:
    """Partial completions decoded together: one row each, the same row in both models' caches."""

    owner: torch.Tensor  # [R] the prompt instance of each row (rows of one owner are contiguous)
    slot: torch.Tensor  # [R] the row's rank among its owner's rows (sample index, beam rank)
    tokens: list[list[int]]  # completion so far
    mask: torch.Tensor  # [R, L] attention mask (left-padded prompt, then the completion)
    pos: torch.Tensor  # [R] position id of the last token
    cache: Any
    z: torch.Tensor  # [R, V] fp32 policy logits at the current state
    ref_cache: Any = None
    z_ref: torch.Tensor | None = None
    logp: torch.Tensor | None = None  # [R] fp64 sum_t log pi(a_t|s_t) (temperature 1)
    ref_logp: torch.Tensor | None = None  # [R] fp64 sum_t log pi_ref(a_t|s_t)
    last_q: torch.Tensor | None = None  # [R] fp64 Q(s_T, a_T) of the last action
    last_ref: torch.Tensor | None = None  # [R] fp64 log pi_ref(a_T|s_T) of the last action

    def __len__(self) -> int:
        return len(self.tokens)

    def finish(self, i: int, truncated: bool) -> Finished:
        """Row ``i`` as a finished completion (``truncated``: it ended without an EOS)."""
        return Finished(
            owner=int(self.owner[i]),
            slot=int(self.slot[i]),
            tokens=list(self.tokens[i]),
            logp=float(self.logp[i]),
            ref_logp=None if self.z_ref is None else float(self.ref_logp[i]),
            last_q=float(self.last_q[i]),
            last_ref=None if self.z_ref is None else float(self.last_ref[i]),
            truncated=truncated,
        )


@dataclass
class Finished:
    """A finished completion: ``tokens`` (EOS included if it ended so), its sums and last step."""

    owner: int
    slot: int
    tokens: list[int]
    logp: float
    ref_logp: float | None
    last_q: float
    last_ref: float | None
    truncated: bool
    score: float | None = None
    reward: float | None = None

    def implicit(self, tau: float) -> float | None:
        """``tau * log pi(y) / pi_ref(y)``, the implicit reward (None when the reference did not run)."""
        return None if self.ref_logp is None else tau * (self.logp - self.ref_logp)

    def reward_estimate(self, tau: float) -> float:
        """``R^(y) = Q(s_T, a_T) - tau log pi_ref(a_T|s_T)``: the last step's Bellman identity, ``V = 0`` after it."""
        return self.last_q - tau * (self.last_ref or 0.0)


class Engine:
    """A policy (and, when needed, its reference) stepped together, one token per row per call."""

    def __init__(self, model, ref, *, tau: float, anchor: str, eos_ids: Sequence[int], pad_id: int,
                 max_new_tokens: int, compute: Compute):  # fmt: skip
        self.model, self.ref = model, ref
        self.tau, self.anchor = float(tau), anchor
        self.eos = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=torch.long)
        self.pad_id, self.max_new_tokens, self.compute = int(pad_id), int(max_new_tokens), compute
        try:
            self.device = next(model.parameters()).device
        except (StopIteration, AttributeError):
            self.device = torch.device("cpu")

    def _call(self, model, ids, mask, pos, cache, prefill: bool):
        kwargs = {"logits_to_keep": 1} if prefill and accepts_logits_to_keep(model) else {}
        out = model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=pos.to(self.device),
            cache=cache, use_cache=True, **kwargs,
        )  # fmt: skip
        tokens = int(mask[:, -ids.shape[1] :].sum())
        if model is self.model:
            self.compute.policy_forward_passes += 1
            self.compute.policy_forward_tokens += tokens
        else:
            self.compute.reference_forward_passes += 1
            self.compute.reference_forward_tokens += tokens
        z = out.logits[:, -1]
        return z.to(torch.promote_types(z.dtype, torch.float32)).cpu(), cache_of(out)

    def start(self, prompt_ids: Sequence[Sequence[int]], owners: Sequence[int]) -> Rows:
        """One row per prompt at ``s_0``: the prompts run once through each model."""
        if any(len(p) == 0 for p in prompt_ids):
            raise SqlmError("every prompt must have at least one token")
        ids, mask = left_pad(prompt_ids, self.pad_id)
        pos = positions(mask)
        z, cache = self._call(self.model, ids, mask, pos, None, prefill=True)
        z_ref = ref_cache = None
        if self.ref is not None:
            z_ref, ref_cache = self._call(self.ref, ids, mask, pos, None, prefill=True)
            if z_ref.shape[1] != z.shape[1]:
                raise SqlmError(
                    f"the model and the reference have different vocabularies ({z.shape[1]} vs {z_ref.shape[1]} logits)"
                )
        n = len(prompt_ids)
        zeros = torch.zeros(n, dtype=torch.float64)
        return Rows(
            owner=torch.as_tensor(list(owners), dtype=torch.long), slot=torch.zeros(n, dtype=torch.long), tokens=[[] for _ in range(n)], mask=mask,
            pos=pos[:, -1].clone(), cache=cache, z=z, ref_cache=ref_cache, z_ref=z_ref, logp=zeros,
            ref_logp=zeros.clone(), last_q=zeros.clone(), last_ref=zeros.clone(),
        )  # fmt: skip

    @staticmethod
    def _reorder(cache, idx: torch.Tensor):
        if cache is None:
            return None
        if not hasattr(cache, "reorder_cache"):
            raise SqlmError(f"the model's KV cache ({type(cache).__name__}) cannot be reordered for beams")
        cache.reorder_cache(idx)
        return cache

    def select(self, rows: Rows, idx: torch.Tensor) -> Rows:
        """The rows ``idx`` (repeats allowed), caches included."""
        idx = idx.long()
        if len(rows) == len(idx) and bool((idx == torch.arange(len(idx))).all()):
            return rows
        dev = idx.to(self.device)
        return Rows(
            owner=rows.owner[idx], slot=rows.slot[idx], tokens=[list(rows.tokens[i]) for i in idx.tolist()], mask=rows.mask[idx],
            pos=rows.pos[idx], cache=self._reorder(rows.cache, dev), z=rows.z[idx],
            ref_cache=self._reorder(rows.ref_cache, dev), z_ref=None if rows.z_ref is None else rows.z_ref[idx],
            logp=rows.logp[idx], ref_logp=rows.ref_logp[idx], last_q=rows.last_q[idx], last_ref=rows.last_ref[idx],
        )  # fmt: skip

    def values(self, rows: Rows) -> torch.Tensor:
        """``V(s)`` of each row's current state (fp64)."""
        lse = torch.logsumexp(rows.z.double(), dim=-1)
        if self.anchor == "reference" and rows.z_ref is not None:
            lse = lse - torch.logsumexp(rows.z_ref.double(), dim=-1)
        return self.tau * lse

    def advance(self, rows: Rows, tok: torch.Tensor) -> tuple[Rows, list[Finished]]:
        """Take action ``tok [R]`` in every row: update the sums, hand back the rows that ended (EOS or
        the length limit) and run the others one step (their next logits)."""
        tok = tok.long()
        z = rows.z.double()
        z_a = z.gather(1, tok[:, None]).squeeze(1)
        rows.logp = rows.logp + z_a - torch.logsumexp(z, dim=-1)
        if rows.z_ref is not None:
            zr = rows.z_ref.double()
            lse_ref = torch.logsumexp(zr, dim=-1)
            rows.last_ref = zr.gather(1, tok[:, None]).squeeze(1) - lse_ref
            rows.ref_logp = rows.ref_logp + rows.last_ref
            rows.last_q = self.tau * (z_a - lse_ref) if self.anchor == "reference" else self.tau * z_a
        else:
            rows.last_q = self.tau * z_a
        for t, row in zip(tok.tolist(), rows.tokens):
            row.append(t)
        self.compute.tokens_generated += len(tok)
        is_eos = torch.isin(tok, self.eos)
        full = torch.tensor([len(r) >= self.max_new_tokens for r in rows.tokens], dtype=torch.bool)
        ended = is_eos | full
        finished = [rows.finish(i, truncated=not bool(is_eos[i])) for i in ended.nonzero().flatten().tolist()]
        keep = (~ended).nonzero().flatten()
        if len(keep) == 0:
            return self.select(rows, keep), finished
        rows = self.select(rows, keep)
        tok = tok[keep]
        rows.mask = torch.cat([rows.mask, torch.ones(len(keep), 1, dtype=rows.mask.dtype)], dim=1)
        rows.pos = rows.pos + 1
        rows.z, rows.cache = self._call(self.model, tok[:, None], rows.mask, rows.pos[:, None], rows.cache, False)
        if self.ref is not None:
            rows.z_ref, rows.ref_cache = self._call(
                self.ref, tok[:, None], rows.mask, rows.pos[:, None], rows.ref_cache, False
            )
        return rows, finished


def _seed_of(seed: int, owner: int) -> int:
    return (int(seed) * 1_000_003 + int(owner) * 7_919 + 17) % (2**63 - 1)


class Draws:
    """One generator per prompt instance; each call draws, per owner, one number per row in row order."""

    def __init__(self, seed: int):
        self.seed, self.gens = seed, {}

    def gen(self, owner: int) -> torch.Generator:
        if owner not in self.gens:
            self.gens[owner] = torch.Generator().manual_seed(_seed_of(self.seed, owner))
        return self.gens[owner]

    def uniform(self, owner: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(owner), dtype=torch.float64)
        owners, counts = torch.unique_consecutive(owner, return_counts=True)
        start = 0
        for o, c in zip(owners.tolist(), counts.tolist()):
            out[start : start + c] = torch.rand(c, generator=self.gen(o), dtype=torch.float64)
            start += c
        return out


def choose(rows: Rows, temperature: float, draws: Draws) -> torch.Tensor:
    """One token per row: ``argmax z`` at temperature 0, else a draw from ``softmax(z / T)``
    (inverse CDF with the row's owner's generator: zero-probability tokens are never drawn)."""
    if temperature == 0:
        return rows.z.argmax(-1)
    probs = torch.softmax(rows.z.double() / temperature, dim=-1)
    cdf = probs.cumsum(-1)
    u = draws.uniform(rows.owner) * cdf[:, -1]
    return torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp(max=probs.shape[1] - 1)
