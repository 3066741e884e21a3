"""Two CPU processes (gloo) through `accelerate launch` with recipes/accelerate/ddp.yaml, fsdp.yaml,
zero2.yaml and zero3.yaml.

`accelerate launch --cpu --num_processes 2` starts only one process; the configs with
`--num_processes 2 --mixed_precision no` and `use_cpu: true` in the recipe start two. DeepSpeed runs
on its CPU accelerator (scripts/setup.sh installs it); FSDP needs one test-only patch of accelerate's
choice of engine (see SHARDED_WORKER).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart" / "sqlm" / "config.yaml"

WORKER = textwrap.dedent(
    """
    import hashlib, os, sys
    from sqlm.commands.train import run

    def digest(module):
        h = hashlib.sha256()
        for name, p in sorted(module.named_parameters()):
            h.update(name.encode()); h.update(p.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()

    trainer = run(sys.argv[1:])
    model = trainer.accelerator.unwrap_model(trainer.model)
    target = getattr(trainer.target_model, "module", trainer.target_model)
    with open(os.path.join(os.environ["SQLM_TEST_OUT"], f"rank{trainer.args.process_index}.txt"), "w") as f:
        f.write(f"{trainer.args.world_size} {trainer.state.global_step} {digest(model)} {digest(target)}")
    # as `sqlm train` ends: every process waits, the process groups end, and the process exits with code 0
    # without the interpreter's finalisation (sqlm.shutdown: gloo threads outlive destroy_process_group)
    from sqlm.commands.train import finish
    finish(trainer)
    """
)


def _run(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new session: on timeout the launcher and every worker it started are
    killed (a hung distributed run leaves no processes behind), then TimeoutExpired is raised."""
    import signal

    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_launch(config: str, *args: str) -> list[str]:
    """``accelerate launch`` of 2 processes, no mixed precision, a free port, with ``recipes/accelerate/<config>``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "recipes" / "accelerate" / config), "--num_processes", "2", "--mixed_precision", "no",
            "--main_process_port", str(_free_port()), *args]  # fmt: skip


def _worker_env(tmp_path, out, **extra) -> dict[str, str]:
    """The environment of launched workers: offline, one thread each, their own sqlm cache, ``out`` where
    they write what the test reads (``SQLM_TEST_OUT``), and ``extra``."""
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                SQLM_CACHE=str(tmp_path / "cache"), SQLM_TEST_OUT=str(out), **extra)  # fmt: skip


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = _worker_env(tmp_path, tmp_path)
    cmd = _accelerate_launch(
        "ddp.yaml",
        str(worker),
        "--config",
        str(QUICKSTART),
        "--use_cpu",
        "true",
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "4",
        "--mode",
        "mixed",
        "--mix_ratio",
        "0.5",
        "--loss_type",
        "soft_q",
        "--max_completion_length",
        "8",
        "--logging_steps",
        "1",
    )
    proc = _run(cmd, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    for world, steps, _, _ in lines:
        assert world == "2" and steps == "3"
    assert lines[0][2] == lines[1][2], "policy parameters differ across ranks"
    assert lines[0][3] == lines[1][3], "target networks differ across ranks"

    # and training moved the policy away from the (cached) initial model
    from transformers import AutoModelForCausalLM

    (cached,) = [p for p in (tmp_path / "cache" / "tiny").iterdir() if not p.name.startswith(".")]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    initial = AutoModelForCausalLM.from_pretrained(cached)
    assert any(not (a == b).all() for a, b in zip(initial.parameters(), final.parameters()))


# ----------------------------------------------------------------------------- FSDP2 target network

FSDP2_WORKER = textwrap.dedent(
    """
    import copy, os, sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from sqlm.forward import local_shard, model_values, polyak_update
    from sqlm.tiny import tiny_causal_lm

    ALPHA, LR, STEPS = 0.3, 0.5, 3
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    policy = tiny_causal_lm(64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    target = copy.deepcopy(policy)
    for layer in policy.model.layers:  # the policy as accelerate wraps it (one group per decoder layer)...
        fully_shard(layer)
    fully_shard(policy)
    fully_shard(target)  # ...the target as TRL's prepare_fsdp shards a reference (the root only)
    target.eval()
    opt = torch.optim.SGD(policy.parameters(), lr=LR)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    mine = ids[rank * 2 : rank * 2 + 2]  # this process's half of the global batch

    counted = []
    def counting(name, fn):
        def wrapper(*a, **k):
            counted.append(name)
            return fn(*a, **k)
        return wrapper
    for name in ("all_gather_into_tensor", "all_gather", "broadcast", "all_reduce", "reduce_scatter_tensor"):
        setattr(dist, name, counting(name, getattr(dist, name)))

    exact = True
    for step in range(STEPS):
        logits = policy(input_ids=mine).logits
        # the target's values in the step, as compute_loss reads them (the forward gathers, then reshards)
        model_values(target, {"input_ids": mine, "attention_mask": torch.ones_like(mine), "logits_start": 0}, 0.1)
        loss = torch.logsumexp(logits.float(), -1).mean()  # the mean over this half; FSDP averages the halves
        loss.backward()
        opt.step()
        opt.zero_grad()
        before = [local_shard(p).clone() for p in target.parameters()]
        n = len(counted)
        polyak_update(policy, target, ALPHA)
        assert len(counted) == n, f"collectives during the Polyak update: {counted[n:]}"
        for b, p, t in zip(before, policy.parameters(), target.parameters()):
            exact &= torch.equal(local_shard(t), b.mul(1 - ALPHA).add(local_shard(p), alpha=ALPHA))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits_start": 0}
    values = model_values(target, batch, 0.1)  # the sharded target's forward (all-gathers as the reference's)
    full = {f"policy/{k}": v.full_tensor() for k, v in policy.named_parameters()}
    full.update({f"target/{k}": v.full_tensor() for k, v in target.named_parameters()})
    full["values"] = values
    full["exact"] = torch.tensor(exact)
    full["sharded"] = torch.tensor(all(local_shard(p).numel() < p.numel() for p in target.parameters() if p.numel() >= world))
    if rank == 0:
        torch.save(full, os.path.join(os.environ["SQLM_TEST_OUT"], "fsdp2.pt"))
    # fully_shard keeps the group (FSDPMeshInfo.shard_process_group): its gloo threads outlive the destroy
    from sqlm.shutdown import end_process_group, exit_process
    end_process_group()
    exit_process(0)
    """
)


def _single_process_fsdp2_twin():
    """The same 3 steps in one process on the whole batch: what the 2-process FSDP2 run must equal."""
    import copy

    import torch

    from sqlm.forward import model_values, polyak_update
    from sqlm.tiny import tiny_causal_lm

    torch.manual_seed(0)
    policy = tiny_causal_lm(64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    target = copy.deepcopy(policy).eval()
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        halves = [torch.logsumexp(policy(input_ids=ids[i : i + 2]).logits.float(), -1).mean() for i in (0, 2)]
        (sum(halves) / 2).backward()
        opt.step()
        opt.zero_grad()
        polyak_update(policy, target, 0.3)
    out = {f"policy/{k}": v.detach() for k, v in policy.named_parameters()}
    out.update({f"target/{k}": v.detach() for k, v in target.named_parameters()})
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits_start": 0}
    out["values"] = model_values(target, batch, 0.1)
    return out


def test_fsdp2_target_polyak_on_local_shards_matches_one_process(tmp_path):
    """FSDP2 on 2 CPU processes (gloo, torchrun): the target, sharded like a reference, moves by exactly
    the Polyak rule on each process's local shards with no collective, and policy / target / target
    values equal a single-process run of the same global batch, with torch's fully_shard alone (the
    trainer's FSDP2 path: test_soft_q_target_under_sharding_matches_one_process_and_resumes_exactly)."""
    import torch

    worker = tmp_path / "fsdp2_worker.py"
    worker.write_text(FSDP2_WORKER)
    env = _worker_env(tmp_path, tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(worker),
    ]
    proc = _run(cmd, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "fsdp2.pt", weights_only=True)
    assert bool(got.pop("exact")), "the target did not move by exactly the Polyak rule on its local shards"
    assert bool(got.pop("sharded")), "the target's parameters were not sharded"
    expected = _single_process_fsdp2_twin()
    assert got.keys() == expected.keys()
    moved = 0
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    initial = _initial_params()
    for k, v in initial.items():
        moved += not torch.allclose(expected[f"target/{k}"], v)
    assert moved > 0  # the target moved away from the initial policy


def _initial_params():
    import torch

    from sqlm.tiny import tiny_causal_lm

    torch.manual_seed(0)
    model = tiny_causal_lm(64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    return {k: v.detach() for k, v in model.named_parameters()}


# ----------------------------------------------------------------------------- SoftQTrainer under FSDP2 / ZeRO

SHARDED_WORKER = textwrap.dedent(
    '''
    """One SoftQTrainer run (soft_q, target network) under the engine of the accelerate config it is
    launched with, on CPU processes. argv: model folder, output_dir, checkpoint to resume or "-"."""
    import json, os, sys
    import torch
    import torch.distributed as dist

    ENGINE = os.environ["SQLM_TEST_ENGINE"]  # fsdp2 | zero2 | zero3
    if ENGINE != "fsdp2":
        import deepspeed.comm.torch
        # DeepSpeed's CPU shared-memory op (used for inference all-reduce only, not by ZeRO training) sometimes
        # aborts the process at interpreter exit ("terminate called without an active exception")
        deepspeed.comm.torch.build_shm_op = lambda: None
    LORA = os.environ.get("SQLM_TEST_LORA") == "1"  # the target is then a second adapter
    OUT = os.environ["SQLM_TEST_OUT"]

    # Every collective this process starts, counted (wrapped before DeepSpeed caches the functions).
    COLLECTIVES = []
    def counting(name, fn):
        def wrapper(*a, **k):
            COLLECTIVES.append(name)
            return fn(*a, **k)
        return wrapper
    for name in ("all_gather_into_tensor", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list",
                 "all_reduce", "reduce_scatter_tensor", "reduce_scatter", "all_to_all_single"):
        setattr(dist, name, counting(name, getattr(dist, name)))


    def let_accelerate_use_fsdp_on_cpu():
        """accelerate 1.16 turns FSDP on only for accelerator devices: AcceleratorState.__init__ sets
        distributed_type FSDP and state.fsdp_plugin only inside `elif self.distributed_type in
        [MULTI_GPU, MULTI_MLU, ...]` (accelerate/state.py:947-976), a list without MULTI_CPU, so CPU
        processes silently run DDP. This test-only patch does, after __init__ on MULTI_CPU, exactly what
        that branch does for a plugin and mixed_precision "no"; everything after the choice of the
        distributed type is accelerate's, transformers' and sqlm's own code. (DeepSpeed needs no patch:
        AcceleratorState picks it whenever the Accelerator itself is not told cpu=True, state.py:935,
        which the Trainer never does, and DeepSpeed reuses the gloo group of use_cpu's MULTI_CPU state.)
        """
        import accelerate.state as state
        from accelerate.utils import DistributedType

        init = state.AcceleratorState.__init__

        def patched(self, *args, fsdp_plugin=None, **kwargs):
            init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
                self.distributed_type = DistributedType.FSDP
                self.fsdp_plugin = fsdp_plugin
                state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

        state.AcceleratorState.__init__ = patched


    if ENGINE == "fsdp2":
        let_accelerate_use_fsdp_on_cpu()

    from datasets import Dataset
    from sqlm.config import SoftQConfig
    from sqlm.forward import local_shard
    from sqlm.loading import load_model, load_tokenizer, model_init_kwargs
    from sqlm.trainer import SoftQTrainer

    def good_reward(prompts, completions, **kwargs):
        return [1.0 if "good" in c else -1.0 for c in completions]

    model_dir, output_dir, resume = sys.argv[1], sys.argv[2], sys.argv[3]
    args = SoftQConfig(output_dir=output_dir, use_cpu=True, **json.loads(os.environ["SQLM_TEST_ARGS"]))
    rank = args.process_index
    # loaded after the config, as `sqlm train` does: under ZeRO-3, zero.Init partitions it
    model = load_model(model_dir, model_init_kwargs(args))
    partitioned_at_load = hasattr(next(model.parameters()), "ds_tensor")
    rows = json.loads(os.environ["SQLM_TEST_ROWS"])
    peft_config = None
    if LORA:
        from peft import LoraConfig
        peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = SoftQTrainer(model, args, train_dataset=Dataset.from_list(rows),
                           processing_class=load_tokenizer(model_dir), reward_funcs=[good_reward],
                           peft_config=peft_config)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if LORA:  # (policy adapter, target adapter) parameter names of the one model
        target, pairs = policy, trainer.target.pairs
    else:
        target = getattr(trainer.target_model, "module", trainer.target_model)
        pairs = [(n, n) for n in trainer.target.names]
    if trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2:
        engine = "fsdp"
    elif trainer.is_deepspeed_enabled:
        engine = f"zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    else:
        engine = "none"

    # the Polyak step, checked on this process's pieces: exactly (1 - a) * target + a * policy, no collective
    alpha, polyak = args.target_model_mixup_alpha, {"steps": 0, "exact": True, "collectives": []}
    update = trainer.update_target_model
    def checked_update():
        src, dst = dict(policy.named_parameters()), dict(target.named_parameters())
        before = {d: local_shard(dst[d]).clone() for _, d in pairs}
        n_coll = len(COLLECTIVES)
        update()
        polyak["collectives"] += COLLECTIVES[n_coll:]
        for s, d in pairs:
            expected = before[d].mul(1.0 - alpha).add(local_shard(src[s]), alpha=alpha)
            polyak["exact"] &= torch.equal(local_shard(dst[d]), expected)
        polyak["steps"] += 1
    trainer.update_target_model = checked_update

    trainer.train(resume_from_checkpoint=None if resume == "-" else resume)
    trainer.save_model()

    def pieces(params):  # local piece / whole parameter sizes: is it sharded?
        return sum(local_shard(p).numel() for p in params), sum(getattr(p, "ds_numel", p.numel()) for p in params)

    def full(m):
        import contextlib
        if trainer.is_deepspeed_enabled and hasattr(next(m.parameters()), "ds_tensor"):
            import deepspeed
            ctx = deepspeed.zero.GatheredParameters(list(m.parameters()))
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p.data).detach().clone()
                    for n, p in m.named_parameters()}

    if LORA:  # the two adapters' weights
        whole = full(policy)
        weights = {"policy": {s: whole[s] for s, _ in pairs}, "target": {d: whole[d] for _, d in pairs}}
    else:
        weights = {"policy": full(policy), "target": full(target)}
    if rank == 0:
        torch.save(weights, os.path.join(OUT, "final.pt"))
    target_params = dict(target.named_parameters())
    report = dict(engine=engine, world=args.world_size, step=trainer.state.global_step, polyak=polyak,
                  partitioned_at_load=partitioned_at_load, target_pieces=pieces([target_params[d] for _, d in pairs]),
                  n_collectives=len(COLLECTIVES))
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    from sqlm.commands.train import finish
    finish(trainer)  # as `sqlm train` ends: barrier, groups destroyed, exit 0 without the finalisation
    '''
)

# the run every engine is compared with: soft_q with a target network on offline pairs (the same rows on
# every process; accelerate gives each its half of a global batch of 4 rows)
SHARDED_ARGS = dict(
    per_device_train_batch_size=2,
    max_steps=4,
    learning_rate=5e-3,
    lr_scheduler_type="constant",
    logging_steps=1,
    save_strategy="steps",
    save_steps=2,
    report_to="none",
    seed=0,
    max_length=32,
    loss_type="soft_q",
    target_model_mixup_alpha=0.3,
    dataloader_num_workers=0,
)
ENGINE_CONFIGS = {"fsdp2": "fsdp.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}


def _tiny_model_dir(tmp_path):
    """The trainer tests' tiny model and tokenizer, saved for the processes to load (safetensors)."""
    from test_trainer import BAD, GOOD, PROMPTS, make_model

    from sqlm.tiny import train_tokenizer

    tokenizer = train_tokenizer([p + GOOD for p in PROMPTS] * 4 + [p + BAD for p in PROMPTS] * 4, vocab_size=300)
    folder = tmp_path / "model"
    make_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _rows():
    from test_trainer import pref_data

    return pref_data().to_list()


EXIT_ABORT = "terminate called without an active exception"


def _launch(tmp_path, engine, model_dir, output_dir, resume="-", lora=False):
    """`accelerate launch` of SHARDED_WORKER with recipes/accelerate/<engine config> on 2 CPU processes,
    once: every process must exit 0 (no process aborted at exit, EXIT_ABORT; see sqlm.shutdown)."""
    import json

    out = tmp_path / f"report-{output_dir.name}"
    out.mkdir()
    worker = tmp_path / "sharded_worker.py"
    worker.write_text(SHARDED_WORKER)
    env = _worker_env(
        tmp_path,
        out,
        SQLM_TEST_ENGINE=engine,
        SQLM_TEST_ARGS=json.dumps(SHARDED_ARGS),
        SQLM_TEST_ROWS=json.dumps(_rows()),
        SQLM_TEST_LORA="1" if lora else "0",
    )
    cmd = _accelerate_launch(
        ENGINE_CONFIGS[engine],
        str(worker),
        str(model_dir),
        str(output_dir),
        str(resume),
    )
    proc = _run(cmd, timeout=300, cwd=tmp_path, env=env)
    assert EXIT_ABORT not in proc.stderr, proc.stderr[-6000:]
    assert proc.returncode == 0, proc.stderr[-6000:]
    import torch

    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return torch.load(out / "final.pt", weights_only=True), reports


def _single_process(tmp_path, model_dir, lora=False):
    """The same run in one process on the whole global batch (4 rows a step)."""
    from datasets import Dataset
    from test_scale import adapter_params
    from test_scale import lora as lora_config
    from test_trainer import good_reward

    from sqlm.config import SoftQConfig
    from sqlm.loading import load_model, load_tokenizer, model_init_kwargs
    from sqlm.trainer import SoftQTrainer

    kw = {**SHARDED_ARGS, "per_device_train_batch_size": 4, "save_strategy": "no"}
    args = SoftQConfig(output_dir=str(tmp_path / "single"), use_cpu=True, **kw)
    trainer = SoftQTrainer(
        load_model(str(model_dir), model_init_kwargs(args)),
        args,
        train_dataset=Dataset.from_list(_rows()),
        processing_class=load_tokenizer(str(model_dir)),
        reward_funcs=[good_reward],
        peft_config=lora_config() if lora else None,
    )
    trainer.train()
    if lora:
        return {"policy": adapter_params(trainer.model, "default"), "target": adapter_params(trainer.model, "target")}
    return {
        "policy": {n: p.detach() for n, p in trainer.model.named_parameters()},
        "target": {n: p.detach() for n, p in trainer.target_model.named_parameters()},
    }


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """(model folder, lora -> the run's final policy and target in one process on the whole global batch)."""
    tmp = tmp_path_factory.mktemp("one_process")
    model_dir = _tiny_model_dir(tmp)
    runs = {}

    def run(lora=False):
        if lora not in runs:
            runs[lora] = _single_process(tmp / f"lora{int(lora)}", model_dir, lora)
        return runs[lora]

    return model_dir, run


def _assert_matches_one_process(got, expected):
    import torch

    for part in ("policy", "target"):
        assert got[part].keys() == expected[part].keys()
        for n, v in expected[part].items():
            torch.testing.assert_close(got[part][n], v, rtol=1e-5, atol=1e-6, msg=f"{part} {n}")


def _engine_available(engine):
    if engine == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError as e:
            pytest.skip(f"this torch build has no FSDP2 (torch.distributed.fsdp.fully_shard): {e}")
    else:
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            pytest.skip(f"deepspeed is not installed ({e}); scripts/setup.sh installs it (CPU build, no ops)")


@pytest.mark.parametrize("engine,lora", [("fsdp2", False), ("zero3", False), ("fsdp2", True), ("zero3", True)])
def test_soft_q_target_under_sharding_matches_one_process_and_resumes_exactly(tmp_path, engine, lora, one_process_run):
    """SoftQTrainer under accelerate's FSDP2 / DeepSpeed ZeRO-3 plugin on 2 CPU processes (gloo), with the
    recipes' launch configs: a full fine-tune (under ZeRO-3 transformers partitions the policy while it
    loads, as every model loaded once the config exists, and the reference and target are built from its
    partitions), and LoRA with the target as a second adapter, sharded with the policy. DeepSpeed runs as
    accelerate sets it up; FSDP2, which accelerate enables only on accelerators, takes one test-only
    patch of that choice (the worker's let_accelerate_use_fsdp_on_cpu, see its docstring).

    (a) policy and target equal a one-process run of the same global batch (fp32 tolerance); (b) the
    target, sharded, moved by exactly the Polyak rule on each process's pieces, with no collective; (c) a
    resumed run (new processes, from checkpoint-2) ends bit-identical to the uninterrupted one."""
    import torch

    _engine_available(engine)
    model_dir, one_process = one_process_run
    full, reports = _launch(tmp_path, engine, model_dir, tmp_path / "full", lora=lora)
    expected_engine = "fsdp" if engine == "fsdp2" else engine
    for r in reports:
        assert r["engine"] == expected_engine and r["world"] == 2 and r["step"] == 4, r
        local, whole = r["target_pieces"]
        assert local < whole, f"the target is not sharded: {local} of {whole} elements on one process"
        assert r["polyak"]["steps"] == 4 and r["polyak"]["exact"], r["polyak"]
        assert r["polyak"]["collectives"] == [], f"collectives in the Polyak update: {r['polyak']['collectives']}"
        assert r["n_collectives"] > 0  # the spy sees the engine's collectives
        assert r["partitioned_at_load"] == (engine == "zero3")

    _assert_matches_one_process(full, one_process(lora))  # (a)
    if lora:  # lora_B starts at 0: the target adapter moved; the output_dir is the policy adapter alone
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        assert any(bool(v.any()) for n, v in full["target"].items() if "lora_B" in n), "the target never moved"
        assert not (tmp_path / "full" / "target").exists()
        saved = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "full")
        assert set(saved.peft_config) == {"default"}
        params = dict(saved.named_parameters())
        for n, v in full["policy"].items():
            assert torch.equal(params[n], v), f"saved {n}"
    else:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        start = load_file(model_dir / "model.safetensors")
        assert any(not torch.allclose(full["target"][n], start[n]) for n in start), "the target never moved"
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "full")  # the output_dir: the final policy
        for n, p in saved.named_parameters():
            assert torch.equal(p, full["policy"][n]), f"saved {n}"

    # (c) kill and resume: new processes continue from checkpoint-2 and end where the full run ended
    ckpt = tmp_path / "full" / "checkpoint-2"
    resumed, reports = _launch(tmp_path, engine, model_dir, tmp_path / "resumed", ckpt, lora=lora)
    assert [r["polyak"]["steps"] for r in reports] == [2, 2]
    for part in ("policy", "target"):
        for n, v in full[part].items():
            assert torch.equal(resumed[part][n], v), f"resumed {part} {n} differs from the uninterrupted run"


def test_soft_q_target_under_zero2_matches_one_process(tmp_path, one_process_run):
    """ZeRO-2 (the recipes' zero2.yaml) on 2 CPU processes: the target is a whole copy on each process
    (as TRL prepares a reference below ZeRO-3), moved by exactly the Polyak rule; policy and target equal
    the one-process run."""
    _engine_available("zero2")
    model_dir, one_process = one_process_run
    full, reports = _launch(tmp_path, "zero2", model_dir, tmp_path / "full")
    for r in reports:
        assert r["engine"] == "zero2" and r["world"] == 2 and r["step"] == 4, r
        assert r["target_pieces"][0] == r["target_pieces"][1]  # not sharded
        assert r["polyak"]["steps"] == 4 and r["polyak"]["exact"] and r["polyak"]["collectives"] == [], r["polyak"]
        assert not r["partitioned_at_load"]
    _assert_matches_one_process(full, one_process())


QUICKSTART_WORKER = textwrap.dedent(
    """
    import atexit, os, sys
    import deepspeed.comm.torch
    import torch.distributed as dist
    from sqlm.cli import main

    # DeepSpeed's CPU shared-memory op (used for inference all-reduce only, not by ZeRO training) sometimes
    # aborts the process at interpreter exit ("terminate called without an active exception")
    deepspeed.comm.torch.build_shm_op = lambda: None
    from sqlm.shutdown import native_threads

    def at_exit():  # sqlm train ends a launched process through exit_process, which runs the atexit handlers
        with open(os.path.join(os.environ["SQLM_TEST_OUT"], f"after{os.environ['RANK']}.txt"), "w") as f:
            f.write(f"{dist.is_initialized()} {' '.join(native_threads())}")
    atexit.register(at_exit)
    rc = main(["train", *sys.argv[1:]])  # what scripts/train.py runs; a launched process exits in it
    print(f"sqlm train returned {rc} on a launched process", file=sys.stderr)
    sys.exit(3)
    """
)


def test_quickstart_trains_under_zero3_on_two_processes(tmp_path):
    """The README's quickstart recipe (a `tiny:` model built and cached by the main process first) through
    `accelerate launch` with recipes/accelerate/zero3.yaml on 2 CPU processes. The main process used to
    build the model under zero.Init alone, whose collectives waited for the other process, which waited for
    it: the launch hung. `sqlm train` also ends its process group and exits 0 (see
    test_sqlm_train_exits_0_while_a_gloo_thread_still_works)."""
    _engine_available("zero3")
    worker = tmp_path / "quickstart_worker.py"
    worker.write_text(QUICKSTART_WORKER)
    env = _worker_env(tmp_path, tmp_path)
    cmd = _accelerate_launch(
        "zero3.yaml",
        str(worker),
        "--config",
        str(QUICKSTART),
        "--use_cpu",
        "true",
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--loss_type",
        "soft_q",
    )
    try:
        proc = _run(cmd, timeout=150, cwd=tmp_path, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the ZeRO-3 launch of the quickstart hung (killed after 150 s)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in (0, 1):  # sqlm train exited with code 0, its atexit handlers run, the process group destroyed
        assert (tmp_path / f"after{r}.txt").read_text().split()[0] == "False"

    from transformers import AutoModelForCausalLM

    (cached,) = [p for p in (tmp_path / "cache" / "tiny").iterdir() if not p.name.startswith(".")]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    initial = AutoModelForCausalLM.from_pretrained(cached)
    assert any(not (a == b).all() for a, b in zip(initial.parameters(), final.parameters()))


# ----------------------------------------------------------------------------- the end of a launched run

LATE_GLOO_WORKER = textwrap.dedent(
    """
    \"\"\"`sqlm train` as scripts/train.py runs it, with the process group in the state that, under load, ends
    an FSDP2 / DeepSpeed run: a reference to the group outlives destroy_process_group (as FSDPMeshInfo's
    shard_process_group) and a gloo worker thread is still finishing a collective that needs the GIL (here,
    deterministically, a completion hook that takes 1 s; on a busy machine, a thread not yet scheduled).\"\"\"
    import atexit, os, sys, time
    import torch, torch.distributed as dist
    from sqlm.cli import main
    from sqlm.shutdown import native_threads

    OUT, RANK = os.environ["SQLM_TEST_OUT"], os.environ["RANK"]
    destroy, held = dist.destroy_process_group, []

    def destroy_while_gloo_works(group=None):
        held.append(dist.group.WORLD)  # kept past the destroy, as FSDP2 keeps its groups
        def late(fut):  # runs on gloo's worker thread (pt_gloo_runloop)
            time.sleep(1.0)
            return fut.value()
        held[0].allreduce([torch.ones(4)]).get_future().then(late)
        destroy(group)
    dist.destroy_process_group = destroy_while_gloo_works

    def at_exit():
        with open(os.path.join(OUT, f"exit{RANK}.txt"), "w") as f:
            f.write(f"{dist.is_initialized()} {' '.join(native_threads())}")
    atexit.register(at_exit)
    rc = main(["train", *sys.argv[1:]])
    with open(os.path.join(OUT, f"returned{RANK}.txt"), "w") as f:
        f.write(str(rc))
    sys.exit(rc)
    """
)


def test_sqlm_train_exits_0_while_a_gloo_thread_still_works(tmp_path):
    """A 2-process `sqlm train` that saved its model exits 0 on every process, whatever gloo's threads do.

    destroy_process_group() only unregisters a group; the C++ group and its worker threads live as long as
    something holds it (FSDP2, DeepSpeed, device meshes do). Left to the interpreter's finalisation, a
    worker thread that then needs the GIL is ended by CPython with pthread_exit, which aborts the process
    ("terminate called without an active exception", exit -6: the FSDP2 test's intermittent failure under
    load). `sqlm train` ends a launched process with sqlm.shutdown.exit_process: barrier, groups destroyed,
    atexit handlers run, then os._exit(0) without the finalisation. This worker makes the bad state certain
    (see LATE_GLOO_WORKER); before that fix every process of this launch aborted."""
    worker = tmp_path / "late_gloo_worker.py"
    worker.write_text(LATE_GLOO_WORKER)
    env = _worker_env(tmp_path, tmp_path)
    cmd = _accelerate_launch(
        "ddp.yaml",
        str(worker),
        "--config",
        str(QUICKSTART),
        "--use_cpu",
        "true",
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--max_completion_length",
        "4",
    )
    proc = _run(cmd, timeout=300, cwd=tmp_path, env=env)
    assert EXIT_ABORT not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    for r in (0, 1):
        initialized, *threads = (tmp_path / f"exit{r}.txt").read_text().split()
        assert initialized == "False"  # the group was destroyed, and the atexit handlers ran
        assert "gloo_tcp_loop" in threads  # ...while the held group's gloo threads were still alive
        assert not (tmp_path / f"returned{r}.txt").exists()  # a launched process ends in sqlm train
