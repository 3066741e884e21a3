"""Moving token credit between two tokenizations of the same text (pure functions).

A reward model may tokenize a completion differently from the policy. Both tokenizations cover the
same characters, so credit is moved through character spans: a reward-model token ``j`` with credit
``c_j`` and character span ``S_j`` gives each policy token ``k`` (span ``P_k``) the share

    r_k += c_j * |S_j ∩ P_k| / sum_k' |S_j ∩ P_k'|

so the total credit is conserved exactly. A reward-model token that overlaps no policy span (a
special token such as EOS or a chat template's end-of-turn marker, which has no characters in the
completion text) gives its credit to the policy's last completion token, where a sequence reward
lives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


Span = tuple[int, int]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def decoded_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[Span]]:
    """Text of ``ids`` (special tokens skipped) and the character span of each token in it.

    Uses the tokenizer's offset mapping when re-encoding the decoded text gives back exactly ``ids``
    (one call); otherwise decodes growing prefixes, so any token sequence works, sampled ones
    included. Special tokens (EOS, end-of-turn...) get an empty span at the end of the text so far.
    A token that completes a multi-byte character shares the span of that character with the
    tokens before it.
    """
    ids = [int(i) for i in ids]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    plain = [i for i in ids if i not in special]
    if getattr(tokenizer, "is_fast", False) and plain:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == plain:
            offsets = iter([tuple(o) for o in enc["offset_mapping"]])
            spans, end = [], 0
            for i in ids:
                if i in special:
                    spans.append((end, end))
                else:
                    s, e = next(offsets)
                    spans.append((int(s), int(e)))
                    end = int(e)
            return text, spans
    spans, prev, kept = [], "", []
    for i in ids:
        if i in special:
            spans.append((len(prev), len(prev)))
            continue
        kept.append(i)
        cur = tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        start = _common_prefix(prev, cur)
        spans.append((start, len(cur)))
        prev = cur
    return text, spans


def overlap_matrix(src: Sequence[Span], dst: Sequence[Span]) -> torch.Tensor:
    """``M[j, k] = |src_j ∩ dst_k|`` in characters, ``[len(src), len(dst)]``."""
    if not src or not dst:
        return torch.zeros(len(src), len(dst))
    s = torch.tensor(src, dtype=torch.float64)
    d = torch.tensor(dst, dtype=torch.float64)
    lo = torch.maximum(s[:, None, 0], d[None, :, 0])
    hi = torch.minimum(s[:, None, 1], d[None, :, 1])
    return (hi - lo).clamp(min=0)


def transfer_matrix(src: Sequence[Span], dst: Sequence[Span]) -> torch.Tensor:
    """Row-stochastic ``W[j, k]``: the share of source token ``j``'s credit that goes to ``k``.

    Rows of source tokens that overlap no destination span send everything to the last
    destination token. ``credit_dst = credit_src @ W`` conserves the sum.
    """
    m = overlap_matrix(src, dst)
    if m.shape[1] == 0:
        return m
    total = m.sum(1, keepdim=True)
    w = torch.where(total > 0, m / total.clamp(min=1e-12), torch.zeros_like(m))
    orphan = total.squeeze(1) == 0
    w[orphan, -1] = 1.0
    return w


def transfer_credit(credit: torch.Tensor, src: Sequence[Span], dst: Sequence[Span]) -> torch.Tensor:
    """Credit on source tokens ``[len(src)]`` moved onto destination tokens ``[len(dst)]``."""
    w = transfer_matrix(src, dst)
    return (credit.double().cpu() @ w).float()
