"""The web app's data root (cotexnet_app.files): what a browser may name, and uploads. No browser needed."""
from __future__ import annotations

import json
import os

import pytest

from cotexnet_app.files import AccessError, DataRoot


@pytest.fixture
def root(tmp_path):
    inside = tmp_path / "root"
    (inside / "cases" / "dicom").mkdir(parents=True)
    (inside / "cases" / "ct.nii.gz").write_bytes(b"x")
    (inside / "cases" / "ct.seg.nrrd").write_bytes(b"x")
    (inside / "cases" / "dicom" / "1.dcm").write_bytes(b"x")
    (inside / "run" / "best").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (inside / "run" / "best" / name).write_bytes(b"{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.nii.gz").write_bytes(b"secret")
    (inside / "escape").symlink_to(outside, target_is_directory=True)
    (inside / "cases" / "link.nii.gz").symlink_to(outside / "secret.nii.gz")
    return DataRoot(inside, upload_limit_mb=1)


def test_paths_inside_the_root_resolve(root):
    assert root.resolve("cases/ct.nii.gz") == root.root / "cases" / "ct.nii.gz"
    assert root.resolve("cases\\ct.nii.gz") == root.root / "cases" / "ct.nii.gz"
    assert root.resolve("cases/new.seg.nrrd", must_exist=False) == root.root / "cases" / "new.seg.nrrd"


@pytest.mark.parametrize("path, reason", [
    ("../outside/secret.nii.gz", "'..' is not allowed"),
    ("cases/../../outside/secret.nii.gz", "'..' is not allowed"),
    ("/etc/passwd", "expected a path relative"),
    ("C:/Windows/win.ini", "expected a path relative"),
    ("", "expected a path relative"),
    ("escape/secret.nii.gz", "resolves outside the data root"),
    ("cases/link.nii.gz", "resolves outside the data root"),
    ("cases/missing.nii.gz", "no such file"),
])
def test_paths_that_leave_the_root_are_refused(root, path, reason):
    with pytest.raises(AccessError, match=reason):
        root.resolve(path)


def test_listings_hold_volumes_dicom_folders_and_models_but_nothing_outside(root):
    assert root.volumes() == ["cases/ct.nii.gz", "cases/dicom"]  # no .seg.nrrd, no link out of the root
    assert root.models() == ["run/best"]


def test_images_segmentations_and_training_exports_are_listed_apart(root):
    """Label maps (labelsTr/, masks/) and .seg.nrrd files are segmentations; a run's exported dataset under
    runs/ is neither (it is the run's copy of opened cases)."""
    for relative in ("data/imagesTr/a_0000.nii.gz", "data/labelsTr/a.nii.gz", "data/masks/b.png.nii.gz",
                     "runs/r1/dataset/imagesTr/case_000_0000.nrrd", "runs/r1/dataset/labelsTr/case_000.nrrd"):
        (root.root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root.root / relative).write_bytes(b"x")
    assert root.volumes() == ["cases/ct.nii.gz", "cases/dicom", "data/imagesTr/a_0000.nii.gz"]
    assert root.segmentations() == ["cases/ct.seg.nrrd", "data/labelsTr/a.nii.gz", "data/masks/b.png.nii.gz"]


def test_uploads_are_capped_renamed_safely_and_written_whole(root):
    path = root.save_upload("../../evil name.nii.gz", b"abc")
    assert path == root.root / "uploads" / "evil_name.nii.gz" and path.read_bytes() == b"abc"
    again = root.save_upload("evil name.nii.gz", b"other")  # a second file of that name keeps the first
    assert again == root.root / "uploads" / "evil_name-2.nii.gz" and again.read_bytes() == b"other"
    assert path.read_bytes() == b"abc" and root.save_upload("evil_name.nii.gz", b"3").name == "evil_name-3.nii.gz"
    assert sorted(os.listdir(path.parent)) == ["evil_name-2.nii.gz", "evil_name-3.nii.gz", "evil_name.nii.gz"]
    with pytest.raises(AccessError, match="over the upload limit of 1 MiB"):
        root.save_upload("big.nii.gz", b"0" * (2 << 20))
    with pytest.raises(AccessError, match="expected a volume file"):
        root.save_upload("script.py", b"print()")


def test_a_chunked_upload_is_written_as_it_arrives_and_moved_into_place_whole(root):
    upload = root.begin_upload("ct.nii.gz", 6)
    upload.write(0, b"abc")
    assert not (root.root / "uploads" / "ct.nii.gz").exists() and root.volumes() == ["cases/ct.nii.gz", "cases/dicom"]
    upload.write(3, b"def")
    assert upload.finish().read_bytes() == b"abcdef"
    assert os.listdir(root.root / "uploads") == ["ct.nii.gz"]  # the staging folder is gone


