"""`sqlm pipeline` end to end on the reduced (CI) setting: both gold tasks, every method through its own
command with the same budget, reports whose numbers are the runs', cached runs reused; the argv of
each run (like for like) and the pipeline's settings checked without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sqlm.commands.pipeline import PipelineArguments, main, run_pipeline
from sqlm.errors import SqlmError
from sqlm.evaluation.sweep import METHODS, budget_key, fill_placeholders, keyed_recipe, run_argv
from sqlm.evaluation.sweep_report import mean_pm_se
from sqlm.evaluation.tasks import ArithmeticTask, ChatArithmeticTask, ChatSentimentTask, SentimentTask, TaskData


def _table(md: str, header: str) -> dict[tuple[str, str], list[str]]:
    """Rows of the markdown table that starts with ``header``, by (method, knob)."""
    sec = md.split(header, 1)[1].split("\n\n", 1)[0]
    out = {}
    for line in sec.splitlines()[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].startswith("---"):
            continue
        out[(cells[0], cells[1])] = cells[2:]
    return out


def test_reduced_pipeline_end_to_end(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = ["--reduced", "true", "--cache_dir", str(cache), "--output_dir", str(out), "--progress", "false"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"report: {(out / 'report.md').resolve()}" in printed
    summary = (out / "report.md").read_text()
    assert "## Exact oracle" in summary
    for task in ("sentiment", "arithmetic"):
        res = json.loads((out / task / "results.json").read_text())
        assert not res["failed"], res["failed"]
        assert {r["method"] for r in res["runs"]} == set(METHODS)
        for r in res["runs"]:
            assert r["optimizer_steps"] == 3 and r["wall_time_s"] > 0
            regime = METHODS[r["method"]].regime
            if regime == "offline":
                assert r["generated_completions"] == 0
            else:  # online and mixed: the same completions per step (4 prompts x 2)
                assert r["generated_completions"] == 3 * 8, r
        if task == "arithmetic":  # longer operands than in training: accuracy at T=1 and greedy
            assert all(0 <= r["eval"]["long_score"] <= 1 and "long_greedy" in r["eval"] for r in res["runs"])
        md = (out / task / "report.md").read_text()
        rows = _table(md, "| method | knob | runs |")
        for r in res["table"]:
            cells = rows[(r["method"], f"{r['knob_name']}={r['knob']:g}")]
            assert r["n_runs"] == 1 and cells[1] == f"{r['score']:.3f}"  # one run: no s.e. (not "± 0.000")
        summary_rows = _table(summary.split(f"## {task}", 1)[1], "| method | knob | runs |")
        assert all("±" not in c for cells in summary_rows.values() for c in cells)
        pairs = {(v["a"], v["b"]) for v in res["verdicts"]}
        assert pairs == {("sqlm-online", "grpo"), ("sqlm-online", "rloo"), ("sqlm-mixed", "grpo"),
                         ("sqlm-mixed", "rloo"), ("sqlm-offline", "dpo")}  # fmt: skip
        for v in res["verdicts"]:
            assert v["verdict"] in ("win", "loss", "tie", "no overlap")
            if v["ci"] is not None:
                assert v["ci"][0] <= v["ci"][1]
                assert (v["verdict"] == "tie") == (v["ci"][0] <= 0 <= v["ci"][1])
        assert (out / task / "frontier.png").stat().st_size > 1000
        assert (out / task / "efficiency.png").stat().st_size > 1000
        assert f"## {task}" in summary

    # again with other bootstrap settings: every run and stage comes from the cache
    done = sorted(cache.glob("sweeps/*/*/result.json"))
    assert len(done) == 2 * len(METHODS)
    # a run's result keeps its trainer's logged steps (results.json does not)
    logs = [json.loads(p.read_text())["train_log"] for p in done]
    assert all(isinstance(log, list) and all("loss" in h and h["step"] <= 3 for h in log) for log in logs)
    assert any(logs), "no run logged a step"
    assert not any("train_log" in r for task in ("sentiment", "arithmetic")
                   for r in json.loads((out / task / "results.json").read_text())["runs"])  # fmt: skip
    stamps = {p: p.stat().st_mtime_ns for p in done}
    args = PipelineArguments(reduced=True, cache_dir=str(cache), output_dir=str(tmp_path / "out2"), progress=False,
                             n_boot=50, oracle=False)  # fmt: skip
    res2 = run_pipeline(args)
    assert {p: p.stat().st_mtime_ns for p in done} == stamps
    assert res2["seconds"] < 60 and res2["oracle"] is None

    # the plan of a larger sweep: the finished runs by their cache folders, the new seed's to train, nothing run
    args = PipelineArguments(reduced=True, cache_dir=str(cache), output_dir=str(tmp_path / "out3"), progress=False,
                             oracle=False, seeds=[0, 1], plan=True)  # fmt: skip
    res3 = run_pipeline(args)
    for task in ("sentiment", "arithmetic"):
        plan = {p["run"]: p["state"] for p in res3["tasks"][task]["plan"]}
        assert {r for r, state in plan.items() if state == "cached"} == {
            p.parent.name for p in done if p.parent.parent.name == task
        }
        assert sorted(r.split("-s")[-1][:1] for r, state in plan.items() if state == "to train") == ["1"] * len(
            METHODS
        )
    assert sorted(cache.glob("sweeps/*/*/result.json")) == done and not (tmp_path / "out3").exists()

    # the same larger sweep reported so far: the finished runs' table and verdicts, the new seed's runs named
    args = PipelineArguments(reduced=True, cache_dir=str(cache), output_dir=str(tmp_path / "out4"), progress=False,
                             oracle=False, seeds=[0, 1], report_only=True, n_boot=50)  # fmt: skip
    res4 = run_pipeline(args)
    for task in ("sentiment", "arithmetic"):
        res = res4["tasks"][task]
        assert {(r["method"], r["seed"]) for r in res["runs"]} == {(m, 0) for m in METHODS}
        todo = {p["run"] for p in res3["tasks"][task]["plan"] if p["state"] == "to train"}
        assert set(res["not_trained"]) == todo and len(todo) == len(METHODS)
        md = (tmp_path / "out4" / task / "report.md").read_text()
        assert f"**Partial report**: {len(METHODS)} of {2 * len(METHODS)} runs" in md
        assert all(name in md for name in todo)
        assert {(v["a"], v["b"]) for v in res["verdicts"]} == {
            (v["a"], v["b"]) for v in res2["tasks"][task]["verdicts"]
        }
    assert sorted(cache.glob("sweeps/*/*/result.json")) == done  # nothing trained
    # a sweep with nothing done yet: one line, no report
    args = PipelineArguments(reduced=True, cache_dir=str(cache), output_dir=str(tmp_path / "out5"), progress=False,
                             oracle=False, seeds=[7], report_only=True)  # fmt: skip
    with pytest.raises(SqlmError, match="report_only: no run of the .* sweep is recorded or cached yet"):
        run_pipeline(args)
    assert not (tmp_path / "out5" / "report.md").exists()


def test_a_cell_of_one_run_shows_no_standard_error():
    assert mean_pm_se(0.5, 0.0, 1) == "0.500"
    assert mean_pm_se(0.5, 0.01, 3, 2) == "0.50 ± 0.01"


def _data(tmp_path) -> TaskData:
    return TaskData(task="t", base_seed=0, base=tmp_path / "base", prompts_file=tmp_path / "p" / "prompts.jsonl",
                    pairs_file=tmp_path / "p" / "pairs.jsonl", eval_prompts=["1+1:"],
                    reward_argv=["--reward_funcs", "terminal"])  # fmt: skip


def _flags(argv: list[str]) -> dict[str, str]:
    return {argv[i][2:]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("--")}


@pytest.mark.parametrize("task", [SentimentTask(), ArithmeticTask(), ChatArithmeticTask(), ChatSentimentTask()],
                         ids=lambda t: t.name)  # fmt: skip
def test_every_method_of_a_regime_gets_the_same_budget(task, tmp_path):
    """Like for like: the online methods share prompts, generations, completions per step, length,
    temperature, steps, learning rate, seed and reward; mixed sqlm rolls out as many completions per
    step; the offline methods share pairs, batch, steps and learning rate; DPO gets no reward."""
    data, b = _data(tmp_path), task.budget()
    flags = {m: _flags(run_argv(task, METHODS[m], data, 0.1, 3, 40, tmp_path / m, mid=False)) for m in METHODS}
    online = ["sqlm-online", "grpo", "rloo"]
    keys = ["dataset_name", "learning_rate", "per_device_train_batch_size", "num_generations",
            "max_completion_length", "temperature", "max_steps", "seed", "reward_funcs"]  # fmt: skip
    for k in keys:
        assert len({flags[m][k] for m in online}) == 1, k
    assert int(flags["grpo"]["per_device_train_batch_size"]) == b.prompts_per_batch * b.num_generations
    assert flags["grpo"]["dataset_name"] == str(data.prompts_file)
    mixed = flags["sqlm-mixed"]
    assert int(mixed["per_device_train_batch_size"]) * b.mix_ratio == b.prompts_per_batch * b.num_generations
    assert mixed["dataset_name"] == str(data.pairs_file) and mixed["mix_ratio"] == str(b.mix_ratio)
    for k in ("learning_rate", "per_device_train_batch_size", "max_steps", "seed", "dataset_name"):
        assert flags["sqlm-offline"][k] == flags["dpo"][k], k
    assert int(flags["dpo"]["per_device_train_batch_size"]) == b.pairs_per_batch
    assert "reward_funcs" not in flags["dpo"] and flags["sqlm-offline"]["reward_funcs"] == "terminal"
    assert flags["sqlm-online"]["tau"] == flags["grpo"]["beta"] == "0.1"
    for m in METHODS:  # the paired recipe of every method exists for the task
        assert (task.recipes / METHODS[m].recipe).is_file()
    # one schedule for every method where the task sets one (else each recipe's own)
    assert {flags[m].get("lr_scheduler_type") for m in METHODS} == {b.lr_scheduler}


def test_a_budget_field_left_at_none_stays_out_of_the_run_key():
    """A task that sets no schedule keeps the run keys it had before ``lr_scheduler`` existed (its cached
    runs stay valid); one that sets it gets keys that name it."""
    b = ArithmeticTask().budget()
    assert b.lr_scheduler is None and budget_key(b) == {k: v for k, v in vars(b).items() if k != "lr_scheduler"}
    assert budget_key(ChatArithmeticTask().budget())["lr_scheduler"] == "linear"


def test_an_attempt_is_its_base_method_with_further_flags(tmp_path):
    """Section-4 attempts are named variants: the base method's argv plus the attempt's flags (the task's
    reward model substituted), their own knob values, judged against the base method's baselines."""
    args = PipelineArguments(attempts={"sqlm-online-abc": {"base": "sqlm-online", "values": [0.3],
                                                           "flags": ["--reward_funcs", "abc", "--reward_kwargs",
                                                                     '{"abc": {"reward_model": "{reward_model}"}}']}})  # fmt: skip
    cfg = args.sweep_config()
    attempt = cfg.method("sqlm-online-abc")
    assert attempt.compare == METHODS["sqlm-online"].compare and cfg.values(attempt) == (0.3,)
    assert [m.name for m in cfg.all_methods()][-1] == "sqlm-online-abc"
    only = PipelineArguments(attempts={"x": {"base": "dpo", "tasks": ["arithmetic"]}}).sweep_config()
    assert "x" in [m.name for m in only.all_methods("arithmetic")] and "x" not in [
        m.name for m in only.all_methods("sentiment")
    ]
    data = _data(tmp_path)
    data.info["reward_model"] = "/rm"
    base = run_argv(SentimentTask(), METHODS["sqlm-online"], data, 0.3, 0, 40, tmp_path / "o", mid=False)
    got = run_argv(SentimentTask(), attempt, data, 0.3, 0, 40, tmp_path / "o", mid=False)
    assert got == base + ["--reward_funcs", "abc", "--reward_kwargs", '{"abc": {"reward_model": "/rm"}}']
    reuse = PipelineArguments(attempts={"k2": {"base": "sqlm-online", "compare": ["grpo", "g2"]},
                                        "g2": {"base": "grpo", "flags": ["--num_iterations", 2]}}).sweep_config()  # fmt: skip
    assert reuse.method("k2").compare == ("grpo", "g2") and reuse.method("g2").extra[-2:] == ("--num_iterations", "2")
    for bad in ({"x": {"base": "ppo"}}, {"grpo": {"base": "grpo"}}, {"x": {"base": "grpo", "flags": "--beta"}},
                {"x": {"base": "grpo", "tasks": ["math"]}}, {"x": {"base": "grpo", "compare": "dpo"}},
                {"x": {"base": "grpo", "compare": ["ppo"]}}, {"x": {"base": "grpo", "compare": ["x"]}}):  # fmt: skip
        with pytest.raises(SqlmError, match="'attempts'"):
            PipelineArguments(attempts=bad)
    with pytest.raises(SqlmError, match=r"'x' compares against \['x'\]"):  # itself, named in the line
        PipelineArguments(attempts={"x": {"base": "grpo", "compare": ["x"]}})


