"""The chat-sentiment task's pure parts: its prompts and their fixed split, the gold (VADER) of a reply,
the pairs built from two replies per prompt, and the one-line error when every pair ties. No model is
loaded here (the reduced end to end run is in test_real_model.py)."""

from __future__ import annotations

import json

import pytest

from sqlm.errors import SqlmError
from sqlm.evaluation import chat_sentiment as cs


def _key(prompt) -> str:
    return json.dumps(prompt)


def test_prompts_are_distinct_chat_turns_split_once_into_disjoint_sets():
    prompts = cs.all_prompts()
    assert len(prompts) >= 320 and len({_key(p) for p in prompts}) == len(prompts)
    assert all(len(p) == 1 and p[0]["role"] == "user" for p in prompts)
    assert all("one-sentence review" in p[0]["content"] or "In one sentence" in p[0]["content"] for p in prompts)
    train, held_out = cs.split_prompts()
    assert len(train) >= 192 and len(held_out) == 128
    assert not {_key(p) for p in train} & {_key(p) for p in held_out}
    assert {_key(p) for p in train + held_out} == {_key(p) for p in prompts}
    assert cs.split_prompts() == (train, held_out)  # fixed: the same lists every call
    small = cs.split_prompts(8, 4)  # the CI setting: the first prompts of each split
    assert small == (train[:8], held_out[:4])
    # the shuffle mixes the framings into both splits
    for split in (train, held_out):
        assert len({p[0]["content"].split(" about ")[0] for p in split}) == len(cs.FRAMINGS)
    with pytest.raises(SqlmError, match="n_eval"):
        cs.split_prompts(8, 129)


def test_gold_is_vader_of_the_reply_text_and_ranks_obvious_reviews():
    good = "A wonderful, moving film: I loved every beautiful minute."
    flat = "The film is about a lighthouse keeper."
    bad = "A dreadful, boring and painful mess; I hated it."
    scores = cs.gold_scores([good, flat, bad])
    assert scores[0] > 0.5 and scores[1] == 0.0 and scores[2] < -0.5
    # a reply as messages (TRL's conversational completion) scores as its text
    assert cs.gold_scores([[{"role": "assistant", "content": good}]]) == scores[:1]
    assert cs.reward(prompts=[[], []], completions=[good, bad]) == [scores[0], scores[2]]
    with pytest.raises(SqlmError, match="string or a list of messages"):
        cs.gold_scores([3])


def test_pairs_put_the_higher_gold_first_and_drop_ties():
    prompts = [cs.conversation(f"p{i}") for i in range(3)]
    rows = cs.pair_rows(prompts, ["a0", "a1", "a2"], ["b0", "b1", "b2"], [(0.1, 0.5), (0.3, 0.3), (0.9, -0.2)])
    assert [r["prompt"] for r in rows] == [prompts[0], prompts[2]]  # the tie (p1) gives no pair
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [("b0", "a0"), ("a2", "b2")]
    assert [(r["chosen_score"], r["rejected_score"]) for r in rows] == [(0.5, 0.1), (0.9, -0.2)]
    assert all(r["chosen"][0]["role"] == "assistant" for r in rows)
    with pytest.raises(SqlmError, match="pair_rows"):
        cs.pair_rows(prompts, ["a"], ["b"], [(0.0, 1.0)])
    # scored by the gold: the happy review is chosen; two neutral replies tie
    rows = cs.preference_pairs(prompts[:2], ["I hated this awful film.", "A film."],
                               ["I loved this great film.", "The film."])  # fmt: skip
    assert len(rows) == 1 and rows[0]["chosen"][0]["content"] == "I loved this great film."
    assert rows[0]["chosen_score"] > 0 > rows[0]["rejected_score"]


