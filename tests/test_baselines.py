"""`sqlm grpo` / `sqlm rloo` / `sqlm online_dpo`: TRL's online trainers on the prompts, reward and budget of a
paired sqlm recipe."""

import json
import shlex
from pathlib import Path

import pytest
import torch

from sqlm.errors import SqlmError


ROOT = Path(__file__).resolve().parents[1]
QS = {c: str(ROOT / f"recipes/quickstart/{c}/config.yaml") for c in ("grpo", "rloo", "online_dpo", "sqlm")}
BASELINES = ("grpo", "rloo", "online_dpo")
TINY = "tiny:vocab_size=384,hidden_size=64,num_hidden_layers=2"
CPU = ["--bf16", "false", "--use_cpu", "true"]


def _command(name):
    import importlib

    return importlib.import_module(f"sqlm.commands.{name}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sqlm-cache")


@pytest.fixture
def tiny(cache, monkeypatch):
    """The quickstart's tiny model (cached weights, tokenizer and folder)."""
    from sqlm.data import load_split
    from sqlm.tiny import build_tiny_model, dataset_texts

    monkeypatch.setenv("SQLM_CACHE", str(cache))
    texts = dataset_texts(load_split("../reviews.jsonl", "train", None, str(Path(QS["grpo"]).parent)))
    return build_tiny_model(TINY, texts)


@pytest.fixture
def reward_model(tiny, tmp_path):
    """A sequence-classification reward model (random score head) saved as safetensors."""
    from transformers import AutoModelForSequenceClassification

    _, tokenizer, path = tiny
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    out = tmp_path / "rm"
    rm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("command", BASELINES)
def test_tiny_run_trains_the_model_and_writes_run_stats(command, tiny, reward_model, tmp_path, recwarn):
    from transformers import AutoModelForCausalLM

    init = tiny[0]
    # a 'module:function' reward (through sqlm's rewarders), or a reward model folder scored by TRL (rloo)
    reward = (["--reward_funcs", reward_model] if command == "rloo"
              else ["--reward_funcs", "tests.test_baselines:token_sum", "--allow_code_rewards", "true"])  # fmt: skip
    # 4 prompts x 2 completions a step (TRL's grpo/rloo batch counts completions, online DPO's prompts)
    batch, limit = ("4", "--max_new_tokens") if command == "online_dpo" else ("8", "--max_completion_length")
    out = tmp_path / command
    argv = [QS[command], "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", batch,
            limit, "8", "--logging_steps", "1", "--disable_tqdm", "true", "--reward_kwargs", "{}", "--reward_scale", "0.5",
            *reward]  # fmt: skip
    assert _command(command).main(argv) == 0
    # no warning a user can do nothing about (TRL reads transformers' deprecated alias every step)
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]
    stats = json.loads((out / "run_stats.json").read_text())
    assert stats["trainer"] == command and stats["optimizer_steps"] == 3
    assert stats["generated_completions"] == 3 * 8
    assert 3 * 8 <= stats["generated_tokens"] <= 3 * 8 * 8
    assert stats["wall_time_s"] > 0 and stats["total_time_s"] >= stats["wall_time_s"]
    assert stats["last_log"]["loss"] is not None
    # every logged step (logging_steps 1), the last one the last log
    assert [h["step"] for h in stats["log_history"]] == [1, 2, 3] and stats["log_history"][-1] == stats["last_log"]
    if command == "grpo":  # reward_scale multiplies the total reward (TRL logs each function's raw mean)
        assert stats["last_log"]["reward"] == pytest.approx(
            0.5 * stats["last_log"]["rewards/tests.test_baselines:token_sum/mean"]
        )
    model = AutoModelForCausalLM.from_pretrained(out)
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), init.parameters())]
    assert sum(moved) >= 0.9 * len(moved)