def test_compare_sets_a_methods_baselines_for_the_report_only():
    """``compare: {sqlm-mixed: [grpo, rloo, sqlm-online]}`` judges sqlm mixed also against sqlm online (does
    adding the pairs help?): the method's baselines change and nothing that keys its runs (command, regime,
    recipe, knob, flags), so no finished run is trained again; a bad key, list or name is one clear line."""
    from dataclasses import replace

    import numpy as np

    from sqlm.evaluation.curves import curve_verdicts

    cfg = PipelineArguments(compare={"sqlm-mixed": ["grpo", "rloo", "sqlm-online"]}).sweep_config()
    mixed = cfg.method("sqlm-mixed")
    assert mixed.compare == ("grpo", "rloo", "sqlm-online") and cfg.method("sqlm-online") == METHODS["sqlm-online"]
    assert replace(mixed, compare=METHODS["sqlm-mixed"].compare) == METHODS["sqlm-mixed"]
    rng = np.random.default_rng(0)

    def run(method, seed, rate):
        s = (rng.random(32) < rate).astype(float).tolist()
        point = dict(optimizer_steps=10, generated_completions=160, train_seconds=50.0, score=float(np.mean(s)),
                     kl=1.0, per_prompt_score=s, per_prompt_kl=[1.0] * 32)  # fmt: skip
        return dict(method=method, knob=0.1, knob_name="tau", base=0, seed=seed, curve=[point])

    results = [run(m, s, r) for m, r in (("sqlm-mixed", 0.9), ("sqlm-online", 0.2)) for s in range(3)]
    base = {0: {"per_prompt_score": [0.0] * 32}}
    methods = cfg.all_methods()
    assert curve_verdicts(results, base, [METHODS["sqlm-mixed"], METHODS["sqlm-online"]], n_boot=20) == []
    got = curve_verdicts(results, base, methods, n_boot=50)
    assert {(v["a"], v["b"]) for v in got} == {("sqlm-mixed", "sqlm-online")}
    assert got[0]["kind"] == "equal steps" and got[0]["verdict"] == "win"
    for bad, line in (({"ppo": ["grpo"]}, "unknown method 'ppo'"), ({"sqlm-mixed": "grpo"}, "list of method names"),
                      ({"sqlm-mixed": ["ppo"]}, r"against \['ppo'\]"),
                      ({"sqlm-mixed": ["sqlm-mixed"]}, "against itself")):  # fmt: skip
        with pytest.raises(SqlmError, match=rf"key 'compare': .*{line}"):
            PipelineArguments(compare=bad)
    # an attempt may be a baseline
    args = PipelineArguments(attempts={"k2": {"base": "sqlm-online"}}, compare={"sqlm-mixed": ["k2"]})
    assert args.sweep_config().method("sqlm-mixed").compare == ("k2",)


