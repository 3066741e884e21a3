"""sqlm against GRPO, RLOO and DPO on the arithmetic gold task, like for like, over seeds.

For each base LM seed and training seed, train every method at each value of its KL knob with the
same budget, evaluate each model on the held-out ``eval`` split, and report mean ± s.e. over runs and
matched-KL verdicts with bootstrap intervals (``sqlm.evaluation.compare``).

* **Online**: ``sqlm train --mode online`` (tau swept) vs ``sqlm grpo`` and ``sqlm rloo`` (beta swept,
  TRL's default included): the same base LM, train prompts, ``num_generations``,
  ``max_completion_length``, temperature 1, optimizer steps, learning rate, prompts per batch and
  seed; the reward is the exact checker ``arith_reward``.
* **Offline**: ``sqlm train --mode offline`` vs ``sqlm dpo`` on the same preference pairs (tau = beta).

Every run is cached under ``OUTPUT/runs/<method>-<hash of its inputs>/result.json``: a rerun resumes.
Each result logs generated completions and tokens, optimizer steps and wall time. Online runs also
save a checkpoint half-way, evaluated for ``efficiency_arithmetic.png``. Writes
``report_arithmetic.md``, ``frontier_arithmetic.png``, ``efficiency_arithmetic.png`` and
``results.json`` to ``--output_dir``.

    python scripts/exp_arithmetic_compare.py --output_dir outputs/arith_compare          # the full sweep
    python scripts/exp_arithmetic_compare.py --reduced --output_dir /tmp/arith_reduced   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "arithmetic"

# method -> (kind, recipe, knob name, knob values, extra overrides)
METHODS = {
    "sqlm-online": ("sqlm", "sqlm/config_online.yaml", "tau", [0.1, 0.3], []),
    "grpo": ("grpo", "grpo/config.yaml", "beta", [0.0, 0.1], []),
    "rloo": ("rloo", "rloo/config.yaml", "beta", [0.05, 0.2], []),
    "sqlm-offline": ("sqlm", "sqlm/config_offline.yaml", "tau", [0.1, 0.3], []),
    "dpo": ("dpo", "dpo/config.yaml", "beta", [0.1, 0.3], []),
}
ONLINE = ["sqlm-online", "grpo", "rloo"]
OFFLINE = ["sqlm-offline", "dpo"]
# Section-4 attempts: extra sqlm variants, each compared like the method it varies
# (kind, recipe, knob, values, extra overrides, the baselines it is compared with)
ATTEMPTS: dict[str, tuple] = {
    "sqlm-online-softq": ("sqlm", "sqlm/config_online.yaml", "tau", [0.1, 0.3], ["--loss_type", "soft_q"], ["grpo", "rloo"]),
    "sqlm-online-d8": ("sqlm", "sqlm/config_online.yaml", "tau", [0.1, 0.3], ["--rollout_length", "8"], ["grpo", "rloo"]),
    "sqlm-offline-d8": ("sqlm", "sqlm/config_offline.yaml", "tau", [0.1, 0.3], ["--rollout_length", "8"], ["dpo"]),
    # a smaller tau than the sweep (towards larger KL); one point, so compared with the base at KL 0
    "sqlm-online-tau0.03": ("sqlm", "sqlm/config_online.yaml", "tau", [0.03], [], ["grpo", "rloo"]),
    # fairness check of the offline verdict: both methods at a 3x smaller learning rate (the later flag wins)
    "dpo-lr3e-5": ("dpo", "dpo/config.yaml", "beta", [0.1, 0.3], ["--learning_rate", "3e-5"], []),
    "sqlm-offline-lr3e-5": (
        "sqlm", "sqlm/config_offline.yaml", "tau", [0.1, 0.3], ["--learning_rate", "3e-5"], ["dpo-lr3e-5"],
    ),
}  # fmt: skip
COMPARISONS = [
    ("sqlm-online", "grpo"),
    ("sqlm-online", "rloo"),
    ("sqlm-offline", "dpo"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="outputs/arith_compare")
    p.add_argument(
        "--cache_dir",
        default=None,
        help="sqlm cache (base LMs, data); default $SQLM_CACHE or ~/.cache/sqlm.",
    )
    p.add_argument("--bases", type=int, nargs="+", default=[0, 1], help="Base-LM seeds.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Training seeds.")
    p.add_argument("--steps", type=int, default=40, help="Optimizer steps of every run.")
    p.add_argument(
        "--online_lr",
        type=float,
        default=1e-4,
        help="Learning rate of every online run.",
    )
    p.add_argument(
        "--offline_lr",
        type=float,
        default=1e-4,
        help="Learning rate of every offline run.",
    )
    p.add_argument(
        "--prompts_per_batch",
        type=int,
        default=8,
        help="Online: prompts per optimizer step.",
    )
    p.add_argument("--num_generations", type=int, default=4)
    p.add_argument("--max_completion_length", type=int, default=48)
    p.add_argument(
        "--pairs_per_batch",
        type=int,
        default=16,
        help="Offline: preference pairs per step.",
    )
    p.add_argument("--n_eval", type=int, default=200, help="Held-out eval prompts per base LM.")
    p.add_argument("--n_boot", type=int, default=1000)
    p.add_argument("--methods", nargs="+", default=None, help="Subset of methods (default: all).")
    p.add_argument(
        "--attempts",
        nargs="*",
        default=[],
        help="Section-4 variants to add (names in ATTEMPTS).",
    )
    p.add_argument(
        "--reduced",
        action="store_true",
        help="1 base, 1 seed, 4 steps, 3 methods, 40 eval prompts.",
    )
    args = p.parse_args(argv)
    if args.reduced:
        args.bases, args.seeds, args.steps, args.n_eval, args.n_boot = (
            [0],
            [0],
            4,
            40,
            100,
        )
        args.methods = args.methods or ["sqlm-online", "grpo", "dpo"]
    return args


# ----------------------------------------------------------------------------- one run


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def run_argv(
    method: str, spec: tuple, knob, base: Path, data: Path, seed: int, args, out: Path
) -> tuple[str, list[str]]:
    """``(command, argv)`` of one training run."""
    kind, recipe, knob_name, _, extra = spec[:5]
    online = method in ONLINE or (kind == "sqlm" and "online" in recipe)
    argv = [str(RECIPES / recipe), "--model_name_or_path", str(base), f"--{knob_name}", str(knob),
            "--max_steps", str(args.steps), "--seed", str(seed), "--output_dir", str(out),
            "--logging_steps", str(max(1, args.steps // 4)), "--report_to", "none"]  # fmt: skip
    if online:
        batch = args.prompts_per_batch * args.num_generations  # every online batch counts completions (as GRPO)
        argv += ["--dataset_name", str(data / "prompts.jsonl"), "--learning_rate", str(args.online_lr),
                 "--per_device_train_batch_size", str(batch), "--num_generations", str(args.num_generations),
                 "--max_completion_length", str(args.max_completion_length), "--temperature", "1.0",
                 "--save_strategy", "steps", "--save_steps", str(max(1, args.steps // 2))]  # fmt: skip
    else:
        argv += ["--dataset_name", str(data / "pairs.jsonl"), "--learning_rate", str(args.offline_lr),
                 "--per_device_train_batch_size", str(args.pairs_per_batch), "--save_strategy", "no"]  # fmt: skip
    return kind, argv + list(extra)


class _Counter:
    """Counts what sqlm's trainer generates (TRL's baselines count it themselves, run_stats.json)."""

    completions = 0
    tokens = 0

    @classmethod
    def install(cls):
        from sqlm.trainer import SoftQTrainer

        if getattr(SoftQTrainer._rollout, "_counted", False):
            return
        orig = SoftQTrainer._rollout

        def _rollout(self, rows):
            out = orig(self, rows)
            cls.completions += len(out)
            cls.tokens += sum(len(t.completion_ids) for t in out)
            return out

        _rollout._counted = True
        SoftQTrainer._rollout = _rollout


def train(kind: str, argv: list[str]) -> dict:
    """Run one command in-process through its ``main(argv)``; its counts and wall time."""
    import torch

    out = Path(argv[argv.index("--output_dir") + 1])
    _Counter.completions = _Counter.tokens = 0
    torch.manual_seed(0)
    t0 = time.time()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if kind == "sqlm":
            from sqlm.commands.train import run

            _Counter.install()
            trainer = run(argv)
            steps = trainer.state.global_step
            stats = {
                "generated_completions": _Counter.completions,
                "generated_tokens": _Counter.tokens,
            }
        elif kind in ("grpo", "rloo"):
            mod = __import__(f"sqlm.commands.{kind}", fromlist=["main"])
            mod.main(argv)
            rs = json.loads((out / "run_stats.json").read_text())
            steps = rs["optimizer_steps"]
            stats = {
                "generated_completions": rs["generated_completions"],
                "generated_tokens": rs["generated_tokens"],
            }
        elif kind == "dpo":
            from sqlm.commands.dpo import main

            main(argv)
            steps = json.loads((out / "dpo_summary.json").read_text())["steps"]
            stats = {"generated_completions": 0, "generated_tokens": 0}
        else:
            raise ValueError(kind)
    return {
        **stats,
        "optimizer_steps": int(steps),
        "wall_time_s": round(time.time() - t0, 2),
    }


def per_prompt_eval(model, tokenizer, ref, prompts: list[str], max_new_tokens: int, seed: int) -> dict:
    """``evaluate_model``'s summary of the ``eval`` split plus the per-prompt accuracy and KL of the
    very same temperature-1 samples (one per prompt, same seed), for the bootstrap."""
    from sqlm.evaluation.arithmetic import (
        _sample,
        arith_reward,
        deterministic_torch,
        evaluate_model,
    )
    from sqlm.evaluation.gold import completion_text
    from sqlm.evaluation.sampling import exact_sequence_kl

    with deterministic_torch(1):
        summary = evaluate_model(
            model,
            tokenizer,
            {"eval": prompts},
            ref_model=ref,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )["eval"]
        flat, comps = _sample(model, tokenizer, prompts, 1, max_new_tokens, seed, 64, False, "")
        acc = arith_reward(prompts, [completion_text(tokenizer, c) for c in comps])
        kl, _ = exact_sequence_kl(model, ref, flat, comps, pad_token_id=tokenizer.pad_token_id)
    if abs(sum(acc) / len(acc) - summary["accuracy"]) > 1e-9:
        raise RuntimeError("per-prompt samples differ from evaluate_model's (sampling is not reproducible)")
    return {**summary, "per_prompt_accuracy": acc, "per_prompt_kl": kl}


def evaluate_folder(path: Path, ref, tokenizer, prompts, args, seed: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return per_prompt_eval(model, tokenizer, ref, prompts, args.eval_max_new_tokens, seed)


def run_one(method, spec, knob, unit, bases, args, root: Path) -> dict:
    b, s = unit
    base, data = bases[b]["base"], bases[b]["data"]
    key = {"method": method, "spec": [spec[0], spec[1], spec[2], spec[4]], "knob": knob, "base": base.name,
           "data": data.name, "seed": s, "steps": args.steps, "online_lr": args.online_lr, "offline_lr": args.offline_lr,
           "ppb": args.prompts_per_batch, "g": args.num_generations, "mcl": args.max_completion_length,
           "pairs": args.pairs_per_batch, "n_eval": args.n_eval}  # fmt: skip
    folder = root / "runs" / f"{method}-{knob}-b{b}-s{s}-{_hash(key)}"
    done = folder / "result.json"
    if done.is_file():
        print(f"cached  {method} {spec[2]}={knob} base {b} seed {s}", flush=True)
        return json.loads(done.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    kind, argv = run_argv(method, spec, knob, base, data, s, args, folder / "model")
    try:
        stats = train(kind, argv)
    except Exception as e:  # noqa: BLE001 - a failed run is reported, the sweep goes on
        err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"FAILED  {method} {spec[2]}={knob} base {b} seed {s}: {err}", flush=True)
        return {
            "method": method,
            "knob_name": spec[2],
            "knob": knob,
            "base": b,
            "seed": s,
            "failed": err,
        }
    ref, tok, prompts = bases[b]["ref"], bases[b]["tokenizer"], bases[b]["prompts"]
    t0 = time.time()
    result = {"method": method, "knob_name": spec[2], "knob": knob, "base": b, "seed": s, "key": key, **stats,
              "eval": evaluate_folder(folder / "model", ref, tok, prompts, args, seed=1234 + b)}  # fmt: skip
    mids = sorted((folder / "model").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    mids = [m for m in mids if int(m.name.split("-")[1]) < stats["optimizer_steps"]]
    if mids:
        m = mids[-1]
        frac = int(m.name.split("-")[1]) / stats["optimizer_steps"]
        ev = evaluate_folder(m, ref, tok, prompts, args, seed=1234 + b)
        result["mid"] = {"optimizer_steps": int(m.name.split("-")[1]),
                         "generated_completions": round(frac * stats["generated_completions"]),
                         "accuracy": ev["accuracy"], "kl": ev["kl"]}  # fmt: skip
    result["eval_time_s"] = round(time.time() - t0, 2)
    for p in (folder / "model").glob("checkpoint-*"):
        shutil.rmtree(p)
    for p in (folder / "model").glob("*.safetensors"):
        p.unlink()  # keep the logs and stats, not the weights
    done.write_text(json.dumps(result))
    e = result["eval"]
    print(f"trained {method} {spec[2]}={knob} base {b} seed {s}: acc {e['accuracy']:.3f} greedy {e['greedy_accuracy']:.3f} "
          f"KL {e['kl']:.2f} len {e['length']:.1f} | {stats['optimizer_steps']} steps, "
          f"{stats['generated_completions']} completions, {stats['wall_time_s']:.1f}s train, {result['eval_time_s']:.1f}s eval",
          flush=True)  # fmt: skip
    return result


# ----------------------------------------------------------------------------- base LMs


def prepare_bases(args) -> dict:
    from sqlm.evaluation.arithmetic import (
        ArithTaskConfig,
        build_base_model,
        build_task_data,
        load_base,
    )

    out = {}
    for b in args.bases:
        cfg = ArithTaskConfig(seed=b)
        base = build_base_model(cfg, args.cache_dir, progress=False)
        data = build_task_data(cfg, base, cache_dir=args.cache_dir, progress=False)
        ref, tok = load_base(base)
        prompts = json.loads((data / "eval_prompts.json").read_text())[: args.n_eval]
        long = json.loads((data / "long_prompts.json").read_text())[: args.n_eval]
        args.eval_max_new_tokens = cfg.max_new_tokens
        out[b] = {"base": base, "data": data, "ref": ref, "tokenizer": tok, "prompts": prompts, "long": long,
                  "pairs": json.loads((data / "data.json").read_text())["stats"]}  # fmt: skip
    return out


def base_results(bases, args, root: Path) -> dict:
    from sqlm.evaluation.arithmetic import deterministic_torch, evaluate_model

    res = {}
    for b, d in bases.items():
        path = root / f"base{b}-{_hash([d['base'].name, args.n_eval])}.json"
        if path.is_file():
            res[b] = json.loads(path.read_text())
            continue
        ev = per_prompt_eval(
            d["ref"],
            d["tokenizer"],
            d["ref"],
            d["prompts"],
            args.eval_max_new_tokens,
            1234 + b,
        )
        with deterministic_torch(1):
            ev["long"] = evaluate_model(
                d["ref"],
                d["tokenizer"],
                {"long": d["long"]},
                max_new_tokens=args.eval_max_new_tokens,
                seed=1234 + b,
            )["long"]
        ev["pairs"] = d["pairs"]
        path.write_text(json.dumps(ev))
        res[b] = ev
    return res


# ----------------------------------------------------------------------------- report


def _f(m, se, nd=3):
    return f"{m:.{nd}f} ± {se:.{nd}f}"


def summarize(results: list[dict], methods: list[str]) -> dict:
    from sqlm.evaluation.compare import seed_summary

    table = {}
    for m in methods:
        for knob in sorted({r["knob"] for r in results if r["method"] == m}):
            rs = [r for r in results if r["method"] == m and r["knob"] == knob]
            row = {
                "method": m,
                "knob_name": rs[0]["knob_name"],
                "knob": knob,
                "n_runs": len(rs),
            }
            for k in ("accuracy", "greedy_accuracy", "kl", "length"):
                row[k], row[k + "_se"] = seed_summary([r["eval"][k] for r in rs])
            for k in (
                "generated_completions",
                "generated_tokens",
                "optimizer_steps",
                "wall_time_s",
            ):
                row[k] = sum(r[k] for r in rs) / len(rs)
            if all("mid" in r for r in rs):
                row["mid_completions"] = sum(r["mid"]["generated_completions"] for r in rs) / len(rs)
                row["mid_accuracy"], row["mid_accuracy_se"] = seed_summary([r["mid"]["accuracy"] for r in rs])
            table[(m, knob)] = row
    return table


def verdicts(results, base_res, comparisons, n_boot) -> list[dict]:
    from sqlm.evaluation.compare import bootstrap_matched_kl

    def runs_of(m):
        out = {}
        for r in results:
            if r["method"] == m:
                out.setdefault(r["knob"], {})[(r["base"], r["seed"])] = (
                    r["eval"]["per_prompt_accuracy"],
                    r["eval"]["per_prompt_kl"],
                )
        return out

    rows = []
    for a, b in comparisons:
        ra, rb = runs_of(a), runs_of(b)
        if not ra or not rb:
            continue
        units = {u for k in ra.values() for u in k}
        ref = {u: base_res[u[0]]["per_prompt_accuracy"] for u in units}
        for with_ref in (True, False):
            out = bootstrap_matched_kl(ra, rb, reference=ref if with_ref else None, n_boot=n_boot)
            rows.append({"a": a, "b": b, "with_reference": with_ref, **out})
    return rows


def plot(table, base_res, root: Path, methods):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_acc = sum(r["accuracy"] for r in base_res.values()) / len(base_res)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for m in methods:
        rows = sorted((r for (mm, _), r in table.items() if mm == m), key=lambda r: r["kl"])
        if not rows:
            continue
        ls = "-" if m in ONLINE or "online" in m else "--"
        ax.errorbar([0.0] + [r["kl"] for r in rows], [base_acc] + [r["accuracy"] for r in rows],
                    xerr=[0.0] + [r["kl_se"] for r in rows], yerr=[0.0] + [r["accuracy_se"] for r in rows],
                    marker="o", ls=ls, capsize=3, label=m)  # fmt: skip
        for r in rows:
            ax.annotate(
                f"{r['knob_name'][0]}={r['knob']:g}",
                (r["kl"], r["accuracy"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("KL(pi || base), nats per completion")
    ax.set_ylabel("accuracy at T=1 (held-out)")
    ax.set_title("Arithmetic: accuracy vs KL (mean ± s.e. over base LMs x seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "frontier_arithmetic.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for (m, knob), r in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if m not in ONLINE and "online" not in m:
            continue
        xs, ys, es = [0], [base_acc], [0.0]
        if "mid_completions" in r:
            (
                xs.append(r["mid_completions"]),
                ys.append(r["mid_accuracy"]),
                es.append(r["mid_accuracy_se"]),
            )
        (
            xs.append(r["generated_completions"]),
            ys.append(r["accuracy"]),
            es.append(r["accuracy_se"]),
        )
        ax.errorbar(
            xs,
            ys,
            yerr=es,
            marker="o",
            capsize=3,
            label=f"{m} {r['knob_name']}={knob:g}",
        )
    ax.set_xlabel("generated completions (training)")
    ax.set_ylabel("accuracy at T=1 (held-out)")
    ax.set_title("Arithmetic: accuracy vs generated completions (online methods)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "efficiency_arithmetic.png", dpi=120)
    plt.close(fig)


def write_report(results, base_res, table, verd, args, root: Path, wall: float, failed=()):
    lines = ["# sqlm vs GRPO, RLOO and DPO on the arithmetic gold task", ""]
    units = sorted({(r["base"], r["seed"]) for r in results})
    total = sum(r["wall_time_s"] + r.get("eval_time_s", 0.0) for r in results)
    lines += [
        (
            f"Base LMs (seeds) {args.bases}, training seeds {args.seeds}: {len(units)} runs per cell. "
            f"{args.steps} optimizer steps per run. Online: {args.prompts_per_batch} prompts x {args.num_generations} "
            f"generations per step, max_completion_length {args.max_completion_length}, temperature 1, learning rate "
            f"{args.online_lr}, the exact checker as reward. Offline: {args.pairs_per_batch} pairs per step, learning rate "
            f"{args.offline_lr}, the same pairs for both methods. Evaluation: {args.n_eval} held-out `eval` prompts per "
            f"base LM, one temperature-1 sample and the greedy completion per prompt, exact KL to the base model summed "
            f"over the sampled completion. Wall time: {total / 60:.1f} min summed over the {len(results)} runs "
            f"(training + evaluation), {wall / 60:.1f} min this invocation (cached runs are read, not rerun)."
        ),
        "",
        "## Base models",
        "",
        "| base seed | accuracy T=1 | greedy | length | long split accuracy (T=1 / greedy) | pairs |",
        "|---|---|---|---|---|---|",
    ]
    for b, r in sorted(base_res.items()):
        lines.append(f"| {b} | {r['accuracy']:.3f} | {r['greedy_accuracy']:.3f} | {r['length']:.1f} | "
                     f"{r['long']['accuracy']:.3f} / {r['long']['greedy_accuracy']:.3f} | {r['pairs']['pairs']} |")  # fmt: skip
    lines += ["", "## Every method at every knob value (mean ± s.e. over runs)", "",
              "| method | knob | runs | accuracy T=1 | greedy accuracy | KL | length | completions | tokens | steps | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (m, knob), r in table.items():
        lines.append(
            f"| {m} | {r['knob_name']}={knob:g} | {r['n_runs']} | {_f(r['accuracy'], r['accuracy_se'])} | "
            f"{_f(r['greedy_accuracy'], r['greedy_accuracy_se'])} | {_f(r['kl'], r['kl_se'], 2)} | "
            f"{_f(r['length'], r['length_se'], 1)} | {r['generated_completions']:.0f} | {r['generated_tokens']:.0f} | "
            f"{r['optimizer_steps']:.0f} | {r['wall_time_s']:.1f} |"
        )
    lines += ["", "## Matched-KL verdicts", "",
              ("Difference A - B of the mean accuracy over the KL range both frontiers cover (linear between a "
              "method's knob values, no extrapolation), 95% bootstrap interval over runs (paired) and prompts "
              f"({args.n_boot} replicates). 'with base' adds the base model at KL 0 to both frontiers, so the range "
              "starts at 0; 'trained points only' uses the trained points alone (often no overlap)."), "",
              "| A | B | frontiers | KL range | A - B | 95% CI | verdict |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for v in verd:
        rng = "-" if v["kl_range"] is None else f"[{v['kl_range'][0]:.2f}, {v['kl_range'][1]:.2f}]"
        d = "-" if v["diff"] is None else f"{v['diff']:+.3f}"
        ci = "-" if v["ci"] is None else f"[{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"
        lines.append(f"| {v['a']} | {v['b']} | {'with base' if v['with_reference'] else 'trained points only'} | "
                     f"{rng} | {d} | {ci} | **{v['verdict']}** |")  # fmt: skip
    if failed:
        lines += ["", "## Failed runs", ""] + [
            f"- {r['method']} {r['knob_name']}={r['knob']:g} base {r['base']} seed {r['seed']}: {r['failed']}"
            for r in failed
        ]
    lines += [
        "",
        "![frontier](frontier_arithmetic.png)",
        "",
        "![efficiency](efficiency_arithmetic.png)",
        "",
    ]
    notes = root / "notes.md"  # hand-written findings, kept across reruns
    if notes.is_file():
        lines += [notes.read_text()]
    (root / "report_arithmetic.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    specs = {m: METHODS[m] for m in (args.methods or list(METHODS))}
    for a in args.attempts:
        specs[a] = ATTEMPTS[a]
    bases = prepare_bases(args)
    base_res = base_results(bases, args, root)
    results = []
    for m, spec in specs.items():
        for knob in spec[3]:
            for b in args.bases:
                for s in args.seeds:
                    results.append(run_one(m, spec, knob, (b, s), bases, args, root))
    failed = [r for r in results if "failed" in r]
    results = [r for r in results if "failed" not in r]
    table = summarize(results, list(specs))
    comparisons = [c for c in COMPARISONS if c[0] in specs and c[1] in specs]
    comparisons += [(a, b) for a in args.attempts for b in ATTEMPTS[a][5] if b in specs]
    verd = verdicts(results, base_res, comparisons, args.n_boot)
    plot(table, base_res, root, list(specs))
    wall = time.time() - t0
    write_report(results, base_res, table, verd, args, root, wall, failed)
    slim = [
        {k: v for k, v in r.items() if k != "eval"}
        | {"eval": {k: v for k, v in r["eval"].items() if not k.startswith("per_prompt")}}
        for r in results
    ]
    (root / "results.json").write_text(
        json.dumps({"runs": slim, "failed": failed, "verdicts": verd, "wall_s": wall}, indent=1)
    )
    print(f"report: {root / 'report_arithmetic.md'} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
