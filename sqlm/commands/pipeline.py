"""``sqlm pipeline [RECIPE.yaml] [--key value ...]``: the embedded gold-reward task, end to end.

base LM -> preference data -> reward model -> sqlm and DPO sweeps over tau = beta -> eval -> report.

1. **Base LM** (``pi_ref``): trained once on English text and cached (``sqlm.evaluation.gold``).
2. **Preference data**: ``samples_per_prompt`` base-model samples for each of ``n_train_prompts``
   held-out prefixes, pairs labelled by the gold reward (VADER sentiment).
3. **Reward model**: ``sqlm reward recipes/gold/reward/config.yaml`` on those pairs.
4. **Sweeps**: for every tau in ``taus``, ``sqlm train recipes/gold/sqlm/config.yaml`` once per
   rewarder in ``rewarders`` (reward model -> per-token rewards), and ``sqlm dpo
   recipes/gold/dpo/config.yaml`` with beta = tau -- the same pairs, tokens, model, seed, steps.
5. **Eval**: ``sqlm eval`` (:mod:`sqlm.evaluation.evaluate`) on ``n_eval_prompts`` other held-out prefixes.
6. **Exact oracle**: KL(pi || pi*) against the number of pairs (``oracle_compare``).

Every artefact is cached under ``cache_dir`` (default ``$SQLM_CACHE`` or ``~/.cache/sqlm``) in a
folder named by a hash of everything it depends on, so a second run reuses what is done and redoes
only what changed. ``reduced: true`` is a small setting for CI (under 3 minutes on 2 CPU cores).
The report goes to ``output_dir/report.md`` with ``frontier.png`` beside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SqlmError
from ..evaluation.gold import GoldTaskConfig, default_cache_dir, fingerprint
from ..recipe import split_argv, wants_help


RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "gold"


@dataclass
class PipelineArguments:
    """Settings of ``sqlm pipeline`` beyond the base model's (:class:`GoldTaskConfig`)."""

    output_dir: str = field(default="outputs/gold", metadata={"help": "Where report.md and frontier.png go."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Artefact cache; default $SQLM_CACHE or ~/.cache/sqlm."}
    )
    reduced: bool = field(default=False, metadata={"help": "A small CI setting: tiny base LM, few prompts and steps."})
    recipes_dir: str | None = field(
        default=None, metadata={"help": "Folder with sqlm/, dpo/, reward/ recipes; default recipes/gold."}
    )
    n_train_prompts: int = field(default=600, metadata={"help": "Prompts of the preference data."})
    n_eval_prompts: int = field(default=256, metadata={"help": "Held-out prompts of the evaluation."})
    samples_per_prompt: int = field(default=6, metadata={"help": "Base-model samples per preference prompt."})
    max_pairs_per_prompt: int = field(default=6, metadata={"help": "Pairs kept per prompt (widest gold gaps)."})
    taus: list[float] = field(
        default_factory=lambda: [0.03, 0.1, 0.3, 1.0, 3.0], metadata={"help": "The tau = beta sweep."}
    )
    rewarders: list[str] = field(
        default_factory=lambda: ["terminal", "abc"],
        metadata={"help": "sqlm rewarders (sqlm.rewards): terminal, uniform, abc, prefix."},
    )
    loss_type: str = field(default="unified_pcl", metadata={"help": "sqlm loss of the sweep (sqlm.losses.LOSSES)."})
    sqlm_mode: str = field(
        default="mixed",
        metadata={
            "help": "Where sqlm's trajectories come from: 'mixed' (the pairs plus the policy's own samples scored "
            "by the reward model, mix_ratio of the recipe), 'offline' (the pairs only, like DPO) or 'online'."
        },
    )
    train_epochs: float = field(default=1.0, metadata={"help": "Epochs of every sqlm and DPO run."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of every sqlm and DPO run."})
    batch_size: int = field(default=16, metadata={"help": "Pairs per step of every sqlm and DPO run."})
    max_steps: int = field(default=-1, metadata={"help": "Step limit of every run (-1: train_epochs)."})
    rm_epochs: float = field(default=2.0, metadata={"help": "Reward-model epochs."})
    eval_samples_per_prompt: int = field(default=2, metadata={"help": "Completions per eval prompt and model."})
    eval_seed: int = field(default=1234, metadata={"help": "Sampling seed of the evaluation."})
    oracle: bool = field(default=True, metadata={"help": "Add the exact-oracle comparison to the report."})
    oracle_pairs: list[int] = field(
        default_factory=lambda: [32, 128, 512], metadata={"help": "Pair counts of the oracle comparison."}
    )
    oracle_seeds: list[int] = field(
        default_factory=lambda: [0, 1], metadata={"help": "Seeds of the oracle comparison."}
    )
    oracle_steps: int = field(default=80, metadata={"help": "Full-batch steps per oracle-comparison run."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    quiet: bool = field(default=True, metadata={"help": "Hide the trainers' own logs (errors still show)."})


REDUCED = {
    "gold": dict(corpus_sentences=3000, heldout_sentences=600, vocab_size=384, hidden_size=48,
                 num_hidden_layers=2, num_attention_heads=4, lm_steps=60, lm_batch_size=32, max_new_tokens=12),
    "pipe": dict(n_train_prompts=150, n_eval_prompts=24, samples_per_prompt=4, max_pairs_per_prompt=3,
                 taus=[0.3, 3.0], rewarders=["terminal"], max_steps=6, rm_epochs=1.0, eval_samples_per_prompt=1,
                 oracle_pairs=[8, 32], oracle_seeds=[0], oracle_steps=15),
}  # fmt: skip


def apply_reduced(args: PipelineArguments, gold: GoldTaskConfig, explicit: set[str]) -> None:
    """Switch to the CI setting, keeping any value the user set explicitly."""
    for k, v in REDUCED["gold"].items():
        if k not in explicit:
            setattr(gold, k, v)
    for k, v in REDUCED["pipe"].items():
        if k not in explicit:
            setattr(args, k, v)


# ----------------------------------------------------------------------------- helpers


def _log(msg: str) -> None:
    print(f"[sqlm pipeline] {msg}", flush=True)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence a trainer's stdout and info logs; warnings and errors still show on stderr."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(old)


def _done(path: Path) -> bool:
    return (path / "done.json").is_file()


def _mark_done(path: Path, info: dict) -> None:
    (path / "done.json").write_text(json.dumps(info, indent=1, default=str))


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fmt_param(x: float) -> str:
    return format(x, "g")


# ----------------------------------------------------------------------------- stages


def stage_base(gold: GoldTaskConfig, cache: Path, progress: bool) -> Path:
    from ..evaluation.gold import base_model_dir, build_base_model

    if (base_model_dir(gold, cache) / "base_lm.json").is_file():
        _log(f"base LM: cached at {base_model_dir(gold, cache)}")
        return base_model_dir(gold, cache)
    _log("base LM: pretraining on essential-generators English text (once; cached)")
    t = time.time()
    path = build_base_model(gold, cache, progress=progress)
    _log(f"base LM: done in {time.time() - t:.0f}s -> {path}")
    return path


def stage_preferences(args: PipelineArguments, gold: GoldTaskConfig, base: Path, cache: Path) -> Path:
    from ..evaluation.gold import load_base, sample_preferences, split_prompts

    key = dict(base=base.name, n_train=args.n_train_prompts, n_eval=args.n_eval_prompts, k=args.samples_per_prompt,
               max_pairs=args.max_pairs_per_prompt, seed=gold.seed, new=gold.max_new_tokens, words=gold.prompt_words)  # fmt: skip
    out = cache / "gold" / f"prefs-{fingerprint(key)}"
    if _done(out):
        _log(f"preference data: cached at {out}")
        return out
    _fresh(out)
    model, tok = load_base(base)
    train_prompts, eval_prompts = split_prompts(base, gold, args.n_train_prompts, args.n_eval_prompts)
    rows = sample_preferences(
        model, tok, train_prompts, args.samples_per_prompt, gold.max_new_tokens, seed=gold.seed + 1,
        max_pairs_per_prompt=args.max_pairs_per_prompt, progress=args.progress,
    )  # fmt: skip
    if not rows:
        raise SqlmError(
            "the base model's samples gave no preference pairs (all gold scores tied); raise n_train_prompts"
        )
    _write_jsonl(out / "train.jsonl", rows)
    (out / "eval_prompts.json").write_text(json.dumps(eval_prompts))
    _mark_done(out, {**key, "pairs": len(rows)})
    _log(f"preference data: {len(rows)} pairs from {len(train_prompts)} prompts -> {out}")
    return out


def _recipe(args: PipelineArguments, kind: str) -> str:
    root = Path(args.recipes_dir) if args.recipes_dir else RECIPES
    path = root / kind / "config.yaml"
    if not path.is_file():
        raise SqlmError(f"recipe not found: {path} (recipes_dir)")
    return str(path)


def _run_main(module_main, argv: list[str], quiet: bool) -> None:
    if quiet:
        argv = argv + ["--disable_tqdm", "true"]
    with _quiet(quiet):
        code = module_main(argv)
    if code:
        raise SqlmError(f"a pipeline step failed with exit code {code}: {' '.join(argv)}")


def stage_reward_model(args: PipelineArguments, prefs: Path, base: Path, cache: Path) -> Path:
    recipe = _recipe(args, "reward")
    key = dict(prefs=prefs.name, base=base.name, epochs=args.rm_epochs, recipe=Path(recipe).read_text())
    out = cache / "gold" / f"rm-{fingerprint(key)}"
    if _done(out):
        _log(f"reward model: cached at {out}")
        return out
    from .reward import main as reward_main

    _fresh(out)
    t = time.time()
    argv = [recipe, "--model_name_or_path", str(base), "--dataset_name", str(prefs / "train.jsonl"),
            "--output_dir", str(out), "--num_train_epochs", str(args.rm_epochs)]  # fmt: skip
    _run_main(reward_main, argv, args.quiet)
    info = {}
    if (out / "reward_eval.json").is_file():
        info = json.loads((out / "reward_eval.json").read_text())
    _mark_done(out, info)
    acc = info.get("eval_accuracy")
    _log(
        f"reward model: trained in {time.time() - t:.0f}s"
        + (f", held-out pair accuracy {acc:.3f}" if acc is not None else "")
        + f" -> {out}"
    )
    return out


def _train_sqlm(argv: list[str]) -> int:
    """``sqlm train`` in this process."""
    from .train import main as train_main

    return train_main(argv)


def _train_flags(args: PipelineArguments) -> list[str]:
    flags = ["--learning_rate", str(args.learning_rate), "--per_device_train_batch_size", str(args.batch_size)]
    if args.max_steps > 0:
        flags += ["--max_steps", str(args.max_steps)]
    else:
        flags += ["--num_train_epochs", str(args.train_epochs)]
    return flags


# sqlm's own training code: a cached run is redone when any of it changes (a changed default or fix
# must not hide behind an old result)
_TRAINING_CODE = ("soft.py", "losses.py", "fused.py", "forward.py", "trainer.py", "data.py", "rollout.py",
                  "config.py", "tiny.py", "loading.py", "rewards", "commands/train.py", "commands/dpo.py",
                  "commands/reward.py")  # fmt: skip


def training_code_fingerprint() -> str:
    """A hash of the source of sqlm's training code (:data:`_TRAINING_CODE`)."""
    root = Path(__file__).resolve().parent.parent
    files: list[Path] = []
    for name in _TRAINING_CODE:
        p = root / name
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return fingerprint({str(f.relative_to(root)): f.read_text(encoding="utf-8") for f in files if f.is_file()})


def stage_run(
    args: PipelineArguments, method: str, tau: float, prefs: Path, base: Path, rm: Path, cache: Path
) -> Path:
    """One training run: ``dpo`` or ``sqlm-<rewarder>`` at tau = beta."""
    kind = "dpo" if method == "dpo" else "sqlm"
    recipe = _recipe(args, kind)
    flags = _train_flags(args)
    if kind == "sqlm" and args.sqlm_mode != "offline":
        # online and mixed batches count sequences (a row = num_generations of them, 2 by default):
        # the same rows a step as DPO's pairs
        flags[flags.index("--per_device_train_batch_size") + 1] = str(2 * args.batch_size)
        flags += ["--num_generations", "2"]
    key = dict(method=method, tau=tau, prefs=prefs.name, base=base.name, flags=flags, recipe=Path(recipe).read_text(),
               loss=args.loss_type if kind == "sqlm" else None, rm=rm.name if kind == "sqlm" else None,
               mode=args.sqlm_mode if kind == "sqlm" else None,
               code=training_code_fingerprint())  # fmt: skip
    out = cache / "gold" / f"run-{method}-{_fmt_param(tau)}-{fingerprint(key)}"
    if _done(out):
        return out
    _fresh(out)
    argv = [recipe, "--model_name_or_path", str(base), "--dataset_name", str(prefs / "train.jsonl"),
            "--output_dir", str(out), *flags]  # fmt: skip
    t = time.time()
    if kind == "dpo":
        from .dpo import main as dpo_main

        _run_main(dpo_main, argv + ["--beta", str(tau)], args.quiet)
    else:
        rewarder = method.split("-", 1)[1]
        rkw = json.dumps({rewarder: {"reward_model": str(rm)}})
        argv += ["--tau", str(tau), "--loss_type", args.loss_type, "--mode", args.sqlm_mode,
                 "--reward_funcs", rewarder, "--reward_kwargs", rkw]  # fmt: skip
        _run_main(_train_sqlm, argv, args.quiet)
    _mark_done(out, {**key, "seconds": time.time() - t})
    _log(f"{method} tau=beta={_fmt_param(tau)}: trained in {time.time() - t:.0f}s")
    return out


def stage_eval(args: PipelineArguments, gold: GoldTaskConfig, runs: dict, base: Path, prefs: Path) -> dict:
    from ..evaluation.evaluate import ModelSpec, evaluate_models

    prompts = json.loads((prefs / "eval_prompts.json").read_text())
    settings = dict(n=len(prompts), k=args.eval_samples_per_prompt, seed=args.eval_seed, new=gold.max_new_tokens)
    skey = fingerprint(settings)
    specs, cache = [], {}
    for (method, tau), path in runs.items():
        spec = ModelSpec(name=f"{method}@{_fmt_param(tau)}", path=str(path), method=method, param=tau)
        specs.append(spec)
        f = path / f"eval-{skey}.json"
        if f.is_file():
            cache[spec.name] = json.loads(f.read_text())
    ref_file = prefs / f"eval-reference-{skey}.json"
    if ref_file.is_file():
        cache["reference"] = json.loads(ref_file.read_text())
    before = set(cache)
    results = evaluate_models(
        specs, str(base), prompts, samples_per_prompt=args.eval_samples_per_prompt,
        max_new_tokens=gold.max_new_tokens, seed=args.eval_seed, progress=args.progress, cache=cache,
    )  # fmt: skip
    for spec in specs:
        if spec.name not in before:
            (Path(spec.path) / f"eval-{skey}.json").write_text(json.dumps(cache[spec.name]))
    if "reference" not in before:
        ref_file.write_text(json.dumps(cache["reference"]))
    return results


def stage_oracle(args: PipelineArguments, cache: Path) -> dict:
    from ..evaluation.oracle_compare import OracleCompareConfig, run_oracle_comparison

    cfg = OracleCompareConfig(pair_counts=list(args.oracle_pairs), seeds=list(args.oracle_seeds), steps=args.oracle_steps,
                              rm_steps=args.oracle_steps)  # fmt: skip
    out = cache / "gold" / f"oracle-{fingerprint(asdict(cfg))}.json"
    if out.is_file():
        _log(f"exact oracle comparison: cached at {out}")
        return json.loads(out.read_text())
    t = time.time()
    res = run_oracle_comparison(cfg, progress=args.progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res))
    _log(f"exact oracle comparison: done in {time.time() - t:.0f}s")
    return res


# ----------------------------------------------------------------------------- the whole thing


def run_pipeline(args: PipelineArguments, gold: GoldTaskConfig) -> dict:
    """Run (or reuse) every stage and write the report; returns ``{"report", "results", "oracle", ...}``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.taus or any(t <= 0 for t in args.taus):
        raise SqlmError(f"key 'taus' must be a non-empty list of numbers > 0, got {args.taus}")
    from ..rewards.registry import REWARD_MODEL_REWARDERS

    bad = [r for r in args.rewarders if r not in REWARD_MODEL_REWARDERS]
    if bad:
        raise SqlmError(f"key 'rewarders': unknown {bad}; choose from {', '.join(REWARD_MODEL_REWARDERS)}")
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    t0 = time.time()
    base = stage_base(gold, cache, args.progress)
    prefs = stage_preferences(args, gold, base, cache)
    rm = stage_reward_model(args, prefs, base, cache)
    runs = {}
    methods = ["dpo"] + [f"sqlm-{r}" for r in args.rewarders]
    for tau in args.taus:
        for method in methods:
            runs[(method, tau)] = stage_run(args, method, tau, prefs, base, rm, cache)
    _log("evaluating every model on held-out prompts")
    results = stage_eval(args, gold, runs, base, prefs)
    oracle = stage_oracle(args, cache) if args.oracle else None

    from ..evaluation.evaluate import write_report
    from ..evaluation.oracle_compare import oracle_section

    info = json.loads((prefs / "done.json").read_text())
    rm_info = json.loads((rm / "done.json").read_text())
    base_info = json.loads((base / "base_lm.json").read_text())
    acc = rm_info.get("eval_accuracy")
    preamble = (
        f"Embedded gold-reward task: base LM ({gold.hidden_size}-wide, {gold.num_hidden_layers} layers, "
        f"BPE vocabulary {gold.vocab_size}, final pretraining loss {base_info['final_loss']:.2f}) trained on "
        f"{gold.corpus_sentences} essential-generators sentences; {info['pairs']} preference pairs from "
        f"{args.n_train_prompts} prompts × {args.samples_per_prompt} samples labelled by VADER sentiment; reward model "
        f"held-out pair accuracy {'–' if acc is None else f'{acc:.3f}'}. sqlm ({args.loss_type}, {args.sqlm_mode}, rewarders "
        f"{', '.join(args.rewarders)}) and DPO (sigmoid) train on the same pairs and tokens with the same steps, "
        + (
            ""
            if args.sqlm_mode == "offline"
            else "sqlm also on its own samples scored by the reward model fitted to those pairs (no other data), "
        )
        + f"learning rate {args.learning_rate} and batch {args.batch_size}, for τ = β ∈ {args.taus}."
    )
    sections = [oracle_section(oracle)] if oracle else []
    report = write_report(
        results, args.output_dir, title="Gold reward vs KL: sqlm vs DPO", preamble=preamble, sections=sections
    )
    elapsed = time.time() - t0
    _log(f"done in {elapsed:.0f}s; report: {report}")
    print(f"report: {Path(report).resolve()}")
    return {"report": str(report), "results": results, "oracle": oracle, "seconds": elapsed}


def recipe_dataclasses():
    """The config classes a ``sqlm pipeline`` recipe parses into."""
    return PipelineArguments, GoldTaskConfig


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if wants_help(argv):
        print("usage: sqlm pipeline [RECIPE.yaml] [--key value ...]\n\n" + (__doc__ or ""))
        return 0
    from ..recipe import load_yaml, parse_recipe

    recipe, overrides = split_argv(argv)
    args, gold = parse_recipe(recipe_dataclasses(), recipe, overrides)
    if args.reduced:
        explicit = {a[2:].split("=", 1)[0].replace("-", "_") for a in overrides if a.startswith("--")}
        if recipe is not None:
            explicit |= set(load_yaml(recipe))
        apply_reduced(args, gold, explicit)
    run_pipeline(args, gold)
    return 0