def test_an_attempt_flag_names_any_string_the_task_gives():
    """``{name}`` in an attempt's flags is the task's ``info[name]`` for every string-valued key;
    ``{reward_model}`` is as before (the empty string on a task without one); JSON braces are no
    placeholder; a name the task does not give (or gives as a number) is one error naming it."""
    info = {"reward_model": "/rm", "implicit_model": "/cache/implicit-1/model", "base_model": "/gguf/base", "pairs": 5}
    flags = ["--reward_funcs", "implicit", "--reward_kwargs",
             '{"implicit": {"model": "{implicit_model}", "ref_model": "{base_model}", "beta": 0.1}}',
             "--note", "{reward_model}:{implicit_model}"]  # fmt: skip
    got = fill_placeholders(flags, info)
    assert got[3] == '{"implicit": {"model": "/cache/implicit-1/model", "ref_model": "/gguf/base", "beta": 0.1}}'
    assert json.loads(got[3])["implicit"]["model"] == info["implicit_model"]
    assert got[:3] == flags[:3] and got[5] == "/rm:/cache/implicit-1/model"
    assert fill_placeholders(['{"abc": {"reward_model": "{reward_model}"}}'], {}) == ['{"abc": {"reward_model": ""}}']
    for bad in ("{nope}", "{pairs}"):
        with pytest.raises(SqlmError, match=bad[1:-1]) as e:
            fill_placeholders(["--x", bad], info)
        assert "{implicit_model}" in str(e.value)


