"""Sampling completions from a causal LM and scoring them against a reference, batched, offline.

The sampler draws from ``pi`` itself (temperature 1, no top-k/top-p: the soft policy), with a KV
cache, left-padded prompts and explicit position ids. :func:`exact_sequence_kl` then runs the policy
and the reference once over each whole sequence and sums the full-vocabulary per-step KL along the
sampled completion (``sqlm.evaluation.metrics.sequence_kl``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..decoding.engine import cache_of, left_pad, positions
from .metrics import sequence_kl


def _progress(total: int, desc: str | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="seq")


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    seed: int = 0,
    batch_size: int = 64,
    temperature: float = 1.0,
    desc: str | None = "sampling",
    progress: bool = True,
) -> list[list[int]]:
    """One completion per prompt, sampled from ``softmax(logits / temperature)`` (``temperature`` 0:
    greedy); each list ends at (and includes) the first EOS, or has ``max_new_tokens`` tokens."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt must have at least one token")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out: list[list[int]] = []
    bar = _progress(len(prompt_ids), desc, progress)
    for start in range(0, len(prompt_ids), batch_size):
        rows = prompt_ids[start : start + batch_size]
        ids, mask = left_pad(rows, pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        pos = positions(mask)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        past, logits = cache_of(res), res.logits[:, -1]
        b = ids.shape[0]
        done = torch.zeros(b, dtype=torch.bool)
        tokens = []
        last_pos = pos[:, -1]
        for _ in range(max_new_tokens):
            z = logits.float().cpu()
            if temperature == 0:
                tok = z.argmax(-1)
            else:
                tok = torch.multinomial(torch.softmax(z / temperature, dim=-1), 1, generator=gen).squeeze(1)
            tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
            tokens.append(tok)
            done |= tok == eos_token_id
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)
            last_pos = last_pos + 1
            res = model(
                input_ids=tok[:, None].to(device),
                attention_mask=mask,
                position_ids=last_pos[:, None],
                cache=past,
                use_cache=True,
            )
            past, logits = cache_of(res), res.logits[:, -1]
        steps = torch.stack(tokens, dim=1)
        for i in range(b):
            row = steps[i].tolist()
            if eos_token_id in row:
                row = row[: row.index(eos_token_id) + 1]
            out.append(row)
        bar.update(b)
    bar.close()
    model.train(was_training)
    return out


def _right_pad_pairs(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt + right-padded completion: ids, attention mask, completion mask."""
    plen = max(len(p) for p in prompt_ids)
    clen = max(max((len(c) for c in completion_ids), default=0), 1)
    b = len(prompt_ids)
    ids = torch.full((b, plen + clen), pad_id, dtype=torch.long)
    attn = torch.zeros((b, plen + clen), dtype=torch.long)
    comp = torch.zeros((b, plen + clen), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[i, plen - len(p) : plen] = torch.as_tensor(list(p), dtype=torch.long)
        attn[i, plen - len(p) : plen + len(c)] = 1
        if len(c):
            ids[i, plen : plen + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            comp[i, plen : plen + len(c)] = 1
    return ids, attn, comp


@torch.no_grad()
def completion_logits(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Logits of the state before each position: ``out[:, t]`` predicts ``ids[:, t]`` (``out[:, 0]`` is 0)."""
    device = next(model.parameters()).device
    logits = (
        model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=positions(attn).to(device))
        .logits.float()
        .cpu()
    )
    return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)


@torch.no_grad()
def exact_sequence_kl(
    model,
    ref_model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 64,
) -> tuple[list[float], list[float]]:
    """Per completion: the exact-per-step sequence KL ``sum_t KL(pi(.|s_t) || pi_ref(.|s_t))`` and the
    sampled log-ratio ``sum_t log pi(y_t|s_t) / pi_ref(y_t|s_t)`` (both estimate ``KL(pi || pi_ref)``
    when the completions were sampled from ``pi``; the first has lower variance)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    states = [model.training, ref_model.training]
    model.eval()
    ref_model.eval()
    kls: list[float] = []
    ratios: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        p = prompt_ids[start : start + batch_size]
        c = completion_ids[start : start + batch_size]
        ids, attn, comp = _right_pad_pairs(p, c, pad_token_id)
        z = completion_logits(model, ids, attn)
        z_ref = completion_logits(ref_model, ids, attn)
        kls += sequence_kl(z, z_ref, comp).tolist()
        lp = torch.log_softmax(z, -1).gather(-1, ids[..., None]).squeeze(-1)
        lq = torch.log_softmax(z_ref, -1).gather(-1, ids[..., None]).squeeze(-1)
        ratios += ((lp - lq) * comp).sum(-1).tolist()
    model.train(states[0])
    ref_model.train(states[1])
    return kls, ratios


def sample_k_per_prompt(model, tokenizer, prompts: Sequence, k: int, **kwargs) -> tuple[list, list[list[int]]]:
    """``k`` completions of every prompt (a text or a conversation, tokenised as ``sqlm train`` does:
    :func:`sqlm.decoding.prompt_token_ids`), prompt-major order, with :func:`sample_completions`
    (``kwargs``: its keyword arguments but the token ids); returns (the prompts' ids, each repeated
    ``k`` times, the completions)."""
    from ..decoding.inputs import prompt_token_ids

    prompt_ids = prompt_token_ids(prompts, tokenizer)
    flat = [p for p in prompt_ids for _ in range(k)]
    comps = sample_completions(
        model, flat, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs
    )
    return flat, comps
