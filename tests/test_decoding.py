"""sqlm.decoding: exact checks on the oracle, then every strategy on tiny models.

The exact checks use a causal-LM stand-in whose logits ARE a policy table of ``sqlm.oracle``
(``Q*/tau`` for the soft-optimal policy, ``log pi_ref`` for the reference, ``-inf`` off the action
subset), read from its KV cache of token ids: a model that represents ``pi*`` exactly.
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from sqlm.decoding import DecodingArguments, decode, score_completions
from sqlm.errors import SqlmError
from sqlm.oracle import TokenMDP, random_mdp, solve


# ----------------------------------------------------------------------------- an exact stand-in


class _IdsCache:
    """The token ids seen so far: all a table needs (reordered like a KV cache)."""

    def __init__(self):
        self.ids = None

    def reorder_cache(self, idx):
        self.ids = self.ids[idx]


class TableLM(torch.nn.Module):
    """Logits ``[B, T, vocab]`` from per-depth tables ``[k^d, A]`` of an MDP (fp64; ``-inf`` off the
    actions; states off the tree, e.g. past the horizon, get uniform logits over the actions)."""

    def __init__(self, mdp: TokenMDP, tables, vocab: int):
        super().__init__()
        self.mdp, self.tables, self.vocab = mdp, [t.double() for t in tables], vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, for the device
        self.calls: list[tuple[int, bool]] = []  # (new tokens, cache given)

    def _logits(self, seq: list[int]) -> torch.Tensor:
        mdp = self.mdp
        out = torch.full((self.vocab,), -math.inf, dtype=torch.float64)
        out[list(mdp.actions)] = 0.0
        comp = seq[len(mdp.prompt) :]
        if len(seq) < len(mdp.prompt) or len(comp) >= mdp.horizon:
            return out
        row = 0
        for t in comp:
            if t not in mdp.actions or t == mdp.eos:
                return out
            row = row * mdp.k + int(mdp._child_of_col[mdp.actions.index(t)])
        out[list(mdp.actions)] = self.tables[len(comp)][row]
        return out

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, **kwargs):
        self.calls.append((input_ids.shape[1], cache is not None))
        hist = input_ids if cache is None else torch.cat([cache.ids, input_ids], dim=1)
        mask = torch.ones_like(hist) if attention_mask is None else attention_mask
        new = input_ids.shape[1]
        logits = torch.empty(hist.shape[0], new, self.vocab, dtype=torch.float64)
        for b in range(hist.shape[0]):
            for j in range(new):
                p = hist.shape[1] - new + j
                seq = [int(t) for t, m in zip(hist[b, : p + 1], mask[b, : p + 1]) if m]
                logits[b, j] = self._logits(seq)
        if use_cache:
            cache = cache if cache is not None else _IdsCache()
            cache.ids = hist
        return SimpleNamespace(logits=logits, cache=cache)


VOCAB = 8


def _mdp(reward: str, seed: int = 0) -> TokenMDP:
    from sqlm.evaluation.oracle_train import tiny_reference_lm

    ref = tiny_reference_lm(VOCAB, seed=seed + 1)
    return random_mdp(num_actions=4, horizon=3, reward=reward, scale=2.0, tau=0.7, ref_model=ref,
                      prompt=(VOCAB - 1,), seed=seed)  # fmt: skip


def _stand_ins(mdp: TokenMDP):
    sol = solve(mdp)
    policy = TableLM(mdp, [q / mdp.tau for q in sol.q], VOCAB)  # logits = Q*/tau: pi* exactly
    ref = TableLM(mdp, mdp.ref_log_pi, VOCAB)  # logits = log pi_ref (its logsumexp is 0)
    return sol, policy, ref


def _all_sequences(sol):
    table = sol.sequences()
    comps = [toks[:n] for toks, n in zip(table.tokens.tolist(), table.lengths.tolist())]
    return table, comps


@pytest.mark.parametrize("reward", ["token", "terminal"])
def test_implicit_score_of_every_sequence_is_its_reward_minus_v0(reward):
    """tau * log pi*(y)/pi_ref(y) = R(y) - V*(s0) for all 40 sequences (the soft Bellman identity
    summed along y); and the model's last-step estimate Q(s_T,a_T) - tau log pi_ref(a_T|s_T) is the
    last token's reward (the whole R(y) for a terminal reward)."""
    mdp = _mdp(reward)
    sol, policy, ref = _stand_ins(mdp)
    table, comps = _all_sequences(sol)
    for anchor in ("reference", "none"):
        out = score_completions(policy, ref, [list(mdp.prompt)] * len(comps), comps, tau=mdp.tau,
                                value_anchor=anchor, eos_token_id=mdp.eos)  # fmt: skip
        implicit = torch.tensor(out["implicit"], dtype=torch.float64)
        assert len(comps) == mdp.num_sequences == 40
        assert torch.allclose(implicit, table.reward - sol.v0, atol=1e-5, rtol=0)
        assert torch.allclose(torch.tensor(out["logprob"], dtype=torch.float64), table.log_prob, atol=1e-6)
    if reward == "terminal":
        assert torch.allclose(torch.tensor(out["reward"], dtype=torch.float64), table.reward, atol=1e-5)
    values = sol.path_values(table.tokens)  # V*(s_t) along every path
    for v, vs, n in zip(out["values"], values.tolist(), table.lengths.tolist()):
        assert v == pytest.approx(vs[:n], abs=1e-5)  # the critic read off the logits is V*