def test_a_recipes_own_knob_value_stays_out_of_the_run_key():
    """The argv sets the knob, so the recipe's value of it never trains anything: a run at the recipe's value
    keys the recipe text as it is (the keys of finished runs hold), a run at another value keys the text
    with that value, so moving a recipe's default (tau 0.1 -> 0.01) keeps the keys of the runs at both."""
    old = "model: x\ntau: 0.1\nlearning_rate: 3.0e-4\n"
    new = old.replace("tau: 0.1", "tau: 0.01")
    assert keyed_recipe(old, "tau", 0.1) == old and keyed_recipe(new, "tau", 0.01) == new
    assert keyed_recipe(new, "tau", 0.1) == old and keyed_recipe(old, "tau", 0.01) == new
    assert keyed_recipe("beta: 0.0  # TRL's default\n", "beta", 0.0) == "beta: 0.0  # TRL's default\n"
    assert keyed_recipe("beta: 0.0  # TRL's default\n", "beta", 0.04) == "beta: 0.04  # TRL's default\n"
    assert keyed_recipe("# tau: 0.1 in a comment\n  tau: 0.1\n", "tau", 0.3) == "# tau: 0.1 in a comment\n  tau: 0.1\n"
    assert keyed_recipe("tau_scale: 2\n", "tau", 0.3) == "tau_scale: 2\n"
    assert keyed_recipe("model: x\n", "tau", 0.3) == "model: x\n"


