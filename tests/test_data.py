"""Datasets in TRL's formats -> token trajectories (sqlm.data), and the rollout/scoring helpers."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
from datasets import Dataset

from sqlm.config import SoftQConfig
from sqlm.data import (
    Trajectory,
    detect_format,
    hold_out_indices,
    load_split,
    load_train_eval,
    offline_trajectories,
    pack_trajectories,
    prepare_dataset,
    template_ends_turns,
    tokenize_preference,
    tokenize_prompt_completion,
)
from sqlm.errors import SqlmError
from sqlm.rewards.registry import resolve_reward_funcs
from sqlm.rewards.scoring import score_trajectories
from sqlm.rollout import ReplayBuffer
from sqlm.tiny import tiny_model_for_tokenizer, train_tokenizer


os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROWS = [
    {"prompt": "Rate the film:", "chosen": " good and fun.", "rejected": " bad."},
    {"prompt": "Rate the book:", "chosen": " fun.", "rejected": " dull and bad and slow."},
]
CONV = [
    {
        "prompt": [{"role": "user", "content": "Rate the film"}],
        "chosen": [{"role": "assistant", "content": "good and fun"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
]


@pytest.fixture(scope="module")
def tok():
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 8 + ["user: assistant: Rate the film"]
    return train_tokenizer(texts, vocab_size=300)


def args(**kw):
    base = dict(output_dir="unused", report_to="none", use_cpu=True, max_length=64)
    base.update(kw)
    return SoftQConfig(**base)


def _dpo_tokens(dataset, tok, tmp_path):
    """What TRL's DPOTrainer makes of the same rows."""
    from trl import DPOConfig, DPOTrainer

    model = tiny_model_for_tokenizer(
        tok, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    cfg = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=None,
        activation_checkpointing=False,
    )
    import copy

    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=cfg, train_dataset=dataset, processing_class=tok
    )
    return [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in trainer.train_dataset]


@pytest.mark.parametrize("rows", [ROWS, CONV], ids=["standard", "conversational"])
def test_tokenize_preference_matches_trl_dpo(tok, tmp_path, rows):
    ours = [tokenize_preference(r, tok) for r in rows]
    assert ours == _dpo_tokens(Dataset.from_list(rows), tok, tmp_path)
    # pure and deterministic
    assert ours == [tokenize_preference(dict(r), tok) for r in rows]


def test_tokenize_standard_appends_eos_and_truncates(tok):
    out = tokenize_preference(ROWS[1], tok)
    assert out["chosen_ids"][-1] == tok.eos_token_id and out["rejected_ids"][-1] == tok.eos_token_id
    assert tok.decode(out["prompt_ids"] + out["chosen_ids"], skip_special_tokens=True) == "Rate the book: fun."
    short = tokenize_preference(ROWS[1], tok, max_prompt_length=2, max_completion_length=3)
    assert short["prompt_ids"] == out["prompt_ids"][-2:]  # the prompt keeps its end
    assert short["rejected_ids"] == out["rejected_ids"][:3]  # completions keep their start
    total = tokenize_preference(ROWS[1], tok, max_length=len(out["prompt_ids"]) + 2)
    assert total["rejected_ids"] == out["rejected_ids"][:2]