def test_best_of_n_by_implicit_score_ranks_samples_as_the_true_reward():
    mdp = _mdp("terminal", seed=3)
    sol, policy, ref = _stand_ins(mdp)
    table, comps = _all_sequences(sol)
    reward_of = {tuple(c): float(r) for c, r in zip(comps, table.reward)}
    args = DecodingArguments(strategy="best_of_n", best_of=8, scorer="implicit", tau=mdp.tau)
    res = decode(policy, None, None, args, ref_model=ref, prompt_ids=[list(mdp.prompt)] * 6,
                 max_new_tokens=mdp.horizon, eos_token_id=mdp.eos, pad_token_id=0, keep_candidates=True)  # fmt: skip
    for row in res.rows:
        true = [reward_of[tuple(c["completion_ids"])] for c in row["candidates"]]
        assert row["candidate_scores"] == pytest.approx([r - sol.v0 for r in true], abs=1e-5)
        assert reward_of[tuple(row["completion_ids"])] == max(true)


@pytest.mark.parametrize(
    "reward,seed,beam_score,with_rewarder",
    [("token", 0, "likelihood", False), ("terminal", 5, "soft", False), ("terminal", 5, "soft", True)],
)
def test_exhaustive_value_beam_returns_the_mode_of_pi_star(reward, seed, beam_score, with_rewarder):
    """Width 9 = the prefixes at the deepest depth (3^2), every action a candidate, chunk 1,
    temperature 0: nothing is pruned, and the best finished beam is argmax_y pi*(y). ('soft' assumes
    a terminal reward: R comes from the model's last Q, or from the true reward function.) On these
    MDPs greedy decoding (width 1) misses the mode."""
    mdp = _mdp(reward, seed=seed)
    sol, policy, ref = _stand_ins(mdp)
    table, comps = _all_sequences(sol)
    mode = comps[int(table.log_prob.argmax())]
    assert table.log_prob.max() - table.log_prob.topk(2).values[1] > 1e-3  # a unique mode
    reward_of = {tuple(c): float(r) for c, r in zip(comps, table.reward)}
    rewarder = None
    if with_rewarder:

        def rewarder(prompts, completions, completion_ids, **kw):
            return [reward_of[tuple(c)] for c in completion_ids]

    args = DecodingArguments(strategy="value_beam", num_beams=9, num_candidates=4, chunk_length=1, temperature=0.0,
                             beam_score=beam_score, tau=mdp.tau)  # fmt: skip
    res = decode(policy, None, None, args, ref_model=ref, rewarder=rewarder, prompt_ids=[list(mdp.prompt)],
                 max_new_tokens=mdp.horizon, eos_token_id=mdp.eos, pad_token_id=0)  # fmt: skip
    row = res.rows[0]
    assert row["completion_ids"] == mode
    assert policy.calls[0] == (1, False) and all(c == (1, True) for c in policy.calls[1:])  # the cache, one token
    greedy = DecodingArguments(strategy="value_beam", num_beams=1, num_candidates=1, chunk_length=1, temperature=0.0,
                               beam_score=beam_score, tau=mdp.tau)  # fmt: skip
    res1 = decode(policy, None, None, greedy, ref_model=ref, rewarder=rewarder, prompt_ids=[list(mdp.prompt)],
                  max_new_tokens=mdp.horizon, eos_token_id=mdp.eos, pad_token_id=0)  # fmt: skip
    assert res1.rows[0]["completion_ids"] != mode
    expected = mdp.tau * float(table.log_prob.max()) + (sol.v0 if beam_score == "soft" else 0.0)
    assert row["score"] == pytest.approx(expected, abs=1e-5)  # tau log pi*(y) + V*(s0) for 'soft'


