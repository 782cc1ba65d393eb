#!/usr/bin/env bash
# The whole suite again under transformers 4.x (scripts/test.sh runs it under the newest, 5.x): the engine supports
# both majors (pyproject.toml: transformers>=4.40,<6), and Slicer users may have either from another extension.
# .venv-tf4 layers transformers 4 (and the huggingface_hub and tokenizers it needs) over .venv's packages
# (scripts/test.sh makes .venv) through a .pth file, so only those few install and .venv itself is never changed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh test
[ -x .venv-tf4/bin/python ] || python3 -m venv .venv-tf4
base=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.venv-tf4/bin/python -c 'import sysconfig, sys; open(sysconfig.get_paths()["purelib"] + "/cotexnet-base.pth", "w").write(sys.argv[1] + "\n")' "$base"
.venv-tf4/bin/python -m pip install -q "torch==${COTEXNET_TORCH_VERSION:-2.13.0}" "transformers>=4.40,<5"
.venv-tf4/bin/python -c 'import transformers, huggingface_hub, sys; v = transformers.__version__
print("transformers", v, "huggingface_hub", huggingface_hub.__version__); sys.exit(v.split(".")[0] != "4")'
exec .venv-tf4/bin/python -m pytest -q -p no:cacheprovider Testing "$@"
