"""Token rewarders on tiny offline models: the identities of DESIGN.md §2, padding, EOS, tokenizers."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from sqlm.errors import SqlmError
from sqlm.rewards import RewardBatch, WeightedSum, build_rewarder, rewarder_from_spec
from sqlm.rewards.align import decoded_spans, transfer_credit
from sqlm.rewards.cache import make_batch, tokenize_preference_example
from sqlm.rewards.models import (
    ABCRewarder,
    ImplicitRewarder,
    PrefixRewarder,
    TerminalRewarder,
    UniformRewarder,
)
from sqlm.rewards.toy import toy_gold_reward, toy_preference_rows, toy_reward_model, toy_tokenizer
from sqlm.tiny import tiny_model_for_tokenizer


ATOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer(vocab_size=300)


@pytest.fixture(scope="module")
def rm(tok):
    return toy_reward_model(tok, seed=1).eval()


@pytest.fixture(scope="module")
def rows():
    return toy_preference_rows(6, seed=3)


def batch_for(rows, tok, side="chosen", prompt_padding_side="left"):
    toks = [tokenize_preference_example(r, tok) for r in rows]
    return make_batch(
        [t["prompt_ids"] for t in toks],
        [t[f"{side}_ids"] for t in toks],
        tok.pad_token_id,
        prompts=[r["prompt"] for r in rows],
        completions=[r[side] for r in rows],
        prompt_padding_side=prompt_padding_side,
    )


def real(batch, b):
    p = batch.prompt_ids[b][batch.prompt_mask[b].bool()]
    c = batch.completion_ids[b][batch.completion_mask[b].bool()]
    return p, c


@torch.no_grad()
def unpadded_scores(rm, ids):
    """Score head at every position of one unpadded sequence (no batching, no masks)."""
    h = rm.model(input_ids=ids[None], use_cache=False).last_hidden_state
    return rm.score(h)[0, :, 0]


def test_terminal_and_uniform(tok, rm, rows):
    batch = batch_for(rows, tok)
    term = TerminalRewarder(rm, tok)(batch)
    uni = UniformRewarder(rm, tok)(batch)
    for b in range(len(rows)):
        p, c = real(batch, b)
        big_r = unpadded_scores(rm, torch.cat([p, c]))[-1]
        n = len(c)
        assert torch.allclose(term[b, n - 1], big_r, atol=ATOL)
        assert term[b, : n - 1].abs().sum() == 0 and term[b, n:].abs().sum() == 0
        assert torch.allclose(uni[b, :n], big_r / n * torch.ones(n), atol=ATOL)
        assert uni[b, n:].abs().sum() == 0


def test_abc_sums_to_reward_and_keeps_one_minus_beta_on_last(tok, rm, rows):
    beta = 0.8
    batch = batch_for(rows, tok)
    r = ABCRewarder(rm, tok, beta=beta)(batch)
    assert rm.config._attn_implementation == "eager"
    for b in range(len(rows)):
        p, c = real(batch, b)
        ids = torch.cat([p, c])
        with torch.no_grad():
            out = rm.model(input_ids=ids[None], output_attentions=True, use_cache=False)
        big_r = rm.score(out.last_hidden_state)[0, -1, 0]
        att = out.attentions[-1][0].mean(0)[-1, len(p) :]  # final token's row over completion tokens
        alpha = att / att.sum()
        n = len(c)
        expected = beta * big_r * alpha
        expected[-1] += (1 - beta) * big_r
        assert torch.allclose(r[b, :n], expected, atol=ATOL)
        assert torch.allclose(r[b].sum(), big_r, atol=ATOL)
        # the last token keeps at least (1 - beta) * R, the rest is the attention-weighted share
        assert torch.allclose(r[b, n - 1] - (1 - beta) * big_r, beta * big_r * alpha[-1], atol=ATOL)
    # beta = 0 is the terminal reward
    r0 = ABCRewarder(rm, tok, beta=0.0)(batch)
    assert torch.allclose(r0, TerminalRewarder(rm, tok)(batch), atol=ATOL)


@pytest.mark.parametrize("rewarder_cls", [ABCRewarder, PrefixRewarder, TerminalRewarder])
def test_invariant_to_left_and_right_padding(tok, rm, rows, rewarder_cls):
    ref = None
    for prompt_side in ("left", "right"):
        batch = batch_for(rows, tok, prompt_padding_side=prompt_side)
        for rm_side in ("left", "right"):
            r = rewarder_cls(rm, tok, padding_side=rm_side)(batch)
            if ref is None:
                ref = r
            assert torch.allclose(r, ref, atol=ATOL), (prompt_side, rm_side)


def test_score_read_at_last_real_token_when_pad_is_eos(rm, rows):
    """With pad == eos, transformers' classifier skips a trailing EOS; the rewarders do not."""
    tok = toy_tokenizer(vocab_size=300)
    tok.pad_token = tok.eos_token
    batch = batch_for(rows, tok)
    assert all(
        batch.completion_ids[b][batch.completion_mask[b].bool()][-1] == tok.eos_token_id for b in range(len(rows))
    )
    term = TerminalRewarder(rm, tok)
    big_r = term.sequence_rewards(batch)
    for b in range(len(rows)):
        p, c = real(batch, b)
        assert torch.allclose(big_r[b], unpadded_scores(rm, torch.cat([p, c]))[-1], atol=ATOL)
    # what the classifier's own pooling would have read: the token before the EOS
    rm.config.pad_token_id = tok.pad_token_id
    try:
        p, c = real(batch, 0)
        with torch.no_grad():
            pooled = rm(input_ids=torch.cat([p, c])[None]).logits[0, 0]
        assert torch.allclose(pooled, unpadded_scores(rm, torch.cat([p, c]))[-2], atol=ATOL)
    finally:
        rm.config.pad_token_id = toy_tokenizer(vocab_size=300).pad_token_id