def test_exhaustive_value_beam_with_oreo_score_returns_the_best_reward():
    mdp = _mdp("terminal", seed=5)
    sol, policy, ref = _stand_ins(mdp)
    table, comps = _all_sequences(sol)
    args = DecodingArguments(strategy="value_beam", num_beams=9, num_candidates=4, chunk_length=1, temperature=0.0,
                             beam_score="value", tau=mdp.tau)  # fmt: skip
    res = decode(policy, None, None, args, ref_model=ref, prompt_ids=[list(mdp.prompt)],
                 max_new_tokens=mdp.horizon, eos_token_id=mdp.eos, pad_token_id=0)  # fmt: skip
    assert res.rows[0]["completion_ids"] == comps[int(table.reward.argmax())]
    assert res.rows[0]["reward"] == pytest.approx(float(table.reward.max()), abs=1e-5)


# ----------------------------------------------------------------------------- tiny models

PROMPTS = ["a good day", "the film", "it was a long and", "bad"]
STRATEGIES = {
    "sample": DecodingArguments(strategy="sample"),
    "best_of_n_implicit": DecodingArguments(strategy="best_of_n", best_of=3, scorer="implicit", tau=0.5),
    "best_of_n_reward": DecodingArguments(strategy="best_of_n", best_of=3, scorer="reward_model"),
    "best_of_n_random": DecodingArguments(strategy="best_of_n", best_of=3, scorer="random"),
    "best_of_n_likelihood": DecodingArguments(strategy="best_of_n", best_of=3, scorer="likelihood", tau=0.5),
    "value_beam_soft": DecodingArguments(
        strategy="value_beam", num_beams=2, num_candidates=2, chunk_length=3, tau=0.5
    ),
    "value_beam_value_t0": DecodingArguments(
        strategy="value_beam", num_beams=2, num_candidates=3, chunk_length=2, temperature=0.0, beam_score="value"
    ),
}


def n_letters(prompts, completions, **kwargs):
    """A sequence reward for the tests: the number of letters 'e' in the completion."""
    return [float(c.count("e")) for c in completions]


@pytest.fixture(scope="module")
def tiny():
    from sqlm.tiny import tiny_model_for_tokenizer, train_tokenizer

    texts = ["a good day and a bad day", "the film was long and dull", "it was a fine film", "the best day"] * 4
    tok = train_tokenizer(texts, vocab_size=300)
    model = tiny_model_for_tokenizer(tok, seed=0, hidden_size=16, num_hidden_layers=1).eval()
    ref = tiny_model_for_tokenizer(tok, seed=1, hidden_size=16, num_hidden_layers=1).eval()
    with torch.no_grad():  # sharper distributions, so that EOS and repeats happen at different steps
        model.get_output_embeddings().weight.mul_(4.0)
    return model, ref, tok


