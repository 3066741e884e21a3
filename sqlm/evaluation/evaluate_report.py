"""The report of ``sqlm eval`` (:mod:`sqlm.evaluation.evaluate`): frontiers at matched KL,
``frontier.png``, the results and compute tables, ``report.md`` and ``results.json``.

These read the rows :func:`sqlm.evaluation.evaluate.evaluate_models` returns (one per model: method,
param, gold and KL with their standard errors, ...); they load and score nothing. The frontier
functions are also the matched-KL difference of :mod:`sqlm.evaluation.compare`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .evaluate import prompt_text


def compute_table(rows: list[dict]) -> str:
    """The decoding strategy of each model and what it cost, per prompt (rows with ``compute``)."""
    lines = [
        "| model | strategy | gold ± s.e. | tokens generated / prompt | token positions run / prompt | forward passes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r.get("compute")
        if c is None:
            continue
        lines.append(
            f"| {r['name']} | {r['decoding']} | {r['gold']:.3f} ± {r['gold_se']:.3f} "
            f"| {c['tokens_generated_per_prompt']:.1f} | {c['forward_tokens_per_prompt']:.1f} | {c['forward_passes']} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report


def frontier_curve(rows: list[dict], method: str, with_reference: bool = True) -> list[tuple[float, float]]:
    """``method``'s points ``(KL, gold)`` sorted by KL (the reference at KL 0 first, if asked)."""
    pts = sorted((r["kl"], r["gold"]) for r in rows if r["method"] == method)
    ref = [r for r in rows if r["method"] == "reference"]
    if with_reference and ref and pts:
        pts = [(0.0, ref[0]["gold"])] + pts
    return pts


def gold_at_kl(points: list[tuple[float, float]], kl: float) -> float | None:
    """Gold reward of a piecewise-linear frontier at ``kl`` (None outside its KL range: no extrapolation)."""
    if not points or kl < points[0][0] - 1e-12 or kl > points[-1][0] + 1e-12:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= kl <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (kl - x0) / (x1 - x0)
    return points[-1][1]


def matched_kl_comparison(rows: list[dict], methods: list[str], n: int = 101) -> dict | None:
    """Mean gold reward of each method's frontier over the KL range all of them cover (their own
    trained points only, linear in between), and the fraction of that range where each lies above
    every other method. None when the ranges do not overlap."""
    curves = {m: frontier_curve(rows, m, with_reference=False) for m in methods}
    curves = {m: c for m, c in curves.items() if c}
    if len(curves) < 2:
        return None
    lo = max(c[0][0] for c in curves.values())
    hi = min(c[-1][0] for c in curves.values())
    if hi <= lo:
        return None
    grid = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    vals = {m: [gold_at_kl(c, x) for x in grid] for m, c in curves.items()}
    out = {"kl_range": [lo, hi], "mean_gold": {}, "best_fraction": {}}
    for m, v in vals.items():
        out["mean_gold"][m] = sum(v) / len(v)
        best = sum(1 for i in range(n) if all(v[i] > vals[o][i] for o in vals if o != m))
        out["best_fraction"][m] = best / n
    return out


def frontier_area(rows: list[dict], method: str, kl_max: float) -> float | None:
    """Mean gold reward of ``method``'s frontier over KL in [0, kl_max]: the area under its
    piecewise-linear curve (reference point at KL 0 included, flat after its last point) / kl_max."""
    pts = frontier_curve(rows, method)
    if not pts or kl_max <= 0:
        return None
    area, (x0, y0) = 0.0, pts[0]
    for x1, y1 in pts[1:]:
        if x0 >= kl_max:
            break
        xe = min(x1, kl_max)
        ye = y0 + (y1 - y0) * (xe - x0) / (x1 - x0) if x1 > x0 else y1
        area += 0.5 * (y0 + ye) * (xe - x0)
        x0, y0 = xe, ye
    if x0 < kl_max:
        area += y0 * (kl_max - x0)
    return area / kl_max


