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
                               str(tmp_path / "run")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=ENV)
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

    def denied(prefix=None, suffix=None, dir=None):
        raise PermissionError(13, "Permission denied", os.path.join(dir, f"{prefix}x1y2z3{suffix or ''}"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    monkeypatch.setattr(tempfile, "mkdtemp", denied)
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