def test_prompts_are_the_tokens_sqlm_online_generates_from(tiny, tmp_path):
    """The baseline generates from sqlm's prompt_ids (here cut to their last 3 tokens), not from its
    own tokenisation of the prompt text."""
    from sqlm.commands import grpo
    from sqlm.commands._online_baseline import build_trainer
    from sqlm.commands.train import build_trainer as build_sqlm
    from sqlm.commands.train import parse_train_args

    cut = ["--max_prompt_length", "3"]
    args, model_args, recipe_dir = parse_train_args(
        [QS["sqlm"], "--mode", "online", "--max_completion_length", "16", "--output_dir", str(tmp_path / "s"), *cut]
    )
    sq = build_sqlm(args, model_args, recipe_dir)
    recipe, s, c, m = grpo.parse([QS["grpo"], "--output_dir", str(tmp_path / "g"), *cut])
    trainer = build_trainer(grpo.trainer_class(), s, c, m, recipe)
    ids = [list(x) for x in trainer.train_dataset["prompt_ids"]]
    assert ids == [list(x) for x in sq.train_dataset["prompt_ids"]] and max(map(len, ids)) == 3
    assert trainer.processing_class.get_vocab() == sq.processing_class.get_vocab()
    rows = [trainer.train_dataset[i] for i in range(4)]
    trainer._rows = rows
    got, _, _ = trainer._tokenize_prompts([r["prompt"] for r in rows])
    assert got == ids[:4]
    assert len(trainer.processing_class(rows[0]["prompt"])["input_ids"]) > 3  # TRL's own tokens would differ
    # online DPO: the same prompts, and its generation starts from them (each prompt twice)
    from sqlm.commands import online_dpo

    recipe, s, c, m = online_dpo.parse([QS["online_dpo"], "--output_dir", str(tmp_path / "o"), *cut])
    odpo = build_trainer(online_dpo.trainer_class(), s, c, m, recipe)
    assert [list(x) for x in odpo.train_dataset["prompt_ids"]] == ids
    odpo._prompt_ids = ids[:4]
    prompt_ids, prompt_mask, completion_ids, completion_mask, _ = odpo._generate(
        odpo.model, [r["prompt"] for r in rows]
    )
    got = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]
    assert got == ids[:4] * 2 and completion_ids.shape[0] == 8
    assert odpo.generated_completions == 8 and odpo.generated_tokens == int(completion_mask.sum())


def test_sqlm_rewards_score_as_in_sqlm_train():
    from sqlm.commands._online_baseline import (
        OnlineScriptArguments,
        build_reward_funcs,
        scaled_reward_weights,
    )

    class Tok:
        pad_token_id, eos_token_id = 0, 0

    kw = {"keyword": {"words": ["good"], "penalty_words": ["bad"]}, "tests.test_baselines:per_token": {}}
    args = OnlineScriptArguments(reward_funcs=["keyword", "tests.test_baselines:per_token"], reward_kwargs=kw,
                                 allow_code_rewards=True)  # fmt: skip
    (keyword, dense), processing = build_reward_funcs(args, Tok())
    assert processing == [None, None] and keyword.__name__ == "keyword"
    call = {"prompts": ["p", "q"], "completions": ["good good bad", "bad"], "completion_ids": [[5, 6, 7], [8]],
            "prompt_ids": [[1, 2], [3]], "trainer_state": None}  # fmt: skip
    assert keyword(**call) == [1.0, -1.0]
    assert dense(**call) == pytest.approx([1 + 2 + 3, 1])  # per-token rewards summed along the path
    # sqlm's reward_scale multiplies the weighted total
    assert scaled_reward_weights(None, 0.5, 2) == [0.5, 0.5]
    assert scaled_reward_weights([2.0, 1.0], 0.1, 2) == pytest.approx([0.2, 0.1])
    assert scaled_reward_weights([2.0], 1.0, 2) == [2.0]  # unchanged (TRL checks the count)
    with pytest.raises(SqlmError, match="reward_weights has 1 values for 2"):
        scaled_reward_weights([2.0], 0.5, 2)
    with pytest.raises(SqlmError, match="allow_code_rewards"):
        build_reward_funcs(OnlineScriptArguments(reward_funcs=["tests.test_baselines:per_token"]), Tok())
    with pytest.raises(SqlmError, match="unknown reward function 'keywrd'"):
        build_reward_funcs(OnlineScriptArguments(reward_funcs=["keywrd"]), Tok())


def test_a_reward_model_through_sqlms_terminal_rewarder_scores_the_whole_sequence(tiny, reward_model):
    """The gold recipes' reward: sqlm's `terminal` rewarder on a reward model folder gives each completion
    the model's score of prompt + completion."""
    from transformers import AutoModelForSequenceClassification

    from sqlm.commands._online_baseline import OnlineScriptArguments, build_reward_funcs

    tokenizer = tiny[1]
    args = OnlineScriptArguments(reward_funcs=["terminal"], reward_kwargs={"terminal": {"reward_model": reward_model}})
    (terminal,), _ = build_reward_funcs(args, tokenizer)
    prompt_ids = [tokenizer("Review the museum:")["input_ids"], tokenizer("Describe the album:")["input_ids"]]
    completion_ids = [tokenizer(" A great museum.")["input_ids"], tokenizer(" Dull.")["input_ids"]]
    got = terminal(prompts=["Review the museum:", "Describe the album:"], completions=[" A great museum.", " Dull."],
                   completion_ids=completion_ids, prompt_ids=prompt_ids)  # fmt: skip
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    with torch.no_grad():
        want = [float(rm(input_ids=torch.tensor([p + c])).logits[0, 0]) for p, c in zip(prompt_ids, completion_ids)]
    assert got == pytest.approx(want, abs=1e-5) and got[0] != got[1]


