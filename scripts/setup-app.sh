#!/usr/bin/env bash
# Create .venv-app for the web app (`cotexnet app`) with the given extras (default: app). It is a venv of
# its own because trame-slicer pins slicer-core to an older range than the test extra (.venv) uses.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-app}"
[ -x .venv-app/bin/python ] || python3 -m venv .venv-app
.venv-app/bin/python -m pip install -q --upgrade pip
.venv-app/bin/python -m pip install -q "torch==${COTEXNET_TORCH_VERSION:-2.13.0}"
.venv-app/bin/python -m pip install -q -e ".[${extras}]"
# CLIP's BPE vocabulary for the offline 'tiny' tokenizer; --no-deps keeps it from pulling a CUDA torch.
.venv-app/bin/python -m pip install -q --no-deps "open-clip-torch>=2.20"
