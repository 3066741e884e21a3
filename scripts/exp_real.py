"""Learning speed on a real model: sqlm online against TRL GRPO / RLOO on SmolLM2-135M-Instruct chat arithmetic.

Every run trains the same LoRA (r 16, alpha 32, all linear layers, no dropout) from the packaged
SmolLM2-135M-Instruct on the train prompts of :mod:`sqlm.evaluation.chat_arithmetic` with its exact
checker as reward: ``--prompts`` prompts x ``--generations`` completions of at most ``--new`` tokens
per optimizer step, temperature 1, the same learning rate, scheduler (transformers' default: linear
to 0), seed and prompt order. At steps 0, ``--eval-every``, ... it samples one T=1 reply to each of
``--eval-n`` held-out prompts (the same sampling seed for every run) and records the accuracy, the
training wall time so far (evaluation excluded) and the completions generated so far.

Each run's record is a JSON file named by its settings in ``--out`` (default
``scripts/results/real/learning_speed``); a run whose record exists is not run again (``--force``
reruns), so a sweep stopped at any point resumes where it was.

    python scripts/exp_real.py --method grpo --lr 1e-4 --seed 0
    python scripts/exp_real.py --method sqlm --set loss_type=group_pcl --lr 1e-4 --seed 0
    python scripts/exp_real.py --report        # the table and curves of every record in --out
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT = Path(__file__).resolve().parent / "results" / "real" / "learning_speed"
VERSION = 1  # bump when what a run does changes (its records are then stale)


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(v.lower(), v)


def run_name(args) -> str:
    knobs = ",".join(f"{k}={v}" for k, v in sorted(args.overrides.items()))
    spec = f"v{VERSION}|{args.method}|{knobs}|lr={args.lr}|seed={args.seed}|steps={args.steps}|{args.prompts}x{args.generations}x{args.new}"
    h = hashlib.sha256(spec.encode()).hexdigest()[:8]
    label = f"{args.method}{'-' + knobs.replace('=', '').replace(',', '-') if knobs else ''}"
    return f"{label}-lr{args.lr:g}-s{args.seed}-{h}"


def lora():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def make_trainer(args, model_path: str, out_dir: str, train):
    from sqlm.evaluation.chat_arithmetic import reward

    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=args.prompts * args.generations,
        max_steps=args.steps,
        learning_rate=args.lr,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    gen = dict(num_generations=args.generations, max_completion_length=args.new, temperature=1.0)
    if args.method in ("grpo", "rloo"):
        import trl

        cls_cfg, cls = {
            "grpo": (trl.GRPOConfig, trl.GRPOTrainer),
            "rloo": (trl.RLOOConfig, trl.RLOOTrainer),
        }[args.method]
        config = cls_cfg(**common, **gen, gradient_checkpointing=False, **args.overrides)
        return cls(model=model_path, reward_funcs=[reward], args=config, train_dataset=train, peft_config=lora())
    from sqlm.config import SoftQConfig
    from sqlm.trainer import SoftQTrainer

    config = SoftQConfig(**common, **gen, mode="online", max_length=128, **args.overrides)
    return SoftQTrainer(model_path, config, train_dataset=train, reward_funcs=[reward], peft_config=lora())


def run(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from sqlm.evaluation.chat_arithmetic import accuracy, eval_rows, train_rows
    from sqlm.gguf import resolve_model_path

    model_path = resolve_model_path("smollm2-135m-instruct")
    train = Dataset.from_list(train_rows(args.steps * args.prompts, seed=0))
    held_out = eval_rows(args.eval_n, seed=1)
    curve: list[dict] = []
    reuse = int(args.overrides.get("num_iterations", 1))

    class Eval(TrainerCallback):
        def __init__(self):
            self.train_seconds, self.mark = 0.0, time.perf_counter()

        def evaluate(self, step: int, model, tokenizer):
            self.train_seconds += time.perf_counter() - self.mark
            acc = accuracy(model, tokenizer, held_out, temperature=1.0, max_new_tokens=args.new, seed=1234)
            point = {
                "step": step,
                "accuracy": acc["accuracy"],
                "train_seconds": round(self.train_seconds, 1),
                # generated so far: with num_iterations K, a batch is generated every K steps
                "completions": -(-step // reuse) * args.prompts * args.generations,
            }
            curve.append(point)
            print(json.dumps(point), flush=True)
            self.mark = time.perf_counter()

        def on_train_begin(self, a, state, control, model=None, processing_class=None, **kw):
            self.evaluate(0, model, processing_class)

        def on_step_end(self, a, state, control, model=None, processing_class=None, **kw):
            if state.global_step % args.eval_every == 0 or state.global_step == args.steps:
                self.evaluate(state.global_step, model, processing_class)

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_trainer(args, model_path, out_dir, train)
        trainer.add_callback(Eval())
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
    keep = ("loss", "grad_norm", "kl_ref", "kl", "rewards/mean", "reward", "consistency", "v_start")
    return {
        "name": run_name(args),
        "method": args.method,
        "overrides": args.overrides,
        "lr": args.lr,
        "seed": args.seed,
        "steps": args.steps,
        "batch": f"{args.prompts} prompts x {args.generations} completions x <= {args.new} tokens",
        "eval_n": args.eval_n,
        "curve": curve,
        "logs": [{k: h[k] for k in h if k in keep or k.startswith("reward")} | {"step": h.get("step")} for h in logs],
        "threads": torch.get_num_threads(),
    }


def config_label(r: dict) -> str:
    knobs = ", ".join(f"{k}={v}" for k, v in sorted(r["overrides"].items()))
    return f"{r['method']}{' (' + knobs + ')' if knobs else ''}, lr {r['lr']:g}"


def seconds_per_step(c: list[dict]) -> float:
    """Training seconds per step over the run's last two evaluation intervals (the first interval of a
    run may share the machine with its start-up)."""
    a, b = c[max(len(c) - 3, 0)], c[-1]
    return (b["train_seconds"] - a["train_seconds"]) / max(b["step"] - a["step"], 1)


def report(out: Path) -> str:
    """One line per run, then per configuration the mean accuracy at each evaluated step over its seeds
    with the standard error, and the difference to GRPO at the same lr paired by seed."""
    import statistics

    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    lines = ["| run | seed | acc@0 | acc@10 | acc@20 | acc@30 | s/step |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (config_label(r), r["seed"])):
        acc = {p["step"]: p["accuracy"] for p in r["curve"]}
        cells = " | ".join(f"{acc[s]:.3f}" if s in acc else "-" for s in (0, 10, 20, 30))
        lines.append(f"| {config_label(r)} | {r['seed']} | {cells} | {seconds_per_step(r['curve']):.1f} |")
    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(config_label(r), {})[r["seed"]] = r
    lines += [
        "",
        "| configuration | seeds | accuracy at the last step, mean ± s.e. | minus GRPO (same seeds), mean [min, max] |",
    ]
    lines.append("|---|---|---|---|")
    for label, seeds in sorted(by.items()):
        final = [s["curve"][-1]["accuracy"] for s in seeds.values()]
        se = statistics.stdev(final) / len(final) ** 0.5 if len(final) > 1 else float("nan")
        grpo = by.get(f"grpo, lr {next(iter(seeds.values()))['lr']:g}", {})
        diffs = [seeds[k]["curve"][-1]["accuracy"] - grpo[k]["curve"][-1]["accuracy"] for k in seeds if k in grpo]
        d = f"{statistics.mean(diffs):+.3f} [{min(diffs):+.3f}, {max(diffs):+.3f}]" if diffs else "-"
        lines.append(f"| {label} | {sorted(seeds)} | {statistics.mean(final):.3f} ± {se:.3f} | {d} |")
    return "\n".join(lines)


def plot(out: Path) -> Path:
    """Mean held-out accuracy over seeds against steps and against training seconds, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(config_label(r), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, runs in sorted(by.items()):
        steps = [p["step"] for p in runs[0]["curve"]]
        completions = [p["completions"] for p in runs[0]["curve"]]
        mean = [sum(r["curve"][i]["accuracy"] for r in runs) / len(runs) for i in range(len(steps))]
        # wall time: the fastest seed's seconds per step (a run that shared the machine with others is slower)
        sps = min(seconds_per_step(r["curve"]) for r in runs)
        axes[0].plot(completions, mean, marker="o", label=f"{label} ({len(runs)} seeds)")
        axes[1].plot([s * sps for s in steps], mean, marker="o", label=label)
    axes[0].set(
        xlabel="generated completions (16 a step; num_iterations K: 16 every K steps)",
        ylabel="held-out accuracy at T=1",
    )
    axes[1].set(
        xlabel="training seconds (fastest seed's s/step x step, 2 CPU cores)", ylabel="held-out accuracy at T=1"
    )
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct chat arithmetic, LoRA r16: sqlm vs TRL GRPO (mean over seeds)")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=["sqlm", "grpo", "rloo"], default="sqlm")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config key of the method")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--new", type=int, default=12)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-n", type=int, default=128)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--force", action="store_true")
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.out))
        print(f"plot: {plot(args.out)}")
        return 0
    args.overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.method == "sqlm" and args.overrides.get("loss_type", "auto") == "auto":
        from sqlm.config import default_loss_type

        args.overrides["loss_type"] = default_loss_type("online")  # records name the loss that ran
    path = args.out / f"{run_name(args)}.json"
    if path.exists() and not args.force:
        print(f"done before: {path}")
        return 0
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    record = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
