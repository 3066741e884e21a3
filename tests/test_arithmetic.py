"""The arithmetic gold task: trace format, checker, splits, deterministic pretraining, pairs, eval.

The base-accuracy test uses the default base LM from the sqlm cache ($SQLM_CACHE or ~/.cache/sqlm;
``scripts/exp_arithmetic.py`` builds it). On a cold cache it pretrains it once (1-2 minutes on one
core); every other test builds what it needs in a few seconds.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from sqlm.errors import SqlmError
from sqlm.evaluation import arithmetic as ar
from sqlm.evaluation.arithmetic import (
    ArithTaskConfig,
    answer_reward,
    arith_reward,
    checked_pairs,
    final_answer,
    parse_prompt,
    prompt_of,
    trace,
    wrong_trace,
)
from sqlm.evaluation.gold import weights_digest


TINY = {"max_digits": 2, "long_digits": 3, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "lm_steps": 4, "lm_batch_size": 8, "corpus_problems": 64}  # fmt: skip


# ----------------------------------------------------------------------------- format


def test_trace_format():
    assert trace(37, 85) == " 7+5+0=12 3+8+1=12 = 122"
    assert trace(0, 0) == " 0+0+0=00 = 0"
    assert trace(5, 123) == " 5+3+0=08 0+2+0=02 0+1+0=01 = 128"
    assert trace(999, 1) == " 9+1+0=10 9+0+1=10 9+0+1=10 = 1000"


def test_every_right_trace_scores_one_and_every_wrong_one_zero():
    rng = random.Random(0)
    for _ in range(400):
        a, b = rng.randrange(10 ** rng.randint(1, 4)), rng.randrange(10 ** rng.randint(1, 4))
        p = prompt_of(a, b)
        assert answer_reward(p, trace(a, b)) == 1.0
        bad = wrong_trace(a, b, rng)
        assert final_answer(bad) is not None, bad  # well formed
        assert answer_reward(p, bad) == 0.0, (p, bad)


def test_wrong_trace_is_self_consistent_or_has_a_wrong_answer_only():
    """Half the wrong traces err in one column and carry it on (the answer is what the trace spells),
    half have a right trace and a wrong answer."""
    rng = random.Random(1)
    kinds = {"trace": 0, "answer": 0}
    for _ in range(400):
        a, b = rng.randrange(1000), rng.randrange(1000)
        bad = wrong_trace(a, b, rng)
        steps, answer = bad.rsplit(" = ", 1)
        right_steps = trace(a, b).rsplit(" = ", 1)[0]
        if steps == right_steps:
            kinds["answer"] += 1
        else:
            sums = [int(s.split("=")[1]) for s in steps.split()]
            assert answer == ar._answer_of(sums)
            kinds["trace"] += 1
    assert 150 < kinds["trace"] < 250 and 150 < kinds["answer"] < 250


def test_corpus_wrong_share_and_splits():
    cfg = ArithTaskConfig(corpus_problems=2000, wrong_share=0.35)
    texts = ar.corpus(cfg)
    prompts = [t[: t.index(":") + 1] for t in texts]
    right = arith_reward(prompts, [t[t.index(":") + 1 :] for t in texts])
    assert abs(1 - sum(right) / len(right) - 0.35) < 0.04
    assert all(ar.split_of(*parse_prompt(p)) == "pretrain" for p in prompts)
    assert max(len(str(x)) for p in prompts for x in parse_prompt(p)) == 3


def test_task_prompts_are_disjoint_and_long_ones_longer():
    cfg = ArithTaskConfig()
    p = ar.task_prompts(cfg, 50, 50, 20)
    assert not set(p["train"]) & set(p["eval"]) and len(set(p["eval"])) == 50
    assert all(ar.split_of(*parse_prompt(x)) == "train" for x in p["train"])
    assert all(ar.split_of(*parse_prompt(x)) == "eval" for x in p["eval"])
    assert all(max(len(str(v)) for v in parse_prompt(x)) <= 3 for x in p["eval"])
    assert all(max(len(str(v)) for v in parse_prompt(x)) == 4 for x in p["long"])
    assert p == ar.task_prompts(cfg, 50, 50, 20)  # fixed by the seed
    assert ar.split_of(12, 34) == ar.split_of(12, 34)
    with pytest.raises(SqlmError, match="distinct"):
        ar.sample_problems(50, 1, 1, seed=0, split="eval")  # 1-digit problems: ~10 in the split


def test_char_tokenizer_tokenises_prompt_and_completion_apart_as_together():
    tok = ar.char_tokenizer()
    p, c = "37+85:", trace(37, 85)
    ids = tok(p + c + tok.eos_token)["input_ids"]
    assert ids == tok(p)["input_ids"] + tok(c)["input_ids"] + [tok.eos_token_id]
    assert len(ids) == len(p + c) + 1
    assert tok.decode(ids, skip_special_tokens=True) == p + c
    assert tok.unk_token_id not in ids


def test_saved_base_lm_tokenizer_reloads_with_the_same_ids(tmp_path):
    """What sqlm train / sqlm dpo load from a base-LM folder (AutoTokenizer; a Qwen2-shaped config
    makes transformers rebuild a Qwen2Tokenizer) encodes worked completions, spaces included, as the
    pretraining tokenizer did. The first char tokenizer lost every space there: the offline pairs
    were trained as '1+2+0=039+0+0=09=93', text the base LM gives ~-150 nats, and offline runs blew up."""
    from transformers import AutoTokenizer

    from sqlm.tiny import tiny_model_for_tokenizer

    tok = ar.char_tokenizer()
    tiny_model_for_tokenizer(tok, seed=0, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=32).save_pretrained(tmp_path)  # fmt: skip
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("37+85:", trace(37, 85), " 1+2+0=03 9+0+0=09 = 93", "  12 :: ="):
        assert loaded(text)["input_ids"] == tok(text)["input_ids"], text
        assert loaded.decode(tok(text)["input_ids"]) == text
    assert ar.tokenizer_is_current(tmp_path)


# ----------------------------------------------------------------------------- checker

CHECKS = [
    ("37+85:", " 7+5+0=12 3+8+1=12 = 122", 1.0),
    ("37+85:", "= 122", 1.0),  # no trace: only the answer counts
    ("37+85:", " 7+5+0=12 3+8+1=12 = 122  \n", 1.0),  # trailing whitespace
    ("37+85:", " 7+5+0=12 3+8+1=12 = 122<eos>", 1.0),  # an EOS the decoder kept
    ("37+85:", " 7+5+0=12 3+8+1=12 = 122<eos><pad><pad>", 1.0),
    ("37+85:", " 7+5+0=12 3+8+1=12 = 12<eos>2", 0.0),  # text after EOS is not the answer
    ("37+85:", " 7+5+0=13 3+8+1=12 = 123", 0.0),  # wrong but well formed
    ("37+85:", " 7+5+0=12 3+8+1=12 = 122 ", 1.0),
    ("37+85:", " 7+5+0=12 3+8+1=12 = 122 7", 0.0),  # extra text after the answer
    ("37+85:", " 7+5+0=12 3+8+1=12 = 122 = ", 0.0),
    ("37+85:", " 7+5+0=12 3+8+1=12 = 122+", 0.0),
    ("37+85:", " 7+5+0=12 3+8+1=12 122", 0.0),  # missing '='
    ("37+85:", " 7+5+0=12 3+8+1=12 =122", 0.0),  # the answer is ' = N'
    ("7+5:", " 7+5+0=12", 0.0),  # a step's sum is not an answer
    ("37+85:", " 7+5+0=12 3+8+1=12 = 0122", 0.0),  # leading zero
    ("0+0:", " 0+0+0=00 = 0", 1.0),  # ... but 0 itself is fine
    ("0+0:", " 0+0+0=00 = 00", 0.0),
    ("37+85:", "", 0.0),  # empty
    ("37+85:", "   ", 0.0),
    ("37+85:", " = ", 0.0),
    ("37+85:", " 7+5+0=12 3+8+1=12 = 12a", 0.0),  # malformed answers
    ("37+85:", " 7+5+0=12 3+8+1=12 = 1 22", 0.0),
    ("37+85:", " 7+5+0=12 3+8+1=12 = -122", 0.0),
    ("37+85:", " 7+5+0=12 3+8+1=12 = 122.0", 0.0),
    ("37+85:", " 7+5+0=12 3+8+1=12 = ١٢٢", 0.0),  # non-ASCII digits
    ("37+85:", " 7+5+0=12 3+8+1=12 = 1٢2", 0.0),
]


@pytest.mark.parametrize("prompt,completion,reward", CHECKS, ids=[repr(c[1]) for c in CHECKS])
def test_checker(prompt, completion, reward):
    assert answer_reward(prompt, completion) == reward


def test_reward_function_signature_and_conversations():
    prompts = ["37+85:", "1+2:", [{"role": "user", "content": "1+2:"}]]
    comps = [" 7+5+0=12 3+8+1=12 = 122", " 1+2+0=03 = 4", [{"role": "assistant", "content": " = 3"}]]
    assert arith_reward(prompts=prompts, completions=comps, completion_ids=[[1], [2], [3]]) == [1.0, 0.0, 1.0]
    with pytest.raises(SqlmError, match="prompts but"):
        arith_reward(["1+2:"], [])
    with pytest.raises(SqlmError, match="not an arithmetic prompt"):
        answer_reward("What is 1+2?", " = 3")


def test_recipe_reward_resolves_to_the_checker():
    from pathlib import Path

    from sqlm.recipe import load_yaml
    from sqlm.rewards.registry import resolve_reward_funcs

    recipe = load_yaml(Path(__file__).resolve().parents[1] / "recipes/arithmetic/sqlm/config_online.yaml")
    (rewarder,) = resolve_reward_funcs(recipe["reward_funcs"], None, recipe["allow_code_rewards"])
    assert rewarder.fn is arith_reward


# ----------------------------------------------------------------------------- pairs


def test_checked_pairs_pair_a_right_with_a_wrong_sample_and_skip_the_rest():
    prompts = ["1+2:", "2+2:", "3+3:", "4+4:"]
    samples = [
        [" = 3", " = 4", " = 3", ""],  # mixed: one pair
        [" = 4", " = 4"],  # all right: none
        [" = 5", " = 7", "x"],  # all wrong: none
        ["", " = 8"],  # the only wrong one is empty: none
    ]
    rows, stats = checked_pairs(prompts, samples, max_pairs_per_prompt=1)
    assert rows == [
        {"prompt": "1+2:", "chosen": " = 3", "rejected": " = 4", "chosen_score": 1.0, "rejected_score": 0.0}
    ]
    assert stats["pairs"] == 1 and stats["all_correct"] == 1 and stats["all_wrong"] == 1
    rows, _ = checked_pairs(prompts, samples, max_pairs_per_prompt=None)
    assert len(rows) == 2 and all(answer_reward(r["prompt"], r["chosen"]) == 1.0 for r in rows)
    assert all(answer_reward(r["prompt"], r["rejected"]) == 0.0 for r in rows)


# ----------------------------------------------------------------------------- base LM


def test_pretraining_is_bit_identical_for_a_seed_and_differs_across_seeds():
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # pretraining runs on one thread whatever the caller set
    try:
        m1, _, l1 = ar.pretrain_base(ArithTaskConfig(seed=3, **TINY))
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(old)
    m2, _, l2 = ar.pretrain_base(ArithTaskConfig(seed=3, **TINY))
    m3, _, _ = ar.pretrain_base(ArithTaskConfig(seed=4, **TINY))
    assert l1 == l2
    assert weights_digest(m1) == weights_digest(m2)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert weights_digest(m1) != weights_digest(m3)


def test_base_model_is_cached_by_its_settings(tmp_path, monkeypatch):
    cfg = ArithTaskConfig(**TINY)
    path = ar.build_base_model(cfg, tmp_path, progress=False)
    meta = json.loads((path / "base_lm.json").read_text())
    assert meta["settings"] == cfg.base_key()
    model, _ = ar.load_base(path)
    assert weights_digest(model) == meta["weights_sha256"]
    monkeypatch.setattr(ar, "pretrain_base", lambda *a, **k: pytest.fail("pretrained again"))
    assert ar.build_base_model(ArithTaskConfig(**TINY), tmp_path) == path
    other = ArithTaskConfig(**{**TINY, "wrong_share": 0.2})
    assert ar.base_model_dir(other, tmp_path) != path
    # the evaluation-only settings are not part of the key
    assert ar.base_model_dir(ArithTaskConfig(**{**TINY, "long_digits": 5, "max_new_tokens": 9}), tmp_path) == path


def test_bad_settings_name_the_key():
    with pytest.raises(SqlmError, match="wrong_share"):
        ArithTaskConfig(wrong_share=1.5)
    with pytest.raises(SqlmError, match="long_digits"):
        ArithTaskConfig(max_digits=4, long_digits=3)


def test_greedy_completions_match_generate():
    from sqlm.tiny import tiny_model_for_tokenizer

    tok = ar.char_tokenizer()
    model = tiny_model_for_tokenizer(tok, seed=0, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1)  # fmt: skip
    model.eval()
    prompts = ["1+2:", "37+185:", "5+5:"]
    ours = ar.greedy_completions(model, tok(prompts)["input_ids"], max_new_tokens=6, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
    for p, got in zip(prompts, ours):  # one prompt at a time: no padding in the reference
        ids = torch.tensor([tok(p)["input_ids"]])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()  # fmt: skip
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id) + 1]
        assert got == ref


@pytest.fixture(scope="module")
def default_base():
    """The default base LM (cached under the sqlm cache; pretrained once on a cold cache)."""
    cfg = ArithTaskConfig()
    return cfg, ar.build_base_model(cfg, progress=False)


def test_default_base_accuracy_is_between_20_and_60_percent_at_temperature_1(default_base):
    cfg, path = default_base
    model, tok = ar.load_base(path)
    prompts = ar.task_prompts(cfg, 0, 150, 30)
    del prompts["train"]
    res = ar.evaluate_model(model, tok, prompts, ref_model=model, max_new_tokens=cfg.max_new_tokens,
                            samples_per_prompt=2, seed=7)  # fmt: skip
    ev = res["eval"]
    assert 0.2 <= ev["accuracy"] <= 0.6, ev
    assert ev["greedy_accuracy"] > ev["accuracy"]  # the errors are sampled, not the mode
    assert ev["well_formed"] > 0.9 and 20 < ev["length"] < 40
    assert ev["kl"] == pytest.approx(0.0, abs=1e-6)  # the base against itself
    assert set(res) == {"eval", "long"} and res["long"]["n"] == 60 and res["long"]["length"] > ev["length"]


def test_pairs_from_the_default_base(default_base, tmp_path):
    cfg, path = default_base
    model, tok = ar.load_base(path)
    prompts = ar.task_prompts(cfg, 40, 0, 0)["train"]
    rows, stats = ar.sample_pairs(model, tok, prompts, k=4, max_new_tokens=cfg.max_new_tokens, seed=0)
    assert 0 < stats["pairs"] == len(rows) <= 40 - stats["all_correct"] - stats["all_wrong"]
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        assert answer_reward(r["prompt"], r["chosen"]) == 1.0 and answer_reward(r["prompt"], r["rejected"]) == 0.0
    again, _ = ar.sample_pairs(model, tok, prompts, k=4, max_new_tokens=cfg.max_new_tokens, seed=0)
    assert again == rows
