"""``sqlm pipeline [RECIPE.yaml] [--key value ...]``: sqlm against what users pick today, on both
embedded gold tasks, end to end, like for like.

For each task (``sentiment``: controlled-sentiment generation scored by VADER, trained through a
reward model fitted to preference pairs; ``arithmetic``: multi-digit addition with a worked trace,
rewarded by an exact checker):

1. **Base LM** (``pi_ref``), pretrained once, deterministically, and cached.
2. **Data**: the prompts of the online runs, preference pairs of base samples for the offline runs,
   held-out evaluation prompts (sentiment also a Bradley-Terry reward model on the pairs).
3. **Sweep** (:mod:`sqlm.evaluation.sweep`): sqlm online / mixed / offline against TRL's GRPO, RLOO
   and DPO, every method through its own ``sqlm`` command with the same budget, at each value of its KL
   knob, per base LM and training seed.
4. **Evaluation** on the held-out prompts, **verdicts** at matched KL with bootstrap intervals, and
   a report per task (``output_dir/<task>/report.md`` with ``frontier.png`` and ``efficiency.png``).
5. **Exact oracle**: DPO and sqlm on token MDPs solved exactly, KL(pi || pi*) against the number of
   pairs (``oracle_compare``).

The default is one base LM and one training seed at each method's default knob value (about 10
minutes on 2 CPU cores from a cold cache); ``--full true`` runs the full tables: 2 base LMs x 3 training
seeds, every method's knob sweep, half-way evaluations for the efficiency plot. Every stage and run
is cached under ``cache_dir`` (default ``$SQLM_CACHE`` or ``~/.cache/sqlm``) by a hash of everything it
depends on, a run also by its method's behavioural canary (:mod:`sqlm.evaluation.canary`: what a few
deterministic steps of the method do, not its source text), so a rerun does only what changed (``--full true`` after
the default reuses its runs). ``--reduced true`` is the CI setting (tiny base LMs, a few steps).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SqlmError
from ..recipe import split_argv, wants_help


@dataclass
class PipelineArguments:
    """Settings of ``sqlm pipeline``."""

    output_dir: str = field(
        default="outputs/pipeline", metadata={"help": "Where report.md and each task's report go."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Artefact cache; default $SQLM_CACHE or ~/.cache/sqlm."}
    )
    tasks: list[str] = field(
        default_factory=lambda: ["sentiment", "arithmetic"],
        metadata={
            "help": "Gold tasks to run: sentiment, arithmetic (tiny LMs sqlm pretrains; the default), chat_arithmetic, "
            "chat_sentiment (SmolLM2-135M-Instruct with LoRA)."
        },
    )
    methods: list[str] | None = field(
        default=None,
        metadata={
            "help": "Methods (sqlm.evaluation.sweep.METHODS): sqlm-online, sqlm-mixed, grpo, rloo, sqlm-offline, "
            "dpo. Default: all."
        },
    )
    full: bool = field(
        default=False,
        metadata={
            "help": "The full tables: 2 base LMs x 3 training seeds, every method's knob sweep, half-way "
            "evaluations of the online runs (hours on a CPU)."
        },
    )
    reduced: bool = field(default=False, metadata={"help": "A small CI setting: tiny base LMs, a few steps."})
    bases: list[int] | None = field(default=None, metadata={"help": "Base-LM seeds (default [0]; with full [0, 1])."})
    seeds: list[int] | None = field(
        default=None, metadata={"help": "Training seeds (default [0]; with full [0, 1, 2])."}
    )
    knobs: dict | str | None = field(
        default=None,
        metadata={"help": 'Knob values per method, e.g. {"sqlm-online": [0.1, 0.3]} (default: each method\'s).'},
    )
    attempts: dict | str | None = field(
        default=None,
        metadata={
            "help": "Variants of a method, run and judged like it: {name: {base: METHOD, flags: [--key, value, ...], "
            "values: [knob values], tasks: [the tasks it runs on; default all], compare: [the methods or attempts it is "
            "judged against; default its base's]}}; '{name}' in a flag is the task's "
            "info[name]: '{reward_model}' its reward model (sentiment, chat_sentiment), '{implicit_model}' its DPO "
            "policy and '{base_model}' its base LM (chat_sentiment)."
        },
    )
    compare: dict | str | None = field(
        default=None,
        metadata={
            "help": 'The baselines a method is judged against, in place of its own, e.g. {"sqlm-mixed": ["grpo", '
            '"rloo", "sqlm-online"]} (methods or attempts; default: sqlm methods against TRL\'s, online GRPO and '
            "RLOO, offline DPO). Only the report changes: no run is trained again."
        },
    )
    steps: int | None = field(default=None, metadata={"help": "Optimizer steps of every run (default: the task's)."})
    n_eval: int | None = field(
        default=None, metadata={"help": "Held-out prompts per base LM (default 128; with full every prepared one)."}
    )
    eval_samples: int = field(default=1, metadata={"help": "Temperature-1 samples per held-out prompt and model."})
    curve: int = field(
        default=0,
        metadata={
            "help": "Also evaluate every run at this many evenly spaced checkpoints before its end: its learning "
            "curve and more points of its reward-KL path (0: none)."
        },
    )
    records: str | None = field(
        default=None,
        metadata={
            "help": "A folder (e.g. under version control) that also keeps every finished run's result as "
            "<task>/<run>.json, read before the cache: a sweep resumes from it on another machine."
        },
    )
    n_boot: int = field(default=1000, metadata={"help": "Bootstrap replicates of every verdict."})
    keep_models: bool = field(default=False, metadata={"help": "Keep every run's weights in the cache."})
    oracle: bool = field(default=True, metadata={"help": "Add the exact-oracle comparison to the report."})
    oracle_pairs: list[int] = field(
        default_factory=lambda: [32, 128, 512], metadata={"help": "Pair counts of the oracle comparison."}
    )
    oracle_seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds of the oracle comparison."})
    oracle_steps: int = field(default=80, metadata={"help": "Full-batch steps per oracle-comparison run."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    plan: bool = field(
        default=False,
        metadata={
            "help": "List every run of the sweep (its cache folder, named by its key) and whether its result is "
            "recorded, cached or still to train; trains no run and writes no report (base LMs and data are "
            "prepared as usual, from the cache where they are)."
        },
    )
    report_only: bool = field(
        default=False,
        metadata={
            "help": "Write the reports from the runs already recorded or cached and train none (a resumable "
            "sweep's table so far); the report names the runs still to train."
        },
    )

    def __post_init__(self):
        from ..config import as_mapping
        from ..evaluation.sweep import METHODS
        from ..evaluation.tasks import TASKS

        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise SqlmError(f"key 'tasks': unknown {bad or self.tasks}; choose from {', '.join(TASKS)}")
        bad = [m for m in self.methods or [] if m not in METHODS]
        if bad:
            raise SqlmError(f"key 'methods': unknown {bad}; choose from {', '.join(METHODS)}")
        self.knobs = as_mapping(self.knobs, "knobs") or {}
        for m, values in self.knobs.items():
            if m not in METHODS:
                raise SqlmError(f"key 'knobs': unknown method '{m}'; choose from {', '.join(METHODS)}")
            if not isinstance(values, list) or not values or any(not isinstance(v, (int, float)) for v in values):
                raise SqlmError(f"key 'knobs': '{m}' must map to a non-empty list of numbers, got {values!r}")
            if METHODS[m].knob == "tau" and any(v <= 0 for v in values):
                raise SqlmError(f"key 'knobs': tau of '{m}' must be > 0, got {values}")
        self.attempts = as_mapping(self.attempts, "attempts") or {}
        for name, spec in self.attempts.items():
            if name in METHODS or not isinstance(spec, dict) or spec.get("base") not in METHODS:
                raise SqlmError(
                    f"key 'attempts': '{name}' must be a new name mapping to {{base: one of {', '.join(METHODS)}, "
                    f"flags: [...], values: [...]}}, got {spec!r}"
                )
            flags, values, tasks = spec.get("flags", []), spec.get("values", []), spec.get("tasks", [])
            compare = spec.get("compare", [])
            lists = all(isinstance(x, list) for x in (flags, values, tasks, compare))
            if set(spec) - {"base", "flags", "values", "tasks", "compare"} or not lists or set(tasks) - set(TASKS):
                raise SqlmError(
                    f"key 'attempts': '{name}' takes base, flags, values, tasks and compare (lists; tasks of "
                    f"{', '.join(TASKS)}; compare of methods and other attempts), got {spec!r}"
                )
            check_baselines("attempts", name, compare, set(self.attempts) - {name}, "another attempt")
            spec["flags"] = [str(f) for f in flags]
        self.compare = as_mapping(self.compare, "compare") or {}
        for m, against in self.compare.items():
            if m not in METHODS:
                raise SqlmError(f"key 'compare': unknown method '{m}'; choose from {', '.join(METHODS)}")
            if not isinstance(against, list) or any(not isinstance(b, str) for b in against):
                raise SqlmError(f"key 'compare': '{m}' must map to a list of method names, got {against!r}")
            check_baselines("compare", m, against, set(self.attempts), "an attempt")
            if m in against:
                raise SqlmError(f"key 'compare': '{m}' compares against itself")
        for key in ("steps", "n_eval"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise SqlmError(f"key '{key}' must be >= 1, got {v}")
        if self.curve < 0:
            raise SqlmError(f"key 'curve' must be >= 0, got {self.curve}")
        if self.eval_samples < 1:
            raise SqlmError(f"key 'eval_samples' must be >= 1, got {self.eval_samples}")

    def sweep_config(self):
        from ..evaluation.sweep import METHODS, SweepConfig

        full = self.full and not self.reduced
        return SweepConfig(
            methods=list(self.methods or METHODS),
            bases=list(self.bases if self.bases is not None else ([0, 1] if full else [0])),
            seeds=list(self.seeds if self.seeds is not None else ([0, 1, 2] if full else [0])),
            full=full,
            knobs={k: list(v) for k, v in self.knobs.items()},
            steps=self.steps,
            n_eval=self.n_eval if self.n_eval is not None else (None if full or self.reduced else 128),
            eval_samples=self.eval_samples,
            mid_eval=full,
            curve=self.curve,
            records=Path(self.records) if self.records else None,
            n_boot=100 if self.reduced else self.n_boot,
            keep_models=self.keep_models,
            progress=self.progress,
            attempts=dict(self.attempts),
            compare={k: list(v) for k, v in self.compare.items()},
            plan=self.plan,
            report_only=self.report_only,
        )


def check_baselines(key: str, name: str, against: list[str], attempts: set[str], other: str) -> None:
    """One line naming the recipe ``key`` and ``name`` where a baseline in ``against`` is neither a method nor
    one of ``attempts`` (``other`` says which: "another attempt", "an attempt")."""
    from ..evaluation.sweep import METHODS

    if unknown := set(against) - set(METHODS) - attempts:
        raise SqlmError(
            f"key '{key}': '{name}' compares against {sorted(unknown)}, which is neither a method "
            f"({', '.join(METHODS)}) nor {other}"
        )


REDUCED_ORACLE = dict(oracle_pairs=[8, 32], oracle_seeds=[0], oracle_steps=15)


# ----------------------------------------------------------------------------- running commands


def run_command(command: str, argv: list[str]) -> None:
    """``sqlm <command> argv`` in this process, its own output hidden (warnings and errors still
    show); a non-zero exit is an error naming the command line."""
    from transformers.utils import logging as hf_logging

    module = importlib.import_module(f"sqlm.commands.{'train' if command == 'sqlm' else command}")
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = module.main(argv)
    finally:
        hf_logging.set_verbosity(old)
    if code:
        raise SqlmError(f"a pipeline step failed with exit code {code}: sqlm {command} {' '.join(argv)}")


def stage_oracle(args: PipelineArguments, cache: Path) -> dict:
    from ..evaluation.gold import fingerprint
    from ..evaluation.oracle_compare import OracleCompareConfig, run_oracle_comparison
    from ..evaluation.tasks import log

    cfg = OracleCompareConfig(pair_counts=list(args.oracle_pairs), seeds=list(args.oracle_seeds), steps=args.oracle_steps,
                              rm_steps=args.oracle_steps)  # fmt: skip
    out = cache / "gold" / f"oracle-{fingerprint(asdict(cfg))}.json"
    if out.is_file():
        return json.loads(out.read_text())
    t = time.time()
    res = run_oracle_comparison(cfg, progress=args.progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res))
    log(f"exact oracle comparison: done in {time.time() - t:.0f}s")
    return res


# ----------------------------------------------------------------------------- the whole thing


def run_pipeline(args: PipelineArguments) -> dict:
    """Run (or reuse) every task's sweep, the oracle comparison, and write the reports; returns
    ``{"report", "tasks": {task: sweep results}, "oracle", "seconds"}``."""
    from ..evaluation.sweep import run_sweep
    from ..evaluation.tasks import env_defaults, get_task, log
    from ..paths import cache_dir as default_cache_dir

    env_defaults()
    if args.reduced:
        for k, v in REDUCED_ORACLE.items():
            setattr(args, k, v)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    out = Path(args.output_dir)
    cfg = args.sweep_config()
    t0 = time.time()
    results = {}
    for name in args.tasks:
        task = get_task(name, reduced=args.reduced)
        log(f"{name}: {len(cfg.methods)} methods, base LMs {cfg.bases}, seeds {cfg.seeds}")
        results[name] = run_sweep(task, cfg, cache, out / name, run_command)
        if not args.plan:
            log(f"{name}: report {out / name / 'report.md'}")
    if args.plan:
        return {"report": None, "tasks": results, "oracle": None, "seconds": time.time() - t0}
    oracle = stage_oracle(args, cache) if args.oracle else None
    report = write_summary(args, results, oracle, out, time.time() - t0)
    elapsed = time.time() - t0
    log(f"done in {elapsed:.0f}s")
    print(f"report: {report.resolve()}")
    return {"report": str(report), "tasks": results, "oracle": oracle, "seconds": elapsed}


def write_summary(args: PipelineArguments, results: dict, oracle: dict | None, out: Path, wall: float) -> Path:
    """``output_dir/report.md``: every task's verdicts and plots (its full report beside), and the
    exact-oracle section."""
    from ..evaluation.oracle_compare import oracle_section
    from ..evaluation.sweep_report import mean_pm_se, verdict_lines

    cfg = args.sweep_config()
    lines = ["# sqlm vs DPO, GRPO and RLOO on the embedded gold tasks", "",
             (f"Setting: {'full' if cfg.full else 'reduced (CI)' if args.reduced else 'default'}; base LMs {cfg.bases}, "
              f"training seeds {cfg.seeds}, {'every method’s knob sweep' if cfg.full else 'each method’s default knob value'}. "
              f"Wall time of this invocation: {wall / 60:.1f} min (cached stages and runs are reused)."), ""]  # fmt: skip
    for name, res in results.items():
        lines += [f"## {name} ({res['metric']})", "", f"Full report: [{name}/report.md]({name}/report.md).", ""]
        lines += ["| method | knob | runs | " + res["metric"] + " | KL |", "|---|---|---|---|---|"]
        for r in res["table"]:
            lines.append(
                f"| {r['method']} | {r['knob_name']}={r['knob']:g} | {r['n_runs']} | "
                f"{mean_pm_se(r['score'], r['score_se'], r['n_runs'])} | {mean_pm_se(r['kl'], r['kl_se'], r['n_runs'], 2)} |"
            )
        base = ", ".join(f"base {b}: {r['score']:.3f}" for b, r in res["bases"].items())
        lines += ["", f"Base LM {res['metric']}: {base}.", "", *verdict_lines(res["verdicts"], res["metric"]), ""]
        lines += [f"![{name} frontier]({name}/frontier.png)", ""]
        if res["failed"]:
            lines += [f"{len(res['failed'])} run(s) failed: see {name}/report.md.", ""]
    if oracle is not None:
        lines += [oracle_section(oracle)]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    summary = {
        name: {k: res[k] for k in ("metric", "table", "verdicts", "bases", "wall_s")} for name, res in results.items()
    }
    (out / "results.json").write_text(
        json.dumps(
            {"tasks": summary, "oracle": oracle, "wall_s": wall}, indent=1, default=str
        )  # runs: <task>/results.json
    )
    return path


def recipe_dataclasses():
    """The config classes a ``sqlm pipeline`` recipe parses into."""
    return (PipelineArguments,)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if wants_help(argv):
        print("usage: sqlm pipeline [RECIPE.yaml] [--key value ...]\n\n" + (__doc__ or ""))
        return 0
    from ..recipe import parse_recipe

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recipe, overrides = split_argv(argv)
    (args,) = parse_recipe(recipe_dataclasses(), recipe, overrides)
    run_pipeline(args)
    return 0
