"""Two CPU processes (gloo) through `accelerate launch` with recipes/accelerate/ddp.yaml.

`accelerate launch --cpu --num_processes 2` starts only one process; the DDP config with
`--num_processes 2 --mixed_precision no` and `use_cpu: true` in the recipe starts two.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path


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
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        SQLM_CACHE=str(tmp_path / "cache"),
        SQLM_TEST_OUT=str(tmp_path),
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes" / "accelerate" / "ddp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(_free_port()),
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
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
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
    dist.destroy_process_group()
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
    values equal a single-process run of the same global batch. (accelerate enables FSDP only on GPU
    machines, so the trainer's FSDP2 path itself is not run here.)"""
    import torch

    worker = tmp_path / "fsdp2_worker.py"
    worker.write_text(FSDP2_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", SQLM_TEST_OUT=str(tmp_path), HF_HUB_OFFLINE="1")
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
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
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
