"""The critic at inference on a real model: do a trained SmolLM2's own signals tell its right answers
from its wrong ones on chat arithmetic, and does best-of-8 by them beat likelihood and greedy?

1. Two policies trained exactly as the real-model table's cells (``sqlm.evaluation.sweep.run_argv`` with
   the chat_arithmetic budget: 100 steps, LoRA r 16, learning rate decaying linearly from 3e-4 online /
   1e-4 offline): sqlm online (tau 0.01, its recipe's default; ``--knob sqlm-online=0.1`` for the earlier
   default) and TRL DPO (beta 0.1), seed ``--seed``, kept in ``--models`` (trained once; a folder with a
   finished model is reused). The base model is the control.
2. For each model, ``--n`` replies at T=1 to each of ``--n_eval`` held-out prompts (sampling seed 0),
   checked by the exact checker, then read back by the model and the base model
   (:func:`sqlm.decoding.score_completions`) at the model's knob (sqlm: its tau; DPO: its beta; the base:
   0.1, where every implicit reward is 0; a positive scale, so no ranking below depends on it):
   * the AUC of each signal for right against wrong replies, within each prompt that has both, averaged
     over those prompts: the implicit reward tau * sum log pi/pi_ref, the likelihood sum log pi, the
     critic's V(s_0) (one value per prompt: it cannot rank the prompt's replies, so it is measured
     across prompts, against each prompt's accuracy) and V at the last step;
   * best-of-n accuracy when the reply with the highest implicit reward, or likelihood, is kept; the
     mean accuracy of a single sample; greedy accuracy.
3. ``report.md`` and ``results.json`` in ``--out`` (default ``scripts/results/real/critic``).

    python scripts/exp_critic_real.py               # ~15 min of training + ~3 min per model on 2 cores
    python scripts/exp_critic_real.py --n_eval 8 --steps 2 --n 4 --models /tmp/m --out /tmp/c   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "scripts" / "results" / "real" / "critic"
TRAINED = {"sqlm-online": 0.01, "dpo": 0.1}  # method: its default knob (tau / beta), also the tau it is read at


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=ROOT / "outputs" / "critic_real")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the table's budget)")
    p.add_argument("--n", type=int, default=8, help="replies per prompt")
    p.add_argument("--n_eval", type=int, default=128)
    p.add_argument("--use", action="append", default=[], metavar="METHOD=FOLDER",
                   help="a model already trained as the table's run (e.g. a `keep_models` run of the real-model "
                   "sweep, ~/.cache/sqlm/sweeps/chat_arithmetic/<run>/model) instead of training it")  # fmt: skip
    p.add_argument("--knob", action="append", default=[], metavar="METHOD=VALUE",
                   help="train (or read) METHOD at this tau / beta instead of its default")  # fmt: skip
    args = p.parse_args(argv)
    try:
        args.knobs = {**TRAINED, **{m: float(v) for m, v in (k.split("=", 1) for k in args.knob)}}
    except ValueError:
        p.error(f"--knob takes METHOD=NUMBER, got {args.knob}")
    if unknown := set(args.knobs) - set(TRAINED):
        p.error(f"--knob names no trained method: {sorted(unknown)} (known: {sorted(TRAINED)})")
    return args


def train(method: str, knob: float, data, steps: int, seed: int, out: Path) -> float:
    """Train ``method`` as the table's run of this seed into ``out`` (skipped when it exists)."""
    from sqlm.commands.pipeline import run_command
    from sqlm.evaluation.sweep import METHODS, run_argv
    from sqlm.evaluation.tasks import ChatArithmeticTask

    if (out / "adapter_config.json").is_file():
        return 0.0
    t0 = time.time()
    m = METHODS[method]
    run_command(m.command, run_argv(ChatArithmeticTask(), m, data, knob, seed, steps, out, mid=False))
    return time.time() - t0


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a right reply's signal > a wrong one's), ties counted half."""
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def within_prompt_auc(values: list[float], right: list[bool], owner: list[int]) -> tuple[float | None, int]:
    """The mean over prompts with both right and wrong replies of their within-prompt AUC, and how many."""
    aucs = []
    for i in sorted(set(owner)):
        pos = [v for v, r, o in zip(values, right, owner) if o == i and r]
        neg = [v for v, r, o in zip(values, right, owner) if o == i and not r]
        if pos and neg:
            aucs.append(auc(pos, neg))
    return (sum(aucs) / len(aucs) if aucs else None), len(aucs)


def best_of(values: list[float], right: list[bool], owner: list[int]) -> float:
    """Accuracy when each prompt keeps its reply with the highest ``values`` (the first on ties)."""
    best: dict[int, tuple[float, bool]] = {}
    for v, r, o in zip(values, right, owner):
        if o not in best or v > best[o][0]:
            best[o] = (v, r)
    return sum(r for _, r in best.values()) / len(best)


def measure(model, ref, tok, rows: list[dict], n: int, tau: float) -> dict:
    """The signals' AUCs and the best-of-n / sample / greedy accuracies of one model."""
    from sqlm.decoding import score_completions
    from sqlm.evaluation.chat_arithmetic import check, sample_replies
    from sqlm.evaluation.gold import deterministic_torch

    with deterministic_torch(2):
        reps = [r for r in rows for _ in range(n)]
        owner = [i for i in range(len(rows)) for _ in range(n)]
        ids, comps, texts = sample_replies(model, tok, [r["prompt"] for r in reps], max_new_tokens=12, seed=0)
        right = [check(t, r["answer"]) for t, r in zip(texts, reps)]
        keep = [i for i, c in enumerate(comps) if c]  # an empty reply (none seen) cannot be read back
        sc = score_completions(model, ref, [ids[i] for i in keep], [comps[i] for i in keep], tau=tau,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, batch_size=64)  # fmt: skip
        _, _, greedy = sample_replies(model, tok, [r["prompt"] for r in rows], max_new_tokens=12, temperature=0.0)
    right_k, owner_k = [right[i] for i in keep], [owner[i] for i in keep]
    signals = {"implicit": sc["implicit"], "likelihood": sc["logprob"], "v_last": [v[-1] for v in sc["values"]]}
    out = {"tau": tau, "samples": len(keep), "sample_accuracy": sum(right_k) / len(right_k),
           "greedy_accuracy": sum(check(t, r["answer"]) for t, r in zip(greedy, rows)) / len(rows)}  # fmt: skip
    for name, vals in signals.items():
        a, k = within_prompt_auc(vals, right_k, owner_k)
        out[f"auc_{name}"], out["mixed_prompts"] = a, k
    out["best_of_implicit"] = best_of(signals["implicit"], right_k, owner_k)
    out["best_of_likelihood"] = best_of(signals["likelihood"], right_k, owner_k)
    # V(s_0) is one number per prompt: across prompts, does it rank the easier (more often right) ones higher?
    v0 = {o: v[0] for v, o in zip(sc["values"], owner_k)}
    acc = {i: sum(r for r, o in zip(right_k, owner_k) if o == i) / n for i in v0}
    easy = [v0[i] for i in v0 if acc[i] >= 0.5]
    hard = [v0[i] for i in v0 if acc[i] < 0.5]
    out["auc_v0_across_prompts"] = auc(easy, hard) if easy and hard else None
    return out


