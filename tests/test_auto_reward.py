"""Preference pairs without a reward: an error naming the fixes, or `reward_funcs: [bradley_terry]`, a
reward model fitted on the pairs (held-out accuracy logged), cached and reused."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from sqlm.cli import main as cli


os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "recipes" / "quickstart" / "sqlm" / "config.yaml"


@pytest.fixture
def pairs_only_recipe(tmp_path) -> Path:
    """The quickstart recipe minus its reward (reward_funcs, reward_kwargs)."""
    text = QUICKSTART.read_text()
    text = text[: text.index("# rewards")] + text[text.index("# training") :]
    text = text.replace("../reviews.jsonl", str(ROOT / "recipes" / "quickstart" / "reviews.jsonl"))
    assert "reward_funcs" not in text
    path = tmp_path / "pairs_only.yaml"
    path.write_text(text)
    return path


def logs(out: str) -> list[dict]:
    """The training logs printed by `sqlm train` (values printed as short strings)."""
    rows = [ast.literal_eval(line) for line in out.splitlines() if line.startswith("{'loss'")]
    return [{k: float(v) for k, v in row.items()} for row in rows]


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_pairs_without_reward_is_an_error_naming_the_fixes(pairs_only_recipe, tmp_path, capsys, mode):
    flags = ["--mode", mode, "--per_device_train_batch_size", "32", "--max_completion_length", "16"]
    assert cli(["train", str(pairs_only_recipe), "--output_dir", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no reward signal" in err and "reward_funcs: [bradley_terry]" in err and "reward_funcs (e.g." in err
    assert ("sqlm dpo" in err and "reward column" in err) if mode == "offline" else "online" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_bradley_terry_reward_is_fitted_once_and_the_margin_grows(pairs_only_recipe, tmp_path, capsys, monkeypatch):
    from sqlm.rewards import auto

    fits = []
    fit = auto.fit_reward_model

    def counted(*args, **kwargs):
        fits.append(1)
        return fit(*args, **kwargs)

    monkeypatch.setattr(auto, "fit_reward_model", counted)
    cache = tmp_path / "cache"
    base = ["train", str(pairs_only_recipe), "--reward_funcs", "bradley_terry", "--reward_cache_dir", str(cache),
            "--disable_tqdm", "true"]  # fmt: skip
    assert cli([*base, "--max_steps", "40", "--logging_steps", "10", "--output_dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert len(fits) == 1 and "bradley_terry reward model (fitted" in out
    first, *_, last = logs(out)
    assert first["reward_model/eval_accuracy"] >= 0.8 and first["reward_model/eval_pairs"] == 13  # 10% of 128
    assert "reward_model/eval_accuracy" not in last
    assert first["rewards/margins"] < 1.5 < last["rewards/margins"], (first, last)
    assert (cache / "bradley_terry").is_dir() and len(list((cache / "bradley_terry").iterdir())) == 1

    # the same pairs and settings: read from the cache, not fitted again, with the same accuracy
    assert cli([*base, "--max_steps", "2", "--logging_steps", "1", "--output_dir", str(tmp_path / "b")]) == 0
    again = capsys.readouterr().out
    assert len(fits) == 1 and "bradley_terry reward model (from the cache" in again
    assert logs(again)[0]["reward_model/eval_accuracy"] == first["reward_model/eval_accuracy"]


GOOD, BAD = " good and fun.", " bad and dull."


@pytest.fixture(scope="module")
def tiny_policy():
    """A tiny policy and its tokenizer (pad distinct from EOS), and 32 preference pairs."""
    from datasets import Dataset

    from sqlm.tiny import tiny_model_for_tokenizer, train_tokenizer

    prompts = [f"Rate film {i}:" for i in range(32)]
    tokenizer = train_tokenizer([p + s for p in prompts for s in (GOOD, BAD)], vocab_size=300)
    model = tiny_model_for_tokenizer(tokenizer, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1)  # fmt: skip
    pairs = Dataset.from_list([{"prompt": p, "chosen": GOOD, "rejected": BAD} for p in prompts])
    return model, tokenizer, pairs


def auto_args(tmp_path, **reward_kwargs):
    from sqlm.config import SoftQConfig

    return SoftQConfig(output_dir=str(tmp_path / "o"), reward_funcs=["bradley_terry"], use_cpu=True,
                       report_to="none", per_device_train_batch_size=8, max_length=32,
                       reward_kwargs={"bradley_terry": reward_kwargs} if reward_kwargs else None)  # fmt: skip


def test_bradley_terry_warns_when_the_held_out_pairs_are_too_few(tiny_policy, tmp_path, caplog):
    """32 pairs hold out 4 (test_size 0.1): an accuracy there reads nothing, so a warning gives its
    binomial standard error; the report keeps the number of pairs beside the accuracy."""
    from sqlm.rewards.auto import bradley_terry_rewarder

    model, tokenizer, pairs = tiny_policy
    with caplog.at_level("WARNING", logger="sqlm.rewards.auto"):
        _, report = bradley_terry_rewarder(model, tokenizer, pairs, auto_args(tmp_path), tmp_path / "cache")
    assert report["eval_pairs"] == 4 and 0 <= report["eval_accuracy"] <= 1
    (msg,) = [r.getMessage() for r in caplog.records if "held-out" in r.getMessage()]
    assert "only 4 pairs" in msg and "standard error is 0.25" in msg and "reward_kwargs.bradley_terry.test_size" in msg

    # with 20 held-out pairs (test_size 0.625 of 32), no warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="sqlm.rewards.auto"):
        _, report = bradley_terry_rewarder(
            model, tokenizer, pairs, auto_args(tmp_path, test_size=0.625), tmp_path / "cache"
        )
    assert report["eval_pairs"] == 20 and not [r for r in caplog.records if "held-out" in r.getMessage()]


def test_bradley_terry_on_a_policy_that_pads_with_eos_takes_a_pad_token(tiny_policy, tmp_path):
    """SmolLM2 and Llama pad with their EOS: the error names reward_kwargs.bradley_terry.tokenizer_pad_token,
    which sqlm train accepts; the reward model pads with it and the policy keeps its own padding."""
    import copy

    from sqlm.errors import SqlmError
    from sqlm.rewards.auto import bradley_terry_rewarder

    model, tokenizer, pairs = tiny_policy
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    with pytest.raises(SqlmError, match=r"set reward_kwargs\.bradley_terry\.tokenizer_pad_token to an unused token"):
        bradley_terry_rewarder(model, tokenizer, pairs, auto_args(tmp_path), tmp_path / "cache")
    args = auto_args(tmp_path, tokenizer_pad_token="<unk>")
    rewarder, report = bradley_terry_rewarder(model, tokenizer, pairs, args, tmp_path / "cache")
    assert tokenizer.pad_token == tokenizer.eos_token  # the policy's tokenizer is unchanged
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    assert rewarder.model.config.pad_token_id == unk and rewarder.tokenizer.pad_token == "<unk>"
    assert report["fitted"] and Path(report["path"]).is_dir()
    with pytest.raises(SqlmError, match=r"tokenizer_pad_token '<nope>' is not in the tokenizer's vocabulary"):
        bradley_terry_rewarder(model, tokenizer, pairs, auto_args(tmp_path, tokenizer_pad_token="<nope>"), tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokenizer_pad_tokn": "<unk>"}, r"unknown key 'tokenizer_pad_tokn' in reward_kwargs\.bradley_terry .*"
                                          r"did you mean 'tokenizer_pad_token'\?"),
        ({"beta": 0.5}, r"unknown key 'beta' in reward_kwargs\.bradley_terry .*rewarder 'terminal' also takes"),
        ({"rewarder": "prefix", "beta": 0.5}, r"unknown key 'beta'"),
    ],
)  # fmt: skip
def test_unknown_bradley_terry_key_is_an_error_before_any_model_loads(tmp_path, kwargs, match):
    from sqlm.errors import SqlmError

    with pytest.raises(SqlmError, match=match):
        auto_args(tmp_path, **kwargs)
    auto_args(tmp_path, rewarder="abc", beta=0.5, batch_size=4, tokenizer_pad_token="<unk>")  # all known


def test_sqlm_train_takes_the_bradley_terry_pad_token(pairs_only_recipe, tmp_path, capsys, monkeypatch):
    """The recipe key parses in sqlm train; a misspelt one stops it with one line before any model loads."""
    from sqlm import loading

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_model_and_tokenizer", no_model)
    base = ["train", str(pairs_only_recipe), "--reward_funcs", "bradley_terry", "--output_dir", str(tmp_path / "o")]
    assert cli([*base, "--reward_kwargs", '{"bradley_terry": {"tokenizer_pad_tokn": "<unk>"}}']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown key 'tokenizer_pad_tokn' in reward_kwargs.bradley_terry" in err
    from sqlm.commands.train import parse_train_args

    args, _, _ = parse_train_args(
        base[1:] + ["--reward_kwargs", '{"bradley_terry": {"tokenizer_pad_token": "<unk>"}}']
    )
    assert args.reward_kwargs == {"bradley_terry": {"tokenizer_pad_token": "<unk>"}}