def test_a_run_key_holds_the_placeholders_values_and_not_where_the_cache_lies(tmp_path, monkeypatch):
    """A run's key names what an attempt's placeholders stand for (another DPO policy: another key), and,
    where the task names its cache folder, paths under it relative to it (records resume elsewhere); a
    method without placeholders keeps the key it had."""
    from sqlm.evaluation import sweep

    monkeypatch.setattr(sweep, "training_key", lambda task, method, runner: {"canary": "same"})
    task = ChatSentimentTask()
    cfg = PipelineArguments(attempts={"imp": {"base": "sqlm-offline", "flags": [
        "--reward_funcs", "implicit", "--reward_kwargs",
        '{"implicit": {"model": "{implicit_model}", "ref_model": "{base_model}"}}']}}).sweep_config()  # fmt: skip
    attempt = cfg.method("imp")

    def data(cache, implicit="implicit-1"):
        rm = str(cache / "chat_sentiment" / "rm-1")
        return TaskData(task=task.name, base_seed=0, base=tmp_path / "gguf" / "SmolLM2-x",
                        prompts_file=cache / "chat_sentiment" / "pairs-1" / "prompts.jsonl",
                        pairs_file=cache / "chat_sentiment" / "pairs-1" / "train.jsonl", eval_prompts=[],
                        reward_argv=["--reward_funcs", "terminal", "--reward_kwargs",
                                     json.dumps({"terminal": {"reward_model": rm}})],
                        info={"reward_model": rm, "implicit_model": str(cache / "chat_sentiment" / implicit / "model"),
                              "base_model": str(tmp_path / "gguf" / "SmolLM2-x")},
                        cache=cache)  # fmt: skip

    def key(method, d):
        return sweep.run_key(task, method, 0.1, d, 0, cfg, 100, False, 128, {}, None)

    here, there = key(attempt, data(tmp_path / "a")), key(attempt, data(tmp_path / "b"))
    assert here == there and here["placeholders"] == {"implicit_model": "<cache>/chat_sentiment/implicit-1/model",
                                                      "base_model": "SmolLM2-x"}  # fmt: skip
    assert "<cache>/chat_sentiment/rm-1" in here["reward"][-1]
    assert key(attempt, data(tmp_path / "a", "implicit-2")) != here
    assert "placeholders" not in key(METHODS["sqlm-offline"], data(tmp_path / "a"))
    # a task that names no cache folder keeps its reward argv as it is (the keys it always had)
    old = data(tmp_path / "a")
    old.cache = None
    assert key(METHODS["sqlm-offline"], old)["reward"] == old.reward_argv


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"tasks": ["sentimnt"]}, "tasks"),
        ({"methods": ["ppo"]}, "methods"),
        ({"knobs": {"grpo": "0.1"}}, "knobs"),
        ({"knobs": {"sqlm-online": [0.0]}}, "knobs"),
        ({"knobs": {"nope": [0.1]}}, "knobs"),
        ({"steps": 0}, "steps"),
        ({"eval_samples": 0}, "eval_samples"),
    ],
)
def test_bad_settings_name_the_key(kw, key):
    with pytest.raises(SqlmError, match=f"'{key}'"):
        PipelineArguments(**kw)


