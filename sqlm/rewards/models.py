"""Token rewarders backed by models: a Bradley-Terry reward model, or a DPO policy and its reference.

Formulas (DESIGN.md §2). ``R`` is the reward model's sequence score, read at the last real token;
``t = 1..T`` runs over the policy's completion tokens:

- terminal:  ``r_t = R·1[t=T]``
- uniform:   ``r_t = R/T``
- abc:       ``r_t = β·R·α_t + (1−β)·R·1[t=T]`` (Chan et al. 2024, "Dense Reward for Free in RLHF"),
  ``α`` the reward model's last-layer attention, mean over heads, row of the scored token, restricted
  to completion tokens and normalised to sum 1
- prefix:    ``r_t = R(x, y_≤t) − R(x, y_<t)`` (telescopes to ``R(x,y) − R(x,∅)``)
- implicit:  ``r_t = β·log π(a_t|s_t)/π_ref(a_t|s_t)`` (Rafailov et al. 2024, "From r to Q*")

**Scoring input.** When the scoring model shares the policy's vocabulary its input is exactly
``prompt_ids + completion_ids`` (real tokens only); otherwise the completion ids are decoded and the
text is re-tokenized by the scoring model's tokenizer, and credit is moved back to the policy's
tokens by character overlap (:mod:`sqlm.rewards.align`).

**Padding and EOS.** Real tokens are known from the masks, never from token ids: the score is read at
the last position whose attention mask is 1, so a pad token equal to EOS (Llama, many chat models)
cannot be mistaken for padding, and an EOS the policy generated is scored like any other token. Rows
are re-padded on ``padding_side`` with position ids from the mask (``cumsum − 1``), so left and right
padding give the same values. (transformers' ``*ForSequenceClassification.forward`` instead reads
the rightmost token that is not ``pad_token_id``, which skips a trailing EOS when ``pad == eos``; that
is why these rewarders call the base model and the ``score`` head themselves.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SqlmError
from .align import decoded_spans, transfer_matrix
from .base import RewardBatch, TokenRewarder, terminal_rewards
from .loading import load_causal_lm, load_reward_model, model_fingerprint, tokenizer_fingerprint


# ---------------------------------------------------------------------------------------------
# the scoring model's input


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers give every token the same id (then ids pass between them unchanged)."""
    return a is b or a.get_vocab() == b.get_vocab()


