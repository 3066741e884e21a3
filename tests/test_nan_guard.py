"""NaN / inf in rewards, values or the loss: `nan_policy: stop` ends the run with one error naming the
step and the source and keeps the last complete checkpoint; `nan_policy: skip` makes no update for
that step and counts it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from sqlm import cli
from sqlm.checkpoint import COMPLETE_MARKER
from sqlm.config import SoftQConfig
from sqlm.guards import NonFiniteError
from sqlm.tiny import tiny_model_for_tokenizer, train_tokenizer
from sqlm.trainer import SoftQTrainer


NAN_MODULE = '''
import math

def make(bad_call=3, value="nan"):
    """A TRL-signature reward that returns NaN (or inf) on its bad_call-th call, else +1/-1."""
    calls = [0]

    def reward(prompts, completions, **kwargs):
        calls[0] += 1
        bad = float(value) if calls[0] == bad_call else None
        return [bad if bad is not None else (1.0 if "good" in c else -1.0) for c in completions]

    return reward
'''

RECIPE = """
model_name_or_path: tiny:vocab_size=300,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=1
dataset_name: data.jsonl
max_length: 32
loss_type: unified_pcl
per_device_train_batch_size: 2
max_steps: 6
learning_rate: 0.01
save_strategy: steps
save_steps: 2
logging_steps: 1
report_to: none
use_cpu: true
seed: 0
allow_code_rewards: true
reward_funcs: ["nanmod:make"]
"""

ROWS = [
    {"prompt": f"Rate the {w}:", "chosen": " good and fun.", "rejected": " bad and dull."}
    for w in ("film", "book", "song", "game")
] * 2


@pytest.fixture
def work(tmp_path, monkeypatch):
    (tmp_path / "nanmod.py").write_text(NAN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SQLM_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _kwargs(bad_call, value="nan"):
    return ["--reward_kwargs", json.dumps({"nanmod:make": {"bad_call": bad_call, "value": value}})]


def test_stop_names_step_and_source_and_keeps_the_last_checkpoint(work, capsys):
    rc = cli.main(["train", "recipe.yaml", "--output_dir", "out", *_kwargs(5)])
    err = capsys.readouterr().err
    assert rc == 2
    (line,) = [x for x in err.splitlines() if x.startswith("sqlm train: error:")]
    assert "non-finite reward from 'nanmod:make' at step 5" in line and "Traceback" not in err
    out = work / "out"
    # checkpoints of steps 2 and 4 are complete and loadable; nothing of the bad step, no final model
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        assert (out / ckpt / COMPLETE_MARKER).exists()
        assert all(torch.isfinite(t).all() for t in load_file(out / ckpt / "model.safetensors").values())
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_inf_reward_is_caught_too_and_a_fresh_output_dir_is_removed(work, capsys):
    rc = cli.main(["train", "recipe.yaml", "--output_dir", "out", *_kwargs(1, "-inf")])
    assert rc == 2
    assert "non-finite reward from 'nanmod:make' at step 1" in capsys.readouterr().err
    assert not (work / "out").exists()  # the run created it and left nothing complete in it


def test_skip_makes_no_update_for_the_bad_step_and_counts_it(work, caplog):
    from sqlm.commands.train import run

    trainer = run(["recipe.yaml", "--output_dir", "out", "--nan_policy", "skip", *_kwargs(3)])
    assert trainer.state.global_step == 6 and trainer.nonfinite.skipped_steps == 1
    assert any("skipped step 3: non-finite reward from 'nanmod:make'" in r.getMessage() for r in caplog.records)
    logged = [e.get("nonfinite/skipped_steps") for e in trainer.state.log_history if "loss" in e]
    assert logged == [None, None, 1, 1, 1, 1]
    # AdamW counts a step for a parameter only when it has a gradient: 5 updates, not 6
    steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {5.0}
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # the checkpoint taken after the skipped step carries the count (for resuming)
    assert json.loads((work / "out" / "checkpoint-4" / "sqlm_state.json").read_text())["skipped_steps"] == 1


def test_precomputed_reward_column_with_nan_names_the_column(tmp_path):
    tok = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 2, vocab_size=300)
    rows = [dict(r, chosen_token_rewards=[0.1] * 30, rejected_token_rewards=[0.0] * 30) for r in ROWS]
    rows[5]["rejected_token_rewards"][1] = math.nan  # row 5 is in the third batch of 2
    args = SoftQConfig(
        output_dir=str(tmp_path / "o"),
        per_device_train_batch_size=2,
        max_steps=4,
        max_length=32,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    model = tiny_model_for_tokenizer(
        tok, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    trainer = SoftQTrainer(model, args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    with pytest.raises(
        NonFiniteError, match=r"non-finite reward in dataset column 'rejected_token_rewards' at step 3"
    ):
        trainer.train()


@pytest.mark.parametrize(
    "which,source", [("target", "value V_bar(s) of the target network"), ("policy", "value V(s) of the policy")]
)
def test_nan_values_name_the_network(tmp_path, which, source):
    tok = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 2, vocab_size=300)
    args = SoftQConfig(
        output_dir=str(tmp_path / "o"),
        per_device_train_batch_size=2,
        max_steps=2,
        max_length=32,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        loss_type="soft_q",
        reward_scale=1.0,
    )
    model = tiny_model_for_tokenizer(
        tok, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    trainer = SoftQTrainer(
        model, args, train_dataset=Dataset.from_list(ROWS), processing_class=tok, reward_funcs=["length"]
    )
    net = trainer.target_model if which == "target" else trainer.model
    with torch.no_grad():
        net.model.norm.weight[0] = float("nan")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(
        NonFiniteError, match=rf"non-finite {source.replace('(', '[(]').replace(')', '[)]')} at step 1"
    ):
        trainer.train()
    for n, p in trainer.model.named_parameters():  # the bad step made no update
        assert torch.equal(p, before[n]) or (torch.isnan(p) == torch.isnan(before[n])).all(), n