def plot_frontier(rows: list[dict], path: str | os.PathLike, title: str = "Gold reward vs KL") -> Path:
    """Gold reward against KL(pi || pi_ref), one curve per method sorted by KL, error bars = 1 s.e."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=90)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "reference"]
    markers = "osD^v<>ph*"
    for i, m in enumerate(methods):
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["kl"])
        ax.errorbar(
            [r["kl"] for r in pts],
            [r["gold"] for r in pts],
            xerr=[r["kl_se"] for r in pts],
            yerr=[r["gold_se"] for r in pts],
            marker=markers[i % len(markers)],
            ms=4,
            lw=1.2,
            capsize=2,
            label=m,
        )
        for r in pts:
            if r["param"] is not None:
                ax.annotate(
                    f"{r['param']:g}", (r["kl"], r["gold"]), fontsize=6, xytext=(3, 2), textcoords="offset points"
                )
    for r in rows:
        if r["method"] == "reference":
            ax.errorbar(
                [r["kl"]], [r["gold"]], yerr=[r["gold_se"]], marker="*", ms=9, color="k", ls="", label="reference"
            )
    ax.set_xlabel("KL(π ‖ π_ref), nats per completion")
    ax.set_ylabel("gold reward (VADER compound)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def results_table(rows: list[dict]) -> str:
    lines = [
        "| model | τ/β | gold reward ± s.e. | KL(π‖π_ref) ± s.e. | win rate vs DPO ± s.e. | distinct-1 | distinct-2 | mean length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        win = "–" if r["win_rate"] is None else f"{r['win_rate']:.3f} ± {r['win_se']:.3f}"
        lines.append(
            f"| {r['method']} | {'–' if r['param'] is None else format(r['param'], 'g')} "
            f"| {r['gold']:.3f} ± {r['gold_se']:.3f} | {r['kl']:.2f} ± {r['kl_se']:.2f} | {win} "
            f"| {r['distinct1']:.3f} | {r['distinct2']:.3f} | {r['length']:.1f} |"
        )
    return "\n".join(lines)


def write_report(
    results: dict,
    output_dir: str | os.PathLike,
    *,
    title: str = "Gold reward vs KL",
    preamble: str = "",
    sections: list[str] = (),
) -> Path:
    """``results.json``, ``frontier.png`` and ``report.md`` (table, frontier summary, samples)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = results["rows"]
    plot_frontier(rows, out / "frontier.png", title=title)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "reference"]
    kls = [r["kl"] for r in rows if r["method"] != "reference"]
    s = results["settings"]
    md = [f"# {title}", ""]
    if preamble:
        md += [preamble, ""]
    md += [
        f"{s['num_prompts']} held-out prompts × {s['samples_per_prompt']} samples per model, "
        f"≤ {s['max_new_tokens']} new tokens, sampling seed {s['seed']}. KL is the exact per-token KL "
        "summed along each sampled completion; win rates are paired (same prompt and sample index) "
        f"against the {s['baseline_method']} model with the same τ/β.",
        "",
        "![frontier](frontier.png)",
        "",
        results_table(rows),
        "",
    ]
    cmp = matched_kl_comparison(rows, methods)
    if cmp is not None:
        lo, hi = cmp["kl_range"]
        md += [
            f"Frontiers at matched KL, over KL ∈ [{lo:.2f}, {hi:.2f}] (the range every method's sweep covers; "
            "linear between a method's own points, no extrapolation):",
            "",
            "| method | mean gold reward at matched KL | share of the range where it is highest |",
            "|---|---|---|",
        ]
        for m in cmp["mean_gold"]:
            md.append(f"| {m} | {cmp['mean_gold'][m]:.3f} | {cmp['best_fraction'][m]:.2f} |")
        md.append("")
        results["frontier"] = cmp
    if kls and methods:
        lows = {m: min(r["kl"] for r in rows if r["method"] == m) for m in methods}
        md += [
            "Lowest KL each method's sweep reaches: " + ", ".join(f"{m} {v:.2f}" for m, v in lows.items()) + ".",
            "",
        ]
    if any("compute" in r for r in rows):
        md += [
            f"Decoding: {s.get('decoding')}, each model at its own τ/β. Compute: tokens the policy generated "
            "(discarded candidates included) and token positions run through the policy and the reference "
            "(padding excluded), per prompt; forward passes are batched calls of either model.",
            "",
            compute_table(rows),
            "",
        ]
    for sec in sections:
        md += [sec, ""]
    md += ["## Samples", ""]
    for r in rows:
        for ex in r["examples"][:2]:
            md.append(
                f"- **{r['name']}**: {prompt_text(ex['prompt'])}⟨{ex['completion'].strip()}⟩ (gold {ex['gold']:.2f})"
            )
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return out / "report.md"