def test_a_refused_or_broken_upload_leaves_nothing_in_uploads(root):
    from cotexnet.errors import DataError

    with pytest.raises(AccessError, match="over the upload limit of 1 MiB"):
        root.begin_upload("big.nii.gz", 2 << 20)
    upload = root.begin_upload("gap.nii.gz", 6)
    with pytest.raises(AccessError, match="does not follow the 0 bytes received"):
        upload.write(3, b"def")
    short = root.begin_upload("short.nii.gz", 6)
    short.write(0, b"abc")
    with pytest.raises(AccessError, match="ended after 3 of 6 bytes"):
        short.finish()

    def refuse(path):
        raise DataError("truncated file", path)

    damaged = root.begin_upload("damaged.nii.gz", 3)
    damaged.write(0, b"abc")
    with pytest.raises(AccessError, match=r"^damaged.nii.gz: truncated file; nothing was saved$"):
        damaged.finish(refuse)
    assert os.listdir(root.root / "uploads") == []


def test_messages_show_paths_relative_to_the_root(root):
    assert root.shown(f"{root.root}/cases/ct.nii.gz: cut short") == "cases/ct.nii.gz: cut short"


def test_run_folders_are_listed_as_models(root):
    """A run folder stands for its best bundle (the engine's bundle_folder); its last/ is not a choice."""
    (root.root / "run" / "last").mkdir()
    for name in ("config.json", "model.safetensors"):
        (root.root / "run" / "last" / name).write_bytes(b"{}")
    assert root.runs() == ["run"]


def test_recent_models_are_newest_first_shared_through_one_file_and_skip_vanished_ones(tmp_path):
    from cotexnet_app.recent import MAX_RECENT_MODELS, RecentModels

    bundles = []
    for index in range(3):
        folder = tmp_path / f"m{index}"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        bundles.append(str(folder))
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "config.json").write_text("{}")
    path = tmp_path / "config" / "cotexnet" / "recent.json"
    recent = RecentModels(path)
    assert recent.models() == []
    for folder in [*bundles, str(run), bundles[0]]:
        recent.add(folder)
    assert RecentModels(path).models() == [bundles[0], str(run), bundles[2], bundles[1]]  # another session reads it
    (tmp_path / "m2" / "config.json").unlink()
    assert RecentModels(path).models() == [bundles[0], str(run), bundles[1]]
    for index in range(MAX_RECENT_MODELS + 5):
        recent.add(tmp_path / f"gone{index}")
    assert len(json.loads(path.read_text())["models"]) == MAX_RECENT_MODELS
    path.write_text("{not json")
    assert recent.models() == [] and recent.add(bundles[0]) == [bundles[0]]  # a damaged list is rewritten


def test_training_curves_place_each_epoch_and_replace_repeated_epochs():
    from cotexnet_app.curves import CHART_HEIGHT, CHART_WIDTH, MARGIN, RIGHT, TOP, TrainingCurves, hex_color

    curves = TrainingCurves(["grey", "white"], [hex_color((1, 0, 0)), hex_color((0, 0.5, 1))])
    assert curves.colors == ["#ff0000", "#0080ff"]
    curves.add({"event": "step", "epoch": 1, "loss": 9.0})  # not an epoch: ignored
    curves.add({"event": "epoch", "epoch": 1, "loss": 2.0, "val_dice_per_class": {"grey": 0.5, "white": 0.25}})
    curves.add({"event": "epoch", "epoch": 2, "loss": 1.0, "val_dice_per_class": {"grey": 1.0}})
    loss, dice = curves.charts()
    plot_w, plot_h = CHART_WIDTH - MARGIN - RIGHT, CHART_HEIGHT - MARGIN - TOP
    # x: epoch / 2 of the plot width; loss axis tops at 1.1 x the largest loss; Dice axis at 1. The plot lies
    # below the title band and left of the right edge, so a Dice of 1 and the last epoch are drawn whole.
    assert loss["series"][0]["dots"] == [[round(MARGIN + plot_w / 2, 1), round(TOP + plot_h * (1 - 2 / 2.2), 1)],
                                         [MARGIN + plot_w, round(TOP + plot_h * (1 - 1 / 2.2), 1)]]
    grey, white = dice["series"]
    assert grey["dots"] == [[round(MARGIN + plot_w / 2, 1), TOP + plot_h / 2], [MARGIN + plot_w, TOP]]
    assert white["dots"] == [[round(MARGIN + plot_w / 2, 1), TOP + plot_h * 0.75]]  # no Dice reported in epoch 2
    assert max(x for x, _ in grey["dots"]) + 2.5 <= CHART_WIDTH and min(y for _, y in grey["dots"]) - 2.5 >= 12
    assert grey["points"] == " ".join(f"{x},{y}" for x, y in grey["dots"])
    curves.add({"event": "epoch", "epoch": 2, "loss": 4.0, "val_dice_per_class": {"grey": 0.0, "white": 0.0}})
    assert curves.epochs == [1, 2] and curves.loss == [2.0, 4.0]  # a resumed run's epoch 2 replaces the old one


