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
    from cotexnet_app.curves import CHART_HEIGHT, CHART_WIDTH, MARGIN, TrainingCurves, hex_color

    curves = TrainingCurves(["grey", "white"], [hex_color((1, 0, 0)), hex_color((0, 0.5, 1))])
    assert curves.colors == ["#ff0000", "#0080ff"]
    curves.add({"event": "step", "epoch": 1, "loss": 9.0})  # not an epoch: ignored
    curves.add({"event": "epoch", "epoch": 1, "loss": 2.0, "val_dice_per_class": {"grey": 0.5, "white": 0.25}})
    curves.add({"event": "epoch", "epoch": 2, "loss": 1.0, "val_dice_per_class": {"grey": 1.0}})
    loss, dice = curves.charts()
    plot_w, plot_h = CHART_WIDTH - MARGIN, CHART_HEIGHT - MARGIN
    # x: epoch / 2 of the plot width; loss axis tops at 1.1 x the largest loss; Dice axis at 1.
    assert loss["series"][0]["dots"] == [[round(MARGIN + plot_w / 2, 1), round(plot_h * (1 - 2 / 2.2), 1)],
                                         [MARGIN + plot_w, round(plot_h * (1 - 1 / 2.2), 1)]]
    grey, white = dice["series"]
    assert grey["dots"] == [[round(MARGIN + plot_w / 2, 1), plot_h / 2], [MARGIN + plot_w, 0.0]]
    assert white["dots"] == [[round(MARGIN + plot_w / 2, 1), plot_h * 0.75]]  # no Dice reported in epoch 2
    assert grey["points"] == " ".join(f"{x},{y}" for x, y in grey["dots"])
    curves.add({"event": "epoch", "epoch": 2, "loss": 4.0, "val_dice_per_class": {"grey": 0.0, "white": 0.0}})
    assert curves.epochs == [1, 2] and curves.loss == [2.0, 4.0]  # a resumed run's epoch 2 replaces the old one
