"""A behavioural canary of the training code: the code part of the sweep's cache key.

A cached sweep run must be redone when the code that trained it behaves differently, and only then.
Instead of hashing source files (a hand-kept list misses files, and a refactor that changes nothing
throws every cached run away), the canary *runs* the code: a few deterministic optimizer steps of a
method through the same ``sqlm`` command, recipe and argv as the sweep's real runs
(:func:`sqlm.evaluation.sweep.run_argv`), on a tiny model built offline from a config and tiny data,
and hashes what the run leaves: the trained weights, the loss logged at its last step and its counts
of generated completions, tokens and optimizer steps (``run_stats.json``). The digest changes when
the training behaviour changes (a loss, a default, data handling, a TRL trainer) and not when only
the text of the code does (comments, names, a move between modules).

This module builds the canary's inputs and digests a finished run; :mod:`sqlm.evaluation.sweep`
runs it (see its docstring for what the key covers and what it cannot see).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .tasks import Budget, Task, TaskData


# two optimizer steps: Adam's first moves each weight by about lr * sign(gradient), its second also
# by the gradients' sizes; the loss logged at the second step is hashed as well
CANARY_STEPS = 2
CANARY_BUDGET = Budget(steps=CANARY_STEPS, online_lr=1e-2, offline_lr=1e-2, prompts_per_batch=2, num_generations=2,
                       pairs_per_batch=2, max_completion_length=4)  # fmt: skip
# a Qwen2-shaped model small enough that a step costs milliseconds on one CPU thread
CANARY_MODEL = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
# the libraries whose version is part of the key beside the canary (sqlm's own is sqlm.__version__)
KEYED_LIBRARIES = ("trl", "transformers", "torch")
# what a cached sweep result keeps of a run's run_stats.json (the rest of it is clocks and settings)
RUN_COUNTERS = ("generated_completions", "generated_tokens", "optimizer_steps")

_WORDS = ("good", "bad", "fine", "calm", "dark", "warm", "cold", "slow")


def canary_rows() -> tuple[list[dict], list[dict]]:
    """The canary's prompt-only rows (online runs) and preference rows (offline and mixed runs); the
    pairs also carry ``chosen_score`` / ``rejected_score``, for a recipe that reads its rewards from
    the data."""
    prompts = [f"the {a} and {b} day" for a, b in zip(_WORDS, reversed(_WORDS))]
    pairs = [
        {"prompt": p, "chosen": f" is {w}", "rejected": f" {w} {w} was", "chosen_score": 1.0, "rejected_score": 0.0}
        for p, w in zip(prompts, _WORDS)
    ]
    return [{"prompt": p} for p in prompts], pairs


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_canary_data(folder: Path) -> TaskData:
    """The canary's base LM (a random tiny causal LM), its reward model (a random tiny sequence
    classifier with the same tokenizer, read by sqlm's ``terminal`` rewarder as the sentiment task
    reads its reward model), a second random tiny causal LM (``info["implicit_model"]``, the DPO policy an
    attempt's ``implicit`` rewarder reads, against ``info["base_model"]``) and data files, written to
    ``folder``; deterministic. Call it inside :func:`isolated_determinism`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..tiny import tiny_qwen2_config, train_tokenizer

    prompts, pairs = canary_rows()
    texts = [r["prompt"] for r in prompts] + [r[k] for r in pairs for k in ("chosen", "rejected")]
    tokenizer = train_tokenizer(texts, vocab_size=260)  # byte-level BPE: the 256 bytes and 4 special tokens
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id)  # fmt: skip
    config = tiny_qwen2_config(len(tokenizer), **CANARY_MODEL, **ids)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    config.num_labels = 1
    torch.manual_seed(1)
    reward_model = AutoModelForSequenceClassification.from_config(config)
    torch.manual_seed(2)  # after the others: their weights are what they were before it existed
    implicit = AutoModelForCausalLM.from_config(config)
    for model, name in ((policy, "base"), (reward_model, "reward_model"), (implicit, "implicit_model")):
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    rm = str(folder / "reward_model")
    return TaskData(task="canary", base_seed=0, base=folder / "base",
                    prompts_file=_write_jsonl(folder / "prompts.jsonl", prompts),
                    pairs_file=_write_jsonl(folder / "pairs.jsonl", pairs), eval_prompts=[],
                    reward_argv=["--reward_funcs", "terminal", "--reward_kwargs",
                                 json.dumps({"terminal": {"reward_model": rm}})],
                    info={"reward_model": rm, "implicit_model": str(folder / "implicit_model"),
                          "base_model": str(folder / "base")})  # fmt: skip


class CanaryTask(Task):
    """A task's recipes (what its real runs parse) with the canary's budget."""

    def __init__(self, task: Task):
        super().__init__(reduced=task.reduced)
        self.name, self.recipes = task.name, task.recipes

    def budget(self) -> Budget:
        return CANARY_BUDGET


def canary_knob(values: tuple[float, ...]) -> float:
    """The knob value a canary trains with: the largest of a method's values, never 0, so a KL term
    (GRPO's beta, whose default is 0) is exercised."""
    return max(values)


@contextlib.contextmanager
def isolated_determinism() -> Iterator[None]:
    """One CPU thread and deterministic algorithms inside the block, and the random states of
    ``random``, NumPy and torch (CPU) as they were before it afterwards: a canary leaves the sweep's
    own random draws alone."""
    import numpy as np
    import torch

    from .gold import deterministic_torch

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), deterministic_torch(1):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def run_record(stats: dict) -> dict:
    """What a run's behaviour shows in its ``run_stats.json``: the counters a sweep result keeps and the
    loss logged at the last step (not the clocks, nor metrics that only describe a batch)."""
    return {**{k: stats[k] for k in RUN_COUNTERS}, "loss": (stats.get("last_log") or {}).get("loss")}


def run_digest(out: Path) -> str:
    """sha256 of a finished run in ``out``: every tensor of its ``*.safetensors`` files (name, dtype,
    shape, bytes) and the :func:`run_record` of its ``run_stats.json``."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key)
                h.update(f"{path.name}:{key}:{t.dtype}:{list(t.shape)}".encode())
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(run_record(json.loads((out / "run_stats.json").read_text())), sort_keys=True).encode())
    return h.hexdigest()


def canary_digest(command: str, argv_of: Callable[[TaskData, Path], list[str]], runner) -> str:
    """Train the canary with ``runner(command, argv_of(data, out))`` (``data`` the canary's inputs,
    ``out`` the output folder), in a temporary folder, and return :func:`run_digest` of the run."""
    with tempfile.TemporaryDirectory(prefix="sqlm-canary-") as tmp, isolated_determinism():
        data = build_canary_data(Path(tmp))
        out = Path(tmp) / "run"
        runner(command, argv_of(data, out) + ["--use_cpu", "true", "--bf16", "false"])
        return run_digest(out)


def library_versions() -> dict[str, str]:
    """The versions of sqlm and of the libraries that train: part of the key beside the canary, for
    what the canary does not reach (e.g. a library's behaviour at other sizes or on a GPU)."""
    from .. import __version__

    out = {"sqlm": __version__}
    for name in KEYED_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out
