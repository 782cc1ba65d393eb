#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one run of the device machine (DESIGN: minutes per session,
# 10 minutes per command): CUDA-path checks, the model bench (fp32/bf16/fp16 next to stock CLIPSeg, FLOP, MFU),
# the 300x512x512 volume phase by phase, training phase by phase with the paper-recipe estimate, a kernel profile
# of one volume call, the model under --compile reduce-overhead (CUDA graphs), and the training step so compiled.
# Each step has its own timeout and writes its JSON/text under $OUT (8 files), whatever the others do.
#
# Prepare here (once): ../shared/device/pack.sh   (SimpleITK, monai, slicerio, open-clip-torch into .device-carry/;
# the machine's own transformers 5.x serves: the engine supports it). Then, with the device tool:
#   run(command="bash scripts/gpu-bench.sh", carry=[".device-carry"], timeout_s=600)
# and copy the JSON into docs/performance.md with the date, GPU, torch and CUDA versions.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
if [[ -d .device-carry ]]; then
  S=$(mktemp -d)
  tar -xJf .device-carry/site.tar.xz -C "$S" && python3 -m zipfile -e .device-carry/simpleitk-*.whl "$S" || exit 1
  export PYTHONPATH="$S:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
step() {  # step NAME SECONDS FILE COMMAND...: run with a timeout, say how it ended
  local name=$1 limit=$2 file=$3; shift 3
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$file" 2> "$OUT/$name.err"
  echo "$name: exit $? after $((SECONDS - started)) s (limit $limit s) -> $file"
  tail -n 3 "$OUT/$name.err" | sed "s/^/  $name: /"
  rm -f "$OUT/$name.err"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; $py -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'; } > "$OUT/environment.txt" 2>&1
step checks 70 checks.json $py scripts/gpu_checks.py
step bench 140 bench.json $py -m cotexnet.cli bench --backbone full-random --device cuda --batch-size 64 \
  --precision bf16 fp16 fp32 --iterations 20 --warmup 3 --volume 300x512x512 --json
step train 90 train.json $py -m cotexnet.cli bench --train --backbone full-random --device cuda --batch-size 16 \
  --classes 3 --iterations 10 --json
step profile 40 profile.txt $py - <<'PY'
import numpy as np, torch
from torch.profiler import ProfilerActivity, profile
from cotexnet.bench import _build
from cotexnet.infer import predict_volume
model, _ = _build("cotexnet", "full-random", 352, 1)
model.config.intensity = {"mode": "ct", "window": "soft_tissue", "center": 40.0, "width": 400.0}
volume = np.random.default_rng(0).integers(-1000, 1000, size=(300, 512, 512), dtype=np.int16)
for _ in range(2):
    predict_volume(model, volume, device="cuda", precision="bf16")
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    predict_volume(model, volume, device="cuda", precision="bf16")
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
PY
step compile 130 bench-compile.json $py -m cotexnet.cli bench --backbone full-random --device cuda --batch-size 64 \
  --precision bf16 --iterations 20 --warmup 3 --compile reduce-overhead --json
step train-compile 110 train-compile.json $py -m cotexnet.cli bench --train --backbone full-random --device cuda \
  --batch-size 16 --classes 3 --iterations 10 --compile reduce-overhead --json
ls -l "$OUT"
