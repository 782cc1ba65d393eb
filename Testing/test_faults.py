"""Bad inputs and faults a hostile user found (issue 12), one row each: every row failed before its fix.

Each row says the fault in its id. A row checks what the user sees (exit code, the one ``error:`` line and
the file or option it names) and that nothing was lost (bundles, outputs and checkpoints unchanged).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from test_train import quick, shapes_dataset, weights

from cotexnet import CoTexNet, CoTexNetConfig
from cotexnet.cli import main
from cotexnet.data import read_image, read_label_map
from cotexnet.errors import CoTexNetError, DataError
from cotexnet.checkpoints import TRAINER_STATE
from cotexnet.train import Trainer, train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TINY_TRAIN = ["--backbone", "tiny", "--image-size", "64", "--device", "cpu", "--batch-size", "4"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle") / "model"
    CoTexNet.from_config(CoTexNetConfig(classes=["disk", "square"], backbone="tiny", image_size=32)).save_pretrained(folder)
    return folder


def volume_dataset(root: Path, labels=None, cases: int = 4, **geometry) -> Path:
    """An nnU-Net v2 raw dataset of small NIfTI volumes; ``labels(i, array)`` may change a case's label map,
    ``geometry`` (``origin``/``spacing`` of case 0's label) may move one label off its image."""
    rng = np.random.default_rng(1)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for i in range(cases):
        image = rng.normal(100, 10, (6, 32, 32)).astype(np.float32)
        label = np.zeros(image.shape, np.uint8)
        label[:, 8:20, 8:20] = 1
        image[label == 1] += 80
        if labels is not None:
            label = labels(i, label)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(root / "imagesTr" / f"c{i}_0000.nii.gz"))
        mask = sitk.GetImageFromArray(label)
        if i == 0:
            for name, value in geometry.items():
                getattr(mask, f"Set{name.capitalize()}")(value)
        sitk.WriteImage(mask, str(root / "labelsTr" / f"c{i}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "blob": 1}, "file_ending": ".nii.gz",
                                                   "numTraining": cases, "channel_names": {"0": "MR"}}))
    return root