def _decode(tiny, args, **kw):
    model, ref, tok = tiny
    kw.setdefault("max_new_tokens", 8)
    return decode(model, tok, PROMPTS, args, ref_model=ref, rewarder=n_letters, **kw)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_batching_equals_unbatched(tiny, name):
    """One generator per prompt: a prompt's result is the same alone or with others (left padding,
    shared batches, beams of other prompts)."""
    one = _decode(tiny, STRATEGIES[name], batch_size=1, seed=3, num_return_sequences=2)
    all_ = _decode(tiny, STRATEGIES[name], batch_size=8, seed=3, num_return_sequences=2)
    assert [r["completion_ids"] for r in one.rows] == [r["completion_ids"] for r in all_.rows]
    assert [r["score"] for r in one.rows] == pytest.approx([r["score"] for r in all_.rows], abs=1e-4)
    assert one.compute.tokens_generated == all_.compute.tokens_generated
    assert one.compute.policy_forward_tokens == all_.compute.policy_forward_tokens
    assert one.compute.policy_forward_passes > all_.compute.policy_forward_passes  # more, smaller batches


def test_greedy_equals_transformers_generate_and_uses_the_kv_cache(tiny):
    model, ref, tok = tiny
    calls = []
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((kwargs["input_ids"].shape[1], kwargs.get("cache") is not None)),
        with_kwargs=True,
    )
    try:
        greedy = DecodingArguments(strategy="value_beam", num_beams=1, num_candidates=1, chunk_length=1,
                                   temperature=0.0, beam_score="likelihood")  # fmt: skip
        res = decode(model, tok, PROMPTS, greedy, max_new_tokens=8, batch_size=8)
    finally:
        handle.remove()
    width = max(len(p) for p in tok(PROMPTS)["input_ids"])
    assert calls[0] == (width, False) and calls[1:] and all(c == (1, True) for c in calls[1:])
    for prompt, row in zip(PROMPTS, res.rows):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = model.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1] :].tolist()  # fmt: skip
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id) + 1]
        assert row["completion_ids"] == out
    plain = decode(model, tok, PROMPTS, DecodingArguments(strategy="sample", temperature=0.0), max_new_tokens=8)
    assert [r["completion_ids"] for r in plain.rows] == [r["completion_ids"] for r in res.rows]


def test_compute_counts_every_token_and_forward_pass(tiny):
    model, ref, tok = tiny
    args = STRATEGIES["best_of_n_implicit"]
    res = _decode(tiny, args, batch_size=8, keep_candidates=True)
    cands = [c["completion_ids"] for r in res.rows for c in r["candidates"]]
    prompt_tokens = sum(len(p) for p in tok(PROMPTS)["input_ids"])  # once per prompt: the cache is shared
    c = res.compute
    assert c.prompts == len(PROMPTS) and c.tokens_generated == sum(len(x) for x in cands)
    assert c.policy_forward_tokens == prompt_tokens + sum(len(x) - 1 for x in cands)  # the last token is not run
    assert c.reference_forward_tokens == c.policy_forward_tokens  # the reference runs in lockstep
    assert c.policy_forward_passes == c.reference_forward_passes == max(len(x) for x in cands)
    assert c.forward_passes == 2 * c.policy_forward_passes and c.reward_sequences == 0
    sample = _decode(tiny, STRATEGIES["sample"], batch_size=8)
    assert sample.compute.reference_forward_passes == 0  # plain sampling does not run the reference
    checked = _decode(tiny, STRATEGIES["best_of_n_reward"], batch_size=2)
    assert checked.compute.reward_sequences == 3 * len(PROMPTS) and checked.compute.reward_calls == 2


