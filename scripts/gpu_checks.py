"""The CUDA paths' checks that CPU tests cannot make, run once by scripts/gpu-bench.sh on a GPU machine.

Prints one JSON object: each check's measured figures and whether it passed. Checks: labels of the device path
(pinned pieces on a side stream, device percentiles, pinned download) against the CPU's; device percentiles of a
300x512x512 volume against numpy; the decoder's channels-last weights and a bundle saved from them; the batch
size chosen from free memory against the memory that batch then takes; a training step with the fused optimiser
and the feature cache in GPU memory; the training batch ``--batch-size auto`` measures against a real step's memory.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback

import numpy as np
import torch


def labels_match_cpu() -> dict:
    from cotexnet import CoTexNet, CoTexNetConfig
    from cotexnet.infer import predict_volume

    model = CoTexNet.from_config(CoTexNetConfig(classes=["a", "b"], backbone="tiny", image_size=64))
    volume = np.random.default_rng(0).normal(300, 120, size=(75, 96, 80)).astype(np.float32)
    cpu = predict_volume(model, volume, device="cpu", batch_size=8, probabilities=True)
    result = {}
    for axis in ("axial", "coronal"):
        gpu = predict_volume(model, volume, device="cuda", precision="fp32", batch_size=8, probabilities=True,
                             axis=None if axis == "axial" else 1)
        reference = cpu if axis == "axial" else predict_volume(model, volume, device="cpu", batch_size=8,
                                                               probabilities=True, axis=1)
        result[axis] = {"max_probability_difference": float(np.abs(gpu.probabilities - reference.probabilities).max()),
                        "label_agreement": float((gpu.labels == reference.labels).mean())}
    # cuDNN convolutions run in TF32 by default: probabilities agree to a few 1e-3, labels but for near-ties
    result["passed"] = all(r["max_probability_difference"] < 5e-3 and r["label_agreement"] > 0.999
                           for r in result.values())
    return result


def device_percentiles() -> dict:
    from cotexnet.data import IntensityNormalization
    from cotexnet.infer import device_bounds

    volume = np.random.default_rng(1).integers(-1024, 3071, size=(300, 512, 512), dtype=np.int16)
    normalization = IntensityNormalization("percentile")
    started = time.perf_counter()
    expected = normalization.bounds(volume)
    numpy_s = time.perf_counter() - started
    tensor = torch.from_numpy(volume).cuda()
    device_bounds(normalization, tensor)
    torch.cuda.synchronize()
    started = time.perf_counter()
    got = device_bounds(normalization, tensor)
    device_s = time.perf_counter() - started
    return {"numpy": list(expected), "device": list(got), "numpy_s": numpy_s, "device_s": device_s,
            "passed": bool(np.allclose(got, expected, rtol=0, atol=1e-6))}


def channels_last_bundle() -> dict:
    from cotexnet import CoTexNet, CoTexNetConfig

    model = CoTexNet.from_config(CoTexNetConfig(classes=["a"], backbone="tiny", image_size=64)).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
    model.place("cuda")
    weight = model.clipseg.decoder.transposed_convolution[0].weight
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(f"{folder}/m")
        loaded = CoTexNet.from_pretrained(f"{folder}/m")
        with torch.no_grad():
            again = loaded(images)
            on_gpu = model(images.cuda()).cpu()
    return {"channels_last": weight.is_contiguous(memory_format=torch.channels_last),
            "reloaded_equal": bool(torch.equal(again, expected)),
            "gpu_max_difference": float((on_gpu - expected).abs().max()),
            "passed": weight.is_contiguous(memory_format=torch.channels_last) and bool(torch.equal(again, expected))
            and float((on_gpu - expected).abs().max()) < 1e-2}  # TF32 convolutions


def batch_size_from_memory() -> dict:
    from cotexnet.bench import _build
    from cotexnet.infer import inference_batch_size, predict_volume

    model, _ = _build("cotexnet", "full-random", 352, 1)
    model.config.intensity = {"mode": "ct", "window": "soft_tissue", "center": 40.0, "width": 400.0}
    free, total = torch.cuda.mem_get_info()
    model.place("cuda")
    batch = inference_batch_size(model, torch.device("cuda"), torch.bfloat16, 512 * 512)
    volume = np.random.default_rng(2).integers(-1000, 1000, size=(batch, 512, 512), dtype=np.int16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    predict_volume(model, volume, device="cuda", precision="bf16", batch_size=batch)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    return {"free_gib": free / 2**30, "total_gib": total / 2**30, "batch_size": batch,
            "peak_gib_for_that_batch": peak / 2**30, "passed": peak < free}


def fused_training_step() -> dict:
    """One training step on CUDA: the fused optimiser, a finite loss, the feature cache in GPU memory."""
    from cotexnet.bench import _training_dataset
    from cotexnet.config import TrainOptions
    from cotexnet.train import Trainer

    with tempfile.TemporaryDirectory() as folder:
        data = _training_dataset(__import__("pathlib").Path(folder) / "data", 2, 12, 64)
        trainer = Trainer(TrainOptions(data=str(data), out=f"{folder}/run", backbone="tiny", classes=["a", "b"],
                                       image_size=64, batch_size=4, epochs=1, device="cuda", show_progress=False,
                                       train_encoder="none"))  # a frozen encoder: the cache is on
        trainer.initialize()
        terms = trainer.train_step([next(iter(trainer.train_loader))])
        fused = bool(trainer.optimizer.defaults.get("fused"))
        storage = None if trainer.cache is None else trainer.cache.storage.type
        if trainer.cache is not None:
            trainer.cache.close()
    # the tiny model's cache is a few MB: it must live in GPU memory (feature_cache.plan_cache)
    return {"fused": fused, "loss": terms["loss"], "cache_storage": storage,
            "passed": fused and np.isfinite(terms["loss"]) and storage == "cuda"}


def training_batch_from_memory() -> dict:
    """``train --batch-size auto`` on full-random at 352 px: the batch it measures its way to, then the peak memory
    of a real step at that batch against the free memory it was sized for (half of it, with Adam's state)."""
    from cotexnet.bench import _training_dataset
    from cotexnet.config import TrainOptions
    from cotexnet.train import Trainer

    with tempfile.TemporaryDirectory() as folder:
        data = _training_dataset(__import__("pathlib").Path(folder) / "data", 3, 320, 352)
        trainer = Trainer(TrainOptions(data=str(data), out=f"{folder}/run", backbone="full-random", image_size=352,
                                       classes=["a", "b", "c"], batch_size="auto", epochs=1, device="cuda",
                                       feature_cache="off", train_encoder="none", show_progress=False))
        trainer.initialize()
        fixed, per_slice = trainer.step_memory()
        free = torch.cuda.mem_get_info()[0]
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.train_step([next(iter(trainer.train_loader))])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    return {"batch_size": trainer.batch_size, "fixed_mib": fixed / 2**20, "per_slice_mib": per_slice / 2**20,
            "free_gib": free / 2**30, "peak_gib_of_a_step": peak / 2**30, "passed": peak < free}


def main() -> int:
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name()}
    for check in (labels_match_cpu, device_percentiles, channels_last_bundle, batch_size_from_memory,
                  fused_training_step, training_batch_from_memory):
        try:
            report[check.__name__] = check()
        except Exception:
            report[check.__name__] = {"passed": False, "error": traceback.format_exc(limit=6)}
    print(json.dumps(report, indent=2, default=float))
    return 0 if all(v["passed"] for v in report.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
