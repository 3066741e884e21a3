"""Kill `sqlm train` with SIGKILL and resume: the result is bit-identical to an uninterrupted run.

The run is mixed-mode soft-Q (online rollouts sampled from the policy, a replay buffer of scored
samples, a target network, a carried mix credit) on preference data that carries cached dense reward
columns, with a linear learning-rate schedule and an epoch boundary inside the run. A checkpoint
that was being written when the process died must never be resumed from.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sqlm.checkpoint import COMPLETE_MARKER, latest_complete_checkpoint, resolve_resume
from sqlm.commands.train import build_trainer, parse_train_args, run
from sqlm.errors import SqlmError


MAX_STEPS, SAVE_STEPS = 10, 2
WORDS = ["good", "fun", "bad", "dull", "film", "book", "song", "game"]


def _rows():
    rows = []
    for i in range(12):
        a, b = WORDS[i % 4], WORDS[(i + 2) % 4]
        rows.append(
            {
                "prompt": f"Rate the {WORDS[4 + i % 4]}:",
                "chosen": f" {a} and {b}.",
                "rejected": f" {b} {b}.",
                # cached dense rewards (as sqlm.rewards.cache writes them), longer than any completion
                "chosen_token_rewards": [0.01 * ((i + t) % 5) for t in range(40)],
                "rejected_token_rewards": [-0.02 * ((i * t) % 3) for t in range(40)],
            }
        )
    return rows


RECIPE = f"""
model_name_or_path: tiny:vocab_size=300,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=1
dataset_name: data.jsonl
max_length: 32
max_completion_length: 6
loss_type: soft_q
target_model_mixup_alpha: 0.3
mode: mixed
mix_ratio: 0.3                      # the carried credit is not 0 at checkpoints
num_generations: 2
replay_buffer_size: 6
reward_funcs: [keyword]
reward_kwargs:
  keyword:
    words: [good, fun]
    penalty_words: [bad, dull]
per_device_train_batch_size: 2
max_steps: {MAX_STEPS}
learning_rate: 0.01
lr_scheduler_type: linear
save_strategy: steps
save_steps: {SAVE_STEPS}
logging_steps: 1
disable_tqdm: true
report_to: none
use_cpu: true
seed: 3
dataloader_num_workers: 0
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    (d / "recipe.yaml").write_text(RECIPE)
    return d