@dataclass
class ScorerInputs:
    """A batch re-encoded for a scoring model (rows padded on one side, real tokens from the mask).

    ``completion_pos[b]`` are the positions (in row ``b``) of the scorer tokens that belong to the
    completion, in order; ``transfer[b]`` is ``None`` when they are exactly the policy's completion
    tokens, else the ``[n_scorer, n_policy]`` matrix that moves credit onto the policy's tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    last: torch.Tensor  # [N] position of the last real token (the scored one)
    completion_pos: list[torch.Tensor]
    transfer: list[torch.Tensor | None]


class ScorerEncoder:
    """Builds :class:`ScorerInputs` from a :class:`RewardBatch` of policy tokens."""

    def __init__(
        self,
        tokenizer,
        policy_tokenizer=None,
        padding_side: str = "right",
        max_length: int | None = None,
        pad_token_id: int | None = None,
    ):
        if padding_side not in ("left", "right"):
            raise SqlmError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if tokenizer is None and policy_tokenizer is not None:
            raise SqlmError("the scoring model's tokenizer is needed when the policy uses another tokenizer")
        self.tokenizer = tokenizer
        self.policy_tokenizer = policy_tokenizer
        self.padding_side = padding_side
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.shared = policy_tokenizer is None or same_vocabulary(tokenizer, policy_tokenizer)

    def _pad_id(self) -> int:
        # any id works: real tokens come from the mask; prefer the tokenizer's pad, then EOS
        tok = self.tokenizer
        for tid in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None), self.pad_token_id):
            if tid is not None:
                return int(tid)
        return 0

    def _row_shared(self, batch: RewardBatch, b: int):
        p = batch.prompt_ids[b][batch.prompt_mask[b].bool()].tolist()
        c = batch.completion_ids[b][batch.completion_mask[b].bool()].tolist()
        return p + c, list(range(len(p), len(p) + len(c))), None

    def _prompt_text(self, batch: RewardBatch, b: int):
        prompt = batch.prompts[b] if batch.prompts is not None and b < len(batch.prompts) else None
        if prompt is None:
            ids = batch.prompt_ids[b][batch.prompt_mask[b].bool()].tolist()
            prompt = self.policy_tokenizer.decode(ids, skip_special_tokens=True)
        return prompt

    def _row_text(self, batch: RewardBatch, b: int):
        ptok, tok = self.policy_tokenizer, self.tokenizer
        c = batch.completion_ids[b][batch.completion_mask[b].bool()].tolist()
        text, spans = decoded_spans(ptok, c)
        prompt = self._prompt_text(batch, b)
        append_eos = False
        if isinstance(prompt, str):
            full, start = prompt + text, len(prompt)
            enc = tok(full, add_special_tokens=True, return_offsets_mapping=True)
            append_eos = bool(c) and c[-1] == ptok.eos_token_id and tok.eos_token_id is not None
        else:  # conversational: the reward model's own chat template around the completion
            if getattr(tok, "chat_template", None) is None:
                raise SqlmError(
                    f"row {b}: conversational prompt but the reward model's tokenizer has no chat template"
                )
            messages = list(prompt) + [{"role": "assistant", "content": text}]
            full = tok.apply_chat_template(messages, tokenize=False)
            head = tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            start = full.find(text, len(head) if full.startswith(head) else 0) if text else len(head)
            if start < 0:
                raise SqlmError(
                    f"row {b}: the reward model's chat template does not contain the completion text verbatim"
                )
            enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(int(x) for x in o) for o in enc["offset_mapping"]]
        if append_eos:
            ids.append(int(tok.eos_token_id))
            offsets.append((len(full), len(full)))
        first = next((j for j, (_, e) in enumerate(offsets) if e > start), None)
        if first is None:  # empty completion text: only an appended EOS (if any) is completion
            first = len(ids) - 1 if append_eos else len(ids)
        comp = list(range(first, len(ids)))
        policy_spans = [(s + start, e + start) for s, e in spans]
        w = transfer_matrix([offsets[j] for j in comp], policy_spans) if c else torch.zeros(len(comp), 0)
        return ids, comp, w

    def encode(self, batch: RewardBatch) -> ScorerInputs:
        rows, comps, transfers = [], [], []
        for b in range(batch.completion_ids.shape[0]):
            ids, comp, w = self._row_shared(batch, b) if self.shared else self._row_text(batch, b)
            if self.max_length is not None and len(ids) > self.max_length:
                cut = len(ids) - self.max_length  # keep the end: the completion and the scored token
                keep = [j for j, p in enumerate(comp) if p >= cut]
                if w is not None:
                    w = w[keep]
                elif len(keep) < len(comp):
                    raise SqlmError(
                        f"row {b}: completion of {len(comp)} tokens does not fit max_length={self.max_length}"
                    )
                comp = [comp[j] - cut for j in keep]
                ids = ids[cut:]
            rows.append(ids)
            comps.append(comp)
            transfers.append(w)
        n, length = len(rows), max([len(r) for r in rows] + [1])
        input_ids = torch.full((n, length), self._pad_id(), dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        comp_pos = []
        for b, (ids, comp) in enumerate(zip(rows, comps)):
            off = length - len(ids) if self.padding_side == "left" else 0
            input_ids[b, off : off + len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[b, off : off + len(ids)] = 1
            comp_pos.append(torch.tensor(comp, dtype=torch.long) + off)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        idx = torch.arange(length).expand(n, length)
        last = (idx * mask).amax(1)
        return ScorerInputs(input_ids, mask, position_ids, last, comp_pos, transfers)


def _place(batch: RewardBatch, inputs: ScorerInputs, credits: list[torch.Tensor], terminal: torch.Tensor):
    """Scorer-token credit + a terminal part, as ``r[B, T]`` on the policy's completion tokens."""
    b_size, t_size = batch.completion_ids.shape
    out = torch.zeros(b_size, t_size, dtype=torch.float32)
    cmask = batch.completion_mask.cpu()
    for b in range(b_size):
        pos = cmask[b].bool().nonzero().squeeze(1)
        if pos.numel() == 0:
            continue
        c = credits[b].float().cpu()
        w = inputs.transfer[b]
        dense = c if w is None else (c.double() @ w.double()).float()
        out[b, pos] = dense
    return out + terminal_rewards(terminal.float().cpu(), cmask)


