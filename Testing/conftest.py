"""Shared fixtures: tiny random-init models (fast on 2 CPU cores) and real anatomy from nilearn."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
for module_dir in (REPO, REPO / "CoTexNetSegment", REPO / "CoTexNetTrain"):
    if str(module_dir) not in sys.path:
        sys.path.insert(0, str(module_dir))


@pytest.fixture
def tiny_model():
    """Factory for a tiny CoTexNet: ``tiny_model(classes=[...], **config_fields)``."""
    from cotexnet import CoTexNet, CoTexNetConfig

    def make(classes=("gm", "wm"), image_size=64, **fields):
        return CoTexNet(CoTexNetConfig(classes=list(classes), backbone="tiny", image_size=image_size, **fields))

    return make


@pytest.fixture(scope="session")
def mni152():
    """Real anatomy: the MNI152 T1 template with grey/white-matter probability maps (shipped in nilearn's wheel).

    Returns (t1 array in SimpleITK (z, y, x) order, label map 0/1=grey/2=white, spacing (x, y, z), direction).
    """
    import numpy as np
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2)
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata()
    labels = np.zeros(gm.shape, dtype=np.uint8)
    labels[(gm > 0.5) & (gm >= wm)] = 1
    labels[(wm > 0.5) & (wm > gm)] = 2
    to_sitk = lambda a: np.ascontiguousarray(np.transpose(a, (2, 1, 0)))  # nibabel (i,j,k) -> (k,j,i)
    spacing = tuple(float(s) for s in t1.header.get_zooms()[:3])
    return to_sitk(t1.get_fdata().astype(np.float32)), to_sitk(labels), spacing