def test_full_and_default_settings():
    default, full = PipelineArguments().sweep_config(), PipelineArguments(full=True).sweep_config()
    assert (default.bases, default.seeds, default.n_eval) == ([0], [0], 128)
    assert (full.bases, full.seeds, full.n_eval, full.mid_eval) == ([0, 1], [0, 1, 2], None, True)
    assert all(len(default.values(METHODS[m])) == 1 for m in METHODS)
    assert all(len(full.values(METHODS[m])) >= 3 for m in METHODS)
    # TRL's defaults are among the baselines' knob values
    assert 0.0 in full.values(METHODS["grpo"]) and 0.05 in full.values(METHODS["rloo"])
    # the baselines' grids reach further than sqlm's on every task (5 values, up to beta = 1 or more), so
    # that a comparison never rests on a straight line from the base LM where sqlm has points
    for task in (SentimentTask(), ArithmeticTask()):
        for b in ("grpo", "rloo", "dpo"):
            vals = full.values(METHODS[b], task)
            assert len(vals) == 5 and max(vals) >= 1.0, (task.name, b, vals)
    # a task's own range where it has one (arithmetic: sqlm's KL is small, larger tau values)
    assert full.values(METHODS["sqlm-online"], ArithmeticTask()) == (0.1, 0.3, 1.0)
    assert full.values(METHODS["sqlm-online"], SentimentTask()) == METHODS["sqlm-online"].values
    knobs = PipelineArguments(knobs='{"sqlm-online": [0.3]}').sweep_config()
    assert knobs.values(METHODS["sqlm-online"]) == (0.3,)


# ----------------------------------------------------------------------------- the training key


def _counting(runner, calls: list):
    def run(command, argv):
        calls.append(command)
        runner(command, argv)

    return run


def _with_a_line_after_docstring(fn, line: str):
    """``fn``'s code compiled from its own source text with ``line`` inserted after its docstring (as
    an edit of the file would, without touching the file)."""
    import __future__

    import ast
    import inspect
    import textwrap

    src = textwrap.dedent(inspect.getsource(fn))
    body = ast.parse(src).body[0].body
    assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), "no docstring"
    lines = src.splitlines(keepends=True)
    at = body[1].lineno - 1
    lines.insert(at, " " * body[1].col_offset + line + "\n")
    ns: dict = {}
    flags = __future__.annotations.compiler_flag
    exec(compile("".join(lines), fn.__code__.co_filename, "exec", flags=flags, dont_inherit=True), fn.__globals__, ns)
    return ns[fn.__name__].__code__


@pytest.fixture(scope="module")
def training_keys():
    """The training key of every method on the sentiment task, as a sweep computes them (a few seconds),
    and the commands the canaries ran."""
    from sqlm.commands.pipeline import run_command
    from sqlm.evaluation import sweep

    saved, calls = dict(sweep._TRAINING_KEYS), []
    sweep._TRAINING_KEYS.clear()
    try:
        task, runner = SentimentTask(reduced=True), _counting(run_command, calls)
        keys = {name: sweep.training_key(task, m, runner) for name, m in METHODS.items()}
        again = {name: sweep.training_key(task, m, runner) for name, m in METHODS.items()}
    finally:
        sweep._TRAINING_KEYS.clear()
        sweep._TRAINING_KEYS.update(saved)
    assert again == keys
    return keys, calls


def test_training_key_is_a_canary_per_method_computed_once(training_keys):
    """Each method's key is the digest of its own canary run (through its own command) and the library
    versions; a process computes it once, however many runs and sweeps read it."""
    keys, calls = training_keys
    assert sorted(calls) == sorted(m.command for m in METHODS.values())  # once each, through its command
    digests = [k["canary"] for k in keys.values()]
    assert len(set(digests)) == len(METHODS) and all(len(d) == 64 for d in digests)
    versions = keys["dpo"]["versions"]
    assert set(versions) == {"sqlm", "trl", "transformers", "torch"} and all(versions.values())