def test_scores_are_what_the_docstring_says(tiny):
    model, ref, tok = tiny
    res = _decode(tiny, STRATEGIES["best_of_n_implicit"], keep_candidates=True)
    for r in res.rows:
        assert r["score"] == max(r["candidate_scores"]) == pytest.approx(r["implicit"])
        assert r["implicit"] == pytest.approx(0.5 * (r["logprob"] - r["ref_logprob"]))
        assert r["candidates"][r["chosen"]]["completion_ids"] == r["completion_ids"]
    conf = _decode(tiny, STRATEGIES["best_of_n_likelihood"], keep_candidates=True)
    for r in conf.rows:
        assert r["candidate_scores"] == pytest.approx([0.5 * c["logprob"] for c in r["candidates"]])
        assert r["score"] == max(r["candidate_scores"]) and r["ref_logprob"] is None  # no reference needed
    checked = _decode(tiny, STRATEGIES["best_of_n_reward"], keep_candidates=True)
    for r in checked.rows:
        assert r["candidate_scores"] == [float(c["completion"].count("e")) for c in r["candidates"]]
    forced = score_completions(model, ref, tok(PROMPTS)["input_ids"], [r["completion_ids"] for r in res.rows],
                               tau=0.5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    assert forced["implicit"] == pytest.approx([r["implicit"] for r in res.rows], abs=1e-5)
    itself = decode(model, tok, PROMPTS, STRATEGIES["best_of_n_implicit"], ref_model=model, max_new_tokens=6)
    assert all(s == pytest.approx(0.0, abs=1e-6) for r in itself.rows for s in r["candidate_scores"])


def test_sqlm_generate_writes_jsonl_with_scores_and_compute(tiny, tmp_path, capsys):
    from sqlm import cli

    model, ref, tok = tiny
    for name, m in (("policy", model), ("ref", ref)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    (tmp_path / "recipe.yaml").write_text(
        "strategy: value_beam\nnum_beams: 2\nnum_candidates: 2\nchunk_length: 3\ntau: 0.5\nmax_new_tokens: 6\n"
        "prompts_file: prompts.json\n"
    )
    out = tmp_path / "out" / "c.jsonl"
    code = cli.main(["generate", str(tmp_path / "recipe.yaml"), "--model_name_or_path", str(tmp_path / "policy"),
                     "--ref_model", str(tmp_path / "ref"), "--output_file", str(out), "--num_return_sequences", "2"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * len(PROMPTS) and [r["prompt"] for r in rows[::2]] == PROMPTS
    assert all(isinstance(r["score"], float) and r["strategy"] == "value_beam" for r in rows)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["tokens_generated"] > 0 and summary["forward_passes"] > 0 and summary["prompts"] == 8
    assert "tokens generated" in capsys.readouterr().out


def test_bad_input_is_one_line_naming_the_key(tiny, tmp_path, capsys):
    from sqlm import cli
    from sqlm.commands.generate import recipe_dataclasses
    from sqlm.recipe import parse_recipe

    model, ref, tok = tiny
    with pytest.raises(SqlmError, match=r"scorer 'implicit' needs a reference model"):
        decode(model, tok, PROMPTS, STRATEGIES["best_of_n_implicit"], ref_model=None)
    with pytest.raises(SqlmError, match=r"beam_score 'soft' needs a reference"):
        decode(model, tok, PROMPTS, STRATEGIES["value_beam_soft"])
    with pytest.raises(SqlmError, match=r"value_anchor 'reference' needs a reference"):
        decode(model, tok, PROMPTS, STRATEGIES["value_beam_value_t0"])
    none = DecodingArguments(strategy="value_beam", beam_score="value", value_anchor="none", num_beams=2)
    assert len(decode(model, tok, PROMPTS, none, max_new_tokens=4).rows) == len(PROMPTS)  # V = tau lse z: no ref
    from sqlm.tiny import tiny_causal_lm

    other = tiny_causal_lm(len(tok) + 5, hidden_size=16, num_hidden_layers=1)
    with pytest.raises(SqlmError, match=r"different vocabularies"):
        decode(model, tok, PROMPTS, STRATEGIES["best_of_n_implicit"], ref_model=other, max_new_tokens=2)
    with pytest.raises(SqlmError, match=r"scorer 'reward_model' needs reward_funcs"):
        decode(model, tok, PROMPTS, STRATEGIES["best_of_n_reward"])
    for key in ("best_of", "num_beams", "num_candidates", "chunk_length"):
        with pytest.raises(SqlmError, match=rf"key '{key}' must be an integer >= 1, got 0"):
            parse_recipe(recipe_dataclasses(), None, [f"--{key}", "0"])
    with pytest.raises(SqlmError, match=r"key 'scorer' must be one of implicit, likelihood, reward_model, random"):
        DecodingArguments(scorer="implicti")
    (tmp_path / "p.json").write_text(json.dumps(PROMPTS))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    code = cli.main(["generate", "--model_name_or_path", str(tmp_path / "m"), "--prompts_file", str(tmp_path / "p.json"),
                     "--strategy", "best_of_n", "--scorer", "implicit"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "scorer 'implicit' needs a reference model" in err
    assert cli.main(["generate", "--model_name_or_path", "m", "--best_of", "0"]) == 2
    assert "key 'best_of' must be an integer >= 1, got 0" in capsys.readouterr().err


def test_sqlm_eval_takes_a_strategy_reports_its_compute_and_shows_gold_the_prompts(tiny, tmp_path, monkeypatch):
    """A gold function sees each completion's prompt (before, it got empty strings: the arithmetic
    checker could not score anything)."""
    from sqlm.commands.eval import main

    model, ref, tok = tiny
    for name, m in (("policy", model), ("ref", ref)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    (tmp_path / "goldmod.py").write_text(
        "def gold(prompts, completions, **kw):\n    return [float(p in ('a good day', 'the film')) for p in prompts]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "eval"
    code = main(["--models", f"sqlm@0.5={tmp_path / 'policy'}", "--ref_model", str(tmp_path / "ref"),
                 "--prompts_file", str(tmp_path / "prompts.json"), "--gold", "goldmod:gold", "--max_new_tokens", "5",
                 "--samples_per_prompt", "2", "--strategy", "best_of_n", "--best_of", "2", "--output_dir", str(out)])  # fmt: skip
    assert code == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["sqlm@0.5"]["gold"] == pytest.approx(0.5) and rows["reference"]["gold"] == pytest.approx(0.5)
    assert rows["sqlm@0.5"]["decoding"] == "best_of_n[implicit, N=2]"
    c = rows["sqlm@0.5"]["compute"]
    assert c["prompts"] == 8 and c["tokens_generated"] > 0 and c["reference_forward_passes"] > 0
    assert "| sqlm@0.5 | best_of_n[implicit, N=2] |" in (out / "report.md").read_text()


CHAT_GOLD = '''
def gold(prompts, completions, answer, **kwargs):
    """TRL's signature, reading a column: the row's answer if it sees a chat prompt and an assistant turn."""
    ok = [isinstance(p, list) and c[0]["role"] == "assistant" for p, c in zip(prompts, completions)]
    assert len(kwargs["completion_ids"]) == len(answer)
    return [float(a) if o else -1.0 for a, o in zip(answer, ok)]
'''


def _chat_files(tiny, tmp_path, with_answer=True):
    """The policy and reference saved, and a prompts file of conversations (with an 'answer' column)."""
    model, ref, tok = tiny
    for name, m in (("policy", model), ("ref", ref)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rows = [{"prompt": [{"role": "user", "content": p}], **({"answer": i} if with_answer else {"level": 1})}
            for i, p in enumerate(PROMPTS)]  # fmt: skip
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "chatgold.py").write_text(CHAT_GOLD)
    return [r["prompt"] for r in rows]


def test_conversational_prompts_are_tokenised_as_training_tokenises_them(tiny):
    from sqlm.data import tokenize_prompt
    from sqlm.decoding import prompt_token_ids

    model, ref, tok = tiny
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    ids = prompt_token_ids(chats, tok)
    assert ids == [tokenize_prompt({"prompt": c}, tok)["prompt_ids"] for c in chats]
    assert (
        ids[0]
        == tok.apply_chat_template(chats[0], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    assert tok.decode(ids[0]).endswith("assistant: ")  # the generation prompt of the tiny template
    assert prompt_token_ids(PROMPTS, tok) == tok(PROMPTS)["input_ids"]  # texts as before
    res = decode(model, tok, chats, STRATEGIES["sample"], max_new_tokens=5, seed=1)
    same = decode(model, tok, None, STRATEGIES["sample"], max_new_tokens=5, seed=1, prompt_ids=ids)
    assert [r["completion_ids"] for r in res.rows] == [r["completion_ids"] for r in same.rows]
    assert res.rows[0]["prompt"] == chats[0]
    plain = copy.deepcopy(tok)  # a tokenizer without a chat template: one line
    plain.chat_template = None
    with pytest.raises(SqlmError, match=r"prompt 0 is a conversation, but the model's tokenizer has no chat template"):
        prompt_token_ids(chats, plain)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_generate_and_eval_take_chat_prompts_and_give_gold_the_columns(tiny, tmp_path, monkeypatch, command):
    """Conversational prompts, as sqlm train takes them, were refused ('must hold non-empty prompt
    strings'); a gold function with TRL's signature that reads 'answer' crashed after all decoding."""
    from sqlm import cli

    chats = _chat_files(tiny, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["--prompts_file", str(tmp_path / "prompts.jsonl"), "--gold", "chatgold:gold", "--max_new_tokens", "4"]
    if command == "generate":
        out = tmp_path / "c.jsonl"
        argv = ["generate", "--model_name_or_path", str(tmp_path / "policy"), "--output_file", str(out), *common]
        assert cli.main(argv) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == chats
        assert [r["gold"] for r in rows] == [0.0, 1.0, 2.0, 3.0]  # each row's own answer
    else:
        out = tmp_path / "eval"
        argv = ["eval", "--models", f"sqlm@0.5={tmp_path / 'policy'}", "--ref_model", str(tmp_path / "ref"),
                "--samples_per_prompt", "2", "--output_dir", str(out), *common]  # fmt: skip
        assert cli.main(argv) == 0
        rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
        assert rows["sqlm@0.5"]["gold"] == pytest.approx(1.5) and rows["reference"]["gold"] == pytest.approx(1.5)
        assert rows["sqlm@0.5"]["examples"][0]["prompt"] == chats[0]


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_gold_needing_a_column_the_prompts_lack_stops_before_decoding(tiny, tmp_path, monkeypatch, capsys, command):
    from sqlm import cli, loading
    from sqlm.decoding import api
    from sqlm.evaluation import evaluate

    _chat_files(tiny, tmp_path, with_answer=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    capsys.readouterr()  # what saving the models printed

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded or decoding started")

    for mod, name in ((loading, "load_policy"), (evaluate, "load_policy"), (api, "decode")):
        monkeypatch.setattr(mod, name, never)
    prompts = str(tmp_path / "prompts.jsonl")
    if command == "generate":
        argv = ["generate", "--model_name_or_path", str(tmp_path / "policy")]
    else:
        argv = ["eval", "--models", f"sqlm@0.5={tmp_path / 'policy'}", "--ref_model", str(tmp_path / "ref")]
    assert cli.main([*argv, "--prompts_file", prompts, "--gold", "chatgold:gold"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert f"gold function 'chatgold:gold' needs a column 'answer', which prompts_file {prompts} lacks" in err
    assert "(columns: prompt, level)" in err
