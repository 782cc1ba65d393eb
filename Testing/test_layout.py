"""The engine's layout rules: one source for choices and defaults, import rules, no torch where none is needed."""
from __future__ import annotations

import ast
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
                          capture_output=True, encoding="utf-8", errors="replace", timeout=120)


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


ENGINE = Path(__file__).resolve().parents[1] / "cotexnet"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _engine_imports(path: Path) -> set[str]:
    """Engine modules ``path`` imports anywhere (module level or inside functions), except type-only imports.

    ``from .pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``.
    """
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()

    def visit(node):
        if _is_type_checking(node):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] == "cotexnet":
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    exists = (ENGINE.parent / (candidate.replace(".", "/") + ".py")).is_file() or (
                        ENGINE.parent / candidate.replace(".", "/") / "__init__.py").is_file()
                    found.add(candidate if exists else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "cotexnet")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found - {this}


def test_no_engine_module_imports_a_module_that_imports_it_back():
    """The engine's import graph (function-level imports included) has no cycle of any length."""
    graph = {_module_name(p): _engine_imports(p) for p in sorted(ENGINE.rglob("*.py"))}
    assert graph["cotexnet.model"] and "cotexnet.bundle" in graph["cotexnet.model"]  # the walk sees imports

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for target in graph.get(node, ()):
                if target == goal:
                    return trail + [goal]
                if target not in seen:
                    seen.add(target)
                    stack.append((target, trail + [target]))
        return None

    cycles = [cycle for module in graph if (cycle := reaches(module, module))]
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_nothing_outside_docs_cites_the_design_document_that_is_not_in_the_repository():
    """Code and docstrings cite docs/ (the project's own design documents), never the outside design note."""
    repo = ENGINE.parent
    name = "DESIGN" + ".md"  # split, so this file does not cite it either
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True,
                             encoding="utf-8", errors="replace", check=True).stdout.split()
    citing = [path for path in tracked if not path.startswith("docs/") and (repo / path).is_file()
              and path.endswith((".py", ".md", ".txt", ".ui", ".cmake", ".json", ".toml"))
              and name in (repo / path).read_text(encoding="utf-8", errors="replace")]
    assert tracked and not citing, citing
