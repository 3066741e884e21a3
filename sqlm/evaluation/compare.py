"""Seeds and verdicts: mean ± standard error over seeds, and a bootstrap confidence interval of the
difference between two methods at matched KL.

The unit of replication is a **run**: one base LM and one training seed, ``(base, seed)``. A method
at one knob value (tau or beta) has one run per unit, each evaluated on the same held-out prompts of
its base LM; a run is summarised per prompt by its accuracy (or gold reward) and its KL to the base
model, so the bootstrap can resample both the runs and the prompts.

**Matched KL.** A method's frontier is its knob values' points ``(mean KL, mean accuracy)`` joined
linearly, and optionally the base model at KL 0 (the limit of every method as its KL knob grows: with
it the frontiers of two methods always share ``[0, min of their largest KLs]``). The difference of two
methods is the mean, over the KL range both frontiers cover, of frontier A minus frontier B:
``sqlm.evaluation.evaluate_report.matched_kl_comparison`` on rows of the two methods (no extrapolation
outside either range; None when the ranges do not overlap).

**Bootstrap.** Each replicate draws the runs (units, paired across methods: the same units for every
method) and, per base LM, the prompts (the same prompt indices for every method and seed of that base)
with replacement, recomputes every point and the matched-KL difference; the interval is the
percentile interval of the replicates. :func:`verdict` calls it a ``win`` when the interval lies above
0, a ``loss`` when below, else a ``tie``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .evaluate_report import matched_kl_comparison
from .metrics import mean_se


# A run's per-prompt scores: accuracy (or gold) and KL, each [n_prompts].
Scores = tuple[Sequence[float], Sequence[float]]
# method scores: knob value -> unit (base, seed) -> Scores
MethodRuns = Mapping[Hashable, Mapping[tuple, Scores]]


def seed_summary(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (one value per run; s.e. 0 for a single run)."""
    return mean_se(list(values))


def cell_summary(runs: Mapping[tuple, Scores]) -> dict:
    """One knob value of one method: mean ± s.e. over runs of the runs' mean accuracy and mean KL."""
    acc = [float(np.mean(a)) for a, _ in runs.values()]
    kl = [float(np.mean(k)) for _, k in runs.values()]
    (am, ase), (km, kse) = seed_summary(acc), seed_summary(kl)
    return {
        "accuracy": am,
        "accuracy_se": ase,
        "kl": km,
        "kl_se": kse,
        "n_runs": len(runs),
    }


def matched_kl_difference(
    points_a: Sequence[tuple[float, float]],
    points_b: Sequence[tuple[float, float]],
    reference: float | None = None,
    n: int = 101,
) -> tuple[float, tuple[float, float]] | None:
    """``(mean of frontier A - frontier B over the KL range both cover, that range)`` from each
    method's points ``(kl, accuracy)``; ``reference`` (the base model's accuracy) adds the point
    ``(0, reference)`` to both. None when the ranges do not overlap (no extrapolation)."""
    rows = [
        {"method": m, "kl": float(k), "gold": float(g)}
        for m, pts in (("a", points_a), ("b", points_b))
        for k, g in pts
    ]
    if reference is not None:
        rows += [{"method": m, "kl": 0.0, "gold": float(reference)} for m in ("a", "b")]
    cmp = matched_kl_comparison(rows, ["a", "b"], n=n)
    if cmp is None or set(cmp["mean_gold"]) != {"a", "b"}:
        return None
    return cmp["mean_gold"]["a"] - cmp["mean_gold"]["b"], tuple(cmp["kl_range"])


def verdict(lo: float, hi: float) -> str:
    """``win`` when the interval ``[lo, hi]`` lies above 0, ``loss`` when below, else ``tie``."""
    if lo > 0:
        return "win"
    if hi < 0:
        return "loss"
    return "tie"


@dataclass
class _Stacked:
    """A method's runs as arrays: per knob value, acc and kl of shape [n_units, n_prompts]."""

    knobs: list
    acc: list[np.ndarray]
    kl: list[np.ndarray]


def _stack(runs: MethodRuns, units: list[tuple]) -> _Stacked:
    knobs = list(runs)
    acc, kl = [], []
    for k in knobs:
        missing = [u for u in units if u not in runs[k]]
        if missing:
            raise ValueError(f"knob {k!r} has no run for units {missing}")
        acc.append(np.asarray([runs[k][u][0] for u in units], dtype=np.float64))
        kl.append(np.asarray([runs[k][u][1] for u in units], dtype=np.float64))
    return _Stacked(knobs, acc, kl)


