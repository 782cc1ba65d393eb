"""Resume, clean stops, torchrun, evaluation, and bad-data errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cotexnet import CoTexNet, CoTexNetConfig
from cotexnet.cli import main
from cotexnet.checkpoints import TRAINER_STATE
from cotexnet.train import TrainOptions, Trainer, train

REPO = Path(__file__).resolve().parents[1]


def shapes_dataset(root: Path, count: int = 10, size: int = 64) -> Path:
    """A 2D folder dataset: a bright disk (class 1) and a dark square (class 2) on gray, at random places."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        image = np.full((size, size), 120, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        cy, cx = rng.integers(14, size - 14, 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < 10 ** 2
        sy, sx = rng.integers(2, size - 14, 2)
        square = np.zeros_like(disk)
        square[sy : sy + 12, sx : sx + 12] = True
        square &= ~disk
        image[disk], mask[disk] = 220, 1
        image[square], mask[square] = 30, 2
        Image.fromarray(image).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i:02d}.png")
    return root


def quick(data, out, **fields) -> TrainOptions:
    base = dict(data=str(data), out=str(out), classes=["disk", "square"], backbone="tiny", image_size=64,
                epochs=2, batch_size=4, device="cpu", show_progress=False, lr=1e-3)
    base.update(fields)
    return TrainOptions(**base)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_dataset(tmp_path_factory.mktemp("shapes"))


def weights(bundle: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(bundle / "model.safetensors"))


