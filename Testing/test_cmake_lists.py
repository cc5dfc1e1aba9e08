"""The Slicer build installs only what LiverSeg/CMakeLists.txt lists: every module file must be there."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

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


def module_imports() -> set[str]:
    """Every module LiverSeg.py imports, at load or inside a function."""
    tree = ast.parse((MODULE / "LiverSeg.py").read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


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
    assert not {"torch", "segmentation_models_pytorch", "qt", "ctk"} & top_level_imports
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name != "LiverSegWidget":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    assert not {a.name for a in inner.names} & {"qt", "ctk"}, f"Qt imported in {node.name}"


def test_module_runs_the_engine_in_a_child_process_and_never_imports_torch():
    """Slicer's process never runs the network: no torch, no pipeline, no segmenter in LiverSeg.py, and
    nothing it imports from the engine pulls torch in (checked in a fresh interpreter)."""
    source = (MODULE / "LiverSeg.py").read_text(encoding="utf-8")
    imported = module_imports()
    assert not {name for name in imported if name.split(".")[0] in {"torch", "segmentation_models_pytorch", "onnxruntime"}}
    assert "LiverSegLib.pipeline" not in imported and "LiverSegmenter" not in source
    engine_modules = sorted(name for name in imported if name.startswith("LiverSegLib."))
    assert {"LiverSegLib.mrml", "LiverSegLib.job", "LiverSegLib.dependencies"} <= set(engine_modules)
    check = f"import sys; sys.path.insert(0, {str(MODULE)!r}); import {', '.join(engine_modules)}; " \
            "heavy = [m for m in ('torch', 'segmentation_models_pytorch', 'onnxruntime') if m in sys.modules]; " \
            "assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", check], check=True)


def test_slicer_calls_that_differ_between_releases_have_their_fallbacks():
    for path in MODULE.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        assert '"file://" +' not in source and "'file://' +" not in source, path
        for match in re.finditer(r"\.SetTerminology\(", source):
            before = source[max(0, match.start() - 200):match.start()]
            assert 'hasattr(segment, "SetTerminology")' in before, f"{path.name}: SetTerminology without the pre-5.10 tag fallback"


def test_extension_catalog_entry():
    """The entry for Slicer's ExtensionsIndex (JSON, schema v1.0.1, as TotalSegmentator's and NNUNet's)."""
    entry = json.loads((PROJECT_ROOT / "LiverSeg.json").read_text(encoding="utf-8"))
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1")
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_url", "scm_type", "tier", "enabled"}
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"].startswith("https://github.com/") and entry["scm_revision"]
    cmake = (PROJECT_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert entry["scm_url"].removesuffix(".git") in cmake, "catalog and CMakeLists.txt name different repositories"


def test_screenshots_named_in_cmake_lists_exist():
    cmake = (PROJECT_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    urls = re.search(r'EXTENSION_SCREENSHOTURLS "([^"]+)"', cmake).group(1).split()
    assert urls
    for url in urls + [re.search(r'EXTENSION_ICONURL "([^"]+)"', cmake).group(1)]:
        relative = url.split("/main/", 1)[1]
        assert (PROJECT_ROOT / relative).is_file(), url