@pytest.fixture(autouse=True)
def _cache(workdir, monkeypatch):
    monkeypatch.setenv("SQLM_CACHE", str(workdir / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _argv(workdir, out, *extra):
    return [str(workdir / "recipe.yaml"), "--output_dir", str(out), *extra]


def _state(folder: Path) -> dict:
    """Everything a checkpoint holds that decides the rest of the run."""
    out = {f"model/{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    out.update({f"target/{k}": v for k, v in load_file(folder / "target_model.safetensors").items()})
    opt = torch.load(folder / "optimizer.pt", weights_only=True)
    for pid, st in opt["state"].items():
        for k, v in st.items():
            out[f"optim/{pid}/{k}"] = v
    out["replay"] = json.loads((folder / "replay_buffer_rank0.json").read_text())
    out["sqlm_state"] = json.loads((folder / "sqlm_state.json").read_text())
    out["rng"] = torch.load(folder / "rng_state.pth", weights_only=False)["cpu"]
    out["scheduler"] = torch.load(folder / "scheduler.pt", weights_only=True)["last_epoch"]
    return out


def _assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def reference(workdir):
    """The uninterrupted run (in-process)."""
    os.environ["SQLM_CACHE"] = str(workdir / "cache")
    out = workdir / "ref"
    trainer = run(_argv(workdir, out))
    assert trainer.state.global_step == MAX_STEPS
    assert len(trainer.replay_buffer) == 6  # the buffer filled and wrapped around
    return out


def _killed_run(workdir, out: Path, *, at_log_line: int | None = None, during_save_of: int | None = None):
    """Start `sqlm train` as a subprocess and SIGKILL it after its N-th logged step, or as soon as
    the folder of checkpoint-N appears (that is, while it is being written)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqlm.cli", "train", *_argv(workdir, out)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    logged = []

    def read():
        for line in proc.stdout:
            if line.startswith("{'loss'"):
                logged.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 300
    target = out / f"checkpoint-{during_save_of}" if during_save_of else None
    while time.time() < deadline and proc.poll() is None:
        if at_log_line is not None and len(logged) >= at_log_line:
            break
        if target is not None and (target / "model.safetensors").exists():
            break  # the model is written, the optimizer, RNG and replay state may not be
        time.sleep(0.0005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    return len(logged)


@pytest.mark.parametrize("point", ["random_step", "during_save"])
def test_sigkill_then_resume_is_identical(workdir, reference, point):
    out = workdir / f"killed-{point}"
    if point == "random_step":
        at = random.Random(os.getpid()).randint(3, 6)
        _killed_run(workdir, out, at_log_line=at)
    else:
        _killed_run(workdir, out, during_save_of=8)
    latest = latest_complete_checkpoint(out)
    assert latest is not None and int(latest.name.split("-")[1]) < MAX_STEPS
    for folder in out.glob("checkpoint-*"):  # whatever was half-written is not 'latest'
        if not (folder / COMPLETE_MARKER).exists():
            assert int(folder.name.split("-")[1]) > int(latest.name.split("-")[1])

    trainer = run(_argv(workdir, out, "--resume_from_checkpoint", "latest"))
    assert trainer.state.global_step == MAX_STEPS
    final = out / f"checkpoint-{MAX_STEPS}"
    _assert_identical(_state(final), _state(reference / f"checkpoint-{MAX_STEPS}"))
    assert torch.equal(
        torch.stack([v.flatten().sum() for v in load_file(out / "model.safetensors").values()]),
        torch.stack([v.flatten().sum() for v in load_file(reference / "model.safetensors").values()]),
    )


class _Killed(BaseException):
    """Stands in for SIGKILL inside the process (nothing below catches a BaseException)."""


def test_checkpoint_half_written_when_killed_is_skipped(workdir, reference, monkeypatch):
    from transformers.trainer_utils import get_last_checkpoint

    import sqlm.trainer as trainer_mod

    out = workdir / "crash-in-save"
    real_mark = trainer_mod.mark_complete

    def dies_at_6(folder, step):
        if step == 6:
            raise _Killed()  # every file is written, the completion marker is not
        real_mark(folder, step)

    monkeypatch.setattr(trainer_mod, "mark_complete", dies_at_6)
    args, model_args, recipe_dir = parse_train_args(_argv(workdir, out))
    with pytest.raises(_Killed):
        build_trainer(args, model_args, recipe_dir).train()
    monkeypatch.setattr(trainer_mod, "mark_complete", real_mark)

    half = out / "checkpoint-6"
    assert (half / "model.safetensors").exists() and (half / "trainer_state.json").exists()
    assert get_last_checkpoint(str(out)) == str(half)  # what the HF Trainer alone would resume from
    assert latest_complete_checkpoint(out) == out / "checkpoint-4"
    with pytest.raises(SqlmError, match="checkpoint-6 is not a complete checkpoint"):
        resolve_resume(str(half), out)
    assert resolve_resume("true", out) == str(out / "checkpoint-4")

    run(_argv(workdir, out, "--resume_from_checkpoint", "true"))
    _assert_identical(_state(out / f"checkpoint-{MAX_STEPS}"), _state(reference / f"checkpoint-{MAX_STEPS}"))
    assert (half / COMPLETE_MARKER).exists()  # rewritten in full by the resumed run


def test_resume_without_a_complete_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(SqlmError, match=r"no complete checkpoint.*checkpoint-2 never finished saving"):
        resolve_resume("latest", tmp_path)
    with pytest.raises(SqlmError, match="no checkpoint folder"):
        resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)
    assert resolve_resume(None, tmp_path) is None and resolve_resume("false", tmp_path) is None


def test_rotation_happens_only_after_the_new_checkpoint_is_complete(workdir, monkeypatch):
    import sqlm.trainer as trainer_mod

    seen = []
    real_mark = trainer_mod.mark_complete

    def mark(folder, step):
        # when a checkpoint is being completed, the previous complete one is still there
        seen.append(sorted(p.name for p in Path(folder).parent.glob("checkpoint-*")))
        real_mark(folder, step)

    monkeypatch.setattr(trainer_mod, "mark_complete", mark)
    out = workdir / "rotate"
    run(_argv(workdir, out, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "1"))
    assert seen == [["checkpoint-1"], ["checkpoint-1", "checkpoint-2"], ["checkpoint-2", "checkpoint-3"]]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert (out / "checkpoint-3" / COMPLETE_MARKER).exists()


def test_resume_with_cached_model_based_rewards_is_identical(tmp_path):
    """A reward model's dense rewards cached as dataset columns (offline rows) and scored live (online
    rows): resuming from a checkpoint of the run reloads the cache and ends identical."""
    from sqlm.config import SoftQConfig
    from sqlm.rewards import build_rewarder
    from sqlm.rewards.toy import toy_preference_dataset, toy_reward_model, toy_tokenizer
    from sqlm.tiny import tiny_model_for_tokenizer
    from sqlm.trainer import SoftQTrainer

    tok = toy_tokenizer(vocab_size=300)
    rm = toy_reward_model(tok, seed=3).eval()
    data = toy_preference_dataset(8, seed=1)

    def trainer(out):
        args = SoftQConfig(
            output_dir=str(out),
            per_device_train_batch_size=2,
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            report_to="none",
            use_cpu=True,
            seed=0,
            max_length=64,
            max_completion_length=6,
            num_generations=1,
            mode="mixed",
            mix_ratio=0.5,
            replay_buffer_size=4,
            loss_type="soft_q",
            learning_rate=0.01,
            reward_cache_dir=str(tmp_path / "reward-cache"),
        )
        model = tiny_model_for_tokenizer(
            tok, seed=0, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
        )
        abc = build_rewarder("abc", reward_model=rm, tokenizer=tok, beta=0.8, policy_tokenizer=tok)
        return SoftQTrainer(model, args, train_dataset=data, processing_class=tok, reward_funcs=[abc])

    full = trainer(tmp_path / "full")
    assert "chosen_token_rewards" in full.train_dataset.column_names  # cached columns in use
    full.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    _assert_identical(_state(tmp_path / "resumed" / "checkpoint-4"), _state(tmp_path / "full" / "checkpoint-4"))
