#!/usr/bin/env bash
# The engine's model, bundle and inference tests under transformers 5.x (the main suite runs them under 4.x):
# the engine supports both majors (pyproject.toml: transformers>=4.40,<6). .venv-tf5 layers transformers 5 (and
# the tokenizers/huggingface_hub it needs) over .venv's packages (scripts/test.sh makes .venv) through a .pth
# file, so only those few install and .venv itself is never changed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh test
[ -x .venv-tf5/bin/python ] || python3 -m venv .venv-tf5
base=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.venv-tf5/bin/python -c 'import sysconfig, sys; open(sysconfig.get_paths()["purelib"] + "/cotexnet-base.pth", "w").write(sys.argv[1] + "\n")' "$base"
.venv-tf5/bin/python -m pip install -q "torch==${COTEXNET_TORCH_VERSION:-2.13.0}" "transformers>=5,<6"
.venv-tf5/bin/python -c 'import transformers, sys; v = transformers.__version__; print("transformers", v); sys.exit(v.split(".")[0] != "5")'
exec .venv-tf5/bin/python -m pytest -q -p no:cacheprovider Testing/test_model.py Testing/test_bundle.py Testing/test_infer.py \
  Testing/test_performance.py::test_flops_per_slice_equals_the_architecture_formula "$@"
