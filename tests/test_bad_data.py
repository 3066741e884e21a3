"""The bad-input corpus (tests/bad_inputs): every case is one clear `sqlm train` error naming the key,
row or file, exit code 2, no traceback (unless --debug), and nothing written to output_dir.

Recipes with a bad key are run as they are; data files run under a small valid recipe. Skippable rows
(chosen identical to rejected, prompts that fill max_length) are skipped with a logged count; when
every row would be skipped, that is the error.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from sqlm import cli
from sqlm.config import SoftQConfig
from sqlm.data import prepare_dataset
from sqlm.errors import SqlmError
from sqlm.tiny import train_tokenizer


BAD = Path(__file__).parent / "bad_inputs"
DATA = BAD / "data"

BASE = """
model_name_or_path: tiny:vocab_size=300,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=1
max_length: 32
max_completion_length: 8
mode: offline
reward_funcs: [keyword]
per_device_train_batch_size: 2
max_steps: 1
save_strategy: "no"
report_to: none
use_cpu: true
"""

# (recipe in tests/bad_inputs, extra flags, text the one-line error must contain)
RECIPE_CASES = [
    ("malformed.yaml", [], "malformed.yaml is not valid YAML at line 2"),
    ("unknown_key.yaml", [], "unknown key 'learning_rat'"),
    ("wrong_type.yaml", [], "key 'tau'"),
    ("tau_zero.yaml", [], "key 'tau' must be a finite number > 0"),
    ("tau_negative.yaml", [], "key 'tau' must be a finite number > 0"),
    ("gamma_big.yaml", [], "key 'gamma' must be in (0, 1]"),
    ("gamma_zero.yaml", [], "key 'gamma' must be in (0, 1]"),
    ("mix_ratio_big.yaml", [], "key 'mix_ratio'"),
    ("max_length_zero.yaml", [], "key 'max_length' must be >= 1"),
    ("temperature_zero.yaml", [], "key 'temperature'"),
    ("top_p_zero.yaml", [], "key 'top_p'"),
    ("nan_policy_bad.yaml", [], "key 'nan_policy'"),
    ("reward_kwargs_list.yaml", [], "key 'reward_kwargs'"),
    ("max_steps_text.yaml", [], "key 'max_steps'"),
    ("duplicate_key.yaml", [], "key 'loss_type' appears twice"),
    ("not_mapping.yaml", [], "must be a YAML mapping"),
    ("non_utf8.yaml", [], "non_utf8.yaml is not UTF-8"),
    ("does_not_exist.yaml", [], "recipe file not found"),
    (None, ["--taau", "1"], "unknown key 'taau'"),
    (None, ["--gamma", "2"], "key 'gamma'"),
    (None, ["--max_prompt_length", "40"], "key 'max_prompt_length' must be < max_length"),
    # flags: one line with the closest choice, never argparse's usage
    (
        None,
        ["--mode", "onlne"],
        "key 'mode' must be one of offline, online, mixed, got 'onlne'; did you mean 'online'?",
    ),
    (None, ["--loss_type", "softq"], "got 'softq'; did you mean 'soft_q'?"),
    (None, ["--max_steps", "many"], "flag --max_steps: invalid int value: 'many'"),
    (None, ["--learning_rate", "-1"], "key 'learning_rate' must be > 0"),
    (None, ["--merge_adapter", "true"], "key 'merge_adapter' needs use_peft: true"),
    # TrainingArguments ranges
    ("learning_rate_negative.yaml", [], "key 'learning_rate' must be > 0, got -0.0001"),
    ("batch_size_zero.yaml", [], "key 'per_device_train_batch_size' must be >= 1"),
    ("grad_accum_zero.yaml", [], "key 'gradient_accumulation_steps' must be >= 1"),
    ("max_steps_zero.yaml", [], "key 'max_steps' must be >= 1, or -1"),
    ("epochs_zero.yaml", [], "key 'num_train_epochs' must be > 0"),
    ("warmup_negative.yaml", [], "key 'warmup_steps' must be a whole number of steps >= 0"),
    ("warmup_ratio.yaml", [], "unknown key 'warmup_ratio' in recipe"),
    ("logging_steps_zero.yaml", [], "key 'logging_steps' must be a whole number of steps >= 1"),
    ("max_completion_length_zero.yaml", [], "key 'max_completion_length' must be >= 1"),
    ("mode_typo.yaml", [], "did you mean 'online'?"),
    ("test_split_and_size.yaml", [], "keys 'dataset_test_split' and 'dataset_test_size' cannot both be set"),
    # online batches count completions, as TRL's GRPO: whole groups of num_generations
    (None, ["--mode", "online", "--per_device_train_batch_size", "3"], "must be divisible by 'num_generations' (2)"),
    (None, ["--mode", "mixed", "--per_device_train_batch_size", "3"], "'num_generations' (2) in mixed mode"),
    # pairs with no reward train nothing: an error naming the fixes
    ("no_reward.yaml", [], "no reward signal"),
    (
        "no_reward.yaml",
        ["--mode", "online"],
        "no reward signal: mode 'online' scores its samples with reward_funcs only",
    ),
]

# (data file in tests/bad_inputs/data or a name, extra flags, text the error must contain)
DATA_CASES = [
    ("missing_columns.jsonl", [], "missing 'prompt'"),
    ("empty_prompt.jsonl", [], "row 1: column 'prompt' is empty"),
    ("empty_completion.jsonl", [], "row 1: column 'completion' is empty"),
    (
        "chosen_equals_rejected.jsonl",
        [],
        "every row of the train dataset was skipped: 2 with chosen identical to rejected",
    ),
    (
        "prompt_too_long.jsonl",
        ["--max_length", "8"],
        "every row of the train dataset was skipped: 2 with prompt fills max_length",
    ),
    ("mixed_formats.jsonl", [], "row 1 is a prompt-completion row but the dataset is in preference format"),
    ("mixed_text_and_messages.jsonl", [], "row 1 of the train dataset is conversational but row 0 is standard"),
    ("messages_and_text_in_one_row.jsonl", [], "row 0 mixes conversational messages and plain text"),
    ("non_utf8.jsonl", [], "non_utf8.jsonl is not UTF-8 text: byte 0xe9 at line 2"),
    ("malformed.jsonl", [], "malformed.jsonl: ArrowInvalid: JSON parse error"),
    ("reward_not_a_number.jsonl", [], "row 1: column 'reward' must be a number, got str 'high'"),
    ("token_rewards_too_short.jsonl", [], "row 0: column 'chosen_token_rewards' has 1 token rewards"),
    ("prompt_only.jsonl", [], "mode 'offline' needs completions"),
    ("empty.jsonl", [], "empty.jsonl is empty"),
    ("data.txt", [], "data.txt has an unknown extension"),
    ("missing.jsonl", [], "could not load dataset 'missing.jsonl': no such file"),
    (
        "nobody/no-such-dataset",
        [],
        "dataset 'nobody/no-such-dataset' (not a local path and not in the local hub cache",
    ),
    (
        "chosen_equals_rejected.jsonl",
        ["--model_name_or_path", "nobody/no-such-model"],
        "could not load model 'nobody/no-such-model' (not a local folder and not in the local hub cache",
    ),
    (
        "chosen_equals_rejected.jsonl",
        ["--model_name_or_path", "./no-such-folder"],
        "could not load model './no-such-folder'",
    ),
    (
        "chosen_equals_rejected.jsonl",
        ["--model_name_or_path", "tiny:hiden_size=8"],
        "bad tiny model setting 'hiden_size=8'",
    ),
    (
        "chosen_equals_rejected.jsonl",
        ["--resume_from_checkpoint", "no-such-checkpoint"],
        "no checkpoint folder at no-such-checkpoint",
    ),
    ("mixed_formats.jsonl", ["--reward_funcs", "os.path:exists"], "allow_code_rewards"),
    # one file has one split: no silent evaluation on the training rows
    ("chosen_equals_rejected.jsonl", ["--dataset_test_split", "test"], "unknown split 'test' of dataset file"),
    (
        "chosen_equals_rejected.jsonl",
        ["--dataset_test_split", "heldout.jsonl"],
        "could not load split file 'heldout.jsonl': no such file",
    ),
    ("chosen_equals_rejected.jsonl", ["--dataset_test_size", "2"], "key 'dataset_test_size' holds out 2 of 2 rows"),
    # CSV conversations: JSON-encoded messages in every row of a column, or a clear refusal
    (
        "csv_messages_and_text.csv",
        [],
        "row 1 of dataset file {data}/csv_messages_and_text.csv: column 'chosen' is not a JSON list of {{role, content}} messages",
    ),
    (
        "identical_after_truncation.jsonl",
        ["--max_completion_length", "1"],
        (
            "every row of the train dataset was skipped: 2 with chosen and rejected identical only after truncation to "
            "max_length=32, max_completion_length=1"
        ),
    ),
]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder holding only the recipe; the tiny-model cache lives elsewhere."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "base.yaml").write_text(BASE)
    monkeypatch.chdir(work)
    monkeypatch.setenv("SQLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return work


def _assert_one_clean_error(rc, err, needle, work):
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("sqlm train: error:")]
    assert len(lines) == 1, err
    assert "usage:" not in err, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in work.iterdir()) == ["base.yaml"], "something was written"


@pytest.mark.parametrize("recipe,flags,needle", RECIPE_CASES, ids=[c[0] or " ".join(c[1]) for c in RECIPE_CASES])
def test_bad_recipe(sandbox, capsys, recipe, flags, needle):
    path = str(BAD / recipe) if recipe else "base.yaml"
    rc = cli.main(["train", path, "--output_dir", str(sandbox / "out"), *flags])
    _assert_one_clean_error(rc, capsys.readouterr().err, needle, sandbox)


@pytest.mark.parametrize("data,flags,needle", DATA_CASES, ids=[f"{c[0]} {' '.join(c[1])}".strip() for c in DATA_CASES])
def test_bad_data(sandbox, capsys, data, flags, needle):
    name = str(DATA / data) if (DATA / data).exists() else data
    rc = cli.main(["train", "base.yaml", "--dataset_name", name, "--output_dir", str(sandbox / "out"), *flags])
    _assert_one_clean_error(rc, capsys.readouterr().err, needle.format(data=DATA), sandbox)


def test_debug_shows_the_traceback(sandbox):
    with pytest.raises(SqlmError, match="row 1: column 'prompt' is empty"):
        cli.main(["train", "base.yaml", "--dataset_name", str(DATA / "empty_prompt.jsonl"), "--debug"])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["{bad}/malformed.yaml"], "not valid YAML at line 2"),
        (["base.yaml", "--dataset_name", "{data}/non_utf8.jsonl", "--output_dir", "out"], "not UTF-8 text"),
    ],
)
def test_subprocess_exit_code_2_without_traceback(sandbox, args, needle):
    argv = [a.format(bad=BAD, data=DATA) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "sqlm.cli", "train", *argv],
        cwd=sandbox,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    _assert_one_clean_error(proc.returncode, proc.stderr, needle, sandbox)


def test_an_existing_output_dir_is_left_as_it_was(sandbox, capsys):
    out = sandbox / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = cli.main(
        ["train", "base.yaml", "--dataset_name", str(DATA / "mixed_formats.jsonl"), "--output_dir", str(out)]
    )
    assert rc == 2 and "mixed formats" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ----------------------------------------------------------------------------- skipped rows


def _args(**kw):
    return SoftQConfig(output_dir="unused", report_to="none", use_cpu=True, **kw)


@pytest.fixture(scope="module")
def tok():
    texts = ["Rate the film: good.", "Rate the book: bad.", "Rate the song: fun and dull."] * 4
    return train_tokenizer(texts, vocab_size=300)


def test_identical_pairs_and_long_prompts_are_skipped_with_a_count(tok, caplog):
    rows = [
        {"prompt": "Rate the film:", "chosen": " good.", "rejected": " bad."},
        {"prompt": "Rate the book:", "chosen": " fun.", "rejected": " fun."},  # no preference: skipped
        {
            "prompt": "Rate the song, the film, the book, the song, the film and the book:",
            "chosen": " good.",
            "rejected": " dull.",
        },  # prompt fills max_length: skipped
        {"prompt": "Rate the song:", "chosen": " dull.", "rejected": " good."},
    ]
    n_long = len(tok(rows[2]["prompt"])["input_ids"])
    with caplog.at_level(logging.WARNING, logger="sqlm.data"):
        ds = prepare_dataset(Dataset.from_list(rows), tok, _args(max_length=n_long - 1))
    assert ds["row_index"] == [0, 3]
    (msg,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "skipped 2 of 4 rows of the train dataset" in msg
    assert "1 with chosen identical to rejected (rows 1)" in msg and "1 with prompt fills max_length (rows 2)" in msg
    assert "sqlm_skip" not in ds.column_names and "sqlm_row_kind" not in ds.column_names


def test_a_long_prompt_is_cut_when_max_prompt_length_is_set(tok, caplog):
    row = {
        "prompt": "Rate the song, the film, the book, the song, the film and the book:",
        "chosen": " good.",
        "rejected": " dull.",
    }
    ds = prepare_dataset(Dataset.from_list([row]), tok, _args(max_length=12, max_prompt_length=6))
    assert len(ds) == 1 and len(ds[0]["prompt_ids"]) == 6  # kept, its start cut (TRL keeps the end)


def test_data_rows_are_named_in_json_lines_order(tok, tmp_path):
    # row numbers are 0-based positions in the file, as datasets reads it
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "a", "completion": " b"}] * 3 + [{"prompt": "c", "completion": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from sqlm.data import load_split

    with pytest.raises(SqlmError, match="row 3: column 'completion' is empty"):
        prepare_dataset(load_split(str(path), "train"), tok, _args())