def test_prefix_telescopes_and_equals_scoring_each_prefix(tok, rm, rows):
    batch = batch_for(rows, tok)
    r_prompt = PrefixRewarder(rm, tok)(batch)
    r_zero = PrefixRewarder(rm, tok, baseline="zero")(batch)
    for b in range(len(rows)):
        p, c = real(batch, b)
        full = unpadded_scores(rm, torch.cat([p, c]))
        n = len(c)
        assert torch.allclose(r_zero[b].sum(), full[-1], atol=ATOL)  # sum = R(x, y)
        assert torch.allclose(r_prompt[b].sum(), full[-1] - full[len(p) - 1], atol=ATOL)  # R(x,y) - R(x)
        # each difference is the score of the prefix fed alone, minus that of the shorter one
        alone = torch.stack([unpadded_scores(rm, torch.cat([p, c[: t + 1]]))[-1] for t in range(n)])
        before = torch.cat([unpadded_scores(rm, p)[-1:], alone[:-1]])
        assert torch.allclose(r_prompt[b, :n], alone - before, atol=ATOL)


def test_implicit_sums_to_dpo_sequence_reward(tok, rows):
    policy = tiny_model_for_tokenizer(tok, seed=5).eval()
    ref = tiny_model_for_tokenizer(tok, seed=6).eval()
    beta = 0.3
    for side in ("left", "right"):
        batch = batch_for(rows, tok, prompt_padding_side=side)
        r = ImplicitRewarder(policy, ref, tok, beta=beta, padding_side=side)(batch)
        for b in range(len(rows)):
            p, c = real(batch, b)
            ids = torch.cat([p, c])[None]

            start = len(p) - 1

            def seq_logp(model, ids=ids, start=start):
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                return logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[start:].sum()

            expected = beta * (seq_logp(policy) - seq_logp(ref))
            assert torch.allclose(r[b].sum(), expected, atol=1e-4)
    # the same model as its own reference gives zero reward
    assert ImplicitRewarder(policy, policy, tok)(batch).abs().max() < 1e-6


@pytest.fixture(scope="module")
def two_tokenizers():
    from sqlm.tiny import train_tokenizer

    rows = toy_preference_rows(400, seed=77)
    texts = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    coarse = train_tokenizer(texts, vocab_size=330)  # long merges: whole words
    fine = train_tokenizer(texts, vocab_size=262)  # little more than bytes
    return coarse, fine


def word_sums(values, spans, text):
    """Sum of per-token values per whitespace word of ``text`` (tokens assigned by span start)."""
    starts = [i for i, ch in enumerate(text) if ch == " " or i == 0]
    out = torch.zeros(len(starts))
    for v, (s, e) in zip(values, spans):
        if e == s:
            out[-1] += v  # special tokens (EOS) belong to the end
            continue
        w = max(i for i, st in enumerate(starts) if st <= s)
        out[w] += v
    return out


@pytest.mark.parametrize("name,coarse_policy", [("abc", True), ("prefix", True), ("abc", False)])
def test_cross_tokenizer_alignment_conserves_credit_per_word(two_tokenizers, name, coarse_policy):
    policy_tok, rm_tok = two_tokenizers if coarse_policy else two_tokenizers[::-1]
    rows = toy_preference_rows(4, seed=11)
    # the two tokenizers split these completions differently
    assert any(len(policy_tok(r["chosen"])["input_ids"]) != len(rm_tok(r["chosen"])["input_ids"]) for r in rows)
    rm = toy_reward_model(rm_tok, seed=2).eval()
    kwargs = {"beta": 0.8} if name == "abc" else {"baseline": "zero"}
    native = build_rewarder(name, reward_model=rm, tokenizer=rm_tok, **kwargs)
    cross = build_rewarder(name, reward_model=rm, tokenizer=rm_tok, policy_tokenizer=policy_tok, **kwargs)
    assert cross.encoder.shared is False and native.encoder.shared is True
    r_native = native(batch_for(rows, rm_tok))
    pol_batch = batch_for(rows, policy_tok)
    r_cross = cross(pol_batch)
    for b, row in enumerate(rows):
        text = row["chosen"]
        c_rm = tokenize_preference_example(row, rm_tok)["chosen_ids"]
        c_pol = tokenize_preference_example(row, policy_tok)["chosen_ids"]
        _, spans_rm = decoded_spans(rm_tok, c_rm)
        _, spans_pol = decoded_spans(policy_tok, c_pol)
        n_rm, n_pol = len(c_rm), len(c_pol)
        assert torch.allclose(r_cross[b].sum(), r_native[b].sum(), atol=ATOL)
        # both tokenizers split at spaces, so each word's credit must survive the move intact
        assert torch.allclose(
            word_sums(r_cross[b, :n_pol], spans_pol, text), word_sums(r_native[b, :n_rm], spans_rm, text), atol=ATOL
        )


