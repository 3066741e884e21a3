"""Benchmark: each sqlm loss's forward+backward from logits against ``F.cross_entropy``.

For logits ``[B, T, V]`` (default 8 x 512 x 32000, fp32) every case runs forward and backward down to
the logits: ``cross_entropy`` is ``torch.nn.functional.cross_entropy`` on them; every other case is
``sqlm.soft.soft_outputs`` followed by that loss from ``sqlm.losses.LOSS_SPECS``.

Time: all cases run in this one process, round-robin for ``--repeats`` rounds after one warm-up
each, so load from other processes hits every case alike; the table gives the median time and the
median (and range) of the per-round ratio to cross-entropy.

Peak extra memory: the peak memory of forward+backward beyond the logits and their gradient.
On CUDA it is ``torch.cuda.max_memory_allocated`` in this process. On a CPU, where no allocator
statistic covers every torch allocation, each case runs once more in a fresh subprocess that resets
the kernel's resident-set high-water mark (``/proc/self/clear_refs``), runs the case, and reports
``VmHWM`` minus the resident set before the case minus the size of the gradient. This counts every
page touched, whichever allocator made it; freed large blocks go back to the kernel, so it is the true
peak of live memory plus allocator slack.

    python scripts/bench_losses.py            # full size
    python scripts/bench_losses.py --small    # a quick reduced run (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from sqlm.losses import LOSS_SPECS
from sqlm.soft import soft_outputs


TAU = 0.5
GAMMA = 0.99
BASELINE = "cross_entropy"
CASES = (BASELINE, *LOSS_SPECS)


# ----------------------------------------------------------------------------- inputs and cases


def make_inputs(batch: int, seq: int, vocab: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=g).to(device).requires_grad_()
    actions = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    mask = torch.ones(batch, seq, device=device)
    mask[:, : seq // 4] = 0  # a prompt: no path steps there
    return {
        "logits": logits,
        "actions": actions,
        "mask": mask,
        "rewards": torch.randn(batch, seq, generator=g).to(device),
        "ref_log_pi": -torch.rand(batch, seq, generator=g).to(device) * 5,
        "target_v": torch.randn(batch, seq, generator=g).to(device),
        "values": torch.randn(batch, seq, generator=g).to(device).requires_grad_(),
        "group": (torch.arange(batch) // 2).to(device),  # prompt groups of two (group_pcl)
    }


def run_case(name: str, x: dict) -> None:
    """One forward+backward of case ``name``; leaves the gradient in ``x["logits"].grad``."""
    logits = x["logits"]
    if name == BASELINE:
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), x["actions"].view(-1))
    else:
        out = soft_outputs(logits, x["actions"], TAU)
        loss, _ = LOSS_SPECS[name](
            out,
            x["rewards"],
            x["mask"],
            value=x["values"],
            target_v=x["target_v"],
            tau=TAU,
            gamma=GAMMA,
            ref_log_pi=x["ref_log_pi"],
            group=x["group"],
        )
    loss.backward()


def _clear(x: dict) -> None:
    x["logits"].grad = None
    x["values"].grad = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(name: str, args: argparse.Namespace) -> dict:
    """Peak extra bytes of one forward+backward of ``name`` (see the module docstring)."""
    # warm up on a tiny input first, so one-off allocations (thread pools, kernels) are not counted
    tiny = make_inputs(2, 8, 64, args.device, seed=1)
    run_case(name, tiny)
    del tiny
    x = make_inputs(args.batch, args.seq, args.vocab, args.device)
    grad_bytes = x["logits"].numel() * x["logits"].element_size()
    gc.collect()
    if args.device.startswith("cuda"):
        _sync(args.device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_case(name, x)
        _sync(args.device)
        peak = torch.cuda.max_memory_allocated()
        method = "cuda.max_memory_allocated"
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _proc_status_kib("VmRSS") * 1024
        run_case(name, x)
        peak = _proc_status_kib("VmHWM") * 1024
        method = "VmHWM (resident set) in a subprocess"
    # a negative difference (the gradient landed in pages already resident) is allocator noise
    return {"case": name, "extra_bytes": max(0, peak - base - grad_bytes), "method": method}


def measure_memory(names: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Peak extra memory of each case: on CUDA here, on a CPU in a fresh subprocess (one per case;
    with ``--small`` one for all cases, each still measured from its own reset high-water mark)."""
    if args.device.startswith("cuda"):
        return {name: measure_memory_here(name, args) for name in names}
    groups = [names] if args.small else [[name] for name in names]
    out = {}
    for group in groups:
        for line in _memory_subprocess(",".join(group), args):
            out[line["case"]] = line
    return out


def _memory_subprocess(cases: str, args: argparse.Namespace) -> list[dict]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-case",
        cases,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--vocab",
        str(args.vocab),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ] + (["--small"] if args.small else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]


# ----------------------------------------------------------------------------- timing


def measure_times(args: argparse.Namespace) -> dict[str, list[float]]:
    x = make_inputs(args.batch, args.seq, args.vocab, args.device)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for name in CASES:  # warm-up
        run_case(name, x)
        _clear(x)
    for _ in range(args.repeats):
        for name in CASES:
            gc.collect()
            _sync(args.device)
            t0 = time.perf_counter()
            run_case(name, x)
            _sync(args.device)
            times[name].append(time.perf_counter() - t0)
            _clear(x)
    return times


# ----------------------------------------------------------------------------- report


def table(times: dict[str, list[float]], mems: dict[str, dict], args: argparse.Namespace) -> str:
    n_tokens = args.batch * args.seq
    logits_mib = n_tokens * args.vocab * 4 / 2**20
    base = times[BASELINE]
    lines = [
        f"logits [{args.batch}, {args.seq}, {args.vocab}] fp32 ({logits_mib:.0f} MiB), device {args.device}, "
        f"threads {args.threads}, {args.repeats} rounds; memory: {mems[BASELINE]['method']}",
        "",
        "| case | time (ms, median) | time / cross_entropy (median [min, max] per round) "
        "| peak extra memory (MiB) | extra / logits size | extra bytes per token |",
        "|---|---|---|---|---|---|",
    ]
    for name in CASES:
        ratios = [t / b for t, b in zip(times[name], base)]
        extra = mems[name]["extra_bytes"]
        lines.append(
            f"| {name} | {1000 * statistics.median(times[name]):.1f} "
            f"| {statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}] "
            f"| {extra / 2**20:.1f} | {extra / (logits_mib * 2**20):.3f} | {extra / n_tokens:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over all cases")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="a quick reduced run: [2, 64, 1000], 2 rounds")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.batch, args.seq, args.vocab, args.repeats = 2, 64, 1000, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_case is not None:
        for name in args.memory_case.split(","):
            print(json.dumps(measure_memory_here(name, args)), flush=True)
        return 0
    times = measure_times(args)
    mems = measure_memory(list(CASES), args)
    print(table(times, mems, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
