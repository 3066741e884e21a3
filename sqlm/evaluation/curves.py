"""Learning curves of a comparison sweep run with ``curve: N`` (:func:`sqlm.evaluation.sweep.checkpoint_curve`):
the checkpoints' mean ± s.e. over runs, verdicts along them, ``curves.png`` and ``frontier_checkpoints.png``.

Every run evaluated at the same optimizer steps (its checkpoints and its end), each point with the
per-prompt scores and KLs. Four verdicts of each sqlm method against each baseline it is judged against,
each with the bootstrap over runs and prompts of :mod:`sqlm.evaluation.compare`:

* **equal steps**: at every checkpoint step both have, the difference of mean scores. Online and mixed
  methods generate the same completions per step, offline ones see the same pairs, so this is the verdict at
  equal generated completions (equal data);
* **equal generated completions**: where the two methods generate different numbers of completions per
  optimizer step (several updates per generated batch, ``num_iterations``; mixed against online), at the
  smaller of the two methods' mean totals, each run's per-prompt scores interpolated linearly between its
  checkpoints on its own count of generated completions (the base model at 0);
* **equal wall time**: at the shorter of the two methods' mean training times, each run's per-prompt scores
  interpolated linearly between its checkpoints on its own clock (the base model at time 0);
* **matched KL along the checkpoints**: the checkpoints of a method, averaged over runs, joined linearly
  into its reward-KL path (with the base model at KL 0), and the mean difference over the KL range both
  cover (:func:`sqlm.evaluation.compare.bootstrap_matched_kl` with checkpoint steps in place of knob values).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .compare import bootstrap_difference, bootstrap_matched_kl, seed_summary
from .tasks import Task


def _curved(results: list[dict], method: str) -> list[dict]:
    return [r for r in results if r["method"] == method and r.get("curve")]


def curve_table(results: list[dict], methods: list) -> list[dict]:
    """Per method, knob value and checkpoint step every run of the cell has: mean ± s.e. over runs of the
    score, KL, greedy score, length and EOS share, and the mean completions and training seconds so far."""
    rows = []
    for m in methods:
        runs = _curved(results, m.name)
        for knob in sorted({r["knob"] for r in runs}):
            cell = [r for r in runs if r["knob"] == knob]
            steps = sorted(set.intersection(*({p["optimizer_steps"] for p in r["curve"]} for r in cell)))
            for step in steps:
                pts = [next(p for p in r["curve"] if p["optimizer_steps"] == step) for r in cell]
                row = {"method": m.name, "knob_name": cell[0]["knob_name"], "knob": knob, "regime": m.regime,
                       "step": step, "n_runs": len(cell)}  # fmt: skip
                for k in ("score", "kl", "greedy", "length", "eos"):
                    if all(k in p for p in pts):
                        row[k], row[k + "_se"] = seed_summary([p[k] for p in pts])
                for k in ("generated_completions", "train_seconds"):
                    row[k] = sum(p[k] for p in pts) / len(pts)
                rows.append(row)
    return rows


def _per_unit(runs: list[dict], step: int) -> dict[tuple, tuple[list[float], list[float]]]:
    out = {}
    for r in runs:
        p = next((p for p in r["curve"] if p["optimizer_steps"] == step), None)
        if p is not None and "per_prompt_score" in p:
            out[(r["base"], r["seed"])] = (p["per_prompt_score"], p["per_prompt_kl"])
    return out


def score_at(run: dict, base_scores: list[float], x: float, axis: str) -> list[float]:
    """A run's per-prompt scores where its checkpoints' ``axis`` (``train_seconds``, ``generated_completions``)
    reaches ``x``: linear between its checkpoints, the base model's at 0, its final ones past its end."""
    xs = [0.0] + [p[axis] for p in run["curve"]]
    scores = np.asarray([base_scores] + [p["per_prompt_score"] for p in run["curve"]], dtype=np.float64)
    return [float(np.interp(x, xs, scores[:, j])) for j in range(scores.shape[1])]


def score_at_time(run: dict, base_scores: list[float], t: float) -> list[float]:
    """A run's per-prompt scores at training time ``t`` seconds, on its own clock (:func:`score_at`)."""
    return score_at(run, base_scores, t, "train_seconds")


