"""Benchmark: memory per process of policy + reference + target network + optimizer, by engine.

Measured (2 CPU processes, gloo; a Qwen2-shaped model of about 100M parameters by default, fp32):

* ``ddp``: ``SoftQTrainer``, soft_q, full fine-tune: the reference and the target are whole copies;
* ``lora_adapter_target``: the same with LoRA (r=16, every linear layer): the reference is the base
  with adapters disabled and the target is a second adapter (no copy of the base);
* ``precomputed_reference``: ``ddp`` with ``precompute_ref_log_probs`` (no reference model held);
* ``fsdp2``: policy, reference and target sharded with ``torch.distributed.fsdp.fully_shard`` (as
  accelerate and TRL's ``prepare_fsdp`` shard them), Adam, one step and one shard-local Polyak
  update, run with torchrun outside the Trainer: accelerate turns FSDP on only on GPU machines;
* ``zero2`` / ``zero3``: ``SoftQTrainer`` under DeepSpeed through ``accelerate launch`` with
  recipes/accelerate/zero2.yaml / zero3.yaml (fp32, ``use_cpu``; DeepSpeed's CPU accelerator on gloo):
  ZeRO-2 partitions the gradients and optimizer state and keeps whole weights, a whole reference and a
  whole target per process; ZeRO-3 partitions everything, the reference and the target too. Without
  the deepspeed package the row says so.

Each process reports its peak resident set (``VmHWM``) and the model state it holds, counted from
its tensors: parameters of the policy (its local shards when sharded), their gradients (counted
as the trainable parameters' size: they all exist at the peak; under ZeRO, this process's
partition), the optimizer state (Adam's moments, plus DeepSpeed's fp32 master partitions, a copy
even in fp32 training), the reference and the target network. Activations are not in the model
state.

Then the same accounting from formulas (bytes per parameter, mixed-precision training: bf16 weights
and gradients, fp32 master weights and Adam moments; frozen reference and target in bf16) for 7B
and 70B models on 8 x 80 GB GPUs, so a user can see what fits:

    python scripts/bench_memory.py                 # measured rows + formula table
    python scripts/bench_memory.py --formulas-only # the table only
    python scripts/bench_memory.py --small         # a ~0.3M-parameter model (quick)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
MB = 1e6


# ----------------------------------------------------------------------------- formulas


@dataclass(frozen=True)
class Shape:
    """A Llama/Qwen2-shaped decoder."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def params(self) -> int:
        """Parameter count (embeddings, attention, MLP, norms, LM head unless tied)."""
        h, kv = self.hidden, self.kv_dim
        attn = h * h * 2 + h * kv * 2 + ((h + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate
        per_layer = attn + mlp + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * per_layer + h

    def lora_params(self, r: int = 16) -> int:
        """Adapter parameters of LoRA rank ``r`` on every linear layer of the decoder."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
        return self.layers * per_layer


SHAPES = {
    "7B": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "70B": Shape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=32000),
}


def formula_gb(shape: Shape, setup: str, n_gpus: int = 8, r: int = 16) -> float:
    """Model state per GPU (GB) of policy + reference + target + optimizer for soft_q.

    Per trained parameter: 2 (bf16 weight) + 2 (bf16 grad) + 4 (fp32 master) + 8 (Adam m, v) = 16
    bytes; a frozen reference or target: 2 bytes per parameter; LoRA adapters train in fp32
    (4 + 4 + 8 = 16 bytes per adapter parameter, its target adapter 4)."""
    p, n = shape.params(), n_gpus
    a = shape.lora_params(r)
    table = {
        "ddp": 16 * p + 2 * p + 2 * p,
        "zero2": 2 * p + 14 * p / n + 2 * p + 2 * p,  # weights replicated; grads + optimizer sharded
        "zero3": (16 * p + 2 * p + 2 * p) / n,  # everything partitioned (reference and target too)
        "fsdp2": (16 * p + 2 * p + 2 * p) / n,  # everything sharded
        "ddp_precomputed_reference": 16 * p + 2 * p,
        "lora_ddp_target_copy": 2 * p + 16 * a + (2 * p + 4 * a),  # the old way: the target copies the base
        "lora_ddp_adapter_target": 2 * p + 16 * a + 4 * a,  # reference = base, target = an adapter
        "lora_fsdp2_adapter_target": (2 * p + 16 * a + 4 * a) / n,
    }
    return table[setup] / GB


FORMULA_ROWS = [
    ("ddp", "DDP, full fine-tune"),
    ("ddp_precomputed_reference", "DDP, precomputed reference"),
    ("zero2", "ZeRO-2, full fine-tune"),
    ("zero3", "ZeRO-3, full fine-tune"),
    ("fsdp2", "FSDP2, full fine-tune"),
    ("lora_ddp_target_copy", "LoRA r=16, DDP, target = copy of the model"),
    ("lora_ddp_adapter_target", "LoRA r=16, DDP, target = adapter"),
    ("lora_fsdp2_adapter_target", "LoRA r=16, FSDP2/ZeRO-3, target = adapter"),
]


def formula_table(n_gpus: int = 8, gpu_gb: float = 80.0) -> str:
    """A Markdown table: GB per GPU (model state only) for 7B and 70B, and whether it leaves room."""
    head = "| setup (soft_q: policy + reference + target + Adam) | 7B: GB/GPU | 70B: GB/GPU |\n|---|---:|---:|\n"
    rows = []
    for key, label in FORMULA_ROWS:
        cells = []
        for name in ("7B", "70B"):
            gb = formula_gb(SHAPES[name], key, n_gpus)
            cells.append(f"{gb:,.1f} {'fits' if gb < gpu_gb else 'does not fit'}")
        rows.append(f"| {label} | {cells[0]} | {cells[1]} |")
    sizes = ", ".join(f"{k} = {v.params() / 1e9:.2f}B parameters" for k, v in SHAPES.items())
    return (
        f"Model state per GPU on {n_gpus} x {gpu_gb:.0f} GB ({sizes}); activations, the KV cache of "
        f"online generation and allocator slack come on top.\n\n" + head + "\n".join(rows)
    )


# ----------------------------------------------------------------------------- measured rows

DEFAULT = dict(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=2, vocab=32000)
SMALL = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=4096)


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    return float("nan")


def _bytes(tensors) -> int:
    from sqlm.forward import local_shard

    seen, total = set(), 0
    for t in tensors:
        piece = local_shard(t) if hasattr(t, "to_local") or hasattr(t, "ds_tensor") else t
        key = (piece.data_ptr(), piece.numel())
        if key in seen or piece.device.type == "meta":
            continue
        seen.add(key)
        total += piece.numel() * piece.element_size()
    return total


def _zero_master(optimizer) -> list:
    """DeepSpeed's fp32 master partitions (ZeRO-1/2 ``single_partition_of_fp32_groups``, ZeRO-3
    ``fp32_partitioned_groups_flat``) under accelerate's optimizer wrapper; [] for a torch optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)
    out = []
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        out += [t for t in getattr(inner, name, None) or [] if hasattr(t, "numel")]
    return out


def model_state(
    policy,
    optimizer,
    reference=None,
    target=None,
    target_adapter: str | None = None,
    zero_stage: int | None = None,
    world: int = 1,
) -> dict:
    """MB held by this process: policy parameters (adapter target excluded), their gradients (the
    trainable parameters' size; under ZeRO-1/2 a 1/world partition of them, under ZeRO-3 the size of
    the parameters' own partitions), optimizer state (with DeepSpeed's fp32 master partitions),
    reference and target."""
    params = [(n, p) for n, p in policy.named_parameters()]
    tgt_in_policy = [p for n, p in params if target_adapter and f".{target_adapter}." in n]
    own = [p for n, p in params if not (target_adapter and f".{target_adapter}." in n)]
    opt = [v for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel") and v.dim() > 0]
    opt += _zero_master(optimizer)
    grads = _bytes([p for p in own if p.requires_grad])
    if zero_stage in (1, 2):
        grads /= world
    out = {
        "policy": _bytes(own) / MB,
        "grads": grads / MB,
        "optimizer": _bytes(opt) / MB,
        "reference": _bytes(reference.parameters()) / MB if reference is not None else 0.0,
        "target": (_bytes(target.parameters()) if target is not None else _bytes(tgt_in_policy)) / MB,
    }
    out["total"] = sum(out.values())
    return out


def _rows_data(n: int = 16):
    words = "good fun bright bad dull grey film book song game".split()
    return [
        {
            "prompt": f"Rate the {words[6 + i % 4]}:",
            "chosen": f" {words[i % 3]} and {words[(i + 1) % 3]}.",
            "rejected": f" {words[3 + i % 3]} {words[3 + i % 3]}.",
        }
        for i in range(n)
    ]


def run_trainer_row(row: str, shape: dict, out_dir: str) -> dict:
    import torch
    from datasets import Dataset

    from sqlm.config import SoftQConfig
    from sqlm.tiny import train_tokenizer
    from sqlm.trainer import SoftQTrainer

    tok = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in _rows_data()] * 4, vocab_size=300)
    peft_config = None
    if row == "lora_adapter_target":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    args = SoftQConfig(
        output_dir=os.path.join(out_dir, row),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=48,
        loss_type="soft_q",
        learning_rate=1e-5,
        logging_steps=1,
        disable_tqdm=True,
        precompute_ref_log_probs=row == "precomputed_reference",
        dataloader_num_workers=0,
        reward_funcs=["keyword"],
        reward_kwargs={"keyword": {"words": ["good", "fun", "bright"]}},
    )
    # built once the config exists, as `sqlm train` loads its model: under ZeRO-3, zero.Init partitions it
    model = _model(shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    trainer = SoftQTrainer(
        model, args, train_dataset=Dataset.from_list(_rows_data()), processing_class=tok, peft_config=peft_config
    )
    trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    reference = trainer.ref_model
    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    state = model_state(
        policy,
        trainer.optimizer,
        getattr(reference, "module", reference),
        getattr(trainer.target_model, "module", trainer.target_model),
        "target" if trainer.has_target and trainer.target_model is None else None,  # the target adapter
        zero_stage=zero_stage,
        world=trainer.args.world_size,
    )
    del torch
    return {
        "rank": trainer.args.process_index,
        "world": trainer.args.world_size,
        "state": state,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _model(shape: dict, **config):
    """The benchmark's Qwen2-shaped model of ``shape`` (tied embeddings)."""
    from sqlm.tiny import tiny_causal_lm

    return tiny_causal_lm(
        shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        tie_word_embeddings=True,
        **config,
    )


def run_fsdp2_row(shape: dict) -> dict:
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from sqlm.forward import polyak_update

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    policy = _model(shape)
    reference, target = copy.deepcopy(policy).eval(), copy.deepcopy(policy).eval()
    for layer in policy.model.layers:
        fully_shard(layer)
    fully_shard(policy)
    fully_shard(reference)
    fully_shard(target)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    ids = torch.randint(0, shape["vocab"], (2, 48))
    for _ in range(2):
        with torch.no_grad():
            reference(input_ids=ids)
            reference.reshard()
            target(input_ids=ids)
            target.reshard()
        policy(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        polyak_update(policy, target, 0.05)
    state = model_state(policy, opt, reference, target)
    out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "state": state, "peak_rss_mb": _peak_rss_mb()}
    dist.destroy_process_group()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_reason() -> str | None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return "the deepspeed package is not installed (scripts/setup.sh installs it)"
    return None


def launch(row: str, size: str, out: Path) -> list[dict]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        SQLM_CACHE=str(out / "cache"),
    )
    me = [str(Path(__file__).resolve()), "--worker", row, "--size", size, "--out", str(out)]
    if row == "fsdp2":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            *me,
        ]
    else:  # ZeRO rows with their DeepSpeed config, every other row under DDP
        config = f"{row}.yaml" if row in ("zero2", "zero3") else "ddp.yaml"
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "recipes" / "accelerate" / config),
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
            "--main_process_port",
            str(_free_port()),
            *me,
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{row} failed:\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"{row}_rank{r}.json").read_text()) for r in (0, 1)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a ~0.3M-parameter model instead of ~100M")
    parser.add_argument("--rows", default="ddp,lora_adapter_target,precomputed_reference,fsdp2,zero2,zero3")
    parser.add_argument("--formulas-only", action="store_true")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)

    if a.worker:
        shape = SMALL if a.size == "small" else DEFAULT
        result = run_fsdp2_row(shape) if a.worker == "fsdp2" else run_trainer_row(a.worker, shape, a.out)
        Path(a.out, f"{a.worker}_rank{result['rank']}.json").write_text(json.dumps(result))
        return 0

    if not a.formulas_only:
        size = "small" if a.small else "default"
        shape = SMALL if a.small else DEFAULT
        n = Shape(**shape, tied=True, qkv_bias=True).params()
        print(
            f"Measured: Qwen2-shaped model of {n / 1e6:.1f}M parameters (fp32), soft_q, 2 CPU processes; "
            "MB per process (rank 0)\n"
        )
        print("| row | policy | grads | optimizer | reference | target | model state | peak RSS |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        with tempfile.TemporaryDirectory() as tmp:
            for row in a.rows.split(","):
                if row in ("zero2", "zero3") and (why := _deepspeed_reason()):
                    print(f"| {row} | not run here: {why} | | | | | | |")
                    continue
                r0 = launch(row, size, Path(tmp))[0]
                s = r0["state"]
                print(
                    f"| {row} | {s['policy']:.0f} | {s['grads']:.0f} | {s['optimizer']:.0f} | {s['reference']:.0f} "
                    f"| {s['target']:.0f} | {s['total']:.0f} | {r0['peak_rss_mb']:.0f} |",
                    flush=True,
                )
        print()
    print(formula_table(a.gpus, a.gpu_gb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
