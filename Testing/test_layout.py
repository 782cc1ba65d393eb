"""The engine's layout rules: one source for choices and defaults, import rules, no torch where none is needed."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from cotexnet.cli import build_parser
from cotexnet.config import CoTexNetConfig, TrainOptions


def test_cli_train_defaults_are_the_config_defaults():
    """``cotexnet train DATA --out OUT`` runs with exactly the defaults of TrainOptions and CoTexNetConfig."""
    args = vars(build_parser().parse_args(["train", "data", "--out", "out"]))
    flag = {"num_workers": "workers"}
    checked = 0
    for option in fields(TrainOptions):
        name = flag.get(option.name, option.name)
        checked += name in args
        if name in args and args[name] is not None and option.name not in ("data", "out"):
            assert args[name] == option.default, option.name
    assert checked > 15
    for name in ("variant", "clipseg_prompt", "kd_mode", "kl_form", "kd_weight", "alpha_init", "dropout"):
        assert args[name] == CoTexNetConfig.__dataclass_fields__[name].default, name


def _run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import torch`` fails."""
    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["cotexnet.data.image", "cotexnet.data"])
def test_image_io_imports_no_torch(module):
    done = _run_without_torch(f"import {module}, sys; print(sorted(m for m in sys.modules if m.startswith('torch')))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['torch']"  # only the blocked entry itself


def test_nrrd_export_path_writes_exact_geometry_without_torch(tmp_path):
    """What CoTexNetTrain's exporter does, in a process that cannot import torch."""
    path = tmp_path / "case_000.nrrd"
    done = _run_without_torch(
        "import numpy as np\n"
        "from cotexnet.data.image import ImageGeometry, read_image_geometry, write_image\n"
        "grid = ImageGeometry((3, 4, 5), (0.5, 1.0, 2.5), (1.0, -2.0, 3.0), (0, 1, 0, 0, 0, 1, 1, 0, 0))\n"
        f"write_image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), grid, {str(path)!r})\n"
        f"print(read_image_geometry({str(path)!r}).same_grid(grid))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_slicer_geometry_is_the_engine_geometry():
    """mrml.Geometry is ImageGeometry, so the Slicer side hands its grid to the engine as it is."""
    pytest.importorskip("slicer")
    from CoTexNetSegmentLib import mrml

    from cotexnet.data import ImageGeometry

    assert mrml.Geometry is ImageGeometry
