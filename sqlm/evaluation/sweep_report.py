"""Reporting a comparison sweep (:mod:`sqlm.evaluation.sweep`): the summary over runs, the matched-KL
verdicts, ``frontier.png``, ``efficiency.png`` and ``report.md``.

These read the results :func:`sqlm.evaluation.sweep.run_sweep` gathers (one dict per run, the base LMs'
evaluations) and the sweep's :class:`~sqlm.evaluation.sweep.Method` s and
:class:`~sqlm.evaluation.sweep.SweepConfig`; they train and evaluate nothing. ``sqlm pipeline`` also
writes its cross-task report with :func:`mean_pm_se` and :func:`verdict_lines`.
"""

from __future__ import annotations

from pathlib import Path

from .tasks import Task


# ----------------------------------------------------------------------------- summary and verdicts


def summarize(results: list[dict], methods: list) -> dict[tuple[str, float], dict]:
    """Per (method, knob value): mean ± s.e. over runs of every evaluation number, and the mean budget
    (``methods``: the sweep's :class:`~sqlm.evaluation.sweep.Method` s)."""
    from .compare import seed_summary

    table = {}
    regimes = {m.name: m.regime for m in methods}
    for m in regimes:
        for knob in sorted({r["knob"] for r in results if r["method"] == m}):
            rs = [r for r in results if r["method"] == m and r["knob"] == knob]
            row = {"method": m, "knob_name": rs[0]["knob_name"], "knob": knob, "n_runs": len(rs),
                   "regime": regimes[m]}  # fmt: skip
            for k in ("score", "kl", "length", "distinct1", "distinct2", "greedy", "long_score", "long_greedy"):
                if all(k in r["eval"] for r in rs):
                    row[k], row[k + "_se"] = seed_summary([r["eval"][k] for r in rs])
            for k in ("generated_completions", "generated_tokens", "optimizer_steps", "wall_time_s"):
                row[k] = sum(r[k] for r in rs) / len(rs)
            if all("mid" in r for r in rs):
                row["mid_completions"] = sum(r["mid"]["generated_completions"] for r in rs) / len(rs)
                row["mid_score"], row["mid_score_se"] = seed_summary([r["mid"]["score"] for r in rs])
            table[(m, knob)] = row
    return table


def compare_methods(results: list[dict], base_results: dict, methods: list, n_boot: int) -> list[dict]:
    """Matched-KL verdicts of every sqlm method against the baselines it is judged against, with the
    base LM at KL 0 on both frontiers ('with base') and on the trained points alone."""
    from .compare import bootstrap_matched_kl

    def runs_of(m):
        out: dict = {}
        for r in results:
            if r["method"] == m:
                out.setdefault(r["knob"], {})[(r["base"], r["seed"])] = (
                    r["eval"]["per_prompt_score"],
                    r["eval"]["per_prompt_kl"],
                )
        return out

    rows = []
    names = {m.name for m in methods}
    for method in methods:
        a = method.name
        for b in method.compare:
            if b not in names:
                continue
            ra, rb = runs_of(a), runs_of(b)
            if not ra or not rb:
                continue
            units = {u for k in ra.values() for u in k} & {u for k in rb.values() for u in k}
            ra = {k: {u: v for u, v in per.items() if u in units} for k, per in ra.items()}
            rb = {k: {u: v for u, v in per.items() if u in units} for k, per in rb.items()}
            ref = {u: base_results[u[0]]["per_prompt_score"] for u in units}
            for with_ref in (True, False):
                try:
                    out = bootstrap_matched_kl(ra, rb, reference=ref if with_ref else None, n_boot=n_boot)
                except ValueError as e:  # a knob value missing a run (e.g. a failed one)
                    out = {"diff": None, "kl_range": None, "ci": None, "verdict": f"incomplete ({e})"}
                rows.append({"a": a, "b": b, "with_reference": with_ref, **out})
    return rows


# ----------------------------------------------------------------------------- plots and report


def _style(method: str, regime: str) -> dict:
    return {"ls": {"online": "-", "mixed": "-.", "offline": "--"}[regime], "marker": "o" if "sqlm" in method else "s"}


