"""Shared fixtures: tiny random-init models (fast on 2 CPU cores) and real anatomy from nilearn."""
from __future__ import annotations

import locale
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
for module_dir in (REPO, REPO / "CoTexNetSegment", REPO / "CoTexNetTrain"):
    if str(module_dir) not in sys.path:
        sys.path.insert(0, str(module_dir))


LOCALE = locale.setlocale(locale.LC_CTYPE)


@pytest.fixture(autouse=True)
def _restore_text_locale():
    """SimpleITK's DICOM writer (GDCM), which tests use to write series, switches the C library's locale to "C"
    and leaves it so; Python then decodes files and pipes as ASCII for the rest of the process (torch's inductor then fails to read its own sources):
    each test starts with the locale the run started with, so no outcome depends on the order of the tests."""
    yield
    if locale.setlocale(locale.LC_CTYPE) != LOCALE:
        locale.setlocale(locale.LC_CTYPE, LOCALE)


@pytest.fixture
def tiny_model():
    """Factory for a tiny CoTexNet: ``tiny_model(classes=[...], **config_fields)``."""
    from cotexnet import CoTexNet, CoTexNetConfig

    def make(classes=("gm", "wm"), image_size=64, **fields):
        return CoTexNet.from_config(CoTexNetConfig(classes=list(classes), backbone="tiny", image_size=image_size,
                                                   **fields))

    return make


@pytest.fixture(scope="session")
def mni152_dataset(tmp_path_factory):
    """Real anatomy: MNI152 T1 with grey/white matter (nilearn's wheel) as an nnU-Net v2 raw dataset.

    Five interleaved axial sub-volumes: three train, one validation, one test case (see cotexnet.demo).
    """
    from cotexnet.demo import write_mni152_dataset

    return write_mni152_dataset(tmp_path_factory.mktemp("mni152"))
