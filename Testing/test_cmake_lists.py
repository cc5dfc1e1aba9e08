"""The Slicer build installs only what LiverSeg/CMakeLists.txt lists: every module file must be there."""

from __future__ import annotations

import ast
import re

from conftest import PROJECT_ROOT

MODULE = PROJECT_ROOT / "LiverSeg"
SKIP_PARTS = {"__pycache__", "Testing"}


def listed_files() -> set[str]:
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "LiverSeg")
    return set(re.findall(r"^\s+([\w./-]+\.\w+)\s*$", text, re.M))


def module_files() -> set[str]:
    return {
        str(path.relative_to(MODULE))
        for path in MODULE.rglob("*")
        if path.is_file() and not SKIP_PARTS & set(path.relative_to(MODULE).parts) and path.name != "CMakeLists.txt"
    }


def test_every_module_file_is_listed_and_every_listed_file_exists():
    listed, present = listed_files(), module_files()
    assert present - listed == set(), "files missing from LiverSeg/CMakeLists.txt"
    assert listed - present == set(), "listed files that do not exist"


def test_extension_cmake_has_the_template_parts():
    text = (PROJECT_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for needed in ("EXTENSION_HOMEPAGE", 'EXTENSION_CATEGORY "Segmentation"', "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                   "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", 'EXTENSION_DEPENDS "PyTorch"', "find_package(Slicer REQUIRED)",
                   "add_subdirectory(LiverSeg)", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert needed in text, needed
    module = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "WITH_GENERIC_TESTS" in module and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module


def test_module_file_has_the_template_anatomy_and_no_torch_at_load():
    tree = ast.parse((MODULE / "LiverSeg.py").read_text(encoding="utf-8"))
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"LiverSeg", "LiverSegWidget", "LiverSegLogic", "LiverSegTest", "LiverSegParameterNode"} <= classes
    top_level_imports = {
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert not {"torch", "segmentation_models_pytorch", "qt", "ctk", "LiverSegLib"} & top_level_imports
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name != "LiverSegWidget":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    assert not {a.name for a in inner.names} & {"qt", "ctk"}, f"Qt imported in {node.name}"
