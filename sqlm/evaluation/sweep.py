"""Like-for-like comparison sweeps: sqlm against TRL's DPO, GRPO and RLOO on a gold task, over base
LMs, training seeds and each method's KL knob, with matched-KL verdicts (``sqlm pipeline``).

For every method, knob value (sqlm's tau, TRL's beta), base LM and training seed, one run trains
through the method's own ``sqlm`` command (``sqlm train`` / ``dpo`` / ``grpo`` / ``rloo``) with the
task's paired recipe and the shared :class:`sqlm.evaluation.tasks.Budget`:

* **online** (sqlm online, GRPO, RLOO): the same prompts, ``num_generations``, completions per step,
  ``max_completion_length``, temperature 1, optimizer steps, learning rate and seed, and the same
  reward (the task's reward model or checker);
* **offline** (sqlm offline, DPO): the same preference pairs per step, steps, learning rate and
  seed; sqlm scores the pairs with the task's reward (the reward model fitted to those pairs, or the
  checker), DPO reads their labels;
* **mixed** sqlm rolls out as many completions per step as the online methods, and its batch also
  holds the pairs: it is compared with the online methods at an equal number of generated
  completions.

Each run is evaluated on the task's held-out prompts (temperature-1 samples with common random
numbers per base LM: score, exact KL to the base, length, distinct-n) and cached under
``cache/sweeps/<task>/<method>-<knob>-b<base>-s<seed>-<hash>/result.json`` by a hash of everything it
depends on, so a rerun only trains what changed. The summary is mean ± s.e. over runs; a comparison
of two methods is the difference of their frontiers at matched KL with a bootstrap interval over runs
and prompts (:mod:`sqlm.evaluation.compare`). The summary, verdicts, plots and report are
:mod:`sqlm.evaluation.sweep_report`'s.

**The cache key.** A run's key holds its settings (method, command, recipe text, knob, budget, steps,
seed, base LM, data, reward argv, evaluation sizes) and the *training key* of its method on its task
(:func:`training_key`): the versions of sqlm, TRL, transformers and torch, and the digest of a
behavioural canary (:mod:`sqlm.evaluation.canary`). The canary trains the method for
``CANARY_STEPS`` deterministic optimizer steps (one CPU thread, deterministic algorithms) through the
same runner, command, recipe and :func:`run_argv` as the real runs, with a tiny Qwen2-shaped model
(hidden size 16, one layer) and reward model built from a config, 8 prompts and 8 pairs, and hashes
the weights, the last logged loss and the counts it leaves. Each (task, method) is run once per
process, about half a second each on a CPU (a few seconds per sweep). So the key changes when what
trains a method behaves differently (a loss, a default of ``SoftQConfig`` or of a TRL config, data
handling, batching, rewards scoring, a TRL trainer, a library version) and only for the methods
whose behaviour changed; it does not change for a comment, a rename or a move of code.

What the canary cannot see, so a change there keeps old results (delete ``cache/sweeps`` to redo them):

* code paths it does not take: several processes (DDP, ZeRO, FSDP), a GPU, bf16/fp16, vLLM, PEFT
  (unless an attempt's flags turn it on: attempts get their own canary, with their flags), settings
  no sweep recipe or argv sets, and the half-way checkpoints of ``mid_eval``;
* behaviour that shows only after more than ``CANARY_STEPS`` steps (a target-network sync interval,
  a full replay buffer, a learning-rate schedule), only at larger sizes (truncation at
  ``max_length``, chunking over long sequences or a large vocabulary) or only on other data
  (conversational prompts, long completions);
* the task's own reward: the canary scores with sqlm's ``terminal`` rewarder on a random reward model
  (sentiment's kind of reward; an attempt's ``{implicit_model}`` is a random tiny LM against the canary's
  base), not with arithmetic's checker, whose code is not keyed, nor with the sentiment tasks' fitted
  reward models and chat_sentiment's DPO policy (keyed by their paths, which hash their data, recipes and
  budget, not the code that fitted them);
* everything after training: ``task.evaluate``, decoding and the metrics (the stages before it, base
  LMs and data, are cached under keys of their own).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import SqlmError
from .canary import CANARY_STEPS, CanaryTask, canary_digest, canary_knob, library_versions
from .curves import curve_lines, curve_table, curve_verdicts, plot_checkpoint_frontier, plot_curves
from .gold import fingerprint
from .sweep_report import compare_methods, plot_efficiency, plot_frontier, summarize, write_report
from .tasks import Budget, Task, TaskData, log


@dataclass(frozen=True)
class Method:
    """A method of the sweep: the command that trains it, its regime and KL knob."""

    name: str
    command: str  # sqlm, dpo, grpo, rloo
    regime: str  # online, offline, mixed
    recipe: str  # relative to the task's recipes folder
    knob: str  # tau (sqlm) or beta (TRL)
    values: tuple[float, ...]  # the full sweep
    default: tuple[float, ...]  # the default (short) sweep
    extra: tuple[str, ...] = ()  # further flags of every run
    compare: tuple[str, ...] = ()  # the baselines it is judged against


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sqlm-online", "sqlm", "online", "sqlm/config_online.yaml", "tau", (0.03, 0.1, 0.3), (0.1,),
               compare=("grpo", "rloo")),
        Method("sqlm-mixed", "sqlm", "mixed", "sqlm/config_mixed.yaml", "tau", (0.03, 0.1, 0.3), (0.1,),
               compare=("grpo", "rloo")),
        # TRL's defaults are swept with larger values: GRPO's beta 0 (no reference), RLOO's 0.05; the
        # baselines' grids reach further than sqlm's tau grids (5 values, up to beta = 1), so that they
        # have points wherever sqlm has on either task
        Method("grpo", "grpo", "online", "grpo/config.yaml", "beta", (0.0, 0.04, 0.1, 0.3, 1.0), (0.0,)),
        Method("rloo", "rloo", "online", "rloo/config.yaml", "beta", (0.05, 0.1, 0.2, 0.5, 1.0), (0.05,)),
        Method("sqlm-offline", "sqlm", "offline", "sqlm/config_offline.yaml", "tau", (0.03, 0.1, 0.3), (0.1,),
               compare=("dpo",)),
        Method("dpo", "dpo", "offline", "dpo/config.yaml", "beta", (0.03, 0.1, 0.3, 1.0, 3.0), (0.1,)),
    )
}  # fmt: skip


@dataclass
class SweepConfig:
    """What to run: methods x knob values x base LMs x training seeds, and how to evaluate."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    bases: list[int] = field(default_factory=lambda: [0])
    seeds: list[int] = field(default_factory=lambda: [0])
    full: bool = False  # every method's full knob sweep (else its default values)
    knobs: dict[str, list[float]] = field(default_factory=dict)  # per-method override of the values
    steps: int | None = None  # override of the task budget's optimizer steps
    n_eval: int | None = None  # held-out prompts per base LM (None: all the task prepared)
    eval_samples: int = 1  # temperature-1 samples per prompt
    mid_eval: bool = False  # also evaluate online runs half-way (efficiency plot)
    curve: int = 0  # also evaluate every run at this many evenly spaced checkpoints before its end (0: none)
    records: Path | None = None  # also keep each finished run's result here (<task>/<run>.json), read first
    n_boot: int = 1000
    keep_models: bool = False  # keep each run's weights (default: logs and results only)
    progress: bool = True
    plan: bool = False  # list each run's folder and state (recorded, cached, to train); train nothing
    report_only: bool = False  # report the runs already recorded or cached, train none (a resumable sweep so far)
    # variants of a method, judged like it: name -> {"base": method, "flags": [...], "values": [...],
    # "tasks": [...] (default: every task), "compare": [...] (default: the base method's baselines)}
    attempts: dict[str, dict] = field(default_factory=dict)
    compare: dict[str, list[str]] = field(default_factory=dict)  # per-method override of Method.compare (report only)

    def values(self, method: Method, task: Task | None = None) -> tuple[float, ...]:
        """The knob values of ``method``: the ``knobs`` override, else its default value, else (``full``)
        its full sweep, with the task's own range where the task has one (``Task.KNOBS``; an attempt
        uses its base method's)."""
        if method.name in self.knobs:
            return tuple(self.knobs[method.name])
        if not self.full:
            return method.default
        spec = self.attempts.get(method.name, {})
        base, own = spec.get("base", method.name), spec.get("values")
        return tuple(own) if own else tuple(getattr(task, "KNOBS", {}).get(base, method.values))

    def method(self, name: str) -> Method:
        """A method of :data:`METHODS`, or an attempt: its base method with further flags (in which
        ``{name}`` stands for the task's ``info[name]``, e.g. ``{reward_model}`` for its reward model:
        :func:`fill_placeholders`) and, optionally, its own knob values."""
        if name in METHODS:
            m = METHODS[name]
            return replace(m, compare=tuple(self.compare[name])) if name in self.compare else m
        spec = self.attempts[name]
        base = METHODS[spec["base"]]
        values = tuple(spec.get("values") or ())
        return replace(base, name=name, extra=base.extra + tuple(spec.get("flags", ())),
                       values=values or base.values, default=values or base.default,
                       compare=tuple(spec.get("compare") or base.compare))  # fmt: skip

    def all_methods(self, task: str | None = None) -> list[Method]:
        """The methods, then the attempts (those of ``task``: an attempt with ``tasks`` runs on those only)."""
        attempts = [a for a, spec in self.attempts.items() if task is None or task in spec.get("tasks", [task])]
        return [self.method(m) for m in [*self.methods, *attempts]]