def test_a_run_is_judged_on_its_held_out_cases_or_says_it_has_none(tmp_path):
    """cotexnet_app.promotion.run_facts: epochs finished and the cases to compare on, from last/training.json;
    with no validation case the run validated on its training case, and that is said."""
    from cotexnet_app.promotion import mean_over, run_facts

    run = tmp_path / "run"
    assert run_facts(run) == (0, None)  # stopped before its first bundle
    (run / "last").mkdir(parents=True)
    (run / "last" / "training.json").write_text(json.dumps(
        {"epochs_run": 2, "split": {"train": ["case_000"], "val": ["case_001"]}}))
    epochs, held_out = run_facts(run)
    assert epochs == 2 and held_out.case_ids == ["case_001"] and not held_out.trained_on
    (run / "last" / "training.json").write_text(json.dumps({"epochs_run": 0, "split": {"train": ["case_000"]}}))
    epochs, held_out = run_facts(run)
    assert epochs == 0 and held_out.case_ids == ["case_000"] and held_out.trained_on
    assert mean_over({"a": 0.5, "b": 1.0, "added": 0.0}, ["a", "b"]) == pytest.approx(0.75, abs=1e-12)


def test_a_new_session_starts_with_the_model_the_server_was_given_not_the_recent_one(tmp_path):
    from cotexnet_app.models import ModelChooser
    from cotexnet_app.recent import RecentModels

    root = tmp_path / "root"
    for bundle in ("runs/a/best", "models/b"):
        (root / bundle).mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (root / bundle / name).write_bytes(b"{}")
    recent = RecentModels(tmp_path / "recent.json")
    recent.add(root / "runs" / "a")
    data_root = DataRoot(root)
    chooser = ModelChooser(data_root, [], recent)
    choices = chooser.choices()
    assert [c["value"] for c in choices] == ["runs/a", "models/b"] and chooser.default(choices) == "models/b"
    given = ModelChooser(data_root, [str(root / "models" / "b")], recent)
    assert given.default(given.choices()) == "models/b"


def test_the_progress_bar_names_each_phase_of_a_segmentation():
    """cotexnet_app.jobs.next_phase: the worker's events (cotexnet.worker) turn into the phase the page shows."""
    from cotexnet_app.jobs import LOADING_MODEL, next_phase

    phase = next_phase(LOADING_MODEL, "log", "Model tiny ready (1 load(s) ...)")
    assert phase == "Model ready"
    phase = next_phase(phase, "progress", (3, 19))
    assert phase == "Slices 3 of 19"
    assert next_phase(phase, "progress", (19, 19)) == "Post-processing"
    assert next_phase("Post-processing", "log", "Describing the segmented classes") == "Describing the segmented classes"
    assert next_phase("Slices 3 of 19", "log", "something else") == "Slices 3 of 19"


def test_a_held_out_case_from_a_dicom_folder_of_several_series_is_scored_on_its_own_series(tmp_path, capsys,
                                                                                            monkeypatch):
    """cotexnet_app.promotion scores each held-out case as the page opened it: the chosen series of a DICOM
    folder, whose grid its truth is on. (Read as the folder's largest series, the truth would be resampled onto
    that series and the Dice would be of other voxels.) The prediction is a known rule, so the Dice is exact."""
    import types

    import numpy as np
    from cotexnet import CoTexNet, CoTexNetConfig
    from cotexnet.data import read_image, write_segmentation_nrrd
    from test_data import _dicom_series

    import cotexnet.infer
    from cotexnet_app.promotion import main

    rng = np.random.default_rng(0)
    folder = _dicom_series(tmp_path / "study", rng.integers(0, 1000, (6, 20, 20)).astype(np.int16), uid_end="7")
    _dicom_series(folder, rng.integers(0, 1000, (4, 20, 20)).astype(np.int16), uid_end="8", prefix="small")
    chosen = "1.2.826.0.1.3680043.2.1125.8.2"
    image = read_image(folder, series_uid=chosen)
    truth = np.zeros(image.shape, np.uint8)
    truth[1:3, 4:12, 2:9] = 1
    write_segmentation_nrrd(truth, image, tmp_path / "truth.seg.nrrd", ["a"])
    model = tmp_path / "model"
    CoTexNet.from_config(CoTexNetConfig(classes=["a", "b"], backbone="tiny", image_size=32)).save_pretrained(model)
    scored = []

    def bright_voxels_are_a(model, volume, device):  # stands in for the network: class "a" where intensity > 500
        scored.append(volume.shape)
        return types.SimpleNamespace(labels=(volume.array > 500).astype(np.uint8))

    monkeypatch.setattr(cotexnet.infer, "predict_volume", bright_voxels_are_a)

    def dice(series: str) -> float:
        assert main([str(model), "--case", str(folder), str(tmp_path / "truth.seg.nrrd"), series,
                     "--classes", "a", "--device", "cpu"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]["a"]

    predicted = image.array > 500
    expected = 2 * (predicted & (truth == 1)).sum() / (predicted.sum() + truth.sum())
    assert dice(chosen) == pytest.approx(float(expected), abs=1e-9) and scored == [(4, 20, 20)]
    assert dice("") != pytest.approx(float(expected), abs=1e-3) and scored[-1] == (6, 20, 20)  # the largest