def test_implicit_prompt_is_extracted(tok):
    row = {
        "chosen": [{"role": "user", "content": "Rate the film"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "Rate the film"}, {"role": "assistant", "content": "bad"}],
    }
    explicit = {
        "prompt": [{"role": "user", "content": "Rate the film"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    assert tokenize_preference(row, tok) == tokenize_preference(explicit, tok)
    # UltraFeedback-binarized layout: a string prompt beside whole conversations
    assert tokenize_preference({**row, "prompt": "Rate the film"}, tok) == tokenize_preference(explicit, tok)
    ds = prepare_dataset(
        Dataset.from_list([{**row, "prompt": "Rate the film", "score_chosen": 8.0, "score_rejected": 3.0}]),
        tok,
        args(),
    )
    trajs = offline_trajectories(ds[0], "score_chosen", "score_rejected")
    assert [t.sequence_reward for t in trajs] == [8.0, 3.0]
    assert trajs[0].prompt == explicit["prompt"]


def test_offline_rows_give_chosen_and_rejected(tok):
    ds = prepare_dataset(Dataset.from_list(ROWS), tok, args())
    trajs = offline_trajectories(ds[1])
    assert [t.source for t in trajs] == ["chosen", "rejected"]
    assert trajs[0].completion_ids == ds[1]["chosen_ids"] and trajs[1].completion_ids == ds[1]["rejected_ids"]


def test_prompt_completion_with_label_or_reward(tok):
    rows = [
        {"prompt": "Rate the film:", "completion": " good.", "label": True},
        {"prompt": "Rate the book:", "completion": " bad.", "label": False},
    ]
    ds = prepare_dataset(Dataset.from_list(rows), tok, args())
    rewards = [offline_trajectories(r)[0].sequence_reward for r in ds]
    assert rewards == [1.0, -1.0]
    ds = prepare_dataset(Dataset.from_list([{**rows[0], "reward": 0.25}]), tok, args())
    (t,) = offline_trajectories(ds[0])
    assert t.sequence_reward == 0.25
    assert t.completion_ids == tokenize_prompt_completion(rows[0], tok)["completion_ids"]
    r, _ = score_trajectories([t], [], None, tok.pad_token_id)
    assert r[0][-1].item() == 0.25 and r[0][:-1].abs().sum() == 0  # sequence reward on the last token


def test_missing_columns_and_bad_rows_name_the_problem(tok):
    with pytest.raises(SqlmError, match="'prompt'"):
        detect_format(["question", "answer"])
    with pytest.raises(SqlmError, match="prompt-only"):
        prepare_dataset(Dataset.from_list([{"prompt": "x"}]), tok, args(mode="offline"))
    with pytest.raises(SqlmError, match=r"row 1: column 'chosen'"):
        prepare_dataset(Dataset.from_list([ROWS[0], {**ROWS[1], "chosen": ""}]), tok, args())
    with pytest.raises(SqlmError, match="score column 'score_chosen'"):
        prepare_dataset(Dataset.from_list(ROWS), tok, args(chosen_score_column="score_chosen"))
    ds = prepare_dataset(Dataset.from_list(ROWS), tok, args())
    row = {**ds[0], "chosen_token_rewards": [1.0]}
    with pytest.raises(SqlmError, match="chosen_token_rewards"):
        offline_trajectories(row)


def test_column_map_renames(tok):
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    ds = prepare_dataset(
        Dataset.from_list(rows), tok, args(dataset_column_map={"q": "prompt", "good": "chosen", "bad": "rejected"})
    )
    assert ds[0]["chosen_ids"] == tokenize_preference(ROWS[0], tok)["chosen_ids"]
    with pytest.raises(SqlmError, match="'nope'"):
        prepare_dataset(Dataset.from_list(rows), tok, args(dataset_column_map={"nope": "prompt"}))


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_load_split_from_local_files(tmp_path, ext):
    path = tmp_path / f"data.{ext}"
    ds = Dataset.from_list(ROWS)
    if ext == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif ext == "json":
        ds.to_json(str(path))
    elif ext == "csv":
        ds.to_csv(str(path), index=False)
    else:
        ds.to_parquet(str(path))
    loaded = load_split(path.name, "train", base_dir=tmp_path)  # found beside the recipe
    assert loaded.to_list() == ROWS
    with pytest.raises(SqlmError, match="could not load"):
        load_split(str(tmp_path / "missing-dir-name"), "train")


QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart", "reviews.jsonl")


@pytest.mark.parametrize("split", ["test", "tset", "validation"])
def test_a_single_file_has_no_other_split(split):
    # it used to return the 128 training rows for any split name: evaluation on the training data
    with pytest.raises(
        SqlmError, match=rf"unknown split '{split}' of dataset file .*reviews.jsonl: .* one split, 'train'"
    ):
        load_split(QUICKSTART, split)
    assert len(load_split(QUICKSTART, "train")) == 128
    assert len(load_split(QUICKSTART, "train[:25%]")) == 32  # a slice of train is still train


def test_an_unknown_split_of_a_folder_names_the_splits(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (ROWS * 2)[:n]))
    assert len(load_split(str(tmp_path), "test")) == 2
    with pytest.raises(SqlmError, match=r"could not load split 'tset' .*Should be one of \['train', 'test'\]"):
        load_split(str(tmp_path), "tset")


def test_a_missing_split_file_is_named(tmp_path):
    with pytest.raises(SqlmError, match="could not load split file 'heldout.jsonl': no such file"):
        load_split(QUICKSTART, "heldout.jsonl", base_dir=tmp_path)


def test_hold_out_is_disjoint_fixed_and_keeps_file_order():
    train, test = hold_out_indices(128, 0.25)
    assert len(test) == 32 and len(train) == 96 and not set(train) & set(test)
    assert sorted(train + test) == list(range(128)) and train == sorted(train) and test == sorted(test)
    assert hold_out_indices(128, 0.25) == (train, test)  # fixed seed: the same rows every run
    assert test != list(range(96, 128))  # drawn at random, not the file's tail
    assert len(hold_out_indices(128, 10)[1]) == 10  # a whole number is a row count
    assert len(hold_out_indices(3, 0.01)[1]) == 1  # at least one row
    for bad in (128, 1.5):
        with pytest.raises(SqlmError, match="dataset_test_size"):
            hold_out_indices(128, bad)


def test_load_train_eval_holds_out_rows_of_one_file():
    a = args(dataset_name=QUICKSTART, dataset_test_size=0.25, max_eval_samples=8)
    train, evals = load_train_eval(a)
    assert (len(train), len(evals)) == (96, 8)
    pairs = [{(r["prompt"], r["chosen"]) for r in ds} for ds in (train, evals)]
    assert not pairs[0] & pairs[1]
    assert load_train_eval(args(dataset_name=QUICKSTART))[1] is None  # no eval set unless asked for
    with pytest.raises(SqlmError, match="'dataset_test_split' and 'dataset_test_size' cannot both be set"):
        args(dataset_name=QUICKSTART, dataset_test_split="train[:10%]", dataset_test_size=0.25)


def _csv(path, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})


def test_csv_with_json_encoded_messages_is_conversational(tok, tmp_path):
    # message lists JSON-encoded in CSV cells used to train as raw JSON text
    path = tmp_path / "conv.csv"
    _csv(path, CONV + [{**CONV[0], "rejected": [{"role": "assistant", "content": "dull"}]}])
    ds = load_split(str(path), "train")
    assert ds[0]["prompt"] == CONV[0]["prompt"] and ds[0]["chosen"] == CONV[0]["chosen"]
    prepared = prepare_dataset(ds, tok, args())
    assert prepared[0]["chosen_ids"] == tokenize_preference(CONV[0], tok)["chosen_ids"]
    assert "role" not in tok.decode(prepared[0]["chosen_ids"])


def test_csv_column_of_messages_and_text_is_refused(tmp_path):
    path = tmp_path / "mixed.csv"
    _csv(path, CONV + [{**CONV[0], "chosen": "plain text"}])
    with pytest.raises(
        SqlmError,
        match=r"row 1 of dataset file .*mixed.csv: column 'chosen' is not a JSON list of "
        r"\{role, content\} messages, but row 0 is",
    ):
        load_split(str(path), "train")


def test_pairs_identical_only_after_truncation_are_reported_as_such(tok, caplog):
    import logging

    rows = [
        {"prompt": "Rate the film:", "chosen": " good and fun.", "rejected": " good and bad."},  # differ late
        {"prompt": "Rate the book:", "chosen": " fun.", "rejected": " fun."},  # identical in the data
        {"prompt": "Rate the song:", "chosen": " fun.", "rejected": " bad."},
    ]
    with caplog.at_level(logging.WARNING, logger="sqlm.data"):
        ds = prepare_dataset(Dataset.from_list(rows), tok, args(max_completion_length=2))
    assert ds["row_index"] == [2]
    (msg,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert (
        "1 with chosen and rejected identical only after truncation to max_length=64, max_completion_length=2 "
        "(rows 0)" in msg
    )
    assert "1 with chosen identical to rejected (rows 1)" in msg


@pytest.mark.parametrize("fmt", ["preference", "prompt_completion"])
def test_conversational_completions_end_with_eos(tok, fmt):
    # the tiny chat template closes every turn with the EOS, so a chat model learns to stop
    assert template_ends_turns(tok)
    if fmt == "preference":
        out = tokenize_preference(CONV[0], tok)
        ends = [out["chosen_ids"], out["rejected_ids"]]
    else:
        row = {"prompt": CONV[0]["prompt"], "completion": CONV[0]["chosen"]}
        ends = [tokenize_prompt_completion(row, tok)["completion_ids"]]
    for ids in ends:
        assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]


def test_a_template_without_end_of_turn_gets_the_eos_appended(tok):
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = (  # turns end with a newline only: nothing to stop on
        "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    assert not template_ends_turns(bare)
    out = tokenize_preference(CONV[0], bare)
    assert out["chosen_ids"][-1] == bare.eos_token_id and out["rejected_ids"][-1] == bare.eos_token_id
    assert tokenize_preference(CONV[0], bare, max_completion_length=1)["chosen_ids"] == out["chosen_ids"][:1]
    # a template that closes turns with its own special token (as <|im_end|>) is left as TRL tokenises it
    marked = copy.deepcopy(tok)
    marked.add_special_tokens({"additional_special_tokens": ["<end>"]})
    marked.chat_template = bare.chat_template.replace("\n{% endfor %}", "<end>\n{% endfor %}")
    assert template_ends_turns(marked)
    ids = tokenize_preference(CONV[0], marked)["chosen_ids"]
    assert ids[-2] == marked.convert_tokens_to_ids("<end>") and marked.eos_token_id not in ids


def test_pack_layout():
    t1 = Trajectory(prompt_ids=[5, 6], completion_ids=[7, 8, 9])
    t2 = Trajectory(prompt_ids=[5], completion_ids=[7])
    b = pack_trajectories([t1, t2], [torch.tensor([0.0, 0.0, 1.0]), torch.tensor([2.0])], pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 7, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert b["token_rewards"].tolist() == [[0, 0, 0, 0, 1], [0, 2, 0, 0, 0]]


def test_reward_resolution_and_code_opt_in():
    (kw,) = resolve_reward_funcs(["keyword"], {"keyword": {"words": ["good"], "penalty_words": ["bad"]}})
    t = [
        Trajectory(prompt_ids=[1], completion_ids=[2, 3], completion=" good good bad"),
        Trajectory(prompt_ids=[1], completion_ids=[2], completion=" meh"),
    ]
    r, per_source = score_trajectories(t, [kw], [2.0], pad_token_id=0)
    assert [x.tolist() for x in r] == [[0.0, 2.0], [0.0]]
    assert per_source["keyword"] == [1.0, 0.0]
    with pytest.raises(SqlmError, match="allow_code_rewards"):
        resolve_reward_funcs(["os.path:exists"])
    (fn,) = resolve_reward_funcs(["test_data:_len_reward"], allow_code=True)
    assert fn.name == "test_data:_len_reward"
    with pytest.raises(SqlmError, match="allow_code_rewards"):
        resolve_reward_funcs(["callable"], {"callable": {"fn": "os.path:exists"}})
    with pytest.raises(SqlmError, match="not in reward_funcs"):
        resolve_reward_funcs(["keyword"], {"length": {}})


def _len_reward(prompts, completions, completion_ids, **kwargs):
    return [float(len(c)) for c in completion_ids]


def test_replay_buffer_fifo_and_state():
    buf = ReplayBuffer(3, seed=0)
    trajs = [Trajectory(prompt_ids=[1], completion_ids=[i]) for i in range(5)]
    buf.add(trajs, [torch.tensor([float(i)]) for i in range(5)])
    assert [it["completion_ids"] for it in buf.items] == [[2], [3], [4]]
    other = ReplayBuffer(3)
    other.load_state_dict(buf.state_dict())
    a, b = buf.sample(4), other.sample(4)
    assert [t.completion_ids for t in a] == [t.completion_ids for t in b]
    assert all(t.scored and t.token_rewards == [float(t.completion_ids[0])] for t in a)


def test_prioritised_replay_draws_by_exp_of_the_summed_reward():
    """``priority`` alpha draws trajectory i with probability exp(alpha R_i) / sum_j exp(alpha R_j): with
    rewards 0 and 2 (summed over two steps) and alpha 1, the rewarded path comes e^2 / (1 + e^2) = 0.88 of the
    time; alpha 0 keeps the uniform draws (the same sequence as before the option existed)."""
    trajs = [Trajectory(prompt_ids=[1], completion_ids=[i, i]) for i in range(2)]
    rewards = [torch.tensor([0.0, 0.0]), torch.tensor([1.5, 0.5])]
    buf = ReplayBuffer(4, seed=0, priority=1.0)
    buf.add(trajs, rewards)
    picks = [t.completion_ids[0] for t in buf.sample(4000)]
    assert sum(picks) / len(picks) == pytest.approx(math.exp(2) / (1 + math.exp(2)), abs=0.02)
    uniform, plain = ReplayBuffer(4, seed=0, priority=0.0), ReplayBuffer(4, seed=0)
    for b in (uniform, plain):
        b.add(trajs, rewards)
    want = [random.Random(0).randrange(2) for _ in range(1)]
    got = [t.completion_ids[0] for t in uniform.sample(50)]
    assert got == [t.completion_ids[0] for t in plain.sample(50)] and got[:1] == want
    assert 10 < sum(got) < 40
    huge = ReplayBuffer(4, seed=0, priority=50.0)  # exp of large rewards does not overflow
    huge.add(trajs, [torch.tensor([0.0, 0.0]), torch.tensor([40.0, 0.0])])
    assert {t.completion_ids[0] for t in huge.sample(20)} == {1}


def test_a_tiny_chat_model_trained_on_conversations_learns_to_stop(tmp_path):
    # completions of conversational data used to carry no EOS: sampled completions ran to the limit
    from sqlm.trainer import SoftQTrainer

    prompts = ["Rate the film", "Rate the book", "Rate the song", "Rate the game"]
    chat_tok = train_tokenizer([f"user: {p}assistant: good and fun." for p in prompts] * 4, vocab_size=300)
    model = tiny_model_for_tokenizer(
        chat_tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    rows = [
        {
            "prompt": [{"role": "user", "content": p}],
            "completion": [{"role": "assistant", "content": "good"}],
            "reward": 1.0,
        }
        for p in prompts
    ] * 4
    limit = 12
    cfg = args(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=10,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        seed=0,
        max_length=32,
        max_completion_length=limit,
        tau=0.1,
    )
    trainer = SoftQTrainer(model, cfg, train_dataset=Dataset.from_list(rows), processing_class=chat_tok)
    trainer.train()
    prompt = chat_tok.apply_chat_template(
        [{"role": "user", "content": "Rate the film"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    torch.manual_seed(0)
    out = trainer.model.eval().generate(
        **prompt,
        do_sample=True,
        max_new_tokens=limit,
        num_return_sequences=32,
        pad_token_id=chat_tok.pad_token_id,
        eos_token_id=chat_tok.eos_token_id,
    )
    ended = out[:, prompt["input_ids"].shape[1] :] == chat_tok.eos_token_id
    lengths = torch.where(ended.any(1), ended.float().argmax(1) + 1, torch.tensor(limit))
    assert ended.any(1).float().mean() > 0.9  # (before: 0 of 32 stopped, mean length 12 of 12)
    assert lengths.float().mean() < limit / 2
