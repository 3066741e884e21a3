"""The benchmark scripts run in their reduced setting and print their tables (no timing checks)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--small"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("| case") and not line.startswith("| row"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _number(cell: str) -> float:
    m = re.match(r"-?\d+(\.\d+)?", cell)
    assert m, f"not a number: {cell!r}"
    return float(m.group(0))


def test_bench_losses_prints_every_loss_against_cross_entropy():
    from sqlm.losses import LOSSES

    out = _run("bench_losses.py")
    assert "| case | time (ms, median) | time / cross_entropy" in out
    rows = _table_rows(out)
    assert set(rows) == {"cross_entropy", *LOSSES}
    assert rows["cross_entropy"][1].startswith("1.00")
    for name, cells in rows.items():
        assert _number(cells[0]) > 0, name  # a time was measured
        _number(cells[2])  # a memory figure was measured


def test_bench_train_prints_every_row_with_ratios_to_dpo():
    out = _run("bench_train.py")
    assert "| row | s/step | steps/s | tokens/step | tokens/s | time/token vs DPO" in out
    rows = _table_rows(out)
    expected = ["sft", "dpo"]
    if importlib.util.find_spec("sqlm.trainer") is not None:
        expected += ["sqlm_offline_unified_pcl", "sqlm_offline_soft_q", "sqlm_online"]
    for name in expected:
        cells = rows[name]
        assert "failed" not in cells[-1], f"{name}: {cells[-1]}"
        assert _number(cells[0]) > 0 and _number(cells[3]) > 0, name  # s/step, tokens/s
        assert _number(cells[2]) == 2 * 2 * 32, name  # every row trains on the same 2 pairs x 2 x 32 tokens
        _number(cells[4])  # ratio to DPO
    assert rows["dpo"][4].startswith("1.00")
    if "sqlm_online" in expected:
        assert "generation" in rows["sqlm_online"][-1] and "KV cache" in rows["sqlm_online"][-1]
