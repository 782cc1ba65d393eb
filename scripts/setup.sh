#!/usr/bin/env bash
# Create .venv with the engine and the given extras (default: demo). torch is pinned to the CPU
# build that lies on disk here; elsewhere any torch >= 2.1 works.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${COTEXNET_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[${extras}]"
# CLIP's BPE vocabulary for the offline 'tiny' tokenizer; --no-deps keeps it from pulling a CUDA torch.
.venv/bin/python -m pip install -q --no-deps "open-clip-torch>=2.20"
