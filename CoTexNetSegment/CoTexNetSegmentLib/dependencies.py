"""Python packages the CoTexNet engine needs inside Slicer, and installing the missing ones.

torch comes from the PyTorch extension (it picks the CUDA build that matches the driver); everything
else comes from pip with the ranges below, which match the engine's ``pyproject.toml``. A package that
Slicer already bundles is never downgraded and never replaced: if its version is outside a range we
report a conflict instead of touching it, and every pip run is constrained to keep the installed
versions of those packages and of the PyTorch extension's torch and torchvision. pip would otherwise
replace that torch whenever a requirement asks for a newer one (monai 1.6 needs torch>=2.8), with a build
from the package index (a CPU build on Windows) that leaves torchvision mismatched; monai is therefore
also limited to the releases the installed torch satisfies (:func:`monaiRange`).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Callable, Iterable, Optional

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

#: Engine requirements installed with pip (torch excluded: the PyTorch extension installs it).
REQUIREMENTS = (
    "transformers>=4.40,<6",  # as pyproject.toml: 4.x and 5.x both tested
    "safetensors>=0.4",
    "huggingface_hub>=0.20",
    "numpy>=1.23",
    "scipy>=1.9",
    "SimpleITK>=2.2",
    "monai>=1.3",
    "slicerio>=1.1",
    "pillow>=9",
    "tqdm>=4.60",
    "psutil>=5.8",
)
#: torch version the engine needs; passed to the PyTorch extension's installer.
TORCH_REQUIREMENT = ">=2.1"
#: Packages that Slicer ships and its own modules are built against: pip must leave them as they are.
SLICER_BUNDLED = ("numpy", "scipy", "SimpleITK", "pillow", "requests", "packaging", "pydicom", "six")
#: What the PyTorch extension installs, matched to the GPU driver: pip must leave them as they are.
TORCH_PACKAGES = ("torch", "torchvision")
#: The torch each monai release asks for (``Requires-Dist`` of its wheels on PyPI), from the release named
#: until the next row's. A row between two others covers a single release (1.5.0).
MONAI_TORCH = (("1.3", ">=1.9"), ("1.5.0", ">=2.4.1,<2.7"), ("1.5.1", ">=2.4.1"), ("1.6", ">=2.8"))


@dataclass
class DependencyReport:
    """What a pip run would install, and what cannot be fixed without touching Slicer's packages."""

    toInstall: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    torchMissing: bool = False

    @property
    def needsInstall(self) -> bool:
        """Conflicts alone do not: they are reported, never fixed by replacing Slicer's packages."""
        return self.torchMissing or bool(self.toInstall)

    def describe(self) -> str:
        """A plain-language summary for the one confirmation dialog."""
        lines = []
        if self.torchMissing:
            lines.append(f"PyTorch (torch{TORCH_REQUIREMENT}), installed by the PyTorch extension")
        lines += [f"{requirement} (pip)" for requirement in self.toInstall]
        text = "CoTexNet needs these Python packages:\n  " + "\n  ".join(lines) if lines else "All packages are installed."
        if self.conflicts:
            text += "\n\nThese installed packages are outside the supported range and are left untouched:\n  "
            text += "\n  ".join(self.conflicts)
        return text


def _installedVersion(name: str, versionOf: Callable[[str], str]) -> Optional[Version]:
    try:
        return Version(versionOf(name))
    except importlib.metadata.PackageNotFoundError:
        return None


def checkRequirements(
    requirements: Iterable[str] = REQUIREMENTS,
    versionOf: Callable[[str], str] = importlib.metadata.version,
    bundled: Iterable[str] = SLICER_BUNDLED,
    torchRequirement: str = TORCH_REQUIREMENT,
) -> DependencyReport:
    """Compares installed versions (``versionOf``, injectable for tests) with the requirements.

    Missing packages, and installed ones outside their range that Slicer does not bundle, are to be
    installed; a Slicer-bundled package outside its range is a conflict: we never replace what Slicer ships.
    """
    bundledNames = {canonicalize_name(name) for name in bundled}
    report = DependencyReport()
    torchVersion = _installedVersion("torch", versionOf)
    report.torchMissing = torchVersion is None or not Requirement("torch" + torchRequirement).specifier.contains(
        torchVersion, prereleases=True
    )
    for text in requirements:
        requirement = Requirement(text)
        version = _installedVersion(requirement.name, versionOf)
        if version is not None and requirement.specifier.contains(version, prereleases=True):
            continue
        if version is not None and canonicalize_name(requirement.name) in bundledNames:
            report.conflicts.append(f"{requirement.name} {version} (CoTexNet expects {requirement.specifier})")
        else:
            report.toInstall.append(text)
    return report