def report(results: dict, args) -> str:
    rows = [
        f"| model | T=1 sample | greedy | best-of-{args.n} by implicit reward | best-of-{args.n} by likelihood "
        "| AUC implicit | AUC likelihood | AUC V(s_T) | AUC V(s_0) across prompts |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x):
        return "–" if x is None else f"{x:.3f}"

    for name, r in results["models"].items():
        rows.append(f"| {name} | {f(r['sample_accuracy'])} | {f(r['greedy_accuracy'])} | {f(r['best_of_implicit'])} "
                    f"| {f(r['best_of_likelihood'])} | {f(r['auc_implicit'])} | {f(r['auc_likelihood'])} "
                    f"| {f(r['auc_v_last'])} | {f(r['auc_v0_across_prompts'])} |")  # fmt: skip
    return "\n".join(
        [
            "# The critic at inference on SmolLM2-135M-Instruct (chat arithmetic)",
            "",
            f"`python scripts/exp_critic_real.py` — training seed {args.seed}, {results['steps']} steps (the "
            f"real-model table's budget), knobs {', '.join(f'{m} {k:g}' for m, k in args.knobs.items())}, "
            f"{args.n} T=1 replies to each of {results['n_eval']} held-out prompts "
            "(sampling seed 0). AUC: within each prompt that has right and wrong replies, P(a right reply scores "
            "above a wrong one), averaged over those prompts (0.5 = chance); V(s_0): across prompts, prompts the "
            "model answers right at least half the time against the others.",
            "",
            *rows,
            "",
            f"Wall time: {results['wall_s']:.0f} s on {os.cpu_count()} CPU cores, of which training "
            f"{sum(results['train_s'].values()):.0f} s (0: models given with --use).",
        ]
    )


def main(argv=None) -> int:
    from sqlm.evaluation.tasks import ChatArithmeticTask, env_defaults
    from sqlm.loading import load_policy

    args = parse_args(argv)
    env_defaults()
    t0 = time.time()
    task = ChatArithmeticTask()
    data = task.prepare(0, args.models / "cache")
    steps = args.steps or task.budget().steps
    rows = data.eval_prompts[: args.n_eval]
    ref, tok = load_policy(data.base)
    results = {"steps": steps, "n_eval": len(rows), "seed": args.seed, "models": {}, "train_s": {}}
    results["models"]["base"] = measure(ref, ref, tok, rows, args.n, 0.1)
    print(f"base: {results['models']['base']}", flush=True)
    given = dict(u.split("=", 1) for u in args.use)
    results["used"] = given
    results["knobs"] = args.knobs
    for method, tau in args.knobs.items():
        name = f"{method}-{tau:g}-s{args.seed}-steps{steps}"
        folder = Path(given[method]) if method in given else args.models / name
        results["train_s"][method] = 0.0 if method in given else train(method, tau, data, steps, args.seed, folder)
        model, _ = load_policy(folder)
        results["models"][method] = measure(model, ref, tok, rows, args.n, tau)
        print(f"{method}: {results['models'][method]}", flush=True)
    results["wall_s"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "report.md").write_text(report(results, args) + "\n")
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
