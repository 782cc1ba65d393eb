"""The Slicer extension's packaging: CMake metadata, module file lists, .s4ext and the catalogue JSON.

A file missing from a module's CMakeLists is silently left out of the built extension, so every .py,
.ui and icon on disk must be listed (and every listed file must exist). The catalogue entry follows
the schema and the formatting that the extensions index checks (its .pre-commit-config.yaml).
"""
from __future__ import annotations

import ast
import json
import re
import struct
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = ("CoTexNetSegment", "CoTexNetTrain")
ENGINE_HOST = "CoTexNetSegment"  # the module whose CMakeLists bundles the cotexnet engine
#: Fields of the .s4ext format (Slicer ExtensionsIndex README, "extension description file").
S4EXT_FIELDS = ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "screenshoturls", "enabled")
#: The schema the extensions index checks every entry against: its .pre-commit-config.yaml runs
#: check-jsonschema with ``schemas/slicer-extension-catalog-entry-schema-v1.0.1.json`` (Slicer/ExtensionsIndex
#: at 00b8d9c; the same file as Slicer's Schemas/ folder). Its properties ("additionalProperties": false) and
#: their JSON types; v1.0.2 only adds ``dicom_support_rule``, which v1.0.1 refuses.
CATALOGUE_SCHEMA = "slicer-extension-catalog-entry-schema-v1.0.1.json"
CATALOGUE_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                        "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
CATALOGUE_REQUIRED = {"$schema", "category", "scm_url"}
EXTENSION_FIELDS = ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS")


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command, arguments) of a CMakeLists, comments removed, quoted arguments unquoted."""
    text = "\n".join(_strip_comment(line) for line in path.read_text(encoding="utf-8").splitlines())
    commands = []
    for name, body in re.findall(r"(\w+)\s*\(((?:[^()\"]|\"[^\"]*\")*)\)", text):
        arguments = [quoted if quoted or not bare else bare for quoted, bare in re.findall(r'"([^"]*)"|(\S+)', body)]
        commands.append((name.lower(), arguments))
    return commands


def _strip_comment(line: str) -> str:
    inside = False
    for index, char in enumerate(line):
        if char == '"':
            inside = not inside
        elif char == "#" and not inside:
            return line[:index]
    return line


def cmake_variables(path: Path) -> dict[str, list[str]]:
    variables = {}
    for name, arguments in cmake_commands(path):
        if name == "set" and arguments:
            expanded = [re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [m.group(0)])), a)
                        for a in arguments[1:]]
            variables[arguments[0]] = [item for value in expanded for item in value.split(";") if item]
    return variables


@pytest.fixture(scope="module")
def extension():
    return cmake_variables(REPO / "CMakeLists.txt")


def read_s4ext() -> dict[str, str]:
    fields = {}
    for line in (REPO / "CoTexNet.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            fields[key] = value.strip()
    return fields


# ------------------------------------------------------------------------------------------ top level


def test_top_level_cmakelists_has_extension_metadata_and_every_module(extension):
    for field in EXTENSION_FIELDS:
        assert extension.get(f"EXTENSION_{field}"), f"EXTENSION_{field} is missing or empty"
    assert "PyTorch" in extension["EXTENSION_DEPENDS"]
    commands = cmake_commands(REPO / "CMakeLists.txt")
    subdirectories = [args[0] for name, args in commands if name == "add_subdirectory"]
    assert subdirectories == list(MODULES)
    names = [name for name, _ in commands]
    assert names.index("find_package") < names.index("add_subdirectory")
    assert any(name == "include" and args == ["${Slicer_EXTENSION_CPACK}"] for name, args in commands)


@pytest.mark.parametrize("module", MODULES)
def test_module_lists_every_script_ui_and_icon(module):
    directory = REPO / module
    if not (directory / "CMakeLists.txt").is_file():
        pytest.skip(f"{module} is not there yet")
    variables = cmake_variables(directory / "CMakeLists.txt")
    listed = set(variables.get("MODULE_PYTHON_SCRIPTS", [])) | set(variables.get("MODULE_PYTHON_RESOURCES", []))
    on_disk = {
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and "Testing" not in p.parts
        and (p.suffix in (".py", ".ui") or (p.suffix in (".png", ".svg") and "Icons" in p.parts))
    }
    assert sorted(on_disk - listed) == [], f"{module}/CMakeLists.txt does not list these files"
    assert sorted(p for p in listed if not (directory / p).is_file()) == [], f"{module}/CMakeLists.txt lists missing files"
    assert f"{module}.py" in listed and f"Resources/UI/{module}.ui" in listed and f"Resources/Icons/{module}.png" in listed

    commands = cmake_commands(directory / "CMakeLists.txt")
    builds = [args for name, args in commands if name == "slicermacrobuildscriptedmodule"]
    assert builds and "WITH_GENERIC_TESTS" in builds[0]
    assert any(name == "slicer_add_python_unittest" for name, _ in commands), "the self-test is not registered"
    classes = {n.name for n in ast.walk(ast.parse((directory / f"{module}.py").read_text(encoding="utf-8"))) if isinstance(n, ast.ClassDef)}
    assert {module, f"{module}Widget", f"{module}Test"} <= classes


def test_engine_is_bundled_file_by_file():
    variables = cmake_variables(REPO / ENGINE_HOST / "CMakeLists.txt")
    listed = set(variables["ENGINE_PYTHON_SCRIPTS"])
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / "cotexnet").rglob("*.py") if "__pycache__" not in p.parts}
    assert sorted(on_disk - listed) == [], f"{ENGINE_HOST}/CMakeLists.txt does not bundle these engine files"
    assert sorted(listed - on_disk) == [], f"{ENGINE_HOST}/CMakeLists.txt bundles engine files that do not exist"
    compile_calls = [args for name, args in cmake_commands(REPO / ENGINE_HOST / "CMakeLists.txt")
                     if name == "ctkmacrocompilepythonscript"]
    assert compile_calls and "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in " ".join(compile_calls[0])


def test_icons_are_real_pngs_of_slicer_sizes():
    def png_size(path):
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
        return struct.unpack(">II", header[16:24])

    assert png_size(REPO / "CoTexNetSegment/Resources/Icons/CoTexNetSegment.png") == (128, 128)
    assert png_size(REPO / "CoTexNetSegment/Resources/Icons/SegmentEditorCoTexNet.png") == (21, 21)


# ------------------------------------------------------------------------------------------ .s4ext and catalogue


def test_s4ext_has_every_field_consistent_with_cmake(extension):
    fields = read_s4ext()
    assert sorted(f for f in S4EXT_FIELDS if not fields.get(f)) == [], "empty or missing .s4ext fields"
    assert fields["scm"] == "git" and fields["enabled"] in ("0", "1")
    assert fields["category"] == " ".join(extension["EXTENSION_CATEGORY"])
    assert fields["homepage"] == " ".join(extension["EXTENSION_HOMEPAGE"])
    assert fields["description"] == " ".join(extension["EXTENSION_DESCRIPTION"])
    assert fields["iconurl"] == " ".join(extension["EXTENSION_ICONURL"])
    assert fields["depends"].split() == extension["EXTENSION_DEPENDS"]


def test_catalogue_entry_follows_the_extensions_index_schema(extension):
    entry = json.loads((REPO / "CoTexNet.json").read_text(encoding="utf-8"))
    assert CATALOGUE_REQUIRED <= set(entry)
    assert set(entry) <= set(CATALOGUE_PROPERTIES), f"refused by the schema: {set(entry) - set(CATALOGUE_PROPERTIES)}"
    for name, value in entry.items():  # bool is not an integer in JSON Schema
        assert type(value) is CATALOGUE_PROPERTIES[name], f"{name}: {value!r} is not a {CATALOGUE_PROPERTIES[name].__name__}"
    assert entry["$schema"] == f"https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/{CATALOGUE_SCHEMA}#"
    assert entry["category"] == " ".join(extension["EXTENSION_CATEGORY"])
    assert entry["scm_url"] == read_s4ext()["scmurl"] and entry["scm_url"].startswith("https://")
    assert entry["scm_revision"] == read_s4ext()["scmrevision"]
    assert entry.get("scm_type", "git") in ("git", "local")
    assert all(isinstance(d, str) for d in entry["build_dependencies"])
    assert entry["build_dependencies"] == extension["EXTENSION_DEPENDS"]
    assert 1 <= entry.get("tier", 1) <= 5


def prettier_json(value) -> str:
    """How the extensions index's prettier writes a JSON file (Slicer/ExtensionsIndex .prettierrc.js and
    .pre-commit-config.yaml: prettier 3.5.3 with prettier-plugin-multiline-arrays 4.0.3,
    ``multilineArraysWrapThreshold: 0``), for entries like ours (an object of strings, booleans, integers and
    string arrays). The rules reproduced: two-space indentation and no tabs (prettier's defaults; the forbid-tabs
    hook); every non-empty array one element per line, an empty one as ``[]`` (threshold 0); an object whose
    first key is on its own line stays expanded (prettier keeps objects as written there); ``"key": value``;
    keys in their order (prettier sorts nothing); LF line ends, no trailing spaces, one final newline (the
    mixed-line-ending, trailing-whitespace and end-of-file-fixer hooks)."""
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def test_catalogue_entry_is_formatted_as_the_index_lints_it():
    raw = (REPO / "CoTexNet.json").read_bytes()
    assert raw.decode("utf-8") == prettier_json(json.loads(raw)), "run the index's prettier on CoTexNet.json"


def test_s4ext_passes_the_index_whitespace_hooks():
    """The index's pre-commit hooks that apply to every text file: forbid-tabs, trailing-whitespace,
    mixed-line-ending, end-of-file-fixer (Slicer/ExtensionsIndex .pre-commit-config.yaml)."""
    text = (REPO / "CoTexNet.s4ext").read_bytes().decode("utf-8")
    assert "\t" not in text and "\r" not in text
    assert not [line for line in text.split("\n") if line != line.rstrip()]
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_icon_url_points_at_the_committed_icon(extension):
    url = " ".join(extension["EXTENSION_ICONURL"])
    homepage = " ".join(extension["EXTENSION_HOMEPAGE"]).rstrip("/")
    owner_repo = homepage.split("github.com/")[1]
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/{read_s4ext()['scmrevision']}/"
    assert url.startswith(prefix)
    assert (REPO / url[len(prefix):]).is_file()


# ------------------------------------------------------------------------------------------ extensions index checks


def test_license_is_the_full_text_of_the_license_pyproject_names():
    """The extensions index requires a LICENSE file at the root; it is the one pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]  # an SPDX expression
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    sections = re.findall(r"^\s+(\d+)\. (\w[\w ]*)\.", text, re.M)
    assert [int(number) for number, _ in sections] == list(range(1, 10))  # all nine sections, in order
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10000