def test_replies_that_all_tie_are_one_error_and_pairs_are_cached(tmp_path, monkeypatch):
    """``prepare``'s first stage, with the sampler replaced: neutral replies only give a one-line error;
    otherwise the pairs, prompts and held-out prompts are written once and read back."""
    import sqlm.loading
    from sqlm.evaluation import chat_arithmetic
    from sqlm.evaluation.tasks import ChatSentimentTask

    calls = []

    def replies(texts):
        def sample(model, tok, prompts, **kw):
            calls.append(len(prompts))
            return None, None, [texts[i % len(texts)] for i in range(len(prompts))]

        return sample

    monkeypatch.setattr(sqlm.loading, "load_policy", lambda path: (None, None))
    task = ChatSentimentTask(reduced=True)
    monkeypatch.setattr(chat_arithmetic, "sample_replies", replies(["A film.", "The film."]))
    with pytest.raises(SqlmError, match="tied") as e:
        task._pairs(tmp_path / "base", tmp_path / "cache")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(chat_arithmetic, "sample_replies", replies(["A lovely film.", "A sad film."]))
    data = task._pairs(tmp_path / "base", tmp_path / "cache")

    def read(name):
        return [json.loads(x) for x in (data / name).read_text().splitlines()]

    rows = read("train.jsonl")
    train, held_out = cs.split_prompts(*task.N_REDUCED)
    assert [r["prompt"] for r in rows] == train and all(r["chosen"][0]["content"] == "A lovely film." for r in rows)
    assert [r["prompt"] for r in read("prompts.jsonl")] == train
    assert [r["prompt"] for r in json.loads((data / "eval_prompts.json").read_text())] == held_out
    # the reward model's held-out pairs are those of the last fifth of the training prompts
    assert read("rm_train.jsonl") + read("rm_eval.jsonl") == rows and [r["prompt"] for r in read("rm_eval.jsonl")] == [
        train[-1]
    ]
    meta = json.loads((data / "done.json").read_text())
    assert (meta["pairs"], meta["ties"], meta["rm_eval_pairs"]) == (len(train), 0, 1)
    assert calls == [2 * len(train)] * 2  # two replies per training prompt in the CI setting
    assert task._pairs(tmp_path / "base", tmp_path / "cache") == data and len(calls) == 2  # cached

    # the full setting: REPLIES replies per prompt, paired in sampling order (1st with 2nd, ...), ties dropped
    monkeypatch.setattr(task, "REDUCED_REPLIES", 4)
    monkeypatch.setattr(
        chat_arithmetic, "sample_replies", replies(["A lovely film.", "A sad film.", "A film.", "The film."])
    )
    data = task._pairs(tmp_path / "base", tmp_path / "cache")
    meta = json.loads((data / "done.json").read_text())
    assert calls[-1] == 4 * len(train) and (meta["pairs"], meta["ties"]) == (len(train), len(train))
    assert all(r["rejected"][0]["content"] == "A sad film." for r in read("train.jsonl"))


def test_the_reward_models_held_out_pairs_are_whole_prompts():
    """Several pairs of one prompt never straddle the reward model's split; the last fifth of the prompts
    (at least one) is held out, rows keep their order, and bad arguments are one-line errors."""
    prompts = [cs.conversation(f"p{i}") for i in range(10)]
    rows = [{"prompt": p, "k": k} for p in prompts for k in range(3) if not (p == prompts[9] and k == 1)]
    train, held = cs.reward_model_split(rows, prompts)
    assert [r["prompt"] for r in held] == [prompts[8]] * 3 + [prompts[9]] * 2
    assert train == rows[:24] and train + held == rows
    assert [r["prompt"] for r in cs.reward_model_split(rows[:6], prompts[:2])[1]] == [prompts[1]] * 3
    for bad in ((rows, prompts, 1.0), (rows, prompts[:1], 0.2)):
        with pytest.raises(SqlmError, match="reward_model_split"):
            cs.reward_model_split(*bad)


def test_every_method_has_a_recipe_as_chat_arithmetics_but_data_reward_and_reply_length():
    """Each method of the sweep has its paired recipe: the chat-arithmetic one's settings (SmolLM2, LoRA r 16 /
    alpha 32 on every linear layer, lengths, optimisation, seed) but for the data (filled by the pipeline),
    the reward (the reward model through `terminal`) and 32-token replies, and for sqlm online and mixed their
    tau (0.01 for chat arithmetic's exact 0/1 checker, where 0.1 let the KL term pull accuracy down; a learned
    reward model's scores keep 0.1); the reward model's recipe holds pairs out for its accuracy."""
    import yaml

    from sqlm.evaluation.sweep import METHODS
    from sqlm.evaluation.tasks import ChatArithmeticTask, ChatSentimentTask

    ours, theirs = ChatSentimentTask().recipes, ChatArithmeticTask().recipes
    allowed = {"dataset_name", "reward_funcs", "allow_code_rewards", "chosen_score_column", "rejected_score_column",
               "max_completion_length", "output_dir"}  # fmt: skip
    for m in [*METHODS.values(), None]:
        rel = m.recipe if m else "reward/config.yaml"
        a, b = yaml.safe_load((ours / rel).read_text()), yaml.safe_load((theirs / rel).read_text())
        assert (a["model_name_or_path"], a["lora_r"], a["lora_alpha"]) == ("smollm2-135m-instruct", 16, 32), rel
        assert a["lora_target_modules"] == ["all-linear"] and "dataset_name" not in a, rel
        differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
        own_tau = {"tau"} if m is not None and m.command == "sqlm" and m.regime != "offline" else set()
        assert differ <= allowed | own_tau, (rel, differ - allowed - own_tau)
        if own_tau:
            assert (a["tau"], b["tau"]) == (0.1, 0.01), rel
        if m is None:
            assert a["eval_fraction"] > 0 and a["tokenizer_pad_token"] != "<|im_end|>"
            continue
        assert a["max_completion_length"] == 32, rel
        assert a.get("reward_funcs") == (None if m.command == "dpo" else ["terminal"]), rel
        assert "chosen_score_column" not in a  # the pairs' gold scores are never a training reward