def _figure(colors: str):
    """``(fig, ax)`` of a 7 x 4.5 inch figure (Agg backend) whose lines take matplotlib's ``colors`` map in turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=getattr(plt.cm, colors).colors)
    return fig, ax


def _save(fig, ax, task: Task, xlabel: str, title: str, legend_size: int, path: Path) -> Path:
    """Label ``ax`` (the task's metric up the y axis), save ``fig`` at ``path`` (120 dpi) and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{task.metric} (held-out, T=1)")
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_frontier(table: dict, base_results: dict, task: Task, path: Path) -> Path:
    """``frontier.png``: score against KL to the base, error bars over runs, one line per method."""
    base = sum(r["score"] for r in base_results.values()) / len(base_results)
    fig, ax = _figure("tab10")
    for m in dict.fromkeys(m for m, _ in table):
        rows = sorted((r for (mm, _), r in table.items() if mm == m), key=lambda r: r["kl"])
        ax.errorbar([0.0] + [r["kl"] for r in rows], [base] + [r["score"] for r in rows],
                    xerr=[0.0] + [r["kl_se"] for r in rows], yerr=[0.0] + [r["score_se"] for r in rows],
                    capsize=3, label=m, **_style(m, rows[0]["regime"]))  # fmt: skip
        for r in rows:
            ax.annotate(f"{r['knob_name'][0]}={r['knob']:g}", (r["kl"], r["score"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    kls = [r["kl"] for r in table.values() if r["kl"] > 0]
    log_x = bool(kls) and max(kls) > 20 * min(kls)  # one method far out in KL: a log scale past the smallest KL
    if log_x:
        ax.set_xscale("symlog", linthresh=min(kls))
    xlabel = "KL(π ‖ base), nats per completion" + (" (log scale)" if log_x else "")
    return _save(fig, ax, task, xlabel, f"{task.name}: {task.metric} vs KL (mean ± s.e. over runs; base LM at KL 0)",
                 8, path)  # fmt: skip


def generates(table: dict) -> bool:
    """Whether the table has an online or mixed method: an offline-only sweep has no ``efficiency.png``."""
    return any(r["regime"] != "offline" for r in table.values())


def plot_efficiency(table: dict, base_results: dict, task: Task, path: Path) -> Path | None:
    """``efficiency.png``: score against generated completions of the online and mixed methods; ``None``
    (and no file, a stale one removed) when the table has none of them, as in an offline-only sweep."""
    if not generates(table):
        path.unlink(missing_ok=True)
        return None
    base = sum(r["score"] for r in base_results.values()) / len(base_results)
    fig, ax = _figure("tab20")
    for (m, knob), r in table.items():
        if r["regime"] == "offline":
            continue
        xs, ys, es = [0.0], [base], [0.0]
        if "mid_completions" in r:
            xs.append(r["mid_completions"])
            ys.append(r["mid_score"])
            es.append(r["mid_score_se"])
        xs.append(r["generated_completions"])
        ys.append(r["score"])
        es.append(r["score_se"])
        ax.errorbar(xs, ys, yerr=es, capsize=3, label=f"{m} {r['knob_name']}={knob:g}", **_style(m, r["regime"]))
    return _save(fig, ax, task, "generated completions (training)",
                 f"{task.name}: {task.metric} vs generated completions", 7, path)  # fmt: skip


def mean_pm_se(m: float, se: float, n_runs: int, nd: int = 3) -> str:
    """``mean ± s.e.``; the mean alone for one run, which has no standard error over runs."""
    return f"{m:.{nd}f}" if n_runs < 2 else f"{m:.{nd}f} ± {se:.{nd}f}"


def verdict_lines(verdicts: list[dict], metric: str) -> list[str]:
    lines = ["| A | B | frontiers | KL range | A − B | 95% CI | verdict |", "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        rng = "–" if v["kl_range"] is None else f"[{v['kl_range'][0]:.2f}, {v['kl_range'][1]:.2f}]"
        d = "–" if v["diff"] is None else f"{v['diff']:+.3f}"
        ci = "–" if v["ci"] is None else f"[{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"
        kind = "with base" if v["with_reference"] else "trained points only"
        lines.append(f"| {v['a']} | {v['b']} | {kind} | {rng} | {d} | {ci} | **{v['verdict']}** |")
    return lines


def write_report(task: Task, cfg, results, failed, base_results, table, verdicts, out_dir: Path,
                 wall: float, extra: list[str] | None = None, missing: list[str] | None = None) -> Path:  # fmt: skip
    """``out_dir/report.md``: settings (``cfg``, the :class:`~sqlm.evaluation.sweep.SweepConfig`), base
    LMs, every method at every knob value, the verdicts, the plots, ``extra`` lines and (kept across
    reruns) ``notes.md`` of the same folder. ``missing``: the runs of the sweep not trained yet (a
    ``report_only`` report), named at the top. ``efficiency.png`` is linked where it is drawn (not for an
    offline-only sweep)."""
    b = task.budget()
    steps = cfg.steps or b.steps
    units = sorted({(r["base"], r["seed"]) for r in results})
    total = sum(r["wall_time_s"] + r.get("eval_time_s", 0.0) for r in results)
    greedy = any("greedy" in r for r in table.values())
    long = all("long_score" in r for r in table.values()) and bool(table)
    n_prompts = {len(r["per_prompt_score"]) for r in base_results.values()}
    lines = [f"# {task.name}: sqlm vs TRL's GRPO, RLOO and DPO, like for like", "",
             (f"Base LMs (seeds) {cfg.bases} × training seeds {cfg.seeds}: {len(units)} runs per cell. {steps} optimizer "
              f"steps per run. Online (sqlm online, GRPO, RLOO): {b.prompts_per_batch} prompts × {b.num_generations} "
              f"generations per step, completion limit {b.max_completion_length}, temperature 1, learning rate "
              f"{b.online_lr}, the same reward. Mixed sqlm: the same {b.prompts_per_batch * b.num_generations} generated "
              f"completions per step plus {round(b.prompts_per_batch * b.num_generations / b.mix_ratio * (1 - b.mix_ratio) / b.num_generations)} "
              f"preference pairs. Offline (sqlm offline, DPO): {b.pairs_per_batch} pairs per step, learning rate "
              f"{b.offline_lr}, the same pairs. Evaluation: {'/'.join(map(str, sorted(n_prompts)))} held-out prompts per "
              f"base LM × {cfg.eval_samples} temperature-1 sample(s), exact KL to the base LM summed over each sampled "
              f"completion. Wall time: {total / 60:.1f} min of training and evaluation over {len(results)} runs, "
              f"{wall / 60:.1f} min this invocation (cached runs are read, not rerun)."), "",
             *([(f"**Partial report**: {len(results)} of {len(results) + len(missing)} runs (those recorded or cached); "
                 f"not trained yet: {', '.join(missing)}. A cell's runs column says how many of its seeds it has; a "
                 "verdict pairs the seeds both methods have."), ""] if missing else []),
             "## Base LMs", "",
             f"| base seed | {task.metric} T=1 |" + (" greedy |" if greedy else "")
             + (" longer operands T=1 / greedy |" if long else "") + " length | pairs | reward model accuracy |",
             "|---|---|" + ("---|" if greedy else "") + ("---|" if long else "") + "---|---|---|"]  # fmt: skip
    for s, r in sorted(base_results.items()):
        acc = r.get("reward_model_accuracy")
        lines.append(f"| {s} | {r['score']:.3f} |" + (f" {r['greedy']:.3f} |" if greedy else "")
                     + (f" {r.get('long_score', 0):.3f} / {r.get('long_greedy', 0):.3f} |" if long else "")
                     + f" {r['length']:.1f} | {r['pairs']} | {'–' if acc is None else f'{acc:.3f}'} |")  # fmt: skip
    head = f"| method | knob | runs | {task.metric} T=1 |" + (" greedy |" if greedy else "")
    head += " longer operands T=1 / greedy |" if long else ""
    lines += ["", "## Every method at every knob value (mean ± s.e. over runs)", "",
              head + " KL | length | distinct-1 | distinct-2 | completions | tokens | steps | wall s |",
              "|---|---|---|---|" + ("---|" if greedy else "") + ("---|" if long else "")
              + "---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (m, knob), r in table.items():
        n = r["n_runs"]
        lines.append(
            f"| {m} | {r['knob_name']}={knob:g} | {n} | {mean_pm_se(r['score'], r['score_se'], n)} |"
            + (f" {mean_pm_se(r['greedy'], r['greedy_se'], n)} |" if greedy else "")
            + (f" {r['long_score']:.3f} / {r['long_greedy']:.3f} |" if long else "")
            + f" {mean_pm_se(r['kl'], r['kl_se'], n, 2)} | {mean_pm_se(r['length'], r['length_se'], n, 1)} | {r['distinct1']:.3f} | "
            f"{r['distinct2']:.3f} | {r['generated_completions']:.0f} | {r['generated_tokens']:.0f} | "
            f"{r['optimizer_steps']:.0f} | {r['wall_time_s']:.1f} |"
        )
    lines += ["", "## Matched-KL verdicts", "",
              (f"Difference A − B of the mean {task.metric} over the KL range both frontiers cover (linear between a "
               "method's knob values, no extrapolation), with a 95% bootstrap interval over runs (paired) and prompts "
               f"({cfg.n_boot} replicates; over prompts alone where a cell has one run); **tie** when the interval holds 0. 'with base' adds the base LM at KL 0 to "
               "both frontiers (the range starts at 0); 'trained points only' uses the trained points alone."), "",
              *verdict_lines(verdicts, task.metric)]  # fmt: skip
    if failed:
        lines += ["", "## Failed runs", ""] + [
            f"- {r['method']} {r['knob_name']}={r['knob']:g} base {r['base']} seed {r['seed']}: {r['failed']}"
            for r in failed
        ]
    lines += ["", "![frontier](frontier.png)", ""] + (
        ["![efficiency](efficiency.png)", ""] if generates(table) else []
    )
    lines += extra or []  # e.g. the learning curves (sqlm.evaluation.curves.curve_lines)
    notes = out_dir / "notes.md"
    if notes.is_file():
        lines.append(notes.read_text())
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