def train_cli(data, out, *extra) -> int:
    return main(["train", str(data), "--out", str(out), *TINY_TRAIN, "--epochs", "1", *extra])


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ------------------------------------------------------------------ 1, 8: damaged NIfTI read as zeros
def _write_nifti(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def _cut(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("name, damage, problem", [
    ("scan.nii", "cut", "truncated"),
    ("scan.nii.gz", "cut", "truncated"),
    ("scan.nii", "nan", "NaN or infinite"),
    ("scan.nii.gz", "inf", "NaN or infinite"),
], ids=["1-truncated-nii", "1-truncated-nii.gz", "8-nan-in-nii", "8-inf-in-nii.gz"])
def test_damaged_nifti_image_is_refused_naming_the_file(bundle, tmp_path, capsys, name, damage, problem):
    """SimpleITK reads these without complaint (zeros for the missing or non-finite voxels)."""
    array = np.random.default_rng(0).random((6, 16, 16)).astype(np.float32)
    if damage == "nan":
        array[2, 3, 4] = np.nan
    if damage == "inf":
        array[0, 0, 0] = -np.inf
    path = _write_nifti(tmp_path / name, array)
    if damage == "cut":
        _cut(path)
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # the library hides it
    with pytest.raises(DataError, match=problem) as error:
        read_image(path)
    assert str(path) in str(error.value)
    assert main(["segment", str(bundle), str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert f"FAILED  {path}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("damage", ["cut", "nan"], ids=["1-truncated-label", "8-nan-in-label"])
def test_damaged_nifti_label_stops_training_naming_the_file(tmp_path, capsys, damage):
    data = volume_dataset(tmp_path / "data")
    label = data / "labelsTr" / "c2.nii.gz"
    array = np.random.default_rng(0).integers(0, 2, (6, 32, 32)).astype(np.float32)  # compresses little
    if damage == "nan":
        array[0, 0, 0] = np.nan
    _write_nifti(label, array)
    if damage == "cut":
        _cut(label, keep=0.7)  # the header stays whole, so the dataset's header-only checks pass
    assert train_cli(data, tmp_path / "run") == 2
    message = one_error_line(capsys.readouterr().err)
    assert str(label) in message and ("truncated" in message or "NaN" in message), message
    assert not (tmp_path / "run" / "best").exists()


# ------------------------------------------------------------------ 2: train over an existing run
def test_train_over_an_existing_run_is_refused_and_overwrite_replaces_it(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(shapes, run, "--classes", "disk", "square", "--max-steps-per-epoch", "1") == 0
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert train_cli(shapes, run, "--classes", "disk", "square", "--seed", "3") == 2
    message = one_error_line(capsys.readouterr().err)
    assert "already holds a training run" in message and "--resume" in message and "--overwrite" in message
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before  # nothing touched
    assert train_cli(shapes, run, "--classes", "disk", "square", "--seed", "3", "--max-steps-per-epoch", "1",
                     "--overwrite") == 0
    for bundle in ("best", "last"):  # both bundles are the new run's
        info = json.loads((run / bundle / "training.json").read_text())
        assert info["options"]["seed"] == 3 and info["epochs_run"] == 1


def test_slicer_training_logic_asks_before_replacing_a_run(shapes, tmp_path):
    """The logic raises RunExistsError (the widget turns it into a Yes/No question) and replaces the run
    only with overwrite=True."""
    pytest.importorskip("slicer")
    import slicer

    from CoTexNetTrainLib import CoTexNetTrainLogic, RunExistsError

    run = tmp_path / "run"
    train(quick(shapes, run, epochs=1, max_steps_per_epoch=1))  # a run made with the command line, no run.json
    before = (run / "best" / "model.safetensors").read_bytes()
    scene = slicer.vtkMRMLScene()
    logic = CoTexNetTrainLogic(scene)
    options = dict(backbone="tiny", imageSize=64, device="cpu", epochs=1, batchSize=4)
    with pytest.raises(RunExistsError, match="already holds a training run"):
        logic.train(shapes, ["disk", "square"], run, **options)
    assert (run / "best" / "model.safetensors").read_bytes() == before and logic.process is None
    bundle = logic.train(shapes, ["disk", "square"], run, overwrite=True, timeout=300, **options)
    assert logic.state == "finished" and "--overwrite" in logic.process.args
    assert (bundle / "model.safetensors").read_bytes() != before
    assert "--overwrite" not in json.loads((run / "run.json").read_text())["arguments"]  # resume continues this run


# ------------------------------------------------------------------ 3: outputs of inputs with one stem
@pytest.mark.parametrize("names, expected", [
    (["a/scan.nii.gz", "b/scan.nii.gz"], ["a_scan_labels.nii.gz", "b_scan_labels.nii.gz"]),
    (["scan.nii", "scan.nii.gz"], ["scan_nii_labels.nii.gz", "scan_nii-gz_labels.nii.gz"]),
], ids=["3-same-name-two-folders", "3-nii-and-nii.gz"])
def test_inputs_sharing_a_stem_get_their_own_outputs(bundle, tmp_path, capsys, names, expected):
    rng = np.random.default_rng(0)
    inputs = []
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        inputs.append(str(_write_nifti(tmp_path / name, rng.random((4, 16, 16)).astype(np.float32))))
    out = tmp_path / "out"
    assert main(["segment", str(bundle), *inputs, "--out", str(out), "--device", "cpu", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [Path(r["labels"]).name for r in results] == expected
    for result in results:  # each output holds its own input's segmentation, on its grid
        assert read_image(result["labels"]).shape == read_image(result["input"]).shape
    written = {path: path.read_bytes() for path in out.iterdir()}
    assert len(written) == 4  # two label maps, two .seg.nrrd

    assert main(["segment", str(bundle), *inputs, "--out", str(out), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("exists already") == 2 and "--overwrite" in err
    assert {path: path.read_bytes() for path in out.iterdir()} == written
    assert main(["segment", str(bundle), *inputs, "--out", str(out), "--device", "cpu", "--overwrite"]) == 0


def test_the_same_input_twice_is_segmented_once(bundle, tmp_path, capsys):
    path = str(_write_nifti(tmp_path / "scan.nii.gz", np.ones((4, 16, 16), np.float32)))
    assert main(["segment", str(bundle), path, path, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert "given twice" in capsys.readouterr().err


# ------------------------------------------------------------------ 4: two trainings into one folder
def test_a_second_training_into_a_held_folder_is_refused(shapes, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from cotexnet.runlock import RunLock\n"
                               "with RunLock(sys.argv[1]):\n print('locked', flush=True); sys.stdin.read()",
                               str(tmp_path / "run")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              encoding="utf-8", errors="replace", env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train_cli(shapes, tmp_path / "run", "--classes", "disk", "square") == 2
        message = one_error_line(capsys.readouterr().err)
        assert f"in use by training process {holder.pid}" in message
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_message(shapes, tmp_path, caplog):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                           "started": time.time() - 60}))
    with caplog.at_level("WARNING", logger="cotexnet.runlock"):
        assert train_cli(shapes, tmp_path / "run", "--classes", "disk", "square", "--max-steps-per-epoch", "1") == 0
    assert f"taking over the lock of training process {dead.pid}" in caplog.text
    assert not (tmp_path / "run" / "run.lock").exists()


# ------------------------------------------------------------------ 5: owner-only files, raw PermissionError
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["5-umask-022", "5-umask-027"])
def test_saved_bundles_get_the_permissions_of_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        model = CoTexNet.from_config(CoTexNetConfig(classes=["a"], backbone="tiny", image_size=32))
        model.save_pretrained(tmp_path / "model")
        model.save_pretrained(tmp_path / "model")  # a second save replaces the folder: same permissions
    finally:
        os.umask(previous)
    folder = tmp_path / "model"
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_unreadable_bundle_names_the_path_and_what_to_do(bundle, monkeypatch):
    """Tests run as root, whom permissions do not stop: the read itself is made to fail as it would for
    another user reading an owner-only bundle."""
    read_text = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(CoTexNetError, match=r"config.json: no permission to read it; ask the owner .*\(chmod -R a\+rX"):
        CoTexNet.from_pretrained(bundle)


def test_a_folder_that_cannot_be_written_is_named_not_a_temporary_file(bundle, tmp_path, monkeypatch, capsys):
    import tempfile

    def denied(real):
        def make(prefix=None, suffix=None, dir=None):
            if dir is None:  # the system's temporary folder (the NIfTI reader's header copy) stays writable
                return real(prefix=prefix, suffix=suffix)
            raise PermissionError(13, "Permission denied", os.path.join(dir, f"{prefix}x1y2z3{suffix or ''}"))
        return make

    monkeypatch.setattr(tempfile, "mkstemp", denied(tempfile.mkstemp))
    monkeypatch.setattr(tempfile, "mkdtemp", denied(tempfile.mkdtemp))
    path = _write_nifti(tmp_path / "scan.nii.gz", np.ones((4, 16, 16), np.float32))
    assert main(["segment", str(bundle), str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out'}: cannot write in this folder (permission denied)" in err and "x1y2z3" not in err


# ------------------------------------------------------------------ 6: kill between the renames of last/
KILL_AT_SECOND_RENAME = """
import os, sys
from pathlib import Path
import cotexnet.atomic as atomic
replace = os.replace
def killed_between_renames(src, dst):
    dst = Path(dst)
    if dst.name == "last" and not dst.exists() and any(dst.parent.glob(".last.old-*")):
        os._exit(137)  # like kill -9: no cleanup runs
    replace(src, dst)
atomic.os.replace = killed_between_renames
from cotexnet.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_between_the_renames_of_last_is_recovered_by_resume(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    arguments = ["train", str(shapes), "--classes", "disk", "square", *TINY_TRAIN, "--epochs", "3",
                 "--max-steps-per-epoch", "2", "--out", str(run)]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SECOND_RENAME, *arguments], env=ENV, capture_output=True,
                            encoding="utf-8", errors="replace", timeout=300)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not (run / "last").exists() and any(run.glob(".last.*.partial")) and any(run.glob(".last.old-*"))

    assert main(arguments) == 2  # without --resume the staging folders still count as a run: refused
    assert ".last." in capsys.readouterr().err
    progress = tmp_path / "progress.jsonl"
    assert main([*arguments, "--resume", "--progress-file", str(progress)]) == 0
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert any(e["event"] == "warning" and "restored from .last." in e["message"] for e in events)
    assert next(e for e in events if e["event"] == "start")["start_epoch"] == 3  # epoch 2's complete checkpoint
    assert not list(run.glob(".last.*")) and not list(run.glob(".best.*"))
    assert torch.load(run / "last" / TRAINER_STATE, weights_only=True)["epoch"] == 3


# ------------------------------------------------------------------ 7: labels without foreground
@pytest.mark.parametrize("labels, problem", [
    (lambda i, label: np.zeros_like(label), "no foreground"),
], ids=["7-no-foreground-anywhere"])
def test_labels_without_foreground_are_refused(tmp_path, capsys, labels, problem):
    data = volume_dataset(tmp_path / "data", labels)
    assert train_cli(data, tmp_path / "run") == 2
    assert problem in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "best").exists()


def test_a_class_absent_from_every_mask_is_named(shapes, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    for mask in (data / "masks").iterdir():
        array = np.array(Image.open(mask))
        array[array == 2] = 0
        Image.fromarray(array).save(mask)
    assert train_cli(data, tmp_path / "run", "--classes", "disk", "square") == 2
    message = one_error_line(capsys.readouterr().err)
    assert "'square' (label 2) appears in none of the training and validation masks" in message


# ------------------------------------------------------------------ 9: raw tracebacks instead of one error line
def _empty_vocabulary_bundle(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "vocab.json").write_text("")
    return copy


@pytest.mark.parametrize("arguments, named", [
    (lambda shapes, bundle, tmp: ["train", str(shapes), "--out", str(tmp / "run"), "--device", "gpu0"], "'gpu0'"),
    (lambda shapes, bundle, tmp: ["segment", str(bundle), str(shapes / "images" / "case00.png"), "--out",
                                  str(tmp / "out"), "--device", "mps"], "'mps'"),
    (lambda shapes, bundle, tmp: ["train", str(shapes), "--out", str(tmp / "run"), "--ct-window", "40,abc"],
     "--ct-window"),
    (lambda shapes, bundle, tmp: ["train", str(shapes), "--out", str(shapes / "images" / "case00.png"),
                                  "--classes", "disk", "square", *TINY_TRAIN], "the output is a file"),
    (lambda shapes, bundle, tmp: ["concepts", str(shapes), "--classes", "disk", "square", "--backend", "llava",
                                  "--model", "/nonexistent", "--out", str(tmp / "c.jsonl")], "'/nonexistent'"),
    (lambda shapes, bundle, tmp: ["segment", str(_empty_vocabulary_bundle(bundle, tmp)),
                                  str(shapes / "images" / "case00.png"), "--out", str(tmp / "out")], "vocab.json"),
], ids=["9-device-gpu0", "9-device-mps", "9-ct-window-not-numbers", "9-train-out-is-a-file",
        "9-llava-model-missing", "9-empty-vocab-json"])
def test_bad_options_and_files_give_one_error_line(shapes, bundle, tmp_path, capsys, arguments, named):
    try:
        code = main(arguments(shapes, bundle, tmp_path))
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    line = [line for line in err.splitlines() if "error:" in line]
    assert len(line) == 1 and named in line[0] and "Traceback" not in err, err


# ------------------------------------------------------------------ 10: Ctrl-C counted a partial epoch as done
def _adam_steps(run: Path) -> list[int]:
    state = torch.load(run / "last" / TRAINER_STATE, weights_only=True)["optimizer"]["state"]
    return sorted({int(s["step"]) for s in state.values()})


def _metrics_without_time(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_a_stop_mid_epoch_resumes_at_its_step_and_repeats_an_uninterrupted_run(shapes, tmp_path):
    train(quick(shapes, tmp_path / "straight", epochs=2))
    stop_file = tmp_path / "stop"

    def stop_at_step_1_of_epoch_2(event, **values):
        if event == "step" and values["epoch"] == 2 and values["step"] == 1:
            stop_file.touch()

    train(quick(shapes, tmp_path / "run", epochs=2, stop_file=str(stop_file)), on_event=stop_at_step_1_of_epoch_2)
    saved = torch.load(tmp_path / "run" / "last" / TRAINER_STATE, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 1)  # epoch 2 is not counted as done
    stop_file.unlink()
    events = []
    train(quick(shapes, tmp_path / "run", epochs=2, resume=True), on_event=lambda e, **v: events.append((e, v)))
    assert [v["step"] for e, v in events if e == "resumed"] == [1]
    assert [v["step"] for e, v in events if e == "step"] == [2]  # only the steps epoch 2 had left
    assert _adam_steps(tmp_path / "run") == _adam_steps(tmp_path / "straight")
    for key, tensor in weights(tmp_path / "straight" / "last").items():
        assert torch.equal(tensor, weights(tmp_path / "run" / "last")[key]), key
    rows = {name: _metrics_without_time(tmp_path / name / "metrics.csv") for name in ("run", "straight")}
    assert rows["run"] == rows["straight"] and [row["epoch"] for row in rows["run"]] == ["1", "2"]


def test_ctrl_c_exits_130_and_resume_takes_the_steps_an_uninterrupted_run_takes(shapes, tmp_path):
    run, progress = tmp_path / "run", tmp_path / "progress.jsonl"
    arguments = ["train", str(shapes), "--classes", "disk", "square", "--backbone", "tiny", "--image-size", "128",
                 "--device", "cpu", "--batch-size", "1", "--epochs", "2", "--out", str(run)]
    process = subprocess.Popen([sys.executable, "-m", "cotexnet.cli", *arguments, "--progress-file", str(progress)],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8",
                               errors="replace")
    deadline = time.time() + 240
    while not (progress.is_file() and '"step"' in progress.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 130, err[-2000:]
    state = torch.load(run / "last" / TRAINER_STATE, weights_only=True)
    assert f"interrupted after epoch {state['epoch']}, step {state['step']}; continue with --resume" in err
    train(quick(shapes, tmp_path / "straight", epochs=2, batch_size=1, image_size=128))
    [total] = _adam_steps(tmp_path / "straight")
    steps_per_epoch = total // 2
    assert 0 < state["epoch"] * steps_per_epoch + state["step"] < total  # stopped before the end
    assert _adam_steps(run) == [state["epoch"] * steps_per_epoch + state["step"]]
    assert main([*arguments, "--resume"]) == 0
    assert _adam_steps(run) == [total]  # not one step fewer (the partial epoch) nor more


# ------------------------------------------------------------------ 12: labels placed elsewhere in space
@pytest.mark.parametrize("geometry, field", [
    ({"origin": (5.0, 0.0, 0.0)}, "origin"),
    ({"spacing": (1.0, 1.0, 2.5)}, "spacing"),
    ({"direction": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)}, "direction"),
], ids=["12-origin", "12-spacing", "12-direction"])
def test_a_label_on_another_grid_is_refused_with_both_values(tmp_path, capsys, geometry, field):
    data = volume_dataset(tmp_path / "data", **geometry)
    assert train_cli(data, tmp_path / "run") == 2
    message = one_error_line(capsys.readouterr().err)
    assert str(data / "labelsTr" / "c0.nii.gz") in message and f"{field} " in message and "vs the image's" in message
    image = read_image(data / "imagesTr" / "c0_0000.nii.gz")
    with pytest.raises(DataError, match=field):
        read_label_map(data / "labelsTr" / "c0.nii.gz", reference=image)


# ------------------------------------------------------------------ 13: segmentFiles stopped at the first bad file
def test_slicer_segment_files_goes_on_after_a_bad_file(bundle, tmp_path):
    pytest.importorskip("slicer")
    import slicer

    from CoTexNetSegmentLib.logic import CoTexNetSegmentLogic

    good = [str(_write_nifti(tmp_path / f"good{i}.nii.gz", np.full((4, 16, 16), i, np.float32))) for i in range(2)]
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    results = CoTexNetSegmentLogic(slicer.vtkMRMLScene()).segmentFiles([good[0], str(bad), good[1]], bundle,
                                                                      tmp_path / "out", device="cpu")
    assert [r["input"] for r in results] == [good[0], str(bad), good[1]]
    assert "error" in results[1] and str(bad) in results[1]["error"]
    assert all(Path(results[i]["labels"]).is_file() for i in (0, 2))


# ------------------------------------------------------------------ smaller ones
def test_segment_out_that_is_a_file_is_refused_before_inference(bundle, shapes, tmp_path, capsys):
    target = tmp_path / "out"
    target.write_text("notes")
    assert main(["segment", str(bundle), str(shapes / "images" / "case00.png"), "--out", str(target)]) == 2
    assert "the output is a file" in one_error_line(capsys.readouterr().err)
    assert target.read_text() == "notes"


def test_a_bad_intensity_setting_is_blamed_on_the_bundle(bundle, shapes, tmp_path, capsys):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    config = json.loads((copy / "config.json").read_text())
    config["intensity"] = {"mode": "ct", "center": 40, "width": -5}
    (copy / "config.json").write_text(json.dumps(config))
    picture = str(shapes / "images" / "case00.png")
    assert main(["segment", str(copy), picture, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    message = one_error_line(capsys.readouterr().err)
    assert str(copy / "config.json") in message and "width" in message and picture not in message


def test_an_rgb_picture_for_a_grayscale_model_gives_a_2d_label_map(bundle):
    from cotexnet.infer import segment_volume

    model = CoTexNet.from_pretrained(bundle)
    picture = np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8)
    labels = segment_volume(model, picture, device="cpu")
    gray = segment_volume(model, picture.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32), device="cpu")
    assert labels.shape == (24, 20) and np.array_equal(labels, gray)


def test_resume_with_a_changed_setting_is_refused(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(shapes, run, "--classes", "disk", "square", "--max-steps-per-epoch", "1", "--lr", "0.001") == 0
    capsys.readouterr()
    assert train_cli(shapes, run, "--classes", "disk", "square", "--max-steps-per-epoch", "1", "--lr", "0.01",
                     "--image-size", "96", "--resume") == 2
    message = one_error_line(capsys.readouterr().err)
    assert "image_size=64" in message and "lr=0.001" in message and "image_size=96" in message and "lr=0.01" in message


def test_an_empty_dicom_folder_is_said_once_without_library_noise(bundle, tmp_path, capfd):
    folder = tmp_path / "dicom"
    folder.mkdir()
    assert main(["segment", str(bundle), str(folder), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
    err = capfd.readouterr().err
    assert err.count(str(folder)) == 1 and "holds no DICOM series (it is empty)" in err and "GDCM" not in err, err


# Issue 21, fault 12: one bad input in a batch
def _complex_nifti(path: Path) -> Path:
    """A NIfTI whose voxels are complex numbers (datatype 32): SimpleITK reads it as a complex image."""
    values = np.random.default_rng(0).random((4, 16, 16)) + 1j
    sitk.WriteImage(sitk.GetImageFromArray(values.astype(np.complex64)), str(path))
    return path


def _symlink_loop(path: Path) -> Path:
    os.symlink(path.with_name(path.name + "-other"), path)
    os.symlink(path, path.with_name(path.name + "-other"))
    return path


@pytest.mark.parametrize("bad_input, expected", [
    (_complex_nifti, "complex"),
    (_symlink_loop, "symbolic links"),
], ids=["12-complex-valued-nifti", "12-symlink-loop"])
def test_one_bad_input_fails_alone_and_the_batch_goes_on(bundle, tmp_path, capsys, bad_input, expected):
    rng = np.random.default_rng(1)
    good = [str(_write_nifti(tmp_path / f"good{i}.nii.gz", rng.random((4, 16, 16)).astype(np.float32))) for i in range(2)]
    bad = str(bad_input(tmp_path / "bad.nii.gz"))
    out = tmp_path / "out"
    assert main(["segment", str(bundle), good[0], bad, good[1], "--out", str(out), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    failed = [line for line in captured.err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and bad in failed[0] and expected in failed[0], captured.err
    assert "2 segmented, 1 failed" in captured.out
    for path in good:  # the inputs around the bad one are segmented, each on its own grid
        assert read_image(out / Path(path).name.replace(".nii.gz", "_labels.nii.gz")).shape == (4, 16, 16)


# Issue 21, part A: files, geometry and outputs
def _nifti_with_header(path: Path, array: np.ndarray, spacing=(2.0, 2.0, 2.0), **fields) -> Path:
    """A NIfTI-1 file of ``array`` whose header fields (``pixdim``, ``dim``, ``qform_code``, ``sform_code``)
    are then set to the given values, as a damaged or hand-written header would hold them."""
    import gzip
    import struct

    plain = path.with_name(path.name.removesuffix(".gz"))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(plain))
    data = bytearray(plain.read_bytes())
    layout = {"dim": (40, "8h"), "pixdim": (76, "8f"), "qform_code": (252, "h"), "sform_code": (254, "h")}
    for name, value in fields.items():
        offset, form = layout[name]
        struct.pack_into("<" + form, data, offset, *np.atleast_1d(value))
    if path.name.endswith(".gz"):
        plain.unlink()
        path.write_bytes(gzip.compress(bytes(data)))
    else:
        path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii"],
                         ids=["1-sibling-nii-of-nii.gz", "1-sibling-nii.gz-of-nii"])
def test_the_named_nifti_is_read_not_its_sibling(tmp_path, name):
    """ITK's NIfTI library opens ``scan.nii`` when asked for ``scan.nii.gz`` if both exist."""
    named = _write_nifti(tmp_path / name, np.full((4, 8, 8), 7, np.int16))
    other = "scan.nii" if name == "scan.nii.gz" else "scan.nii.gz"
    _write_nifti(tmp_path / other, np.zeros((3, 5, 6), np.int16))
    image = read_image(named)
    assert image.shape == (4, 8, 8) and (image.array == 7).all()
    from cotexnet.data import read_image_geometry

    assert read_image_geometry(named).shape == (4, 8, 8)


def test_a_full_disk_is_an_error_and_leaves_no_output_of_that_input(bundle, tmp_path):
    """Under a 4 KiB file-size limit SimpleITK's gzip writer cut the float probability maps (to 0 bytes) and
    reported "ok"; now the input fails, naming the file, and none of its outputs are left."""
    image = _write_nifti(tmp_path / "scan.nii.gz", np.random.default_rng(0).random((6, 32, 32)).astype(np.float32))
    out = tmp_path / "out"
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
              "from cotexnet.cli import main; sys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", script, "segment", str(bundle), str(image), "--out", str(out),
                          "--device", "cpu", "--probabilities", "float32"],
                         env=ENV, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert run.returncode == 1, run.stderr
    assert "not written completely" in run.stderr or "could not be written" in run.stderr, run.stderr
    assert f"FAILED  {image}: {out / 'scan_prob_'}" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not [p for p in out.rglob("*") if p.is_file()]  # no cut file, no staging file, no orphan label map


def test_a_written_image_that_reads_back_differently_is_not_put_in_place(tmp_path, monkeypatch):
    """The check every output passes before it is renamed into place: what is read back must be what was meant."""
    from cotexnet.data import VolumeImage, write_image

    reference = VolumeImage(np.zeros((3, 4, 5), np.uint8), (1, 1, 2), (0, 0, 0), tuple(np.eye(3).ravel()))
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"earlier output")
    real = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", lambda image, name, *args: real(image[:, :, :2], name, *args))
    with pytest.raises(DataError, match="not written completely") as error:
        write_image(np.ones((3, 4, 5), np.uint8), reference, target)
    assert str(target) in str(error.value)
    assert target.read_bytes() == b"earlier output" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"],
                         ids=["14-header-promises-16GB-nii", "14-header-promises-16GB-nii.gz"])
def test_a_header_promising_more_than_the_file_holds_is_refused_before_allocating(tmp_path, name):
    """A 1.3 KB file whose header promises 16 GB: refused from the file size, in a process that cannot
    even map 4 GB more than it holds (SimpleITK allocated the promise first)."""
    path = _nifti_with_header(tmp_path / name, np.ones((4, 8, 8), np.int16), dim=(3, 2048, 2048, 2048, 1, 1, 1, 1))
    script = ("import re, resource, sys\n"
              "from cotexnet.data import read_image\n"
              "size = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
              "resource.setrlimit(resource.RLIMIT_AS, (size + 4 * 2**30, resource.RLIM_INFINITY))\n"
              "try:\n    read_image(sys.argv[1])\nexcept Exception as error:\n    print(error)\n")
    run = subprocess.run([sys.executable, "-c", script, str(path)], env=ENV, capture_output=True, encoding="utf-8",
                         errors="replace", timeout=120)
    assert f"{path}: is truncated: its header promises {2048 ** 3 * 2} bytes" in run.stdout, run.stdout + run.stderr


def test_a_plain_nifti_named_nii_gz_is_said_to_be_not_gzip(tmp_path):
    path = tmp_path / "scan.nii.gz"
    _write_nifti(tmp_path / "plain.nii", np.ones((2, 3, 4), np.int16)).rename(path)
    with pytest.raises(DataError, match="not gzip-compressed") as error:
        read_image(path)
    assert "truncated" not in str(error.value) and str(path) in str(error.value)


def test_a_valid_sform_with_zero_pixdim_is_refused_not_put_on_a_1_mm_grid(tmp_path):
    """ITK takes pixdim 0 as 1 mm and keeps the sform's direction only: the label map came back 2x too small."""
    path = _nifti_with_header(tmp_path / "scan.nii.gz", np.ones((4, 8, 8), np.int16), pixdim=(1, 0, 0, 0, 0, 0, 0, 0),
                              qform_code=0)
    with pytest.raises(DataError, match=r"sform says \(2.0, 2.0, 2.0\)") as error:
        read_image(path)
    assert str(path) in str(error.value) and "spacing (1.0, 1.0, 1.0)" in str(error.value)
    from cotexnet.data import read_image_geometry

    with pytest.raises(DataError, match="contradicts itself"):
        read_image_geometry(path)


def test_negative_pixdim_without_orientation_codes_reads_the_same_in_both_readers(tmp_path):
    """The header reader said -2 mm and the full reader +2 mm (direction -1), so training refused an image and
    mask whose headers are identical."""
    from cotexnet.data import read_image_geometry
    from cotexnet.data.labels import check_label_placement

    array = np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8)
    image = _nifti_with_header(tmp_path / "image.nii.gz", array, pixdim=(1, -2, -2, -2, 0, 0, 0, 0), qform_code=0,
                               sform_code=0)
    mask = _nifti_with_header(tmp_path / "mask.nii.gz", (array > 100).astype(np.uint8),
                              pixdim=(1, -2, -2, -2, 0, 0, 0, 0), qform_code=0, sform_code=0)
    full, header = read_image(image), read_image_geometry(image)
    assert full.spacing == header.spacing == (2.0, 2.0, 2.0)
    np.testing.assert_array_equal(np.reshape(header.direction, (3, 3)), -np.eye(3))
    assert full.geometry.same_grid(header)
    np.testing.assert_array_equal(full.array, array)
    check_label_placement(read_image_geometry(mask), header)
    assert read_label_map(mask, reference=full).sum() == (array > 100).sum()


@pytest.mark.parametrize("z_positions, problem", [
    ([30, 32, 34, 38, 40], "1 slice(s) missing: 4.000 mm between slice002.dcm and slice003.dcm"),
    ([30, 32, 34.7, 36, 38], "uneven slice spacing: 2.700 mm between slice001.dcm and slice002.dcm"),
    ([30, 32, 32, 34, 36], "duplicate positions (1 pair(s); first: slice001.dcm and slice002.dcm, both at 32.000 mm"),
], ids=["5-dicom-missing-slice", "5-dicom-uneven-spacing", "5-dicom-duplicate-position"])
def test_a_dicom_series_off_a_uniform_grid_is_refused_naming_the_slices(bundle, tmp_path, capsys, z_positions, problem):
    """ITK spreads the slices evenly over the series' extent: slices were drawn up to half a gap out of place."""
    from test_data import _dicom_series

    folder = _dicom_series(tmp_path / "ct", np.arange(5 * 6 * 5, dtype=np.int16).reshape(5, 6, 5),
                           z_positions=z_positions)
    with pytest.raises(DataError) as error:
        read_image(folder)
    assert str(error.value).startswith(f"{folder}: DICOM series has ") and problem in str(error.value)
    assert main(["segment", str(bundle), str(folder), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_two_dicom_series_of_one_size_say_which_was_read_and_list_the_other(tmp_path, caplog):
    from test_data import _dicom_series

    folder = tmp_path / "study"
    folder.mkdir()
    for end, value in (("8", 1), ("9", 2)):
        series = _dicom_series(tmp_path / end, np.full((3, 4, 5), value, np.int16), uid_end=end)
        for file in series.iterdir():
            file.rename(folder / f"{end}_{file.name}")
    with caplog.at_level("WARNING", logger="cotexnet.data.image"):
        image = read_image(folder)
    message = caplog.text
    read, other = ("8", "9") if (image.array == 1).all() else ("9", "8")
    assert f"holds 2 DICOM series; reading 1.2.826.0.1.3680043.2.1125.{read}.2 (3 files)" in message, message
    assert f"Not read: 1.2.826.0.1.3680043.2.1125.{other}.2 (3 files)" in message and str(folder) in message


def test_a_fifo_as_input_is_refused_before_it_is_opened(bundle, tmp_path):
    """Reading a FIFO waits for a writer that never comes: the CLI hung (and so did the worker's slot)."""
    fifo = tmp_path / "scan.nii.gz"
    os.mkfifo(fifo)
    try:
        run = subprocess.run([sys.executable, "-m", "cotexnet.cli", "segment", str(bundle), str(fifo), "--out",
                              str(tmp_path / "out"), "--device", "cpu"], env=ENV, capture_output=True,
                             encoding="utf-8", errors="replace", timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("segment waited on the FIFO")
    assert run.returncode == 1 and f"FAILED  {fifo}: is neither a regular file nor a folder" in run.stderr, run.stderr
    with pytest.raises(DataError, match="neither a regular file nor a folder"):
        read_label_map(fifo)


def test_a_fifo_as_worker_input_is_refused_and_frees_the_segmentation_slot(bundle, tmp_path):
    import io
    import threading

    from cotexnet.worker import Worker

    fifo = tmp_path / "volume.npy"
    os.mkfifo(fifo)
    worker, outcome = Worker(io.StringIO()), []
    request = {"input": str(fifo), "model": str(bundle), "spacing": [1, 1, 1], "direction": list(np.eye(3).ravel()),
               "output": str(tmp_path / "labels.npy"), "device": "cpu"}

    def segment():
        try:
            worker._handle_segment(1, request)
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=segment, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # the old reader waits on the FIFO: a writer that closes at once lets it go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=30)
        pytest.fail("the worker waited on the FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], DataError) and "neither a regular file" in str(outcome[0])


@pytest.mark.parametrize("shift, dropped", [(100.0, 48), (3.0, 24)],
                         ids=["7-seg-nrrd-outside", "7-seg-nrrd-half-outside"])
def test_a_seg_nrrd_outside_its_image_is_refused_naming_the_file(tmp_path, shift, dropped):
    """Resampled onto its image, such a segmentation became all (or partly) background without a word."""
    from cotexnet.data import ImageGeometry, write_segmentation_nrrd

    image = read_image(_write_nifti(tmp_path / "image.nii.gz", np.zeros((4, 8, 8), np.float32)))
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[1:3, 2:6, 2:5] = 1  # columns 2..4, 24 voxels: 3 mm to the left they still lie on the image
    labels[1:3, 2:6, 5:8] = 2  # columns 5..7, 24 voxels: 3 mm to the left they are off it
    placed = ImageGeometry((4, 8, 8), (1.0, 1.0, 1.0), (shift, 0.0, 0.0), tuple(np.eye(3).ravel()))
    seg = write_segmentation_nrrd(labels, placed, tmp_path / "mask.seg.nrrd", ["liver", "spleen"])
    with pytest.raises(DataError, match=rf"{dropped} of its 48 segment voxels") as error:
        read_label_map(seg, reference=image, classes=["liver", "spleen"])
    assert str(error.value).startswith(f"{seg}: ") and str(tmp_path / "image.nii.gz") in str(error.value)
    assert ("liver" in str(error.value)) == (dropped == 48) and "spleen" in str(error.value)


def test_itk_messages_have_no_object_addresses_and_keep_the_reason(tmp_path):
    path = tmp_path / "cut.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\nab")
    with pytest.raises(DataError) as error:
        read_image(path)
    assert "0x" not in str(error.value) and "require endian info" in str(error.value), str(error.value)


# Issue 21, part B: models, training and options
def _colour_shapes(root: Path) -> Path:
    """The shapes dataset in colour: a red disk and a green square on blue, where luminance and colour differ."""
    shapes_dataset(root)
    palette = np.array([[40, 60, 160], [220, 30, 30], [30, 200, 40]], np.uint8)  # background, disk, square
    for mask in (root / "masks").iterdir():
        Image.fromarray(palette[np.array(Image.open(mask))]).save(root / "images" / mask.name)
    return root


def test_3_a_model_trained_on_colour_pictures_is_fed_colour_at_inference(tmp_path):
    """Training fed colour (no --modality RGB), inference fed luminance: val Dice 0.835, evaluate 0.00."""
    from cotexnet.infer import predict_volume

    data = _colour_shapes(tmp_path / "data")
    trainer = Trainer(quick(data, tmp_path / "run"))
    trainer.initialize()
    trainer.model.save_pretrained(tmp_path / "model")
    model = CoTexNet.from_pretrained(tmp_path / "model")
    item = trainer.train_set[0]
    fed = []
    model.register_forward_pre_hook(lambda module, inputs: fed.append(inputs[0].expand(-1, 3, -1, -1).clone()))
    case = trainer.index.case(item["case"])
    predict_volume(model, read_image(case.image_path), device="cpu", postprocess=False)
    assert item["image"].shape == (3, 64, 64) and not torch.allclose(item["image"][0], item["image"][1], atol=0.1)
    torch.testing.assert_close(fed[0][0], item["image"], atol=2e-3, rtol=0)  # float16 cache of training slices
    assert model.config.channels == "rgb"


def test_4_init_from_with_the_classes_in_another_order_keeps_each_class_its_channel(bundle, tmp_path):
    """Same classes, other order: the head's shapes match, so its channels were kept under the new names."""
    from cotexnet.train import initialized_from

    head = "clipseg.decoder.transposed_convolution.4"  # one channel per class after the background
    source = CoTexNet.from_pretrained(bundle)
    with torch.no_grad():
        source.state_dict()[f"{head}.bias"][2] += 1.0  # 'square' differs from 'disk'
    source.save_pretrained(tmp_path / "source")
    model = initialized_from(tmp_path / "source", CoTexNetConfig(classes=["square", "disk"], backbone="tiny",
                                                                 image_size=32))
    assert model.config.classes == ["square", "disk"]
    old, new = source.state_dict(), model.state_dict()
    for key, dim in ((f"{head}.weight", 1), (f"{head}.bias", 0)):
        assert torch.equal(new[key].movedim(dim, 0), old[key].movedim(dim, 0)[[0, 2, 1]]), key


def _picture_dataset(shapes: Path, root: Path, labels: dict[str, int], relabel: list[int]) -> Path:
    """The shapes cases as an nnU-Net dataset naming ``labels``; mask values go through ``relabel``."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for i in range(4):
        shutil.copy(shapes / "images" / f"case{i:02d}.png", root / "imagesTr" / f"c{i}_0000.png")
        mask = np.array(relabel, np.uint8)[np.array(Image.open(shapes / "masks" / f"case{i:02d}.png"))]
        Image.fromarray(mask).save(root / "labelsTr" / f"c{i}.png")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, **labels}, "file_ending": ".png",
                                                   "numTraining": 4}))
    return root


def test_6_evaluate_matches_classes_by_name_and_refuses_other_names(shapes, tmp_path, monkeypatch, capsys):
    """A dataset listing the model's classes in another order was scored by position (Dice 73/67 -> 21/24)."""
    import cotexnet.infer

    model = tmp_path / "model"
    CoTexNet.from_config(CoTexNetConfig(classes=["disk", "square"], backbone="tiny", image_size=32)).save_pretrained(model)
    truths = {f"c{i}_0000.png": np.array(Image.open(shapes / "masks" / f"case{i:02d}.png")) for i in range(4)}
    perfect = lambda model, image, **options: truths[image.path.name]  # noqa: E731  (the model's order: disk, square)
    monkeypatch.setattr(cotexnet.infer, "segment_volume", perfect)
    swapped = _picture_dataset(shapes, tmp_path / "swapped", {"square": 1, "disk": 2}, [0, 2, 1])
    assert main(["evaluate", str(model), str(swapped), "--split", "all", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["dice"] for row in report["per_class"]] == [1.0, 1.0]
    other = _picture_dataset(shapes, tmp_path / "other", {"disk": 1, "circle": 2}, [0, 1, 2])
    assert main(["evaluate", str(model), str(other), "--split", "all", "--device", "cpu"]) == 2
    message = one_error_line(capsys.readouterr().err)
    assert "['circle']" in message and "['disk', 'square']" in message and str(other) in message


def test_8_island_volumes_in_mm3_do_not_apply_to_2d_pictures(tmp_path):
    """A picture's spacing is a nominal 1 and a slice has no thickness: the same slice kept 1,044 pixels as PNG
    and 2,009 as NIfTI. Island sizes now apply to 3D label maps only, and are not chosen on 2D cases."""
    from cotexnet.postprocess import apply_postprocessing, choose_postprocessing

    labels = np.zeros((32, 32), np.uint8)
    labels[2:12, 2:12] = labels[20:30, 20:30] = 1  # two true components (largest-component would lose one)
    labels[16:18, 2:4] = 1  # a 4-pixel island
    Image.fromarray(labels).save(tmp_path / "slice.png")
    nifti = sitk.GetImageFromArray(labels)
    nifti.SetSpacing((3.0, 3.0))
    sitk.WriteImage(nifti, str(tmp_path / "slice.nii.gz"))
    choice = {"a": {"min_volume_mm3": 10.0}}
    results = [apply_postprocessing(labels, choice, ["a"], read_image(tmp_path / name).spacing)
               for name in ("slice.png", "slice.nii.gz")]
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], labels)
    truth = labels.copy()
    truth[16:18, 2:4] = 0
    assert choose_postprocessing([labels], [truth], ["a"], [(1.0, 1.0)])["classes"]["a"]["min_volume_mm3"] == 0.0
    volume, choice = np.stack([labels] * 3), {"a": {"min_volume_mm3": 50.0}}
    assert apply_postprocessing(volume, choice, ["a"], (1.0, 1.0, 1.0))[:, 16:18, 2:4].sum() == 0  # 12 mm3 go
    assert apply_postprocessing(volume, choice, ["a"], (2.0, 2.0, 2.0))[:, 16:18, 2:4].sum() == 12  # 96 mm3 stay


def test_9_a_bundle_with_nan_weights_is_refused_naming_the_tensor_and_file(bundle, shapes, tmp_path, capsys):
    """It segmented everything as background and said "ok"."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    state = load_file(str(copy / "model.safetensors"))
    name = "clipseg.decoder.transposed_convolution.4.bias"
    state[name][1] = float("nan")
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(["segment", str(copy), str(shapes / "images" / "case00.png"), "--out", str(out), "--device", "cpu"]) == 2
    message = one_error_line(capsys.readouterr().err)
    assert str(copy / "model.safetensors") in message and name in message and "NaN" in message
    assert not out.exists() or not list(out.iterdir())


def test_10_more_than_255_classes_are_refused_not_wrapped_in_8_bits(tmp_path, capsys):
    """Label maps are uint8: class 256 became 0 and 300 became 44."""
    def sixteen_bit(i, label):
        wide = label.astype(np.uint16)
        wide[0, :4, :4], wide[1, :4, :4] = 256, 300
        return wide

    data = volume_dataset(tmp_path / "data", sixteen_bit)
    labels = {"background": 0, **{f"structure {i}": i for i in range(1, 301)}}
    (data / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz", "numTraining": 4}))
    with pytest.raises(DataError, match="at most 255"):
        read_label_map(data / "labelsTr" / "c0.nii.gz", num_classes=300)
    assert train_cli(data, tmp_path / "run") == 2
    assert "at most 255" in one_error_line(capsys.readouterr().err)
    with pytest.raises(CoTexNetError, match="at most 255"):
        CoTexNetConfig(classes=[f"c{i}" for i in range(256)])


def test_11_the_feature_cache_is_reserved_on_disk_and_a_full_disk_is_a_named_error(shapes, tmp_path):
    """Sparse memory-mapped cache files on a disk that filled up killed training with SIGBUS (exit 135), no
    message, run.lock left."""
    trainer = Trainer(quick(shapes, tmp_path / "run", train_encoder="none"))
    trainer.initialize()
    files = list(trainer.cache.folder.glob("*.bin"))
    assert len(files) == 4 and all(f.stat().st_blocks * 512 >= f.stat().st_size > 0 for f in files)  # not sparse
    trainer.cache.close()

    mount, run = tmp_path / "small disk", tmp_path / "small disk" / "run"
    mount.mkdir()
    command = [sys.executable, "-m", "cotexnet.cli", "train", str(shapes), "--classes", "disk", "square", *TINY_TRAIN,
               "--epochs", "3", "--train-encoder", "none", "--out", str(run)]
    script = (f"mount -t tmpfs -o size=12m tmpfs '{mount}' || exit 99\n"  # a bundle of the tiny model is 8 MB
              f"{' '.join(repr(part) for part in command)}\ncode=$?\nls -a '{run}'\nexit $code")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare to mount a small disk")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True,
                            encoding="utf-8", errors="replace", timeout=300)
    if result.returncode == 99 or result.stderr.startswith("unshare:"):
        pytest.skip(f"cannot mount a small disk here: {result.stderr.strip()}")
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert str(run) in errors[0] and "No space left on device" in errors[0]
    assert "run.lock" not in result.stdout.split() and "feature_cache" not in result.stdout.split()


def test_15_a_diverging_training_stops_with_a_message_and_keeps_the_last_good_checkpoint(shapes, tmp_path, capsys,
                                                                                          monkeypatch):
    """--lr 1e6 died in the progress writer ("Out of range float values are not JSON compliant") and left a
    folder that needed --overwrite."""
    run = tmp_path / "run"
    assert train_cli(shapes, run, "--classes", "disk", "square", "--lr", "1e6") == 2
    message = one_error_line(capsys.readouterr().err)
    assert "training diverged at epoch 1, step 2: the loss is nan" in message and "lower --lr (now 1000000.0)" in message
    assert sorted(path.name for path in run.iterdir()) == ["split.json"]
    # ended before its first checkpoint (diverged, or killed in epoch 1): --resume starts it anew
    assert train_cli(shapes, run, "--classes", "disk", "square", "--max-steps-per-epoch", "1", "--resume") == 0
    assert torch.load(run / "last" / TRAINER_STATE, weights_only=True)["epoch"] == 1

    step = Trainer.train_step

    def diverging_in_epoch_2(self, batch):
        terms = step(self, batch)
        if self.epoch == 2:
            with torch.no_grad():
                for parameter in self.model.trainable_parameters():
                    parameter.fill_(float("nan"))
            terms["loss"] = float("nan")
        return terms

    monkeypatch.setattr(Trainer, "train_step", diverging_in_epoch_2)
    with pytest.raises(CoTexNetError, match="diverged at epoch 2, step 1.*last good checkpoint is kept"):
        train(quick(shapes, tmp_path / "run2", epochs=3))
    assert torch.load(tmp_path / "run2" / "last" / TRAINER_STATE, weights_only=True)["epoch"] == 1
    CoTexNet.from_pretrained(tmp_path / "run2" / "last")  # finite weights: loading refuses NaN ones


def test_20_a_stop_file_written_after_the_start_is_a_stop_request_not_a_leftover(tmp_path):
    """The web app and CoTexNetTrain write the stop file when Stop is clicked, which may be while the training
    process still imports torch: that is a request (the run stops at its first step), only a file older than
    the process is refused."""
    from cotexnet.train import StopRequest

    request = StopRequest(str(tmp_path / "stop"))
    (tmp_path / "stop").touch()
    assert request and not request.left_from_before()
    os.utime(tmp_path / "stop", (time.time() - 3600,) * 2)
    assert request.left_from_before()


def _stop_file(tmp: Path) -> str:
    """A stop file an earlier run left an hour ago (one written after the process started is a stop request)."""
    (tmp / "stop").touch()
    os.utime(tmp / "stop", (time.time() - 3600,) * 2)
    return str(tmp / "stop")


@pytest.mark.parametrize("arguments, named", [
    (lambda shapes, tmp: ["--cache-limit-gb", "-1"], "cache_limit_gb"),
    (lambda shapes, tmp: ["--cache-limit-gb", "nan"], "cache_limit_gb"),
    (lambda shapes, tmp: ["--image-size", "40"], "multiple of the backbone's patch size 16, e.g. 48"),
    (lambda shapes, tmp: ["--weight-decay", "-1"], "weight_decay"),
    (lambda shapes, tmp: ["--weight-decay", "nan"], "weight_decay"),
    (lambda shapes, tmp: ["--seed", "-1"], "seed"),
    (lambda shapes, tmp: ["--workers", "-1"], "num_workers"),
    (lambda shapes, tmp: ["--progress-file", str(tmp)], "the progress file is a folder"),
    (lambda shapes, tmp: ["--lr", "inf"], "lr: expected a finite positive number"),
    (lambda shapes, tmp: ["--max-steps-per-epoch", "0"], "max_steps_per_epoch"),
    (lambda shapes, tmp: ["--accumulate", "0"], "accumulate: expected a positive integer"),
    (lambda shapes, tmp: ["--train-encoder", "last-99"], "the image encoder has 4 layers"),
    (lambda shapes, tmp: ["--stop-file", _stop_file(tmp)], "the stop file exists already"),
    (lambda shapes, tmp: ["--out", str(shapes / "run")], "lies inside the dataset"),
], ids=["19-cache-limit-negative", "19-cache-limit-nan", "19-image-size-40", "19-weight-decay-negative",
        "19-weight-decay-nan", "19-seed-negative", "19-workers-negative", "19-progress-file-folder", "15-lr-inf",
        "20-max-steps-0", "22-accumulate-0", "20-train-encoder-last-99", "20-stop-file-at-start", "20-out-inside-dataset"])
def test_bad_train_options_give_one_error_line_and_write_nothing(shapes, tmp_path, capsys, arguments, named):
    run = tmp_path / "run"
    assert main(["train", str(shapes), "--classes", "disk", "square", "--out", str(run), *TINY_TRAIN, "--epochs", "1",
                 *arguments(shapes, tmp_path)]) == 2
    assert named in one_error_line(capsys.readouterr().err)
    assert not run.exists() or not any(run.iterdir())
    assert not (shapes / "run").exists()


@pytest.mark.parametrize("arguments, named", [
    (["--volume", "10xAx10"], "--volume"), (["--iterations", "0"], "--iterations"), (["--batch-size", "0"], "--batch-size"),
], ids=["19-bench-volume-not-numbers", "19-bench-iterations-0", "19-bench-batch-size-0"])
def test_bad_bench_options_give_one_error_line(capsys, arguments, named):
    with pytest.raises(SystemExit) as exit:
        main(["bench", "--backbone", "tiny", "--device", "cpu", *arguments])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and [line for line in err.splitlines() if "error:" in line] == [
        line for line in err.splitlines() if named in line and "error:" in line] != [], err


def test_20_a_lock_being_written_is_not_called_unreadable(tmp_path):
    """A lock file exists (empty) between its creation and its write: 10 of 300 simultaneous takers were told to
    delete an "unreadable" lock instead of being told who holds it."""
    import threading

    from cotexnet.runlock import LOCK_NAME, RunLock, RunLockedError

    lock = tmp_path / LOCK_NAME
    lock.touch()  # created by another trainer, which writes it a moment later
    text = json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname(), "started": time.time()})
    threading.Timer(0.3, lock.write_text, args=(text,)).start()
    with pytest.raises(RunLockedError, match=f"in use by training process {os.getpid()}"):
        RunLock(tmp_path).acquire()
    lock.write_text("{half")  # a lock that stays broken is still called unreadable
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with pytest.raises(RunLockedError, match="unreadable lock file"):
        RunLock(tmp_path).acquire()


# ------------------------------------------------------------------ Issue 21: worker and web gateway
# The gateway's rows (17: sessions only for same-origin page loads, never-connected sessions expire, idle
# timeout 0 does not spin, wrong tokens rate-limited; 19: `app --port 99999`, `--upload-limit-mb nan`,
# `--max-sessions 0`) need the web app's virtualenv: they are in Testing/test_app_gateway.py.
class WorkerProcess:
    """``python -m cotexnet.worker`` on pipes: requests in as bytes, events out as dicts."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-m", "cotexnet.worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=ENV)
        assert self.next_event()["event"] == "ready"

    def send(self, line: bytes | dict) -> None:
        self.process.stdin.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
        self.process.stdin.flush()

    def next_event(self) -> dict:
        line = self.process.stdout.readline()
        assert line, f"the worker ended (exit code {self.process.wait(10)})"
        return json.loads(line)

    def answer(self, request_id) -> dict:
        """The request's result or error (progress and log events skipped)."""
        while True:
            event = self.next_event()
            if event["id"] == request_id and event["event"] in ("result", "error"):
                return event

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


@pytest.fixture
def worker_process():
    worker = WorkerProcess()
    yield worker
    worker.close()


def _segment_request(bundle, tmp_path, request_id, **fields) -> dict:
    volume = tmp_path / "volume.npy"
    if not volume.exists():
        np.save(volume, np.random.default_rng(0).normal(100, 20, (2, 24, 24)).astype(np.float32))
    return {"id": request_id, "type": "segment", "model": str(bundle), "input": str(volume),
            "output": str(tmp_path / f"labels{request_id}.npy"), "spacing": [1, 1, 1],
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1], "device": "cpu", "batch_size": 2, **fields}


def test_16_back_to_back_segmentations_are_never_refused_as_already_running(bundle, tmp_path, worker_process):
    """The result was sent before the busy flag was released: a client that sends its next request as soon as
    it reads a result was told "already running" (8 of 30)."""
    answers = []
    for request_id in range(1, 31):
        worker_process.send(_segment_request(bundle, tmp_path, request_id, concepts=False))
        answers.append(worker_process.answer(request_id))
    refused = [a["message"] for a in answers if a["event"] == "error"]
    assert refused == [] and len(answers) == 30, refused


def test_16_a_request_line_that_is_not_utf8_is_refused_and_the_worker_answers_the_next(worker_process):
    worker_process.send(b'{"id": 1, "type": "status", "x": "\xff"}')
    refused = worker_process.next_event()
    assert refused["event"] == "error" and refused["error"] == "ProtocolError" and "not UTF-8" in refused["message"]
    worker_process.send({"id": 2, "type": "status"})
    assert worker_process.answer(2)["event"] == "result"


@pytest.mark.parametrize("fields", [{"tta": True}, {"planes": ["axial", "coronal"]}], ids=["tta", "planes"])
def test_16_tta_and_planes_give_no_confidence_unless_asked(bundle, tmp_path, worker_process, fields):
    worker_process.send(_segment_request(bundle, tmp_path, 1, **fields))
    value = worker_process.answer(1)["value"]
    assert "confidence" not in value and not (tmp_path / "labels1_confidence.npy").exists()
    assert value["concepts"] and all("mean_confidence" not in record for record in value["concepts"])
    worker_process.send(_segment_request(bundle, tmp_path, 2, confidence=True, **fields))  # asked: given
    value = worker_process.answer(2)["value"]
    assert np.load(value["confidence"]).shape == (2, 24, 24)
    assert all("mean_confidence" in record for record in value["concepts"])


@pytest.mark.parametrize("field", ["tta", "concepts"])
def test_16_a_string_boolean_is_refused_naming_the_field(bundle, tmp_path, worker_process, field):
    worker_process.send(_segment_request(bundle, tmp_path, 1, **{field: "false"}))
    refused = worker_process.answer(1)
    assert refused["event"] == "error" and refused["error"] == "ValueError"
    assert refused["message"] == f"request field {field!r}: expected true or false, got 'false'"
    assert not (tmp_path / "labels1.npy").exists()