def curve_verdicts(results: list[dict], base_results: dict, methods: list, n_boot: int) -> list[dict]:
    """The three verdicts of the module docstring for every sqlm method, at each of its knob values (named in
    ``a`` where it has several), against each baseline it is compared with (its first knob value), where both
    have curves with per-prompt scores."""
    names = {m.name for m in methods}
    rows = []
    for method in methods:
        for b in (x for x in method.compare if x in names):
            curved, rb = _curved(results, method.name), _curved(results, b)
            if not curved or not rb:
                continue
            knobs = list(dict.fromkeys(r["knob"] for r in curved))
            rb = [r for r in rb if r["knob"] == rb[0]["knob"]]
            for knob in knobs:
                ra = [r for r in curved if r["knob"] == knob]
                name = method.name if len(knobs) == 1 else f"{method.name} ({ra[0]['knob_name']}={knob:g})"
                rows += _verdicts_of(ra, rb, {"a": name, "b": b}, base_results, n_boot)
    return rows


def _verdicts_of(ra: list[dict], rb: list[dict], head: dict, base_results: dict, n_boot: int) -> list[dict]:
    """The verdicts of the runs ``ra`` against ``rb`` (one knob value each), every row starting with ``head``."""
    rows = []
    steps = sorted({p["optimizer_steps"] for r in ra for p in r["curve"]}
                   & {p["optimizer_steps"] for r in rb for p in r["curve"]})  # fmt: skip
    pa, pb = ({s: _per_unit(rr, s) for s in steps} for rr in (ra, rb))
    for step in steps:
        sa = {u: s for u, (s, _) in pa[step].items()}
        sb = {u: s for u, (s, _) in pb[step].items()}
        rows.append({**head, "kind": "equal steps", "at": step, **bootstrap_difference(sa, sb, n_boot)})
    for kind, axis in (("equal generated completions", "generated_completions"), ("equal wall time", "train_seconds")):
        ends = [float(np.mean([r["curve"][-1].get(axis, 0) for r in rr])) for rr in (ra, rb)]
        if axis == "generated_completions" and (min(ends) <= 0 or ends[0] == ends[1]):
            continue  # offline, or the same completions per step: the equal-steps verdicts say it
        x = min(ends)
        sa, sb = ({(r["base"], r["seed"]): score_at(r, base_results[r["base"]]["per_prompt_score"], x, axis)
                   for r in rr} for rr in (ra, rb))  # fmt: skip
        rows.append({**head, "kind": kind, "at": round(x, 1), **bootstrap_difference(sa, sb, n_boot)})
    units = set.intersection(*(set(p[s]) for p in (pa, pb) for s in steps)) if steps else set()
    if units:
        pa = {s: {u: v for u, v in pa[s].items() if u in units} for s in steps}
        pb = {s: {u: v for u, v in pb[s].items() if u in units} for s in steps}
        ref = {u: base_results[u[0]]["per_prompt_score"] for u in units}
        out = bootstrap_matched_kl(pa, pb, reference=ref, n_boot=n_boot)
        rows.append({**head, "kind": "matched KL along checkpoints", "at": out.pop("kl_range"), **out,
                     "n_units": len(units)})  # fmt: skip
    return rows


