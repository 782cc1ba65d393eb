"""The web app's data root (cotexnet_app.files): what a browser may name, and uploads. No browser needed."""
from __future__ import annotations

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
    assert not [p for p in os.listdir(path.parent) if p != path.name]  # no temporary file left behind
    with pytest.raises(AccessError, match="over the upload limit of 1 MiB"):
        root.save_upload("big.nii.gz", b"0" * (2 << 20))
    with pytest.raises(AccessError, match="expected a volume file"):
        root.save_upload("script.py", b"print()")
