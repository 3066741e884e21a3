"""Seeds and verdicts (sqlm.evaluation.compare) on synthetic numbers (the sweeps of ``sqlm pipeline``
that use them are tested in tests/test_pipeline.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sqlm.evaluation.compare import (
    bootstrap_difference,
    bootstrap_matched_kl,
    cell_summary,
    matched_kl_difference,
    seed_summary,
    verdict,
)


ROOT = Path(__file__).resolve().parents[1]


def _runs(acc_by_knob: dict, kl_by_knob: dict, units, n_prompts=200, seed=0, noise=0.0):
    """knob -> unit -> (per-prompt 0/1 accuracy with the given rate, per-prompt KL around the given mean)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, rate in acc_by_knob.items():
        out[k] = {}
        for u in units:
            p = min(max(rate + noise * rng.standard_normal(), 0.0), 1.0)
            acc = (rng.random(n_prompts) < p).astype(float)
            kl = rng.exponential(kl_by_knob[k], n_prompts)
            out[k][u] = (acc.tolist(), kl.tolist())
    return out


UNITS = [(b, s) for b in (0, 1) for s in (0, 1)]


def test_seed_summary_mean_and_standard_error():
    m, se = seed_summary([1.0, 2.0, 3.0, 4.0])
    assert m == pytest.approx(2.5)
    assert se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert seed_summary([0.7]) == (pytest.approx(0.7), 0.0)


def test_cell_summary_averages_runs_then_seeds():
    runs = {(0, 0): ([1, 0, 1, 0], [1, 1, 1, 1]), (0, 1): ([1, 1, 1, 1], [3, 3, 3, 3])}
    s = cell_summary(runs)
    assert s["accuracy"] == pytest.approx(0.75) and s["kl"] == pytest.approx(2.0)
    assert s["accuracy_se"] == pytest.approx(np.std([0.5, 1.0], ddof=1) / math.sqrt(2))
    assert s["n_runs"] == 2


def test_verdict_words():
    assert verdict(0.01, 0.2) == "win"
    assert verdict(-0.2, -0.01) == "loss"
    assert verdict(-0.1, 0.1) == "tie"
    assert verdict(0.0, 0.1) == "tie"  # touching 0 is not excluding it


def test_matched_kl_difference_no_extrapolation():
    a = [(1.0, 0.5), (3.0, 0.7)]
    b = [(2.0, 0.4), (4.0, 0.6)]
    d, (lo, hi) = matched_kl_difference(a, b)
    assert (lo, hi) == (2.0, 3.0)  # only where both frontiers exist
    # on [2, 3]: a = 0.6..0.7, b = 0.4..0.5 -> a - b = 0.2 everywhere
    assert d == pytest.approx(0.2)
    assert matched_kl_difference([(1.0, 0.5), (2.0, 0.6)], [(3.0, 0.4), (4.0, 0.6)]) is None
    # with the base model at KL 0 both cover [0, 2]
    d, (lo, hi) = matched_kl_difference([(1.0, 0.5), (2.0, 0.6)], [(3.0, 0.4), (4.0, 0.6)], reference=0.3)
    assert (lo, hi) == (0.0, 2.0) and d > 0


def test_identical_methods_tie():
    runs = _runs({0.1: 0.5, 0.3: 0.45}, {0.1: 4.0, 0.3: 2.0}, UNITS, noise=0.05)
    out = bootstrap_matched_kl(runs, runs, n_boot=200)
    assert out["diff"] == pytest.approx(0.0, abs=1e-12)
    assert out["verdict"] == "tie" and out["ci"][0] <= 0 <= out["ci"][1]


def test_shifted_method_wins_and_the_reverse_loses():
    kl = {0.1: 4.0, 0.3: 2.0}
    base = _runs({0.1: 0.45, 0.3: 0.40}, kl, UNITS, seed=1, noise=0.02)
    better = _runs({0.1: 0.75, 0.3: 0.70}, kl, UNITS, seed=2, noise=0.02)
    out = bootstrap_matched_kl(better, base, n_boot=300)
    assert out["verdict"] == "win", out
    assert 0.2 < out["diff"] < 0.4 and out["ci"][0] > 0
    assert bootstrap_matched_kl(base, better, n_boot=300)["verdict"] == "loss"


def test_small_shift_with_noisy_seeds_ties():
    kl = {0.1: 4.0, 0.3: 2.0}
    a = _runs({0.1: 0.50, 0.3: 0.45}, kl, UNITS, n_prompts=30, seed=3, noise=0.1)
    b = _runs({0.1: 0.51, 0.3: 0.46}, kl, UNITS, n_prompts=30, seed=4, noise=0.1)
    assert bootstrap_matched_kl(a, b, n_boot=300)["verdict"] == "tie"


def test_disjoint_kl_ranges_give_no_verdict_without_the_reference():
    a = _runs({0.1: 0.5, 0.3: 0.45}, {0.1: 1.0, 0.3: 0.5}, UNITS, seed=5)
    b = _runs({0.1: 0.5, 0.3: 0.45}, {0.1: 40.0, 0.3: 30.0}, UNITS, seed=6)
    assert bootstrap_matched_kl(a, b, n_boot=50)["verdict"] == "no overlap"
    ref = {u: [0.4] * 200 for u in UNITS}
    out = bootstrap_matched_kl(a, b, reference=ref, n_boot=50)
    assert out["verdict"] in ("win", "loss", "tie") and out["kl_range"][0] == 0.0


def test_missing_unit_is_an_error():
    a = _runs({0.1: 0.5, 0.3: 0.45}, {0.1: 1.0, 0.3: 0.5}, UNITS)
    b = _runs({0.1: 0.5, 0.3: 0.45}, {0.1: 1.0, 0.3: 0.5}, UNITS[:3])
    with pytest.raises(ValueError, match="no run for units"):
        bootstrap_matched_kl(a, b, n_boot=10)


def test_difference_at_one_point_pairs_units_and_calls_ties():
    """bootstrap_difference: the mean per-prompt difference of the units both methods have; identical runs
    tie at exactly 0, a 0.3 shift wins (and its reverse loses), and a unit only one method has is left out."""
    a = {u: r[0] for u, r in _runs({0: 0.45}, {0: 1.0}, UNITS, seed=1, noise=0.02)[0].items()}
    b = {u: r[0] for u, r in _runs({0: 0.75}, {0: 1.0}, UNITS, seed=2, noise=0.02)[0].items()}
    same = bootstrap_difference(a, a, n_boot=200)
    assert same["diff"] == 0.0 and same["verdict"] == "tie" and same["n_units"] == len(UNITS)
    out = bootstrap_difference(b, a, n_boot=300)
    assert out["verdict"] == "win" and 0.2 < out["diff"] < 0.4 and out["ci"][0] > 0
    assert bootstrap_difference(a, b, n_boot=300)["verdict"] == "loss"
    extra = {**b, (9, 9): [1.0] * len(a[UNITS[0]])}
    assert bootstrap_difference(extra, a, n_boot=50)["diff"] == pytest.approx(out["diff"])
    assert bootstrap_difference({}, a)["verdict"] == "no common runs"