def curve_lines(table: list[dict], verdicts: list[dict], metric: str) -> list[str]:
    """The report's section: the checkpoint table and the verdicts along the curves."""
    lines = ["## Learning curves (every checkpoint; mean ± s.e. over runs)", "",
             f"| method | knob | step | completions | training s | {metric} T=1 | greedy | KL | length | EOS share | runs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def pm(r, k, nd=3):
        return (
            "–" if k not in r else (f"{r[k]:.{nd}f}" if r["n_runs"] < 2 else f"{r[k]:.{nd}f} ± {r[k + '_se']:.{nd}f}")
        )

    for r in table:
        lines.append(f"| {r['method']} | {r['knob_name']}={r['knob']:g} | {r['step']} | {r['generated_completions']:.0f} "
                     f"| {r['train_seconds']:.0f} | {pm(r, 'score')} | {pm(r, 'greedy')} | {pm(r, 'kl', 2)} "
                     f"| {pm(r, 'length', 1)} | {pm(r, 'eos', 2)} | {r['n_runs']} |")  # fmt: skip
    lines += ["", "### Verdicts along the curves", "",
              ("A − B with a 95% bootstrap interval over runs (paired) and prompts; **tie** when it holds 0. 'equal "
               "steps': at that optimizer step (online: the same generated completions unless one method reuses its "
               "samples; offline: the same pairs). 'equal generated completions' (where the two generate different "
               "numbers per step): at the smaller of their totals, each run interpolated between its checkpoints. "
               "'equal wall time': at that many training seconds (the shorter of the two methods' mean times), each "
               "run interpolated between its checkpoints. 'matched KL along checkpoints': each method's checkpoints "
               "joined into a reward-KL path from the base model at KL 0, the mean difference over the KL range "
               "both cover."), "",
              "| A | B | verdict at | where | A − B | 95% CI | runs | verdict |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for v in verdicts:
        at = v["at"]
        where = ("–" if at is None else f"KL [{at[0]:.2f}, {at[1]:.2f}]") if isinstance(at, list | type(None)) else (
            f"step {at}" if v["kind"] == "equal steps" else
            f"{at:.0f} completions" if v["kind"] == "equal generated completions" else f"{at:.0f} s")  # fmt: skip
        d = "–" if v["diff"] is None else f"{v['diff']:+.3f}"
        ci = "–" if v["ci"] is None else f"[{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"
        lines.append(f"| {v['a']} | {v['b']} | {v['kind']} | {where} | {d} | {ci} | {v.get('n_units', '–')} "
                     f"| **{v['verdict']}** |")  # fmt: skip
    return lines + ["", "![learning curves](curves.png)", "", "![checkpoint frontier](frontier_checkpoints.png)", ""]


def plot_curves(table: list[dict], base_results: dict, task: Task, path: Path) -> Path:
    """``curves.png``: score against optimizer steps, against generated completions (left out when nothing
    in ``table`` generates, an offline-only sweep) and against training seconds, mean ± s.e. over runs, one
    line per method and knob value, the base model at 0."""
    import matplotlib

    from .sweep_report import _style

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = sum(r["score"] for r in base_results.values()) / len(base_results)
    keys = ["step", "generated_completions", "train_seconds"]
    if not any(r["generated_completions"] for r in table):  # offline only: nothing generated, no such panel
        keys.remove("generated_completions")
    fig, axes = plt.subplots(1, len(keys), figsize=(17 * len(keys) / 3, 4.5), sharey=True)
    cells = dict.fromkeys((r["method"], r["knob"]) for r in table)
    for i, (m, knob) in enumerate(cells):
        rows = [r for r in table if (r["method"], r["knob"]) == (m, knob)]
        style = {**_style(m, rows[0]["regime"]), "color": plt.cm.tab10.colors[i % 10]}
        label = f"{m} {rows[0]['knob_name']}={knob:g} ({rows[0]['n_runs']} runs)"
        ys, es = [base] + [r["score"] for r in rows], [0.0] + [r["score_se"] for r in rows]
        for ax, key in zip(axes, keys):
            if key == "generated_completions" and not rows[-1][key]:
                continue  # offline: generates nothing
            ax.errorbar([0] + [r[key] for r in rows], ys, yerr=es, capsize=3, label=label, **style)
    xlabels = {"step": "optimizer steps (offline: × pairs per step)",
               "generated_completions": "completions generated for training (online and mixed)",
               "train_seconds": "training wall time, s (evaluation excluded)"}  # fmt: skip
    for ax, key in zip(axes, keys):
        ax.set_xlabel(xlabels[key])
    axes[0].set_ylabel(f"{task.metric} (held-out, T=1)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{task.name}: learning curves (mean ± s.e. over runs; base model at 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_checkpoint_frontier(table: list[dict], base_results: dict, task: Task, path: Path) -> Path:
    """``frontier_checkpoints.png``: score against KL at every checkpoint (mean over runs), each method's
    checkpoints joined in step order from the base model at KL 0."""
    from .sweep_report import _figure, _save, _style

    base = sum(r["score"] for r in base_results.values()) / len(base_results)
    fig, ax = _figure("tab10")
    for m, knob in dict.fromkeys((r["method"], r["knob"]) for r in table):
        rows = [r for r in table if (r["method"], r["knob"]) == (m, knob)]
        ax.errorbar([0.0] + [r["kl"] for r in rows], [base] + [r["score"] for r in rows],
                    xerr=[0.0] + [r["kl_se"] for r in rows], yerr=[0.0] + [r["score_se"] for r in rows], capsize=3,
                    label=f"{m} {rows[0]['knob_name']}={knob:g}", **_style(m, rows[0]["regime"]))  # fmt: skip
        for r in rows:
            ax.annotate(str(r["step"]), (r["kl"], r["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    return _save(fig, ax, task, "KL(π ‖ base), nats per completion",
                 f"{task.name}: {task.metric} vs KL along the checkpoints (step labels)", 8, path)  # fmt: skip
