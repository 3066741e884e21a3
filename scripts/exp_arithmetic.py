"""The arithmetic gold task's base LM and data: build them, then measure the base model.

1. Pretrain (once, cached by its settings) the tiny base LM on worked additions, a share of them
   wrong (``sqlm.evaluation.arithmetic``), deterministically on one thread.
2. Sample it ``--samples_per_prompt`` times on each ``train`` prompt and pair a correct with an
   incorrect sample (``pairs.jsonl`` for DPO and offline sqlm; ``prompts.jsonl`` for online runs).
3. Measure the base model on held-out problems: accuracy at temperature 1 and greedy, in
   distribution (``eval``) and with longer operands (``long``), completion length.

Prints the folders to pass to the recipes in ``recipes/arithmetic/`` and writes ``results.json``:

    python scripts/exp_arithmetic.py            # cold cache: pretraining ~70 s of CPU on one thread, ~100 s in all
    python scripts/exp_arithmetic.py --seed 1   # another base LM
    sqlm train recipes/arithmetic/sqlm/config_online.yaml --model_name_or_path BASE \\
        --dataset_name DATA/prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from sqlm.evaluation.arithmetic import (
    ArithTaskConfig,
    base_model_dir,
    build_base_model,
    build_task_data,
    deterministic_torch,
    evaluate_model,
    load_base,
)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ArithTaskConfig]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(ArithTaskConfig):
        p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])
    p.add_argument("--cache_dir", default=None, help="Artefact cache; default $SQLM_CACHE or ~/.cache/sqlm.")
    p.add_argument("--n_train", type=int, default=1000, help="Train prompts (preference pairs, online prompts).")
    p.add_argument("--n_eval", type=int, default=300, help="Held-out in-distribution prompts.")
    p.add_argument("--n_long", type=int, default=200, help="Held-out prompts with longer operands.")
    p.add_argument("--samples_per_prompt", type=int, default=4, help="Base samples per train prompt for pairs.")
    p.add_argument("--eval_samples", type=int, default=2, help="Temperature-1 samples per eval prompt.")
    p.add_argument("--output_dir", default="outputs/arithmetic", help="Where results.json goes.")
    args = p.parse_args(argv)
    cfg = ArithTaskConfig(**{f.name: getattr(args, f.name) for f in fields(ArithTaskConfig)})
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    cached = (base_model_dir(cfg, args.cache_dir) / "base_lm.json").is_file()
    t0 = time.time()
    base = build_base_model(cfg, args.cache_dir)
    t_base = time.time() - t0
    meta = json.loads((base / "base_lm.json").read_text())
    how = (
        "cached"
        if cached
        else f"pretrained on one thread in {t_base:.1f} s, {meta['pretrain_cpu_seconds']:.1f} s of CPU"
    )
    print(
        f"base LM: {base} ({how}; "
        f"final completion loss {meta['final_loss']:.3f}; weights sha256 {meta['weights_sha256'][:16]})"
    )
    t0 = time.time()
    data = build_task_data(
        cfg, base, n_train=args.n_train, n_eval=args.n_eval, n_long=args.n_long,
        samples_per_prompt=args.samples_per_prompt, cache_dir=args.cache_dir,
    )  # fmt: skip
    stats = json.loads((data / "data.json").read_text())["stats"]
    print(f"data: {data} ({time.time() - t0:.1f} s) {json.dumps(stats)}")
    model, tokenizer = load_base(base)
    prompts = {
        "eval": json.loads((data / "eval_prompts.json").read_text()),
        "long": json.loads((data / "long_prompts.json").read_text()),
    }
    t0 = time.time()
    with deterministic_torch(1):
        metrics = evaluate_model(
            model, tokenizer, prompts, ref_model=model, max_new_tokens=cfg.max_new_tokens,
            samples_per_prompt=args.eval_samples, seed=cfg.seed + 1234,
        )  # fmt: skip
    print(f"base model evaluation ({time.time() - t0:.1f} s):")
    for split, row in metrics.items():
        print(
            f"  {split:5s} accuracy@T=1 {row['accuracy']:.3f} ± {row['accuracy_se']:.3f}   greedy "
            f"{row['greedy_accuracy']:.3f} ± {row['greedy_accuracy_se']:.3f}   well-formed {row['well_formed']:.3f}   "
            f"length {row['length']:.1f} (greedy {row['greedy_length']:.1f})   n {row['n']}"
        )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": cfg.base_key(), "base": str(base), "data": str(data), "pretrain_seconds": meta.get("pretrain_seconds"),
              "pretrain_cpu_seconds": meta.get("pretrain_cpu_seconds"),
              "weights_sha256": meta["weights_sha256"], "pairs": stats, "base_metrics": metrics,
              "torch": torch.__version__}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"results: {out / 'results.json'}")
    print(
        f"recipes: --model_name_or_path {base} --dataset_name {data}/pairs.jsonl (offline, DPO) "
        f"or {data}/prompts.jsonl (online)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