def _points(s: _Stacked, rows: np.ndarray, cols: np.ndarray) -> list[tuple[float, float]]:
    return [(float(k[rows, cols].mean()), float(a[rows, cols].mean())) for a, k in zip(s.acc, s.kl)]


def bootstrap_matched_kl(
    runs_a: MethodRuns,
    runs_b: MethodRuns,
    reference: Mapping[tuple, Sequence[float]] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """The matched-KL difference A - B with a bootstrap interval over runs and prompts.

    ``runs_a`` / ``runs_b``: knob value -> unit -> (per-prompt accuracy, per-prompt KL); units are
    ``(base, seed, ...)`` tuples (``unit[0]`` names the base LM, whose prompts are shared), and both
    methods must have every unit at every knob value, with the same number of prompts per base.
    ``reference``: unit -> the base model's per-prompt accuracy (adds the point at KL 0, see the
    module docstring). Returns ``diff`` (on all the data), ``kl_range``, ``ci``, ``verdict``,
    ``n_boot`` and ``n_valid`` (replicates whose KL ranges overlapped; the interval uses those)."""
    units = sorted({u for r in (runs_a, runs_b) for per_knob in r.values() for u in per_knob})
    a, b = _stack(runs_a, units), _stack(runs_b, units)
    ref = None if reference is None else np.asarray([reference[u] for u in units], dtype=np.float64)
    n_prompts = a.acc[0].shape[1]

    def diff(rows: np.ndarray, cols: np.ndarray):
        r = None if ref is None else float(ref[rows, cols].mean())
        return matched_kl_difference(_points(a, rows, cols), _points(b, rows, cols), r)

    all_rows = np.arange(len(units))[:, None]
    full = diff(all_rows, np.broadcast_to(np.arange(n_prompts), (len(units), n_prompts)))
    reps = []
    for rows, cols in _replicates(units, n_prompts, n_boot, seed):
        d = diff(rows[:, None], cols)
        if d is not None:
            reps.append(d[0])
    out = {
        "diff": None,
        "kl_range": None,
        "ci": None,
        "verdict": "no overlap",
        "n_boot": n_boot,
        "n_valid": len(reps),
    }
    if full is None:
        return out
    out["diff"], out["kl_range"] = full[0], list(full[1])
    if reps:
        out["ci"] = _interval(reps, level)
        out["verdict"] = verdict(*out["ci"])
    return out


def _replicates(units: list[tuple], n_prompts: int, n_boot: int, seed: int):
    """The bootstrap's draws, ``n_boot`` times ``(rows, cols)``: ``rows`` [n_units] the units drawn with
    replacement, ``cols`` [n_units, n_prompts] the prompts drawn with replacement per base LM (the same
    indices for every unit of one base)."""
    bases = sorted({u[0] for u in units})
    base_of = np.asarray([bases.index(u[0]) for u in units])
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        rows = rng.integers(len(units), size=len(units))
        yield rows, rng.integers(n_prompts, size=(len(bases), n_prompts))[base_of[rows]]


def _interval(reps: list[float], level: float) -> list[float]:
    """The percentile interval of the replicates at ``level``."""
    alpha = (1 - level) / 2
    return [float(x) for x in np.quantile(reps, [alpha, 1 - alpha])]


def bootstrap_difference(
    runs_a: Mapping[tuple, Sequence[float]],
    runs_b: Mapping[tuple, Sequence[float]],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """The difference A - B of the mean per-prompt score of two methods at one point of their budget (e.g.
    the same generated completions), with the bootstrap of :func:`bootstrap_matched_kl`: units (paired:
    the units both have) and, per base LM, prompts drawn with replacement. ``runs_a`` / ``runs_b``: unit
    -> per-prompt scores. Returns ``diff``, ``ci``, ``verdict``, ``n_units``."""
    units = sorted(set(runs_a) & set(runs_b))
    if not units:
        return {"diff": None, "ci": None, "verdict": "no common runs", "n_units": 0}
    a = np.asarray([runs_a[u] for u in units], dtype=np.float64)
    b = np.asarray([runs_b[u] for u in units], dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"the two methods' runs have {a.shape[1]} and {b.shape[1]} prompts")
    d = a - b
    reps = [float(d[rows[:, None], cols].mean()) for rows, cols in _replicates(units, d.shape[1], n_boot, seed)]
    ci = _interval(reps, level)
    return {"diff": float(d.mean()), "ci": ci, "verdict": verdict(*ci), "n_units": len(units)}
