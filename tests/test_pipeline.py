"""`sqlm pipeline` end to end on the reduced (CI) setting: base LM -> preference pairs -> reward
model -> sqlm and DPO sweeps -> eval -> report, cached stages reused, report numbers from the run."""

import json
import re

from test_eval_metrics import check_report_matches  # tests/ is on sys.path (pytest rootdir import)

from sqlm.commands.pipeline import PipelineArguments, apply_reduced, main, run_pipeline
from sqlm.evaluation.gold import GoldTaskConfig


def _oracle_cells(md: str) -> dict[str, list[str]]:
    sec = md.split("## Exact oracle", 1)[1].split("## Samples", 1)[0]
    out = {}
    for line in sec.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("method",) and not cells[0].startswith("---"):
            out[cells[0]] = cells[1:]
    return out


def test_reduced_pipeline_end_to_end(tmp_path, capsys):
    cache, out1, out2 = tmp_path / "cache", tmp_path / "r1", tmp_path / "r2"
    # 1. the CLI, as CI and the README run it
    assert (
        main(["--reduced", "true", "--cache_dir", str(cache), "--output_dir", str(out1), "--progress", "false"]) == 0
    )
    printed = capsys.readouterr().out
    assert f"report: {(out1 / 'report.md').resolve()}" in printed
    res1 = json.loads((out1 / "results.json").read_text())
    args, gold = PipelineArguments(reduced=True), GoldTaskConfig()
    apply_reduced(args, gold, set())
    methods = ["dpo"] + [f"sqlm-{r}" for r in args.rewarders]
    assert len(res1["rows"]) == 1 + len(args.taus) * len(methods)
    assert {r["method"] for r in res1["rows"]} == {"reference", *methods}
    md1 = check_report_matches(out1, res1)
    ref = next(r for r in res1["rows"] if r["method"] == "reference")
    assert abs(ref["kl"]) < 1e-6
    trained = [r for r in res1["rows"] if r["method"] != "reference"]
    assert all(r["kl"] > 0 for r in trained)  # every run moved away from the reference
    assert "## Exact oracle" in md1

    # 2. again with another evaluation seed: training artefacts are reused, the report changes
    done = sorted(cache.glob("gold/*/done.json"))
    stamps = {p: p.stat().st_mtime_ns for p in done}
    args2 = PipelineArguments(reduced=True, cache_dir=str(cache), output_dir=str(out2), progress=False, eval_seed=99)
    gold2 = GoldTaskConfig()
    apply_reduced(args2, gold2, {"eval_seed"})
    res2 = run_pipeline(args2, gold2)
    assert {p: p.stat().st_mtime_ns for p in done} == stamps
    md2 = check_report_matches(out2, res2["results"])
    before = [(r["name"], r["gold"], r["kl"]) for r in res1["rows"]]
    after = [(r["name"], r["gold"], r["kl"]) for r in res2["results"]["rows"]]
    assert before != after and md1 != md2
    # the oracle table is the returned comparison
    cells = _oracle_cells(md2)
    for method, by_n in res2["oracle"]["summary"].items():
        assert cells[method] == [f"{by_n[str(n)] if str(n) in by_n else by_n[n]:.4f}" for n in args2.oracle_pairs]
    assert re.search(r"\d+ preference pairs", md2)


def test_training_runs_are_keyed_by_the_training_code(tmp_path, monkeypatch):
    """A cached sqlm/DPO run must not survive a change to sqlm's training code."""
    from sqlm.commands import pipeline

    before = pipeline.training_code_fingerprint()
    assert before == pipeline.training_code_fingerprint()  # stable
    fake = tmp_path / "sqlm"
    (fake / "commands").mkdir(parents=True)
    for name in pipeline._TRAINING_CODE:
        if not name.endswith(".py"):
            continue
        (fake / name).write_text("x = 1\n")
    monkeypatch.setattr(pipeline, "__file__", str(fake / "commands" / "pipeline.py"))
    one = pipeline.training_code_fingerprint()
    (fake / "losses.py").write_text("x = 2\n")
    assert pipeline.training_code_fingerprint() != one
