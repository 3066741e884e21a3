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
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", SQLM_CACHE=str(tmp_path / "cache"),
               SQLM_TEST_OUT=str(tmp_path), TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes" / "accelerate" / "ddp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
        str(worker), "--config", str(QUICKSTART),
        "--use_cpu", "true", "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--mode", "mixed", "--mix_ratio", "0.5",
        "--loss_type", "soft_q", "--max_completion_length", "8", "--logging_steps", "1",
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