# ----------------------------------------------------------------------------- one run


# A runner trains with a sqlm command in this process: ``runner(command, argv)`` (``sqlm pipeline``
# passes one that calls ``sqlm.commands.<command>.main(argv)``; the library never imports commands).
Runner = Callable[[str, list[str]], None]


def run_argv(task: Task, method: Method, data: TaskData, knob: float, seed: int, steps: int, out: Path,
             mid: bool, save_every: int = 0) -> list[str]:  # fmt: skip
    """The argv of one run's command (``main(argv)``): the paired recipe, the base LM, the budget of
    the method's regime, the knob, the seed and the reward; checkpoints half-way (``mid``, online) or
    every ``save_every`` steps."""
    b = task.budget()
    recipe = task.recipes / method.recipe
    if not recipe.is_file():
        raise SqlmError(f"no recipe {recipe} for method '{method.name}' on task '{task.name}'")
    argv = [str(recipe), "--model_name_or_path", str(data.base), f"--{method.knob}", repr(float(knob)),
            "--max_steps", str(steps), "--seed", str(seed), "--output_dir", str(out),
            "--logging_steps", str(max(1, steps // 4)), "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip
    completions = b.prompts_per_batch * b.num_generations
    if method.regime in ("online", "mixed"):
        batch = completions if method.regime == "online" else round(completions / b.mix_ratio)
        data_file = data.prompts_file if method.regime == "online" else data.pairs_file
        argv += ["--dataset_name", str(data_file), "--learning_rate", str(b.online_lr),
                 "--per_device_train_batch_size", str(batch), "--num_generations", str(b.num_generations),
                 "--max_completion_length", str(b.max_completion_length), "--temperature", "1.0"]  # fmt: skip
        if method.regime == "mixed":
            argv += ["--mix_ratio", str(b.mix_ratio)]
        argv += ["--save_strategy", "steps", "--save_steps", str(max(1, steps // 2))] if mid else []
    else:
        argv += ["--dataset_name", str(data.pairs_file), "--learning_rate", str(b.offline_lr),
                 "--per_device_train_batch_size", str(b.pairs_per_batch)]  # fmt: skip
    if b.lr_scheduler is not None:
        argv += ["--lr_scheduler_type", b.lr_scheduler]
    if save_every:
        argv += ["--save_strategy", "steps", "--save_steps", str(save_every)]
    elif not mid:
        argv += ["--save_strategy", "no"]
    if method.command != "dpo":
        argv += data.reward_argv
    return argv + fill_placeholders(list(method.extra), data.info)


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholders(flags: list[str]) -> list[str]:
    """The names of the ``{name}`` placeholders in ``flags``, in order, once each."""
    return list(dict.fromkeys(n for x in flags for n in _PLACEHOLDER.findall(x)))


def fill_placeholders(flags: list[str], info: dict) -> list[str]:
    """An attempt's ``flags`` with ``{name}`` replaced by ``info[name]`` for every string-valued key of the
    task's ``info`` (e.g. ``{implicit_model}``); ``{reward_model}`` is the task's reward model as ever (the
    empty string on a task without one). A placeholder the task's info lacks is an error naming it (JSON
    braces such as ``{"abc": ...}`` are no placeholder)."""
    values = {k: v for k, v in info.items() if isinstance(v, str)}
    values["reward_model"] = str(info.get("reward_model", ""))

    def value(m: re.Match) -> str:
        if m.group(1) not in values:
            raise SqlmError(f"attempt flag names '{{{m.group(1)}}}', which this task does not give; it gives "
                            f"{', '.join('{' + k + '}' for k in sorted(values))}")  # fmt: skip
        return values[m.group(1)]

    return [_PLACEHOLDER.sub(value, x) for x in flags]


# the training key of each (task, method) of this process: computed once, by the first sweep that needs it
_TRAINING_KEYS: dict[tuple[str, str, Method], dict] = {}


def canary_argv(task: Task, method: Method) -> Callable[[TaskData, Path], list[str]]:
    """``argv_of(data, out)`` of ``method``'s canary: :func:`run_argv` with the task's recipe, the
    canary's budget, its knob value and seed 0, so the canary parses and trains as the real runs do."""
    canary_task, knob = CanaryTask(task), canary_knob(method.values)
    return lambda data, out: run_argv(canary_task, method, data, knob, 0, CANARY_STEPS, out, False)


def training_key(task: Task, method: Method, runner: Runner) -> dict:
    """The code part of the cache key of ``method``'s runs on ``task``: the versions of sqlm, TRL,
    transformers and torch, and the digest of the method's behavioural canary
    (:mod:`sqlm.evaluation.canary`), computed once per process. A canary that fails gives a key that
    matches no cached run (the real run then reports the failure)."""
    k = (task.name, str(task.recipes), method)
    if k not in _TRAINING_KEYS:
        try:
            digest = canary_digest(method.command, canary_argv(task, method), runner)
        except Exception as e:  # noqa: BLE001 - the run itself trains and reports what fails
            log(f"training-code canary of {method.name} on {task.name} failed ({type(e).__name__}: {e}); "
                "its runs are not read from the cache")  # fmt: skip
            digest = f"failed-{uuid.uuid4().hex}"
        _TRAINING_KEYS[k] = {"versions": library_versions(), "canary": digest}
    return _TRAINING_KEYS[k]


def evaluate_folder(task: Task, path: Path, ref, tokenizer, prompts: list[str], seed: int, samples: int,
                    extra: dict[str, list[str]] | None = None) -> dict:  # fmt: skip
    """``task.evaluate`` of the model saved in ``path`` (deterministic, one thread)."""
    from ..loading import load_policy
    from .gold import deterministic_torch

    model, _ = load_policy(path)
    with deterministic_torch(1):
        return task.evaluate(model, tokenizer, ref, prompts, seed=seed, samples_per_prompt=samples, extra=extra)


def _extra(data: TaskData, cfg: SweepConfig) -> dict[str, list[str]]:
    """The task's further evaluation splits (e.g. arithmetic's longer operands), as many prompts as the
    held-out split."""
    return {name: ps[: cfg.n_eval] if cfg.n_eval else ps for name, ps in data.extra_eval.items()}


def budget_key(budget: Budget) -> dict:
    """The budget's part of a run's key: its fields, less those left at None (so that a field added with
    a None default keeps the keys of the runs that do not set it)."""
    return {k: v for k, v in vars(budget).items() if v is not None}


def run_key(task: Task, method: Method, knob: float, data: TaskData, seed: int, cfg: SweepConfig, steps: int,
            mid: bool, n_eval: int, extra: dict, runner: Runner) -> dict:  # fmt: skip
    """Everything a run's result depends on (its cache key; see the module docstring). The values the
    attempt's placeholders stand for are part of it (except ``{reward_model}``, in the reward argv); where the
    task names its cache folder (``data.cache``) paths are written relative to it (:func:`portable`)."""
    reward = [portable(x, data) for x in data.reward_argv] if data.cache is not None else data.reward_argv
    key = dict(method=[method.command, method.regime, method.recipe, method.knob, list(method.extra)], knob=knob,
               task=task.name, budget=budget_key(task.budget()), steps=steps, base=data.base.name,
               data=[data.prompts_file.parent.name, data.pairs_file.name], reward=reward, seed=seed,
               n_eval=n_eval, samples=cfg.eval_samples, mid=mid, extra={k: len(v) for k, v in extra.items()},
               recipe=keyed_recipe((task.recipes / method.recipe).read_text(), method.knob, knob),
               code=training_key(task, method, runner))  # fmt: skip
    if cfg.curve:  # only then, so that the keys of runs without a curve stay what they were
        key["curve"] = cfg.curve
    named = [n for n in placeholders(list(method.extra)) if n != "reward_model"]
    if named:  # only then, as the curve
        key["placeholders"] = {n: portable(str(data.info.get(n, "")), data) for n in named}
    return key


def keyed_recipe(text: str, knob_name: str, knob: float) -> str:
    """The recipe's part of a run's key: its text, with the value of its top-level ``knob_name:`` line written
    as the run's ``knob`` where the two differ. The run's argv sets the knob (``--tau`` / ``--beta``), so the
    recipe's own value never reaches training: a recipe whose default knob changes keeps the keys of the
    runs at the other values (a run at the recipe's value keys its text unchanged, as before)."""
    line = re.compile(rf"^({re.escape(knob_name)}:[ \t]*)([-+0-9.eE]+)", re.MULTILINE)
    found = line.search(text)
    if found is None:
        return text
    try:
        same = float(found.group(2)) == float(knob)
    except ValueError:
        return text
    return text if same else text[: found.start(2)] + f"{knob:g}" + text[found.end(2) :]


def portable(text: str, data: TaskData) -> str:
    """``text`` with the base LM's path written as its folder name and, where the task names it, the cache
    folder as ``<cache>``: a key part that holds on another machine (the folders' names carry the
    fingerprints of what they hold)."""
    text = text.replace(str(data.base), data.base.name)
    return text.replace(str(data.cache).rstrip("/") + "/", "<cache>/") if data.cache is not None else text


def run_paths(task: Task, method: Method, knob: float, data: TaskData, seed: int, cfg: SweepConfig, root: Path,
              prompts: list[str], runner: Runner) -> tuple[int, bool, Path, Path, Path | None]:  # fmt: skip
    """``(steps, mid, folder, done, record)`` of a run: its optimizer steps, whether it evaluates half-way,
    its cache folder (named by its key), the cached result and the record where it is kept (or None)."""
    steps = cfg.steps or task.budget().steps
    mid = cfg.mid_eval and method.regime != "offline" and not cfg.curve
    key = run_key(task, method, knob, data, seed, cfg, steps, mid, len(prompts), _extra(data, cfg), runner)
    folder = root / f"{method.name}-{knob:g}-b{data.base_seed}-s{seed}-{fingerprint(key)}"
    record = cfg.records / task.name / f"{folder.name}.json" if cfg.records else None
    return steps, mid, folder, folder / "result.json", record


def run_one(task: Task, method: Method, knob: float, data: TaskData, seed: int, cfg: SweepConfig, root: Path,
            ref, tokenizer, prompts: list[str], runner: Runner) -> dict:  # fmt: skip
    """Train (or read from the cache) and evaluate one run; a failed run is returned with ``failed``."""
    steps, mid, folder, done, record = run_paths(task, method, knob, data, seed, cfg, root, prompts, runner)
    save_every = max(1, steps // (cfg.curve + 1)) if cfg.curve else 0
    extra = _extra(data, cfg)
    for path in (record, done):
        if path is not None and path.is_file():
            return json.loads(path.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    out = folder / "model"
    argv = run_argv(task, method, data, knob, seed, steps, out, mid, save_every)
    head = {"method": method.name, "knob_name": method.knob, "knob": knob, "base": data.base_seed, "seed": seed}
    started = time.time()
    try:
        runner(method.command, argv)
    except Exception as e:  # noqa: BLE001 - a failed run is reported, the sweep goes on
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        log(f"FAILED {task.name} {method.name} {method.knob}={knob:g} base {data.base_seed} seed {seed}: "
             f"{type(e).__name__}: {msg}")  # fmt: skip
        return {**head, "failed": f"{type(e).__name__}: {msg}", "argv": argv}
    stats = json.loads((out / "run_stats.json").read_text())
    train_s = time.time() - started
    t = time.time()
    eval_seed = 1234 + data.base_seed
    result = {
        **head,
        "generated_completions": stats["generated_completions"],
        "generated_tokens": stats["generated_tokens"],
        "optimizer_steps": stats["optimizer_steps"],
        "wall_time_s": stats["wall_time_s"],
        "train_log": stats.get("log_history", []),  # the trainer's logged steps: why a run learned as it did
        "eval": evaluate_folder(task, out, ref, tokenizer, prompts, eval_seed, cfg.eval_samples, extra),
    }
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    checkpoints = [c for c in checkpoints if int(c.name.split("-")[1]) < stats["optimizer_steps"]]
    if mid and checkpoints:
        c = checkpoints[-1]
        frac = int(c.name.split("-")[1]) / stats["optimizer_steps"]
        ev = evaluate_folder(task, c, ref, tokenizer, prompts, eval_seed, cfg.eval_samples)
        result["mid"] = {"optimizer_steps": int(c.name.split("-")[1]), "score": ev["score"], "kl": ev["kl"],
                         "generated_completions": round(frac * stats["generated_completions"])}  # fmt: skip
    if cfg.curve:
        result["curve"] = checkpoint_curve(task, checkpoints, stats, result["eval"], ref, tokenizer, prompts,
                                           eval_seed, cfg.eval_samples)  # fmt: skip
    result["eval_time_s"] = round(time.time() - t, 2)
    result["argv"] = argv
    _finish(out, done, record, result, cfg.keep_models)
    e = result["eval"]
    log(f"{task.name} {method.name} {method.knob}={knob:g} base {data.base_seed} seed {seed}: {task.metric} "
         f"{e['score']:.3f}, KL {e['kl']:.2f} ({train_s:.0f}s training, {result['eval_time_s']:.0f}s eval)")  # fmt: skip
    return result


def _finish(out: Path, done: Path, record: Path | None, result: dict, keep_models: bool) -> None:
    """Drop a finished run's checkpoints (and weights unless kept), write its result to the cache and,
    atomically, to its record."""
    for c in out.glob("checkpoint-*"):
        shutil.rmtree(c)
    if not keep_models:
        for f in out.glob("*.safetensors"):
            f.unlink()
    done.write_text(json.dumps(result))
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(record)


# each curve point keeps the per-prompt scores and KLs too: the verdicts at equal generated completions and at
# matched KL along the checkpoints bootstrap over them
CURVE_KEYS = ("score", "kl", "greedy", "length", "eos", "hard_score", "hard_greedy", "long_score", "long_greedy",
              "per_prompt_score", "per_prompt_kl")  # fmt: skip


def checkpoint_curve(task: Task, checkpoints: list[Path], stats: dict, final: dict, ref, tokenizer,
                     prompts: list, seed: int, samples: int) -> list[dict]:  # fmt: skip
    """A run's learning curve: the evaluation of each checkpoint and of the final model (``final``), with
    the optimizer steps, generated completions and training seconds up to it (the run's clock times the
    share of its steps: its steps cost about the same). Checkpoints are evaluated on the held-out split
    only; the further splits (``hard``, ``long``) are evaluated on the final model alone (they were half of the
    evaluation time and no curve or verdict reads them)."""
    total = max(stats["optimizer_steps"], 1)
    points = []
    for path, ev in [*((c, None) for c in checkpoints), (None, final)]:
        n = int(path.name.split("-")[1]) if path is not None else stats["optimizer_steps"]
        ev = ev or evaluate_folder(task, path, ref, tokenizer, prompts, seed, samples)
        points.append({"optimizer_steps": n, "generated_completions": round(n / total * stats["generated_completions"]),
                       "train_seconds": round(n / total * stats["wall_time_s"], 1),
                       **{k: ev[k] for k in CURVE_KEYS if k in ev}})  # fmt: skip
    return points


# ----------------------------------------------------------------------------- the sweep


def prepare_bases(task: Task, cfg: SweepConfig, cache: Path, root: Path, runner: Runner) -> tuple[dict, dict]:
    """Each base LM of ``cfg``: ``{base seed: (data, model, tokenizer, held-out prompts)}`` (the task's
    stages, cached in ``cache``) and ``{base seed: its own evaluation and data info}`` (cached in
    ``root``)."""
    from ..loading import load_policy
    from .gold import deterministic_torch

    bases, base_results = {}, {}
    for b in cfg.bases:
        data = task.prepare(b, cache, runner, progress=cfg.progress)
        ref, tok = load_policy(data.base)
        prompts = data.eval_prompts[: cfg.n_eval] if cfg.n_eval else data.eval_prompts
        bases[b] = (data, ref, tok, prompts)
        path = root / f"base{b}-{fingerprint([data.base.name, prompts, cfg.eval_samples, _extra(data, cfg)])}.json"
        if not path.is_file():
            with deterministic_torch(1):
                ev = task.evaluate(ref, tok, ref, prompts, seed=1234 + b, samples_per_prompt=cfg.eval_samples,
                                   extra=_extra(data, cfg))  # fmt: skip
            path.write_text(json.dumps(ev))
        base_results[b] = {**json.loads(path.read_text()), **data.info}
    return bases, base_results


def _slim(r: dict) -> dict:
    """A run's result without its per-prompt lists and training log (in the records, not in results.json)."""
    out = {**{k: v for k, v in r.items() if k != "train_log"},
           "eval": {k: v for k, v in r["eval"].items() if not k.startswith("per_prompt")}}  # fmt: skip
    if "curve" in r:
        out["curve"] = [{k: v for k, v in p.items() if not k.startswith("per_prompt")} for p in r["curve"]]
    return out


def run_state(task: Task, cfg: SweepConfig, root: Path, bases: dict, run: tuple, runner: Runner) -> tuple[str, str]:
    """``(folder name, state)`` of one run ``(method, knob, base, seed)``: its result is in the records
    ("recorded"), in the cache ("cached") or still to train ("to train")."""
    method, knob, b, s = run
    data, _, _, prompts = bases[b]
    _, _, folder, done, record = run_paths(task, method, knob, data, s, cfg, root, prompts, runner)
    state = "recorded" if record is not None and record.is_file() else "cached" if done.is_file() else "to train"
    return folder.name, state


def plan_sweep(task: Task, cfg: SweepConfig, root: Path, bases: dict, runs: list, runner: Runner) -> dict:
    """What a sweep would do, without training: each run's folder and whether its result is in the records
    ("recorded"), in the cache ("cached") or still to train ("to train"), one line each, and a count."""
    plan = []
    for run in runs:
        folder, state = run_state(task, cfg, root, bases, run, runner)
        plan.append({"run": folder, "state": state})
        log(f"{task.name} plan: {folder}: {state}")
    left = sum(p["state"] == "to train" for p in plan)
    log(f"{task.name} plan: {len(plan) - left} of {len(plan)} runs done, {left} to train")
    return {"task": task.name, "plan": plan}


def run_sweep(task: Task, cfg: SweepConfig, cache: Path, out_dir: Path, runner: Runner) -> dict:
    """Every run of ``cfg`` on ``task`` (cached; trained by ``runner``), the summary, the verdicts,
    ``report.md``, ``frontier.png``, ``efficiency.png`` and ``results.json`` in ``out_dir``; returns
    the results."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    unknown += [f"{a} (base {s.get('base')})" for a, s in cfg.attempts.items() if s.get("base") not in METHODS]
    if unknown:
        raise SqlmError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    methods = cfg.all_methods(task.name)
    t = time.time()
    for method in methods:  # the code part of every run's key, before any run (cached in this process)
        training_key(task, method, runner)
    log(f"{task.name}: training-code canaries of {len(methods)} methods in {time.time() - t:.1f}s")
    t0 = time.time()
    root = cache / "sweeps" / task.name
    root.mkdir(parents=True, exist_ok=True)
    bases, base_results = prepare_bases(task, cfg, cache, root, runner)
    runs = [(m, knob, b, s) for m in methods for knob in cfg.values(m, task) for b in cfg.bases for s in cfg.seeds]
    if cfg.plan:
        return plan_sweep(task, cfg, root, bases, runs, runner)
    missing = []  # report_only: the runs left out, still to train
    if cfg.report_only:
        states = [run_state(task, cfg, root, bases, run, runner) for run in runs]
        missing = [folder for folder, state in states if state == "to train"]
        runs = [run for run, (_, state) in zip(runs, states, strict=True) if state != "to train"]
        if not runs:
            raise SqlmError(
                f"report_only: no run of the {task.name} sweep is recorded or cached yet; nothing to report"
            )
        log(f"{task.name}: reporting the {len(runs)} runs done; {len(missing)} not trained yet, left out")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    bar = _bar(len(runs), f"{task.name} runs", cfg.progress)
    for method, knob, b, s in runs:
        data, ref, tok, prompts = bases[b]
        results.append(run_one(task, method, knob, data, s, cfg, root, ref, tok, prompts, runner))
        bar.update(1)
    bar.close()
    failed = [r for r in results if "failed" in r]
    ok = [r for r in results if "failed" not in r]
    table = summarize(ok, methods)
    verdicts = compare_methods(ok, base_results, methods, cfg.n_boot)
    plot_frontier(table, base_results, task, out_dir / "frontier.png")
    plot_efficiency(table, base_results, task, out_dir / "efficiency.png")
    curves = curve_table(ok, methods)
    along = curve_verdicts(ok, base_results, methods, cfg.n_boot) if curves else []
    if curves:
        plot_curves(curves, base_results, task, out_dir / "curves.png")
        plot_checkpoint_frontier(curves, base_results, task, out_dir / "frontier_checkpoints.png")
    wall = time.time() - t0
    extra = curve_lines(curves, along, task.metric) if curves else []
    report = write_report(task, cfg, ok, failed, base_results, table, verdicts, out_dir, wall, extra, missing)
    slim = [_slim(r) for r in ok]
    res = {"task": task.name, "metric": task.metric, "runs": slim, "failed": failed, "table": list(table.values()),
           "verdicts": verdicts, "curves": curves, "curve_verdicts": along, "bases": {str(b): {k: v for k, v in r.items() if not k.startswith("per_prompt")}
                                           for b, r in base_results.items()},
           "wall_s": wall, "report": str(report), "not_trained": missing}  # fmt: skip
    (out_dir / "results.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="run")
