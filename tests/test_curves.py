"""Learning curves of a sweep with checkpoints (sqlm.evaluation.curves) on synthetic runs."""

from __future__ import annotations

import numpy as np
import pytest

from sqlm.evaluation.curves import (
    curve_lines,
    curve_table,
    curve_verdicts,
    plot_checkpoint_frontier,
    plot_curves,
    score_at_time,
)
from sqlm.evaluation.sweep import METHODS
from sqlm.evaluation.tasks import ChatArithmeticTask


N = 64


def _run(method, seed, rates, kls, seconds, rng):
    curve = []
    for i, (rate, kl, t) in enumerate(zip(rates, kls, seconds)):
        s = (rng.random(N) < rate).astype(float).tolist()
        k = (rng.random(N) * 2 * kl).tolist()
        curve.append(dict(optimizer_steps=10 * (i + 1), generated_completions=160 * (i + 1), train_seconds=t,
                          score=float(np.mean(s)), kl=float(np.mean(k)), per_prompt_score=s, per_prompt_kl=k))  # fmt: skip
    knob_name = "tau" if method.startswith("sqlm") else "beta"
    return dict(method=method, knob=0.1, knob_name=knob_name, base=0, seed=seed, curve=curve)


@pytest.fixture(scope="module")
def sweep():
    rng = np.random.default_rng(0)
    good = [_run("sqlm-online", s, [0.5, 0.8, 0.9], [1, 2, 3], [50, 100, 150], rng) for s in range(3)]
    poor = [_run("grpo", s, [0.2, 0.2, 0.3], [2, 4, 6], [100, 200, 300], rng) for s in range(3)]
    base = {0: {"score": 0.1, "per_prompt_score": (rng.random(N) < 0.1).astype(float).tolist()}}
    return good + poor, base, [METHODS["sqlm-online"], METHODS["grpo"]]


def test_the_table_averages_each_checkpoint_over_runs(sweep):
    results, _, methods = sweep
    table = curve_table(results, methods)
    assert [(r["method"], r["step"]) for r in table] == [(m, s) for m in ("sqlm-online", "grpo") for s in (10, 20, 30)]
    first = table[0]
    want = np.mean([r["curve"][0]["score"] for r in results[:3]])
    assert first["score"] == pytest.approx(want) and first["n_runs"] == 3 and first["train_seconds"] == 50


def test_score_at_time_interpolates_on_the_runs_own_clock(sweep):
    results, base, _ = sweep
    run, b = results[0], base[0]["per_prompt_score"]
    assert score_at_time(run, b, 0.0) == b
    assert score_at_time(run, b, 50.0) == run["curve"][0]["per_prompt_score"]
    mid = score_at_time(run, b, 75.0)
    want = [(x + y) / 2 for x, y in zip(run["curve"][0]["per_prompt_score"], run["curve"][1]["per_prompt_score"])]
    assert mid == pytest.approx(want)
    assert score_at_time(run, b, 1e6) == run["curve"][-1]["per_prompt_score"]


def test_verdicts_along_the_curves_and_the_report(sweep, tmp_path):
    """A method far ahead at every step wins at equal steps, at equal wall time (150 s, the shorter of the
    two runs' times) and at matched KL; the report section names every verdict and the plots are written."""
    results, base, methods = sweep
    table = curve_table(results, methods)
    verdicts = curve_verdicts(results, base, methods, n_boot=200)
    kinds = [(v["kind"], v["at"]) for v in verdicts]
    assert kinds[:4] == [("equal steps", 10), ("equal steps", 20), ("equal steps", 30), ("equal wall time", 150.0)]
    assert kinds[4][0] == "matched KL along checkpoints" and kinds[4][1][0] == 0.0
    assert all(v["verdict"] == "win" and v["a"] == "sqlm-online" and v["b"] == "grpo" for v in verdicts), verdicts
    assert all(v["n_units"] == 3 for v in verdicts)
    text = "\n".join(curve_lines(table, verdicts, "accuracy"))
    assert text.count("**win**") == 5 and "| step 20 |" in text and "| 150 s |" in text
    task = ChatArithmeticTask()
    for f in (plot_curves, plot_checkpoint_frontier):
        assert f(table, base, task, tmp_path / f"{f.__name__}.png").stat().st_size > 10_000
    # without the sqlm method there is nothing to judge
    assert curve_verdicts([r for r in results if r["method"] == "grpo"], base, methods, n_boot=50) == []


def test_each_knob_value_of_an_sqlm_method_gets_its_own_verdicts(sweep):
    """Two tau values of sqlm online: each is judged against the baseline on its own runs, named by its knob
    (a method with one knob value keeps its bare name, as above); the far-behind value loses where the
    far-ahead one wins."""
    results, base, methods = sweep
    rng = np.random.default_rng(1)
    weak = []
    for s in range(3):
        r = _run("sqlm-online", s, [0.0, 0.0, 0.05], [1, 2, 3], [50, 100, 150], rng)
        weak.append({**r, "knob": 0.01})
    verdicts = curve_verdicts(results + weak, base, methods, n_boot=200)
    by = {}
    for v in verdicts:
        by.setdefault(v["a"], []).append(v["verdict"])
    assert set(by) == {"sqlm-online (tau=0.1)", "sqlm-online (tau=0.01)"}
    assert by["sqlm-online (tau=0.1)"] == ["win"] * 5
    assert by["sqlm-online (tau=0.01)"][:4] == ["loss"] * 4


