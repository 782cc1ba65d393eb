"""Studies/hour of a cohort run with 1 process and with N torchrun ranks, on the same studies (docs/cohorts.md).

    python scripts/cohort_speedup.py --studies 16 --shape 24x192x192 --processes 2 --repeats 2 [--model BUNDLE]

Writes the studies (random volumes, NIfTI gzip) and, without --model, a tiny random bundle under --work;
each run segments all of them into a fresh folder; prints one JSON line per run (its report's summary)
and the ratio of the medians. The numbers include reading and writing (gzip), not the model load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def write_studies(folder: Path, count: int, shape: tuple[int, int, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        volume = rng.normal(0, 1, shape).astype(np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(folder / f"study{i:03d}.nii.gz"))
    manifest = folder / "cohort.txt"
    manifest.write_text("".join(f"study{i:03d}.nii.gz\n" for i in range(count)), encoding="utf-8")
    return manifest


def run(model: str, manifest: Path, out: Path, processes: int, device: str, read_ahead: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "cotexnet.cli", "segment", model, "--inputs", str(manifest), "--out", str(out),
               "--device", device, "--read-ahead", str(read_ahead), "--json"]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   *command[1:]]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((out / "report.json").read_text(encoding="utf-8"))["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--shape", default="24x192x192", help="slices x rows x columns")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", help="a bundle (default: a tiny random one at 96 px)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--read-ahead", type=int, default=2, help="passed to cotexnet segment")
    parser.add_argument("--work", help="folder for the studies and outputs (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="cohort-speedup-"))
    model = args.model
    if model is None:
        from cotexnet import CoTexNet, CoTexNetConfig

        model = str(work / "model")
        CoTexNet.from_config(CoTexNetConfig(classes=["a", "b"], backbone="tiny", image_size=96)).save_pretrained(model)
    manifest = write_studies(work / "studies", args.studies, tuple(int(v) for v in args.shape.split("x")))
    rates = {1: [], args.processes: []}
    for repeat in range(args.repeats):
        for processes in rates:
            summary = run(model, manifest, work / f"out-{processes}", processes, args.device, args.read_ahead)
            rates[processes].append(summary["studies_per_hour"])
            print(json.dumps({"repeat": repeat, **summary}), flush=True)
    one, many = statistics.median(rates[1]), statistics.median(rates[args.processes])
    print(f"median studies/hour: 1 process {one:.0f}, {args.processes} processes {many:.0f}, speed-up {many / one:.2f}x")


if __name__ == "__main__":
    main()
