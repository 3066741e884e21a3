"""`sqlm train` and `python scripts/train.py --config`: end to end on the quickstart recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqlm import cli
from sqlm.errors import SqlmError
from sqlm.recipe import split_argv
from sqlm.tiny import build_tiny_model, parse_tiny_spec


ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart" / "sqlm" / "config.yaml"


def _env(tmp_path):
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", SQLM_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false"
    )
    return env


def test_sqlm_train_quickstart_subprocess_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sqlm.cli",
            "train",
            str(QUICKSTART),
            "--max_steps",
            "4",
            "--output_dir",
            str(out),
            "--use_cpu",
            "true",
            "--logging_steps",
            "2",
        ],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").exists()
    stats = json.loads((out / "run_stats.json").read_text())  # as every training command writes
    assert stats["optimizer_steps"] == 4 and stats["generated_completions"] == 0 and stats["wall_time_s"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Review the film:", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    # the cached tiny model was built from the recipe's data, and training changed it
    (cached,) = [p for p in (tmp_path / "cache" / "tiny").iterdir() if not p.name.startswith(".")]
    base = AutoModelForCausalLM.from_pretrained(cached)
    assert not torch.equal(base.model.norm.weight, model.model.norm.weight)


def test_scripts_train_py_with_config_and_lora_merge(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            "--config",
            str(QUICKSTART),
            "--max_steps",
            "3",
            "--output_dir",
            str(out),
            "--use_cpu",
            "true",
            "--use_peft",
            "true",
            "--lora_r",
            "4",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--merge_adapter",
            "true",
        ],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert cli.main(["train", str(QUICKSTART), "--loss_typ", "soft_q"]) == 2
    err = capsys.readouterr().err
    assert "'loss_typ'" in err and "'loss_type'" in err and "Traceback" not in err

    bad = tmp_path / "r.yaml"
    bad.write_text(
        QUICKSTART.read_text()
        .replace("reward_funcs: [keyword]", "reward_funcs: ['os.path:exists']")
        .replace("dataset_name: ../reviews.jsonl", f"dataset_name: {QUICKSTART.parent.parent}/reviews.jsonl")
    )
    env_cache = os.environ.get("SQLM_CACHE")
    os.environ["SQLM_CACHE"] = str(tmp_path / "cache")
    try:
        assert (
            cli.main(
                ["train", str(bad), "--output_dir", str(tmp_path / "o"), "--use_cpu", "true", "--reward_kwargs", "{}"]
            )
            == 2
        )
    finally:
        if env_cache is None:
            os.environ.pop("SQLM_CACHE")
        else:
            os.environ["SQLM_CACHE"] = env_cache
    assert "allow_code_rewards" in capsys.readouterr().err

    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_argv_and_tiny_spec():
    assert split_argv(["--config", "r.yaml", "--tau", "1"]) == ("r.yaml", ["--tau", "1"])
    assert split_argv(["r.yaml", "--tau", "1"]) == ("r.yaml", ["--tau", "1"])
    assert split_argv(["--config=r.yaml"]) == ("r.yaml", [])
    assert parse_tiny_spec("tiny:hidden_size=32")["hidden_size"] == 32
    with pytest.raises(SqlmError, match="hidden"):
        parse_tiny_spec("tiny:hiden_size=32")


def test_tiny_model_is_cached_and_deterministic(tmp_path):
    texts = ["a good film", "a bad book"] * 4
    m1, t1, p1 = build_tiny_model(
        "tiny:vocab_size=280,hidden_size=16,num_hidden_layers=1", texts, cache_dir=tmp_path / "a"
    )
    m2, t2, p2 = build_tiny_model(
        "tiny:vocab_size=280,hidden_size=16,num_hidden_layers=1", texts, cache_dir=tmp_path / "b"
    )
    assert t1.get_vocab() == t2.get_vocab()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    m3, _, p3 = build_tiny_model(
        "tiny:vocab_size=280,hidden_size=16,num_hidden_layers=1", texts, cache_dir=tmp_path / "a"
    )  # loaded from the cache
    assert p3 == p1 and all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))