def test_transfer_credit_splits_by_character_overlap():
    # source token "abcd" (4 chars) over destination tokens "ab", "c", "d"; then a special token
    src = [(0, 4), (4, 4)]
    dst = [(0, 2), (2, 3), (3, 4)]
    out = transfer_credit(torch.tensor([4.0, 1.0]), src, dst)
    assert torch.allclose(out, torch.tensor([2.0, 1.0, 2.0]))  # EOS credit goes to the last token


def test_decoded_spans_cover_text(two_tokenizers):
    tok, _ = two_tokenizers
    ids = tok(" the cat sat.<eos>")["input_ids"]
    text, spans = decoded_spans(tok, ids)
    assert text == " the cat sat."
    assert "".join(text[s:e] for s, e in spans) == text
    assert spans[-1][0] == spans[-1][1] == len(text)  # EOS: empty span at the end
    # sampled ids that re-tokenize differently take the slow path and still cover the text
    single = [tok.convert_tokens_to_ids(ch) for ch in "Ġcat"]
    text2, spans2 = decoded_spans(tok, single)
    assert text2 == " cat" and [e - s for s, e in spans2] == [1, 1, 1, 1]


def test_registry_weighted_and_callable(tok, rm, rows):
    batch = batch_for(rows, tok)
    abc = build_rewarder("abc", reward_model=rm, tokenizer=tok, beta=0.5)
    term = build_rewarder("terminal", reward_model=rm, tokenizer=tok)
    mix = rewarder_from_spec(
        [{"name": "abc", "weight": 0.25, "beta": 0.5}, {"name": "terminal", "weight": 0.75}],
        reward_model=rm,
        tokenizer=tok,
    )
    assert isinstance(mix, WeightedSum)
    assert torch.allclose(mix(batch), 0.25 * abc(batch) + 0.75 * term(batch), atol=ATOL)
    # two parts with one name both count
    twice = WeightedSum([term, term], [1.0, 2.0])
    assert torch.allclose(twice(batch), 3 * term(batch), atol=ATOL)
    fn = build_rewarder("callable", fn="sqlm.rewards.toy:toy_gold_reward_function")
    r = fn(batch)
    for b, row in enumerate(rows):
        n = int(batch.completion_mask[b].sum())
        assert r[b, n - 1] == pytest.approx(toy_gold_reward(row["chosen"]))
    with pytest.raises(SqlmError, match="unknown rewarder 'abcd'.*did you mean 'abc'"):
        build_rewarder("abcd")
    with pytest.raises(SqlmError, match="needs reward_model"):
        build_rewarder("prefix")
    with pytest.raises(SqlmError, match="beta must be in"):
        build_rewarder("abc", reward_model=rm, tokenizer=tok, beta=1.5)
    with pytest.raises(SqlmError, match="rewarder 'terminal'"):
        build_rewarder("terminal", reward_model=rm, tokenizer=tok, betta=0.1)


def test_empty_completion_gets_no_reward(tok, rm):
    batch = make_batch([[5, 6], [7]], [[8, 9, 10], []], tok.pad_token_id)
    for r in (ABCRewarder(rm, tok), PrefixRewarder(rm, tok), UniformRewarder(rm, tok)):
        out = r(batch)
        assert out[1].abs().sum() == 0 and out.shape == (2, 3)
    assert isinstance(batch, RewardBatch)


def test_rewarders_load_saved_models_by_path(tok, rm, rows, tmp_path):
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    policy = tiny_model_for_tokenizer(tok, seed=5)
    policy.save_pretrained(tmp_path / "dpo")
    tok.save_pretrained(tmp_path / "dpo")
    batch = batch_for(rows, tok)
    by_path = build_rewarder("abc", reward_model=str(tmp_path / "rm"), device="cpu")
    assert by_path.model.config._attn_implementation == "eager"
    assert torch.allclose(by_path(batch), ABCRewarder(rm, tok)(batch), atol=ATOL)
    implicit = build_rewarder("implicit", model=str(tmp_path / "dpo"), ref_model=str(tmp_path / "dpo"), device="cpu")
    assert implicit(batch).abs().sum() == 0
    with pytest.raises(SqlmError, match="could not load the reward model"):
        build_rewarder("terminal", reward_model=str(tmp_path / "missing"))
    with pytest.raises(SqlmError, match="dtype"):
        build_rewarder("terminal", reward_model=str(tmp_path / "rm"), dtype="float33")
