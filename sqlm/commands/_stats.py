"""``run_stats.json``: what every training command writes beside its model (generated completions and
tokens, optimizer steps, wall time), so runs of different trainers compare on the same budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def run_stats(trainer, name: str, seconds: float) -> dict[str, Any]:
    """Generated completions and tokens (all processes), optimizer steps, wall time, the last logs and
    every logged training step of a finished run (``run_stats.json`` of every training command); a
    trainer that generates nothing (DPO) counts 0."""
    import torch

    generated = [getattr(trainer, "generated_completions", 0), getattr(trainer, "generated_tokens", 0)]
    counts = torch.tensor(generated, device=trainer.accelerator.device)
    counts = trainer.accelerator.reduce(counts, reduction="sum").tolist()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    args = trainer.args
    return {
        "trainer": name,
        "generated_completions": int(counts[0]),
        "generated_tokens": int(counts[1]),
        "optimizer_steps": int(trainer.state.global_step),
        "wall_time_s": round(seconds, 3),
        "beta": getattr(args, "beta", None),
        "tau": getattr(args, "tau", None),
        "num_generations": getattr(args, "num_generations", 2 if name == "online_dpo" else None),  # online DPO: a pair
        "max_completion_length": getattr(args, "max_completion_length", getattr(args, "max_new_tokens", None)),
        "temperature": getattr(args, "temperature", None),
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "seed": args.seed,
        "last_log": logs[-1] if logs else None,
        "log_history": logs,  # every logging step's metrics (loss, rewards, margins, ...), oldest first
    }


def write_run_stats(trainer, name: str, seconds: float, out: str | Path, total_seconds: float | None = None) -> dict:
    """:func:`run_stats` of a finished run, written to ``out/run_stats.json`` by the main process."""
    stats = run_stats(trainer, name, seconds)
    if total_seconds is not None:
        stats["total_time_s"] = round(total_seconds, 3)
    if trainer.is_world_process_zero():
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "run_stats.json").write_text(json.dumps(stats, indent=1, default=str))
    return stats