# ---------------------------------------------------------------------------------------------
# reward-model rewarders


class RewardModelRewarder(TokenRewarder):
    """Common part of the rewarders that read a sequence-classification reward model.

    ``reward_model`` is a causal ``*ForSequenceClassification`` with ``num_labels=1`` (as saved by
    ``sqlm reward``) or a path to one; ``tokenizer`` is its tokenizer (may be ``None`` when the
    completion ids are already the reward model's); ``policy_tokenizer`` the tokenizer of the
    completion ids (``None``: the same one).
    """

    name = "reward_model"
    needs_attention = False

    def __init__(
        self,
        reward_model,
        tokenizer=None,
        *,
        policy_tokenizer=None,
        padding_side: str = "right",
        batch_size: int = 16,
        max_length: int | None = None,
    ):
        if isinstance(reward_model, str):
            reward_model, loaded_tok = load_reward_model(reward_model, eager_attention=self.needs_attention)
            tokenizer = tokenizer or loaded_tok
        if tokenizer is None and policy_tokenizer is not None:
            raise SqlmError(f"rewarder '{self.name}' needs the reward model's tokenizer (the policy's differs)")
        if getattr(reward_model.config, "num_labels", 1) != 1 or not hasattr(reward_model, "score"):
            raise SqlmError(
                f"rewarder '{self.name}': the reward model must be a causal *ForSequenceClassification "
                f"with num_labels=1 and a 'score' head, got {type(reward_model).__name__}"
            )
        if self.needs_attention and reward_model.config._attn_implementation != "eager":
            reward_model.set_attn_implementation("eager")  # only eager attention returns the weights
        self.model = reward_model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        pad = getattr(reward_model.config.get_text_config(), "pad_token_id", None)
        self.encoder = ScorerEncoder(tokenizer, policy_tokenizer, padding_side, max_length, pad)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "reward_model": model_fingerprint(self.model),
            "reward_tokenizer": None if self.tokenizer is None else tokenizer_fingerprint(self.tokenizer),
            "max_length": self.encoder.max_length,
        }

    @torch.no_grad()
    def scores(self, inputs: ScorerInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-position scores ``[N, L]`` (the score head on every hidden state) and, for rewarders
        that need it, the last layer's head-mean attention row of the scored token ``[N, L]``."""
        base = getattr(self.model, self.model.base_model_prefix)
        device = next(self.model.parameters()).device
        all_scores, all_rows = [], []
        for s in range(0, inputs.input_ids.shape[0], self.batch_size):
            sl = slice(s, s + self.batch_size)
            kwargs: dict[str, Any] = {"use_cache": False}
            if self.needs_attention:
                kwargs["output_attentions"] = True
            out = base(
                input_ids=inputs.input_ids[sl].to(device),
                attention_mask=inputs.attention_mask[sl].to(device),
                position_ids=inputs.position_ids[sl].to(device),
                **kwargs,
            )
            h = out.last_hidden_state
            all_scores.append(self.model.score(h).squeeze(-1).float().cpu())
            if self.needs_attention:
                att = out.attentions[-1].float().mean(1)  # [n, L, L], mean over heads
                last = inputs.last[sl].to(att.device)
                all_rows.append(att[torch.arange(att.shape[0], device=att.device), last].cpu())
        scores = torch.nan_to_num(torch.cat(all_scores))
        rows = torch.nan_to_num(torch.cat(all_rows)) if self.needs_attention else None
        return scores, rows

    def sequence_rewards(self, batch: RewardBatch) -> torch.Tensor:
        """``R[b]``: the reward model's score at the last real token of prompt + completion."""
        inputs = self.encoder.encode(batch)
        s, _ = self.scores(inputs)
        return s[torch.arange(s.shape[0]), inputs.last]

    def token_rewards(self, batch: RewardBatch) -> torch.Tensor:
        inputs = self.encoder.encode(batch)
        s, rows = self.scores(inputs)
        big_r = s[torch.arange(s.shape[0]), inputs.last]
        credits, terminal = self.credit(inputs, s, rows, big_r)
        return _place(batch, inputs, credits, terminal).to(batch.completion_ids.device)

    def credit(self, inputs, scores, attn_rows, big_r) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Credit on the scorer's completion tokens (per row) and the terminal part ``[N]``."""
        raise NotImplementedError


class TerminalRewarder(RewardModelRewarder):
    """``r_t = R·1[t=T]``: the reward model's sequence reward on the last completion token."""

    name = "terminal"

    def credit(self, inputs, scores, attn_rows, big_r):
        return [torch.zeros(len(p)) for p in inputs.completion_pos], big_r


class UniformRewarder(RewardModelRewarder):
    """``r_t = R/T`` on each of the policy's ``T`` completion tokens."""

    name = "uniform"

    def token_rewards(self, batch: RewardBatch) -> torch.Tensor:
        big_r = self.sequence_rewards(batch)
        mask = batch.completion_mask.float().cpu()
        n = mask.sum(1).clamp(min=1)
        return ((big_r / n)[:, None] * mask).to(batch.completion_ids.device)


class ABCRewarder(RewardModelRewarder):
    """Attention-based credit (Chan et al. 2024): ``r_t = β·R·α_t + (1−β)·R·1[t=T]``.

    ``α`` is the last layer's attention of the scored (final) token, averaged over heads, over the
    completion tokens and normalised to sum 1, so ``Σ_t r_t = R`` and the last token gets at least
    ``(1−β)·R``. The reward model runs with eager attention (the only kind that returns weights).
    """

    name = "abc"
    needs_attention = True

    def __init__(self, reward_model, tokenizer=None, *, beta: float = 0.8, **kwargs):
        if not 0.0 <= float(beta) <= 1.0:
            raise SqlmError(f"abc: beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        super().__init__(reward_model, tokenizer, **kwargs)

    def settings(self):
        return {**super().settings(), "beta": self.beta}

    def credit(self, inputs, scores, attn_rows, big_r):
        credits = []
        for b, pos in enumerate(inputs.completion_pos):
            a = attn_rows[b, pos].clamp(min=0)
            total = a.sum()
            alpha = a / total if total > 0 else torch.full_like(a, 1.0 / max(len(pos), 1))
            credits.append(self.beta * big_r[b] * alpha)
        return credits, (1.0 - self.beta) * big_r


class PrefixRewarder(RewardModelRewarder):
    """Prefix differences ``r_t = R(x, y_≤t) − R(x, y_<t)``, from ONE forward pass per batch.

    ``R(x, y_<1)`` is the score of the prompt alone (``baseline="prompt"``, the formula as written;
    the sum telescopes to ``R(x,y) − R(x,∅)``, a per-prompt shift that leaves the KL-regularised
    optimum unchanged) or 0 (``baseline="zero"``; the sum is ``R(x,y)`` exactly).

    Why one forward pass is enough: a sequence-classification reward model on a decoder-only
    transformer scores a sequence by applying its ``score`` head to the hidden state of the last
    token, and with a causal attention mask the hidden state at position ``l`` depends only on the
    tokens at positions ``≤ l``. So the score head applied at position ``l`` of the full sequence is
    exactly the score the model gives to the prefix ending at ``l`` on its own (position ids are
    taken from the mask, so padding does not shift them). It is NOT the same when
    (a) the model is not causal (bidirectional encoders such as BERT/DeBERTa reward models, or
    prefix-LM / bidirectional-prompt architectures): then each prefix needs its own pass;
    (b) the reward model was trained on sequences ending in EOS or an end-of-turn marker (TRL's
    RewardTrainer appends EOS): an intermediate prefix is scored without that marker, which the
    model may never have seen; only the last difference includes it;
    (c) tokenization is not prefix-stable: re-tokenizing a prefix's text can split its last word
    differently from the full text (BPE merges across the boundary); the scores here are those of
    the full text's tokens, truncated.
    """

    name = "prefix"

    def __init__(self, reward_model, tokenizer=None, *, baseline: str = "prompt", **kwargs):
        if baseline not in ("prompt", "zero"):
            raise SqlmError(f"prefix: baseline must be 'prompt' or 'zero', got {baseline!r}")
        self.baseline = baseline
        super().__init__(reward_model, tokenizer, **kwargs)

    def settings(self):
        return {**super().settings(), "baseline": self.baseline}

    def credit(self, inputs, scores, attn_rows, big_r):
        credits = []
        for b, pos in enumerate(inputs.completion_pos):
            if len(pos) == 0:
                credits.append(torch.zeros(0))
                continue
            s = scores[b, pos]
            before = int(pos[0]) - 1
            has_prompt = before >= 0 and bool(inputs.attention_mask[b, before])
            start = scores[b, before] if self.baseline == "prompt" and has_prompt else s.new_zeros(())
            credits.append(s - torch.cat([start.reshape(1), s[:-1]]))
        return credits, torch.zeros(len(inputs.completion_pos))


# ---------------------------------------------------------------------------------------------
# implicit reward of a policy against its reference


class ImplicitRewarder(TokenRewarder):
    """``r_t = β·(log π(a_t|s_t) − log π_ref(a_t|s_t))`` (Rafailov et al. 2024, "From r to Q*").

    For a DPO-trained ``π`` with its reference ``π_ref`` and DPO's ``β``, ``Σ_t r_t`` is DPO's
    implicit sequence reward ``β·log π(y|x)/π_ref(y|x)``. Both models must share ``tokenizer``
    (they are a policy and its reference); the policy being trained may use another one.
    """

    name = "implicit"

    def __init__(
        self,
        model,
        ref_model,
        tokenizer=None,
        *,
        beta: float = 0.1,
        policy_tokenizer=None,
        padding_side: str = "right",
        batch_size: int = 16,
        max_length: int | None = None,
    ):
        if isinstance(model, str):
            model, loaded_tok = load_causal_lm(model)
            tokenizer = tokenizer or loaded_tok
        if isinstance(ref_model, str):
            ref_model, _ = load_causal_lm(ref_model)
        if tokenizer is None and policy_tokenizer is not None:
            raise SqlmError("rewarder 'implicit' needs the tokenizer of its model (the policy's differs)")
        if ref_model is None:
            raise SqlmError("rewarder 'implicit' needs ref_model (the reference the policy was trained against)")
        self.model, self.ref_model = model.eval(), ref_model.eval()
        self.tokenizer = tokenizer
        self.beta = float(beta)
        self.batch_size = int(batch_size)
        pad = getattr(model.config.get_text_config(), "pad_token_id", None)
        self.encoder = ScorerEncoder(tokenizer, policy_tokenizer, padding_side, max_length, pad)

    def settings(self):
        return {
            **super().settings(),
            "model": model_fingerprint(self.model),
            "ref_model": model_fingerprint(self.ref_model),
            "tokenizer": None if self.tokenizer is None else tokenizer_fingerprint(self.tokenizer),
            "beta": self.beta,
            "max_length": self.encoder.max_length,
        }

    @torch.no_grad()
    def _token_logps(self, model, inputs: ScorerInputs) -> torch.Tensor:
        """``log π(x_l | x_<l)`` at every position ``l ≥ 1`` of every row, ``[N, L]`` (0 at ``l=0``)."""
        device = next(model.parameters()).device
        out = []
        for s in range(0, inputs.input_ids.shape[0], self.batch_size):
            sl = slice(s, s + self.batch_size)
            ids = inputs.input_ids[sl].to(device)
            logits = model(
                input_ids=ids,
                attention_mask=inputs.attention_mask[sl].to(device),
                position_ids=inputs.position_ids[sl].to(device),
                use_cache=False,
            ).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            out.append(torch.cat([logp.new_zeros(logp.shape[0], 1), logp], 1).cpu())
        return torch.cat(out)

    def token_rewards(self, batch: RewardBatch) -> torch.Tensor:
        inputs = self.encoder.encode(batch)
        for b, pos in enumerate(inputs.completion_pos):
            if len(pos) and (int(pos[0]) == 0 or not bool(inputs.attention_mask[b, int(pos[0]) - 1])):
                raise SqlmError(
                    f"implicit: row {b} has no prompt token before its completion; the first token's "
                    "log-probability needs a context (add a BOS token or a prompt)"
                )
        logp = self._token_logps(self.model, inputs)
        ref = self._token_logps(self.ref_model, inputs)
        diff = self.beta * (logp - ref)
        credits = [diff[b, pos] for b, pos in enumerate(inputs.completion_pos)]
        terminal = torch.zeros(len(credits))
        return _place(batch, inputs, credits, terminal).to(batch.completion_ids.device)
