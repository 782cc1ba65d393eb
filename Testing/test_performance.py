"""Where inference and training time goes (cotexnet bench), and the device-side volume path's logic on the CPU:
FLOP counts against the architecture's formula, device percentiles against numpy, batch sizes from free memory,
phase timings, the compiled path (docs/performance.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cotexnet.data import IntensityNormalization
from cotexnet.infer import (CPU_BATCH_SIZE, MAX_AUTO_BATCH_SIZE, VOLUME_PHASES, auto_batch_size, device_bounds,
                            inference_batch_size, predict_volume, slice_memory_bytes)


def architecture_flops(model, size: int) -> int:
    """FLOP of one slice through CoTexNet's test-time path, written out from the architecture (multiply-add = 2):
    patch embedding, the ViT layers (the last for the CLS position only), projection, concept mapper, FiLM,
    the decoder's reductions, layers and transposed convolutions."""
    v, c = model.vision.config, model.clipseg.config
    width, hidden, layers, patch = v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.patch_size
    grid = size // patch
    tokens = grid * grid + 1
    projection, reduce, decoder_hidden = c.projection_dim, c.reduce_dim, c.decoder_intermediate_size
    outputs = model.config.num_classes + 1
    layer = 8 * tokens * width**2 + 4 * tokens**2 * width + 4 * tokens * width * hidden
    cls_layer = 4 * width**2 + 4 * tokens * width**2 + 4 * tokens * width + 4 * width * hidden
    encoder = 2 * 3 * width * patch**2 * grid**2 + (layers - 1) * layer + cls_layer + 2 * width * projection
    decoder = (len(model.extract_layers) * (2 * tokens * width * reduce + 8 * tokens * reduce**2
                                            + 4 * tokens**2 * reduce + 4 * tokens * reduce * decoder_hidden)
               + 2 * reduce**2 * 9 * grid**2 + 2 * reduce * (reduce // 2) * 16 * grid**2
               + 2 * (reduce // 2) * outputs * 16 * (4 * grid) ** 2)
    mappers = 4 * projection**2 + 4 * projection * reduce
    return encoder + decoder + mappers


def test_flops_per_slice_equals_the_architecture_formula():
    from cotexnet.bench import _build, flops_per_slice

    run, model = _build("cotexnet", "tiny", 64, 2)
    assert flops_per_slice(run, 64, torch.device("cpu")) == architecture_flops(model.eval(), 64)


@pytest.mark.parametrize("lower, upper", [(0.5, 99.5), (0.0, 100.0), (2.0, 98.0)])
def test_device_percentiles_equal_numpy_on_more_voxels_than_torch_quantile_takes(lower, upper):
    """kthvalue has no 2**24-element limit; numpy's linear interpolation between order statistics is repeated."""
    rng = np.random.default_rng(0)
    volume = rng.integers(-1024, 3071, size=(65, 512, 505), dtype=np.int16)  # 2**24 + 3 * 2**16 + ... voxels
    assert volume.size > 2**24
    normalization = IntensityNormalization("percentile", lower=lower, upper=upper)
    expected = normalization.bounds(volume)
    got = device_bounds(normalization, torch.from_numpy(volume))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_device_percentiles_of_float_intensities_with_outliers():
    rng = np.random.default_rng(1)
    volume = rng.gamma(2.0, 150.0, size=(7, 33, 29)).astype(np.float32)
    volume[0, 0, :5] = [1e6, -1e5, 3e5, 0.0, 7.5]
    for mode in ("percentile", "minmax"):
        normalization = IntensityNormalization(mode)
        np.testing.assert_allclose(device_bounds(normalization, torch.from_numpy(volume)),
                                   normalization.bounds(volume), rtol=1e-6)
    ct = IntensityNormalization("ct", window="lung")
    assert device_bounds(ct, torch.from_numpy(volume)) == (-1350.0, 150.0)


def test_batch_size_from_free_memory_fills_the_share_and_stops_at_the_cap(tiny_model):
    model = tiny_model(image_size=352)
    per_slice, channels = slice_memory_bytes(model, 2, 512 * 512), model.config.num_classes + 1
    # float32 logits at the model size and at the slice's size are part of it: their share grows with the slice
    assert per_slice > channels * (352 * 352 + 512 * 512) * 4
    assert slice_memory_bytes(model, 2, 1024 * 1024) - per_slice == channels * (1024 * 1024 - 512 * 512) * 4
    free = 3 * 2**30  # a fake GPU with 3 GiB free
    batch = auto_batch_size(free, per_slice)
    assert batch * per_slice <= free // 2 < (batch + 1) * per_slice
    assert auto_batch_size(200 * 2**30, per_slice) == MAX_AUTO_BATCH_SIZE
    assert auto_batch_size(10, per_slice) == 1
    cpu = torch.device("cpu")
    assert inference_batch_size(model, cpu, None, 512 * 512) == CPU_BATCH_SIZE
    assert inference_batch_size(model, cpu, None, 512 * 512, batch_size=5) == 5


def test_phase_timings_cover_the_phases_and_change_no_label(tiny_model):
    model = tiny_model(classes=["a"], image_size=32)
    volume = np.random.default_rng(2).normal(100, 30, size=(9, 40, 36)).astype(np.float32)
    timings: dict[str, float] = {}
    timed = predict_volume(model, volume, device="cpu", batch_size=4, timings=timings).labels
    assert set(timings) == set(VOLUME_PHASES) - {"upload"}  # the CPU reads the array where it is
    assert all(seconds >= 0 for seconds in timings.values()) and timings["model"] > 0
    np.testing.assert_array_equal(timed, predict_volume(model, volume, device="cpu", batch_size=4).labels)


def test_compiled_model_on_the_cpu_gives_the_eager_labels(tiny_model):
    """--compile (torch.compile, inductor on the CPU) pads the last batch to the compiled shape and keeps results."""
    model = tiny_model(classes=["a", "b"], image_size=32)
    volume = np.random.default_rng(3).normal(0, 1, size=(5, 24, 20)).astype(np.float32)
    eager = predict_volume(model, volume, device="cpu", batch_size=4, probabilities=True)
    compiled = predict_volume(model, volume, device="cpu", batch_size=4, probabilities=True, compile="default")
    np.testing.assert_allclose(compiled.probabilities, eager.probabilities, atol=1e-4)
    assert (compiled.labels != eager.labels).mean() < 0.01  # only near-ties may flip


def test_train_bench_reports_phases_and_the_paper_recipe_estimate():
    from cotexnet.bench import PAPER_RECIPE_EPOCHS, PAPER_RECIPE_SLICES, bench_train

    report = bench_train("tiny", "cpu", batch_size=2, image_size=32, num_classes=2, iterations=2)
    for side in ("uncached", "cached"):
        row = report[side]
        assert set(row["phases_per_step_s"]) == {"data", "forward", "backward", "optimizer"}
        assert row["slices_per_s"] == pytest.approx(2 * row["steps_per_s"])
    estimate = report["paper_recipe_estimate_s"]
    assert estimate["uncached"] == pytest.approx(PAPER_RECIPE_SLICES * PAPER_RECIPE_EPOCHS / report["uncached"]["slices_per_s"])
    assert report["cached"]["phases_per_step_s"]["data"] < report["uncached"]["phases_per_step_s"]["forward"] * 10
    assert report["cached"]["cache_storage"] == "cpu" and report["uncached"]["cache_storage"] is None  # files, on a CPU
    for side in ("uncached", "cached"):  # MFU: the measured rate x a step's forward and backward FLOP over the peak
        row = report[side]
        assert row["achieved_tflops"] == pytest.approx(row["slices_per_s"] * row["flops_per_slice"] / 1e12, rel=1e-9)
        assert row["mfu"] == pytest.approx(row["achieved_tflops"] / report["peak_matmul_tflops"], rel=1e-9)
    # a cached step skips the frozen image encoder (the ROI branch's passes too): fewer FLOP than an uncached one
    assert 0 < report["cached"]["flops_per_slice"] < report["uncached"]["flops_per_slice"]


def test_a_bench_process_that_dies_before_reporting_is_an_error_not_a_hang():
    import os

    from cotexnet.bench import _in_fresh_process

    # os._exit(queue, args) fails in the child before anything is reported, as an import error would
    with pytest.raises(RuntimeError, match="ended with exit code 1 and no result"):
        _in_fresh_process("cotexnet", "tiny", "cpu", target=os._exit)