# -------------------------------------------------------------------------------- resume / stop
def test_resume_continues_from_the_saved_epoch_and_repeats_an_uninterrupted_run(shapes, tmp_path):
    train(quick(shapes, tmp_path / "straight"))

    stop_file = tmp_path / "stop"

    def stop_after_first_epoch(event, **values):
        if event == "epoch" and values["epoch"] == 1:
            stop_file.touch()

    train(quick(shapes, tmp_path / "resumed", stop_file=str(stop_file)), on_event=stop_after_first_epoch)
    saved = torch.load(tmp_path / "resumed" / "last" / TRAINER_STATE, weights_only=True)
    assert saved["epoch"] == 1
    stop_file.unlink()
    events = []
    train(quick(shapes, tmp_path / "resumed", resume=True), on_event=lambda e, **v: events.append((e, v)))
    assert events[0][0] == "start" and events[0][1]["start_epoch"] == 2
    final = torch.load(tmp_path / "resumed" / "last" / TRAINER_STATE, weights_only=True)
    straight = torch.load(tmp_path / "straight" / "last" / TRAINER_STATE, weights_only=True)
    assert final["epoch"] == straight["epoch"] == 2
    for key, tensor in weights(tmp_path / "straight" / "last").items():
        assert torch.equal(tensor, weights(tmp_path / "resumed" / "last")[key]), key
    exp_avg = [s["exp_avg"] for s in final["optimizer"]["state"].values()]
    expected = [s["exp_avg"] for s in straight["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(exp_avg, expected))


def test_stop_mid_epoch_leaves_loadable_bundles(shapes, tmp_path):
    stop_file = tmp_path / "stop"
    events = []

    def stop_at_first_step(event, **values):
        events.append((event, values))
        if event == "step":
            stop_file.touch()

    best = train(quick(shapes, tmp_path / "run", epochs=5, stop_file=str(stop_file)), on_event=stop_at_first_step)
    assert sum(1 for e, _ in events if e == "step") == 1
    assert events[-1][0] == "done" and events[-1][1]["stopped"] is True
    for bundle in (best, tmp_path / "run" / "last"):
        model = CoTexNet.from_pretrained(bundle)
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_progress_file_events(shapes, tmp_path):
    progress = tmp_path / "progress.jsonl"
    train(quick(shapes, tmp_path / "run", epochs=1, progress_file=str(progress)))
    events = [json.loads(line) for line in progress.read_text(encoding="utf-8").splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "epoch" in kinds
    step = next(e for e in events if e["event"] == "step")
    assert {"epoch", "step", "steps", "loss", "loss_seg", "loss_kd", "lr", "eta_s"} <= set(step)
    epoch = next(e for e in events if e["event"] == "epoch")
    assert 0.0 <= epoch["val_dice"] <= 1.0 and set(epoch["val_dice_per_class"]) == {"disk", "square"}
    assert step["loss"] == pytest.approx(step["loss_seg"] + step["loss_kd"], rel=1e-5)


# --------------------------------------------------------------------------------- accumulation
def ready_trainer(shapes, out, **fields) -> Trainer:
    """A trainer past ``initialize`` on a deterministic step: no augmentation, no dropout, no clipping."""
    trainer = Trainer(quick(shapes, out, augment=False, grad_clip=0.0, feature_cache="off",
                            config_overrides={"dropout": 0.0}, **fields))
    trainer.initialize()
    trainer.net.train()
    return trainer


def test_an_accumulated_step_descends_the_mean_gradient_of_its_batches(shapes, tmp_path):
    """``--accumulate 2`` back-propagates half of each batch's loss and steps once: on one batch given twice,
    g/2 + g/2 = g in floats, so the gradient, the step and the loss reported equal one step on that batch alone
    (a step per batch, or no halving, would give other weights or a doubled gradient)."""
    single, double = ready_trainer(shapes, tmp_path / "one"), ready_trainer(shapes, tmp_path / "two", accumulate=2)
    batch = next(iter(single.train_loader))
    before = {name: p.detach().clone() for name, p in double.model.named_parameters()}
    assert single.train_step([batch]) == pytest.approx(double.train_step([batch, batch]), rel=1e-6)
    moved = 0
    for (name, one), (_, two) in zip(single.model.named_parameters(), double.model.named_parameters()):
        if one.grad is not None:
            torch.testing.assert_close(two.grad, one.grad, rtol=1e-5, atol=1e-8, msg=name)
            moved += not torch.equal(two, before[name])
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-7, msg=name)
    assert moved > 0 and double.scheduler.last_epoch == single.scheduler.last_epoch == 1


def test_accumulate_counts_optimiser_steps_and_out_of_memory_keeps_the_effective_batch(shapes, tmp_path, monkeypatch):
    """An epoch of ``--accumulate 2`` is ceil(batches / 2) optimiser steps. Out of GPU memory (simulated on the first
    step) the trainer halves the batch and doubles the accumulation: the effective batch (4) and the steps per
    epoch stay the run's."""
    events = []
    trainer = Trainer(quick(shapes, tmp_path / "run", epochs=1, accumulate=2, batch_size=2),
                      on_event=lambda event, **values: events.append((event, values)))
    real_step, calls = Trainer.train_step, []

    def first_step_runs_out_of_memory(self, batches):
        calls.append([len(batch["image"]) for batch in batches])
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", first_step_runs_out_of_memory)
    trainer.run()
    start = next(values for event, values in events if event == "start")
    batches_of_two = len(trainer.make_loaders(2)[0])
    assert start["steps_per_epoch"] == trainer.steps == -(-batches_of_two // 2)
    warning = next(values["message"] for event, values in events if event == "warning")
    assert "batch size 1, 4 batches per optimiser step (effective batch 4)" in warning
    assert trainer.batch_size == 1 and trainer.accumulate == 4
    assert calls[0] == [2, 2] and all(sizes == [1] * len(sizes) for sizes in calls[1:])
    assert sum(1 for event, _ in events if event == "step") == trainer.steps
    assert sum(len(sizes) for sizes in calls[1:]) <= 4 * trainer.steps


def test_batch_size_auto_fills_half_the_free_memory_and_is_the_recipes_off_a_gpu(shapes, tmp_path):
    """On a GPU: (free / 2 - fixed) / per-slice bytes, at least 1, at most 256. Off a GPU: the recipe's batch."""
    from cotexnet.config import RECIPES
    from cotexnet.train import train_batch_size

    gib, mib = 2**30, 2**20
    assert train_batch_size(8 * gib, 2 * gib, 100 * mib) == 20  # (4 - 2) GiB / 100 MiB = 20.48
    assert train_batch_size(80 * gib, 2 * gib, 100 * mib) == 256  # 389 fit: capped
    assert train_batch_size(1 * gib, 2 * gib, 100 * mib) == 1  # nothing fits: one slice, and out-of-memory halving
    trainer = ready_trainer(shapes, tmp_path / "run", batch_size="auto")
    assert trainer.batch_size == RECIPES["random"]["batch_size"] and trainer.accumulate == 1
    assert trainer.training_info()["batch"] == {"size": RECIPES["random"]["batch_size"], "accumulate": 1}


def test_a_resumed_run_keeps_the_batch_an_out_of_memory_retry_chose(shapes, tmp_path, monkeypatch):
    """Out of memory at the first step (batch 2 -> 1, accumulate 2 -> 4), stopped after epoch 1: the resumed run
    trains on with batch 1 and 4 batches per step (what its checkpoint holds), not the options' 2 and 2."""
    stop = tmp_path / "stop"
    options = dict(epochs=2, accumulate=2, batch_size=2, stop_file=str(stop))
    real_step, calls = Trainer.train_step, []

    def first_step_runs_out_of_memory(self, batches):
        calls.append(len(batches))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", first_step_runs_out_of_memory)
    first = Trainer(quick(shapes, tmp_path / "run", **options),
                    on_event=lambda event, **values: event == "epoch" and stop.touch())
    first.run()
    assert first.stopped and first.epoch == 1 and (first.batch_size, first.accumulate) == (1, 4)
    stop.unlink()
    resumed = Trainer(quick(shapes, tmp_path / "run", resume=True, **options))
    resumed.initialize()
    assert (resumed.batch_size, resumed.accumulate) == (1, 4) and resumed.start_epoch == 2
    assert resumed.steps == first.steps


def test_a_compiled_step_trains_as_the_eager_one(shapes, tmp_path):
    """``--compile default`` (inductor on the CPU) on the text encoder and decoder: on two batches (new prompts, no
    recompilation needed) the losses and each step's gradients are the eager step's within float32 reassociation.
    Gradients, not weights: Adam turns the float noise of a gradient that is zero in exact arithmetic (an attention
    key's bias, which the softmax ignores) into a full step of either sign."""
    eager, compiled = ready_trainer(shapes, tmp_path / "eager"), ready_trainer(shapes, tmp_path / "compiled",
                                                                               compile="default")
    assert type(compiled.model.decode).__name__ != "method"  # torch.compile's wrapper, not the bound method
    for batch in list(eager.train_loader)[:2]:
        assert compiled.train_step([batch]) == pytest.approx(eager.train_step([batch]), rel=1e-4)
        scale = max(p.grad.abs().max().item() for p in eager.model.parameters() if p.grad is not None)
        for (name, one), (_, two) in zip(eager.model.named_parameters(), compiled.model.named_parameters()):
            if one.grad is not None:
                torch.testing.assert_close(two.grad, one.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


# ------------------------------------------------------------------------------------- torchrun
def test_torchrun_two_cpu_processes_write_one_bundle(shapes, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    progress = tmp_path / "progress.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(port), "-m", "cotexnet.cli", "train", str(shapes), "--classes", "disk", "square",
               "--backbone", "tiny", "--image-size", "64", "--epochs", "1", "--batch-size", "2", "--device", "cpu",
               "--out", str(tmp_path / "run"), "--progress-file", str(progress), "--progress-json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best", "last", "metrics.csv", "split.json"]
    starts = [json.loads(line) for line in progress.read_text(encoding="utf-8").splitlines() if '"start"' in line]
    assert len(starts) == 1 and starts[0]["world_size"] == 2
    CoTexNet.from_pretrained(tmp_path / "run" / "best")


# ------------------------------------------------------------------------------------- evaluate
def test_evaluate_cli_reports_per_class_and_per_case(shapes, tmp_path, capsys):
    model = CoTexNet.from_config(CoTexNetConfig(classes=["disk", "square"], backbone="tiny", image_size=64))
    model.save_pretrained(tmp_path / "model")
    assert main(["evaluate", str(tmp_path / "model"), str(shapes), "--split", "all", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["cases"]) == 10 and len(report["per_class"]) == 2
    assert {"dice", "iou", "hd95", "pixel_accuracy"} == set(report["mean"])
    assert main(["evaluate", str(tmp_path / "model"), str(shapes), "--split", "all", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "Dice (%)" in table and "HD95 (mm)" in table and "square" in table


def test_evaluate_refuses_a_dataset_with_another_class_count(shapes, tmp_path, capsys):
    CoTexNet.from_config(CoTexNetConfig(classes=["disk"], backbone="tiny", image_size=64)).save_pretrained(tmp_path / "model")
    data = tmp_path / "data"
    for folder in ("imagesTr", "labelsTr"):
        (data / folder).mkdir(parents=True)
    for i in range(3):
        Image.open(shapes / "images" / f"case{i:02d}.png").save(data / "imagesTr" / f"c{i}_0000.png")
        Image.open(shapes / "masks" / f"case{i:02d}.png").save(data / "labelsTr" / f"c{i}.png")
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "disk": 1, "square": 2},
                                                   "file_ending": ".png", "numTraining": 3}), encoding="utf-8")
    assert main(["evaluate", str(tmp_path / "model"), str(data), "--split", "all", "--device", "cpu"]) == 2
    message = capsys.readouterr().err
    assert "2 classes" in message and "the model has 1" in message


# ------------------------------------------------------------------------------------- bad data
def _break(kind: str, root: Path) -> str:
    """Damage a copy of the shapes dataset in one way; returns the file the error must name."""
    if kind == "image without mask":
        (root / "masks" / "case03.png").unlink()
        return "case03.png"
    if kind == "mask shape differs":
        Image.fromarray(np.zeros((32, 40), np.uint8)).save(root / "masks" / "case04.png")
        return "case04.png"
    if kind == "labels outside classes":
        mask = np.array(Image.open(root / "masks" / "case05.png"))
        mask[:3, :3] = 7
        Image.fromarray(mask).save(root / "masks" / "case05.png")
        return "case05.png"
    if kind == "empty dataset":
        for folder in ("images", "masks"):
            for path in (root / folder).iterdir():
                path.unlink()
        return str(root.name)
    if kind == "unreadable file":
        (root / "images" / "case06.png").write_bytes(b"\x89PNG broken")
        return "case06.png"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, problem", [
    ("image without mask", "no mask"),
    ("mask shape differs", "differs"),
    ("labels outside classes", "outside"),
    ("empty dataset", "no cases"),
    ("unreadable file", "cannot be read"),
])
def test_bad_data_errors_name_the_file_and_the_problem(shapes, tmp_path, capsys, kind, problem):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shapes, root)
    culprit = _break(kind, root)
    code = main(["train", str(root), "--classes", "disk", "square", "--backbone", "tiny", "--image-size", "64",
                 "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    message = capsys.readouterr().err
    assert code == 2
    assert culprit in message and problem in message, message
    assert not (tmp_path / "run" / "best").exists()


# ------------------------------------------------------------------------ LMM concept backend
class _AttributeServer:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that always answers with valid attributes."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        requests = self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                requests.append(self.path)
                content = json.dumps({"number": "one", "shape": "round", "size": "small", "color": "bright",
                                      "location": "center"})
                body = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_lmm_concepts_are_asked_once_per_original_slice_and_cached(shapes, tmp_path):
    requests_after_epoch = []
    with _AttributeServer() as server:
        def count(event, **values):
            if event == "epoch":
                requests_after_epoch.append(len(server.requests))

        # oversample=0: epoch 1 then visits every training slice once, so epoch 2 only reads the cache
        options = quick(shapes, tmp_path / "run", epochs=2, oversample=0, concept_backend="openai",
                        concept_options={"model": "llava", "base_url": server.url, "api_key_env": None},
                        concept_cache=str(tmp_path / "concepts.jsonl"))
        train(options, on_event=count)
    train_slices = len(json.loads((tmp_path / "run" / "split.json").read_text(encoding="utf-8"))["train"])
    assert requests_after_epoch[0] > 0
    assert requests_after_epoch[1] == requests_after_epoch[0]  # epoch 2 reuses every cached answer
    cached = [json.loads(line) for line in (tmp_path / "concepts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(cached) == train_slices * 2  # one record per original slice and class