def token_sum(prompts, completions, completion_ids, **kwargs):
    """A sequence reward that differs between samples of the same prompt (for the tiny runs)."""
    return [float(sum(ids) % 5) for ids in completion_ids]


def per_token(prompts, completions, completion_ids, **kwargs):
    """A dense reward (1, 2, 3, ... along the completion) for the test above."""
    return [[float(i + 1) for i in range(len(ids))] for ids in completion_ids]


def _baseline_recipes():
    return sorted(p for c in BASELINES for p in ROOT.glob(f"recipes/*/{c}/*.yaml"))


@pytest.mark.parametrize("path", _baseline_recipes(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_baseline_recipe_matches_its_sqlm_online_pair(path):
    """Each recipe names its sqlm pair (`#   sqlm train RECIPE FLAGS`); both give the same model, prompts,
    reward, num_generations, max_completion_length, temperature 1, optimizer steps, learning rate, seed,
    and as many generated completions per step."""
    from sqlm.commands.train import parse_train_args

    line = next(x for x in path.read_text().splitlines() if x.startswith("#   sqlm train "))
    sqlm_recipe, *flags = shlex.split(line[len("#   sqlm train ") :])
    a, am, _ = parse_train_args([str(ROOT / sqlm_recipe), *flags, *CPU])
    _, s, c, m = _command(path.parent.name).parse([str(path), *CPU])
    assert a.mode in ("online", "mixed")
    online = a.mix_ratio if a.mode == "mixed" else 1.0
    # grpo / rloo: num_generations, batch in completions, as sqlm's online batch; online DPO: always 2,
    # batch in prompts
    gens, per_prompt = (c.num_generations, 1) if hasattr(c, "num_generations") else (2, 2)
    assert gens == a.num_generations
    assert c.per_device_train_batch_size * per_prompt == a.per_device_train_batch_size * online
    assert c.num_train_epochs == a.num_train_epochs * online  # a TRL epoch rolls out every prompt once
    assert getattr(c, "max_completion_length", getattr(c, "max_new_tokens", None)) == a.max_completion_length
    assert getattr(s, "max_length", getattr(c, "max_length", None)) == a.max_length
    assert c.temperature == a.temperature == 1.0
    for key in ("learning_rate", "seed", "max_steps", "lr_scheduler_type", "warmup_steps", "gradient_accumulation_steps",
                "max_grad_norm", "weight_decay"):  # fmt: skip
        assert getattr(c, key) == getattr(a, key), key
    for key in ("dataset_name", "dataset_train_split", "max_prompt_length", "dataset_column_map", "max_train_samples",
                "reward_funcs", "reward_kwargs", "reward_scale"):  # fmt: skip
        assert getattr(s, key) == getattr(a, key), key
    if path.parent.name == "online_dpo":  # DPO's beta plays the part of tau (as in sqlm dpo's recipes)
        assert c.beta == a.tau
    for key in ("model_name_or_path", "dtype", "use_peft", "lora_r", "lora_alpha", "lora_target_modules"):
        assert getattr(m, key) == getattr(am, key), key


def test_bad_recipe_keys_are_one_line_errors(tmp_path, capsys):
    from sqlm.cli import main as cli

    with pytest.raises(SqlmError, match="unknown key 'num_generation'.*did you mean 'num_generations'"):
        _command("grpo").main([QS["grpo"], "--num_generation", "3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(QS["rloo"]).read_text() + "tau: 0.1\n")
    with pytest.raises(SqlmError, match="unknown key 'tau'"):
        _command("rloo").main([str(bad)])
    # TRL's own check: the batch of completions must hold whole groups
    assert cli(["grpo", QS["grpo"], "--per_device_train_batch_size", "3", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sqlm grpo: error:") and "num_generations" in err and "\n" not in err
    assert cli(["rloo", QS["rloo"], "--dataset_name", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sqlm rloo: error:") and "\n" not in err
    # online DPO has no num_generations (always a pair) and TRL's name for the completion limit
    assert cli(["online_dpo", QS["online_dpo"], "--max_completion_length", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key 'max_completion_length'" in err and "\n" not in err