def test_screenshot_url_points_at_a_committed_png_of_sensible_size(extension):
    urls = extension["EXTENSION_SCREENSHOTURLS"]
    assert urls and " ".join(urls) == read_s4ext()["screenshoturls"]
    owner_repo = " ".join(extension["EXTENSION_HOMEPAGE"]).split("github.com/")[1]
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/{read_s4ext()['scmrevision']}/"
    from PIL import Image

    for url in urls:
        assert url.startswith(prefix), f"{url} is not this repository's raw path"
        path = REPO / url[len(prefix):]
        assert path.is_file(), f"{url} names {path}, which is not committed"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and 800 <= image.width <= 4000 and 400 <= image.height <= 3000
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 256  # a rendering, not a placeholder


def test_contributors_are_in_the_index_name_organization_form(extension):
    """ExtensionsIndex: contributors as "Name (Organization)", comma-separated, in CMake, .s4ext and modules."""
    form = re.compile(r"[^,()]+ \([^()]+\)")
    for text in (" ".join(extension["EXTENSION_CONTRIBUTORS"]), read_s4ext()["contributors"]):
        assert all(form.fullmatch(part.strip()) for part in text.split(",")), text
    for module in MODULES:
        source = (REPO / module / f"{module}.py").read_text(encoding="utf-8")
        [contributors] = re.findall(r"parent\.contributors = \[(.*?)\]", source)
        assert all(form.fullmatch(ast.literal_eval(item)) for item in re.findall(r'"[^"]*"', contributors)), module
