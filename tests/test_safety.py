"""Safe loading: no remote code unless asked, safetensors only for weights, a safe YAML loader, and
Python code named in a recipe imported only with allow_code_rewards. Every refusal is checked to have
run nothing: each payload would touch a marker file."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from sqlm import cli
from sqlm.tiny import tiny_model_for_tokenizer, train_tokenizer


QUICKSTART = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "quickstart" / "sqlm" / "config.yaml"
ROWS = [
    {"prompt": f"Rate the {w}:", "chosen": " good and fun.", "rejected": " bad and dull."}
    for w in ("film", "book", "song", "game")
]
BASE = """
model_name_or_path: {model}
dataset_name: data.jsonl
max_length: 32
per_device_train_batch_size: 2
max_steps: {steps}
save_strategy: steps
save_steps: 2
report_to: none
use_cpu: true
"""
TINY = "tiny:vocab_size=300,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=1"


class _Payload:
    """Unpickling this touches a marker file (stands in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def work(tmp_path, monkeypatch):
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SQLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _recipe(work, model=TINY, steps=2, extra=""):
    path = work / "r.yaml"
    path.write_text(BASE.format(model=model, steps=steps) + extra)
    return str(path)


def _tiny_folder(path):
    tok = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 2, vocab_size=280)
    model = tiny_model_for_tokenizer(
        tok, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def test_trust_remote_code_is_off_by_default_and_custom_code_never_runs(work, capsys):
    from sqlm.commands.train import parse_train_args
    from sqlm.config import SoftQConfig
    from sqlm.loading import model_init_kwargs

    args, model_args, _ = parse_train_args([str(QUICKSTART)])
    assert SoftQConfig(output_dir="x").trust_remote_code is False and args.trust_remote_code is False
    kwargs = model_init_kwargs(args, model_args)
    assert kwargs["trust_remote_code"] is False and kwargs["use_safetensors"] is True

    # a model folder whose config asks for its own Python code
    folder = work / "remote"
    _tiny_folder(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(
        model_type="custom",
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (folder / name).write_text(f"import pathlib\npathlib.Path({str(work / 'RAN')!r}).touch()\n")
    assert cli.main(["train", _recipe(work, model=folder), "--output_dir", "out"]) == 2
    err = capsys.readouterr().err
    assert f"could not load model '{folder}'" in err and "trust_remote_code" in err
    assert not (work / "RAN").exists() and not (work / "out").exists()


def test_weights_are_written_and_read_as_safetensors_only(work, capsys):
    from sqlm.commands.train import run

    trainer = run([_recipe(work, steps=2, extra="loss_type: soft_q\nreward_funcs: [length]\n"), "--output_dir", "out"])
    files = sorted(str(p.relative_to(work / "out")) for p in (work / "out").rglob("*") if p.is_file())
    assert "model.safetensors" in files and "checkpoint-2/model.safetensors" in files
    assert "checkpoint-2/target_model.safetensors" in files
    # the only pickles are transformers' own non-weight state files, read back with weights_only=True
    pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    allowed = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
    assert {pathlib.Path(f).name for f in pickles} <= allowed, pickles
    assert not any(pathlib.Path(f).name in ("pytorch_model.bin", "adapter_model.bin") for f in files)
    assert trainer.state.global_step == 2

    # a model folder with only a pickled checkpoint is refused, and the pickle is never opened
    folder = work / "pickled"
    model = _tiny_folder(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"state": model.state_dict(), "x": _Payload(work / "UNPICKLED")}, folder / "pytorch_model.bin")
    assert cli.main(["train", _recipe(work, model=folder), "--output_dir", "out2"]) == 2
    err = capsys.readouterr().err
    assert f"could not load model '{folder}'" in err and "Traceback" not in err
    assert not (work / "UNPICKLED").exists() and not (work / "out2").exists()


def test_resume_refuses_a_checkpoint_with_code_in_its_pickles(work, capsys):
    from sqlm.commands.train import run

    run([_recipe(work, steps=2, extra="reward_funcs: [length]\n"), "--output_dir", "out"])
    ckpt = work / "out" / "checkpoint-2"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(work / "UNPICKLED")}, ckpt / "optimizer.pt")
    before = sorted(p.name for p in (work / "out").iterdir())
    rc = cli.main(
        [
            "train",
            _recipe(work, steps=4, extra="reward_funcs: [length]\n"),
            "--output_dir",
            "out",
            "--resume_from_checkpoint",
            str(ckpt),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("sqlm train: error:")]
    assert f"checkpoint {ckpt}: refusing to load optimizer/scheduler state" in line
    assert "UnpicklingError" not in err
    assert not (work / "UNPICKLED").exists()
    assert sorted(p.name for p in (work / "out").iterdir()) == before  # the failed resume removed nothing


def test_recipes_are_read_with_the_safe_loader(work, capsys):
    marker = work / "YAML_RAN"
    path = work / "evil.yaml"
    path.write_text(
        f"tau: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path [{str(marker)!r}]]\n"
    )
    assert cli.main(["train", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert not marker.exists()


def test_code_named_in_a_recipe_runs_only_with_the_opt_in(work, capsys, monkeypatch):
    (work / "rewardmod.py").write_text(
        f"import pathlib\npathlib.Path({str(work / 'IMPORTED')!r}).touch()\n"
        "def reward(prompts, completions, **kw):\n    return [1.0 for _ in completions]\n"
    )
    monkeypatch.syspath_prepend(str(work))
    recipe = _recipe(work, steps=1, extra="reward_funcs: ['rewardmod:reward']\n")
    assert cli.main(["train", recipe, "--output_dir", "out"]) == 2
    assert "set allow_code_rewards: true" in capsys.readouterr().err
    assert not (work / "IMPORTED").exists() and not (work / "out").exists()
    # the 'callable' rewarder naming a function by string needs the same opt-in
    recipe2 = _recipe(
        work, steps=1, extra="reward_funcs: [callable]\nreward_kwargs: {callable: {fn: 'rewardmod:reward'}}\n"
    )
    assert cli.main(["train", recipe2, "--output_dir", "out"]) == 2
    assert "allow_code_rewards" in capsys.readouterr().err and not (work / "IMPORTED").exists()

    assert cli.main(["train", recipe, "--output_dir", "out", "--allow_code_rewards", "true"]) == 0
    assert (work / "IMPORTED").exists()
