"""`sqlm dpo`: TRL's DPOTrainer on the tokens `sqlm train` sees, from paired recipes."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from sqlm.errors import SqlmError


ROOT = Path(__file__).resolve().parents[1]
SQLM_QS = str(ROOT / "recipes/quickstart/sqlm/config.yaml")
DPO_QS = str(ROOT / "recipes/quickstart/dpo/config.yaml")
# keys that legitimately differ between a sqlm recipe and its DPO pair
UNPAIRED = {"tau", "beta", "loss_type", "output_dir", "gamma", "rollout_length", "reduction", "mode", "use_reference",
            "reward_funcs", "reward_kwargs", "allow_code_rewards", "env", "use_cpu", "bf16", "activation_checkpointing",
            "gradient_checkpointing", "value_head", "use_target_model"}  # fmt: skip


def _col(ds, name):
    return [list(x) for x in ds[name]]


def _build_both(tmp_path, monkeypatch, extra=()):
    from sqlm.commands import dpo
    from sqlm.commands.train import build_trainer, parse_train_args

    monkeypatch.setenv("SQLM_CACHE", str(tmp_path / "cache"))
    args, model_args, recipe_dir = parse_train_args([SQLM_QS, "--output_dir", str(tmp_path / "s"), *extra])
    sq = build_trainer(args, model_args, recipe_dir)
    recipe, s, c, m = dpo.parse([DPO_QS, "--output_dir", str(tmp_path / "d"), *extra])
    d = dpo.build_trainer(s, c, m, recipe)
    return sq, d


def test_paired_quickstart_recipes_give_byte_identical_tokens(tmp_path, monkeypatch):
    sq, d = _build_both(tmp_path, monkeypatch)
    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    a = json.dumps({c: _col(sq.train_dataset, c) for c in cols}).encode()
    b = json.dumps({c: _col(d.train_dataset, c) for c in cols}).encode()
    assert len(sq.train_dataset) == len(d.train_dataset) > 0
    assert a == b
    # same tokenizer, same initial weights, same optimisation and seed, beta = tau
    assert sq.processing_class.get_vocab() == d.processing_class.get_vocab()
    sd_s, sd_d = sq.model.state_dict(), d.model.state_dict()
    assert sd_s.keys() == sd_d.keys() and all(torch.equal(sd_s[k], sd_d[k]) for k in sd_s)
    assert torch.equal(sq.ref_model.get_input_embeddings().weight, d.ref_model.get_input_embeddings().weight)
    for key in (
        "seed",
        "learning_rate",
        "per_device_train_batch_size",
        "max_steps",
        "max_length",
        "lr_scheduler_type",
    ):
        assert getattr(sq.args, key) == getattr(d.args, key), key
    assert sq.args.tau == d.args.beta


def test_truncation_settings_reach_both_sides(tmp_path, monkeypatch):
    sq, d = _build_both(tmp_path, monkeypatch, ["--max_length", "12", "--max_prompt_length", "5"])
    for c in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert _col(sq.train_dataset, c) == _col(d.train_dataset, c)
    prompts, chosen = _col(d.train_dataset, "prompt_ids"), _col(d.train_dataset, "chosen_ids")
    assert max(len(p) for p in prompts) <= 5
    assert max(len(p) + len(c) for p, c in zip(prompts, chosen)) <= 12


def test_sqlm_dpo_trains_and_saves_a_loadable_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sqlm.commands.dpo import main

    monkeypatch.setenv("SQLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "dpo"
    assert (
        main([DPO_QS, "--output_dir", str(out), "--max_steps", "3", "--logging_steps", "1", "--disable_tqdm", "true"])
        == 0
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    stats = json.loads((out / "run_stats.json").read_text())
    assert stats["optimizer_steps"] == 3 and stats["beta"] == 0.1 and stats["generated_completions"] == 0
    # the policy moved away from its initial (cached tiny) weights
    from sqlm.data import load_split
    from sqlm.tiny import build_tiny_model, dataset_texts

    texts = dataset_texts(load_split("../reviews.jsonl", "train", None, str(Path(DPO_QS).parent)))
    init, _, _ = build_tiny_model("tiny:vocab_size=384,hidden_size=64,num_hidden_layers=2", texts)
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), init.parameters())]
    assert all(moved)


def test_missing_dataset_is_a_named_error(tmp_path):
    from sqlm.commands.dpo import main

    with pytest.raises(SqlmError, match="dataset_name"):
        main(["--model_name_or_path", "tiny", "--output_dir", str(tmp_path)])


def _dpo_recipes():
    return sorted(ROOT.glob("recipes/*/dpo/*.yaml"))


@pytest.mark.parametrize("path", _dpo_recipes(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_dpo_recipe_parses_and_matches_its_sqlm_pair(path):
    from sqlm.commands.dpo import parse

    _, script_args, config, model_args = parse([str(path), "--bf16", "false", "--use_cpu", "true"])
    assert config.beta > 0
    # a task whose sqlm recipes come per mode pairs DPO with the offline one
    pair = path.parent.parent / "sqlm" / "config_offline.yaml"
    if not pair.is_file():
        pair = path.parent.parent / "sqlm" / path.name
    if not pair.is_file():
        pytest.skip(f"no paired sqlm recipe {pair.relative_to(ROOT)} yet")
    a, b = yaml.safe_load(pair.read_text()), yaml.safe_load(path.read_text())
    shared = (set(a) & set(b)) - UNPAIRED
    if a.get("mode", "offline") != "offline":  # sqlm's online/mixed batch counts sequences: a row = num_generations
        shared.discard("per_device_train_batch_size")
        assert a["per_device_train_batch_size"] == b["per_device_train_batch_size"] * a.get("num_generations", 2)
    assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
    missing = {"model_name_or_path", "dataset_name", "max_length", "seed", "learning_rate"} & (set(a) ^ set(b))
    assert not missing, f"{path.name}: {missing} set on one side only"
    assert b.get("beta") == a.get("tau", a.get("beta")) or path.parent.parent.name == "gold"