def test_a_method_that_reuses_its_samples_is_also_judged_at_equal_generated_completions(sweep):
    """Two updates per generated batch (``num_iterations: 2``) halve the completions per step: the equal-steps
    verdicts compare different amounts of data, so a verdict at the smaller total of generated completions
    follows, each run interpolated on its own count (the base model at 0); with equal counts per step (the
    fixture's methods) there is no such row, and offline methods (no completions) get none either."""
    from dataclasses import replace

    from sqlm.evaluation.curves import score_at

    results, base, methods = sweep
    reuse = [{**r, "method": "sqlm-reuse", "curve": [{**p, "generated_completions": p["generated_completions"] // 2}
                                                     for p in r["curve"]]} for r in results[:3]]  # fmt: skip
    grpo = [r for r in results if r["method"] == "grpo"]
    b = base[0]["per_prompt_score"]
    half = score_at(grpo[0], b, 240.0, "generated_completions")  # between grpo's 160 and 320
    want = [
        (x + y) / 2 for x, y in zip(grpo[0]["curve"][0]["per_prompt_score"], grpo[0]["curve"][1]["per_prompt_score"])
    ]
    assert half == pytest.approx(want)
    assert score_at(grpo[0], b, 0.0, "generated_completions") == b
    m = replace(METHODS["sqlm-online"], name="sqlm-reuse", compare=("grpo",))
    verdicts = curve_verdicts(reuse + grpo, base, [m, METHODS["grpo"]], n_boot=200)
    kinds = [(v["kind"], v["at"]) for v in verdicts]
    assert kinds[3] == ("equal generated completions", 240.0) and kinds[4] == ("equal wall time", 150.0)
    at = next(v for v in verdicts if v["kind"] == "equal generated completions")
    assert at["verdict"] == "win" and at["n_units"] == 3
    text = "\n".join(curve_lines(curve_table(reuse + grpo, [m, METHODS["grpo"]]), verdicts, "accuracy"))
    assert "| 240 completions |" in text
    assert "equal generated completions" not in {v["kind"] for v in curve_verdicts(results, base, methods, 50)}
    offline = [{**r, "curve": [{**p, "generated_completions": 0} for p in r["curve"]]} for r in reuse + grpo]
    assert "equal generated completions" not in {
        v["kind"] for v in curve_verdicts(offline, base, [m, METHODS["grpo"]], 50)
    }


def test_an_offline_only_sweep_draws_no_empty_panels(sweep, tmp_path):
    """Offline methods generate nothing: an offline-only sweep gets no ``efficiency.png`` (a stale one from an
    earlier sweep in the same folder is removed, and the report does not link it) and ``curves.png`` has no
    generated-completions panel (two panels, not three: two thirds of the width)."""
    from types import SimpleNamespace

    from matplotlib.image import imread

    from sqlm.evaluation.sweep_report import plot_efficiency, summarize, write_report

    results, base, _ = sweep
    methods = [METHODS["sqlm-offline"], METHODS["dpo"]]
    offline = [{**r, "method": "sqlm-offline" if r["method"] == "sqlm-online" else "dpo",
                "curve": [{**p, "generated_completions": 0} for p in r["curve"]]} for r in results]  # fmt: skip
    task = ChatArithmeticTask()
    full = plot_curves(curve_table(results, [METHODS["sqlm-online"], METHODS["grpo"]]), base, task, tmp_path / "a.png")
    two = plot_curves(curve_table(offline, methods), base, task, tmp_path / "b.png")
    assert imread(two).shape[1] == pytest.approx(imread(full).shape[1] * 2 / 3, abs=2)

    last = {k: r["curve"][-1][k] for r in offline for k in ("score", "kl")}
    runs = [{**r, "eval": {**last, "length": 3.0, "distinct1": 0.5, "distinct2": 0.5}, "generated_completions": 0,
             "generated_tokens": 0, "optimizer_steps": 30, "wall_time_s": 1.0} for r in offline]  # fmt: skip
    table = summarize(runs, methods)
    stale = tmp_path / "efficiency.png"
    stale.write_bytes(b"an earlier sweep's plot")
    assert plot_efficiency(table, base, task, stale) is None and not stale.exists()
    cfg = SimpleNamespace(steps=30, bases=[0], seeds=[0, 1, 2], eval_samples=1, n_boot=10)
    bases = {0: {**base[0], "length": 3.0, "pairs": 8}}
    md = write_report(task, cfg, runs, [], bases, table, [], tmp_path, 1.0).read_text()
    assert "![frontier](frontier.png)" in md and "efficiency.png" not in md
    online = {
        **table,
        ("sqlm-online", 0.1): {**table[("sqlm-offline", 0.1)], "method": "sqlm-online", "regime": "online"},
    }
    md = write_report(task, cfg, runs, [], bases, online, [], tmp_path, 1.0).read_text()
    assert "![efficiency](efficiency.png)" in md