def test_training_key_follows_behaviour_not_source_text(training_keys, monkeypatch):
    """The key survives a comment-only edit of the loss sqlm's recipes use, and changes when that loss
    or a default of SoftQConfig changes behaviour; a change to sqlm leaves DPO's key alone."""
    from sqlm.commands.pipeline import run_command
    from sqlm.config import SoftQConfig
    from sqlm.evaluation.canary import canary_digest
    from sqlm.evaluation.sweep import canary_argv
    from sqlm.losses import loss_spec

    keys, _ = training_keys
    task = SentimentTask(reduced=True)

    def digest(name: str) -> str:
        method = METHODS[name]
        return canary_digest(method.command, canary_argv(task, method), run_command)

    loss = loss_spec("unified_pcl").fn  # recipes/gold/sqlm/config_online.yaml's loss_type
    with monkeypatch.context() as m:
        m.setattr(loss, "__code__", _with_a_line_after_docstring(loss, "# only a comment: the same behaviour"))
        assert digest("sqlm-online") == keys["sqlm-online"]["canary"]
    with monkeypatch.context() as m:
        m.setattr(loss, "__code__", _with_a_line_after_docstring(loss, "rewards = 2 * rewards"))
        assert digest("sqlm-online") != keys["sqlm-online"]["canary"]
    with monkeypatch.context() as m:
        m.setattr(SoftQConfig.__dataclass_fields__["reward_scale"], "default", 2.0)  # no recipe sets it
        assert digest("sqlm-online") != keys["sqlm-online"]["canary"]
        assert digest("dpo") == keys["dpo"]["canary"]
    assert digest("sqlm-online") == keys["sqlm-online"]["canary"]  # all restored: deterministic


def test_pipeline_recipes_parse():
    from sqlm.recipe import parse_recipe

    root = Path(__file__).resolve().parents[1] / "recipes" / "pipeline"
    (args,) = parse_recipe((PipelineArguments,), str(root / "config_full.yaml"), [])
    cfg = args.sweep_config()
    assert cfg.full and cfg.bases == [0, 1] and cfg.seeds == [0, 1, 2]
    (args,) = parse_recipe((PipelineArguments,), str(root / "config_real.yaml"), [])
    cfg = args.sweep_config()
    assert args.tasks == ["chat_arithmetic"] and cfg.seeds == [0, 1, 2] and cfg.curve == 3
    assert cfg.records == Path("scripts/results/real/runs") and set(cfg.methods) == set(METHODS)
    (args,) = parse_recipe((PipelineArguments,), str(root / "config_real_sentiment.yaml"), [])
    cfg = args.sweep_config()
    assert args.tasks == ["chat_sentiment"] and cfg.methods == ["sqlm-offline", "dpo"] and cfg.seeds == [0, 1, 2]
    assert cfg.curve == 3 and cfg.records == Path("scripts/results/real/runs")
    assert args.output_dir != "scripts/results/real"  # its report does not overwrite the arithmetic one
    names = [m.name for m in cfg.all_methods("chat_sentiment")]
    assert names == ["sqlm-offline", "dpo", "sqlm-offline-abc", "sqlm-offline-implicit"]
    info = {"reward_model": "/rm", "implicit_model": "/dpo", "base_model": "/base"}
    kwargs = {m.name: json.loads(fill_placeholders(list(m.extra), info)[-1]) for m in cfg.all_methods()[2:]}
    assert kwargs == {"sqlm-offline-abc": {"abc": {"reward_model": "/rm"}},
                      "sqlm-offline-implicit": {"implicit": {"model": "/dpo", "ref_model": "/base", "beta": 0.1}}}  # fmt: skip
    assert ChatSentimentTask.IMPLICIT_BETA == 0.1  # the beta the DPO policy of {implicit_model} was trained with
    (args,) = parse_recipe((PipelineArguments,), str(root / "config_real_offline.yaml"), [])
    cfg = args.sweep_config()
    assert args.output_dir != "scripts/results/real" and cfg.records == Path("scripts/results/real/runs")
    (attempt,) = [m for m in cfg.all_methods("chat_arithmetic") if m.name == "sqlm-offline-group"]
    assert attempt.extra[-2:] == ("--loss_type", "group_pcl") and set(attempt.compare) == {"sqlm-offline", "dpo"}
    assert cfg.values(attempt) == (0.1, 0.01)  # the table's tau = beta, and the 100-nat margin that keeps pushing