def monaiRange(torchVersion: Version) -> str:
    """The monai releases whose torch requirement ``torchVersion`` meets, as a specifier (:data:`MONAI_TORCH`)."""
    rows = [(Version(start), SpecifierSet(torch).contains(torchVersion, prereleases=True))
            for start, torch in MONAI_TORCH]
    allowed = [index for index, (_, ok) in enumerate(rows) if ok]
    if not allowed:
        raise RuntimeError(f"no monai release works with the installed torch {torchVersion}; install torch"
                           f"{TORCH_REQUIREMENT} with the PyTorch extension")
    first, last = allowed[0], allowed[-1]
    parts = [f">={rows[first][0]}"]
    parts += [f"!={rows[index][0]}" for index in range(first, last) if not rows[index][1]]  # single releases
    if last + 1 < len(rows):
        parts.append(f"<{rows[last + 1][0]}")
    return ",".join(parts)


def constraintsText(
    bundled: Iterable[str] = SLICER_BUNDLED, versionOf: Callable[[str], str] = importlib.metadata.version
) -> str:
    """pip constraints: every installed Slicer-bundled package and the installed torch and torchvision pinned
    to their versions, and monai limited to the releases that installed torch satisfies."""
    lines = []
    for name in (*bundled, *TORCH_PACKAGES):
        version = _installedVersion(name, versionOf)
        if version is not None:
            lines.append(f"{name}=={version}")
    torch = _installedVersion("torch", versionOf)
    if torch is not None:
        lines.append(f"monai{monaiRange(torch)}")
    return "\n".join(lines) + "\n"


def installMissing(report: DependencyReport, pipInstall: Callable[[list[str]], object],
                   versionOf: Callable[[str], str] = importlib.metadata.version) -> None:
    """Runs one pip install of ``report.toInstall`` (``pipInstall`` is ``slicer.util.pip_install`` in Slicer),
    constrained by :func:`constraintsText` (read after torch was installed)."""
    if not report.toInstall:
        return
    handle, constraintsPath = tempfile.mkstemp(prefix="cotexnet-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(constraintsText(versionOf=versionOf))
        pipInstall(["-c", constraintsPath, *report.toInstall])
    finally:
        os.remove(constraintsPath)


#: Outcomes of :func:`ensureDependencies`.
READY, DECLINED, RESTART = "ready", "declined", "restart"


class InstallOutcome(str):
    """READY, DECLINED or RESTART (a ``str``, so it compares with those), and in ``replaced`` the packages
    (``"name old -> new"``) that this session had imported before they were replaced."""

    replaced: tuple[str, ...]

    def __new__(cls, status: str, replaced: Iterable[str] = ()):
        outcome = super().__new__(cls, status)
        outcome.replaced = tuple(replaced)
        return outcome


def loadedVersions(
    names: Iterable[str],
    versionOf: Callable[[str], str] = importlib.metadata.version,
    loadedModules=sys.modules,
    topLevelModules: Optional[Callable[[str], set[str]]] = None,
) -> dict[str, Version]:
    """Installed versions of the distributions in ``names`` that this process has imported (by import name)."""
    topLevelModules = topLevelModules or _topLevelModules
    versions = {}
    for name in names:
        version = _installedVersion(name, versionOf)
        if version is not None and any(module in loadedModules for module in topLevelModules(name)):
            versions[name] = version
    return versions


def ensureDependencies(
    confirm: Callable[[str], bool],
    installTorch: Callable[[], bool],
    pipInstall,
    *,
    versionOf: Optional[Callable[[str], str]] = None,
    loadedModules=sys.modules,
    topLevelModules: Optional[Callable[[str], set[str]]] = None,
) -> InstallOutcome:
    """Checks, asks once, installs; the outcome says whether CoTexNet can run now.

    ``confirm(text)`` shows what will be installed and returns the user's answer; ``installTorch()``
    runs the PyTorch extension's installer and returns whether torch is now available. A restart is
    needed only when a package that was imported *before* the install now has another version: the
    PyTorch extension's installer imports torch itself, and a package imported for the first time after
    its install is simply the new one. ``versionOf``, ``loadedModules`` and ``topLevelModules`` (import
    names of a distribution) are injectable for tests.
    """
    versions = {"versionOf": versionOf} if versionOf is not None else {}
    versionOf = versionOf or importlib.metadata.version
    report = checkRequirements(**versions)
    if not report.needsInstall:
        return InstallOutcome(READY)
    if not confirm(report.describe()):
        return InstallOutcome(DECLINED)
    toChange = [Requirement(text).name for text in report.toInstall] + (["torch"] if report.torchMissing else [])
    before = loadedVersions(toChange, versionOf, loadedModules, topLevelModules)
    if report.torchMissing and not installTorch():
        return InstallOutcome(DECLINED)
    installMissing(report, pipInstall, versionOf)
    importlib.invalidate_caches()
    replaced = tuple(
        f"{name} {version} -> {_installedVersion(name, versionOf)}"
        for name, version in before.items() if _installedVersion(name, versionOf) != version
    )
    if replaced or checkRequirements(**versions).needsInstall:
        return InstallOutcome(RESTART, replaced)
    return InstallOutcome(READY)


def _topLevelModules(distribution: str) -> set[str]:
    """Top-level import names a distribution provides (``PIL`` for ``pillow``), from its file list."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {PurePath(f).parts[0].removesuffix(".py") for f in files if f.suffix == ".py" or len(PurePath(f).parts) > 1}
