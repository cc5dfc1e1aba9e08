"""Project-level promises: the README's commands are the ones CI runs, and layers point one way."""

from __future__ import annotations

import re

from conftest import PROJECT_ROOT


def readme_commands() -> list[str]:
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in (PROJECT_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    test_command = next(c for c in readme_commands() if "pytest" in c)
    assert test_command in ci_lines


def test_readme_main_command_uses_the_shipped_sample_and_model():
    main_command = readme_commands()[0]
    sample = re.search(r"liverseg segment (\S+)", main_command).group(1)
    assert (PROJECT_ROOT / sample).is_file()
    assert (PROJECT_ROOT / "LiverSeg" / "Resources" / "Models" / "liverseg.json").is_file()


def test_engine_never_imports_training_or_qt():
    """The MRML layer may use slicer.vtk… classes (Qt-free); nothing in the engine may use Qt or training."""
    for path in (PROJECT_ROOT / "LiverSeg" / "LiverSegLib").glob("*.py"):
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from|import)\s+(LiverSegTraining|qt|ctk)\b", source, re.M), path.name


def test_slicer_requirements_have_the_bounds_of_pyproject():
    """One set of version bounds: what the Slicer module pip-installs for the CPU is in pyproject's base
    dependencies, what it adds for a GPU in the ``gpu`` extra, with the same bounds."""
    import tomllib

    from LiverSegLib.dependencies import CPU_REQUIREMENTS, GPU_REQUIREMENTS, TORCH_VERSION

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def bounds(requirements: list[str]) -> dict[str, str]:
        return {re.split(r"[<>=!~ ;]", r, maxsplit=1)[0].lower(): r.replace(" ", "") for r in requirements}

    base, gpu = bounds(project["dependencies"]), bounds(project["optional-dependencies"]["gpu"])
    for requirements, declared in ((CPU_REQUIREMENTS, base), (GPU_REQUIREMENTS, gpu)):
        for requirement in requirements:
            name = re.split(r"[<>=!~]", requirement, maxsplit=1)[0].lower()
            assert declared[name] == requirement, (declared.get(name), requirement)
    assert "torch" not in base and gpu["torch"].startswith("torch" + TORCH_VERSION)


def engine_imports(path) -> set[str]:
    """The LiverSegLib modules a module imports, lazily too, except under ``if TYPE_CHECKING:``."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
               for statement in block.body for node in ast.walk(statement)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif node.level == 1:
            found |= {alias.name for alias in node.names if alias.name != "__version__"}
        elif (node.module or "").startswith("LiverSegLib."):
            found.add(node.module.split(".")[1])
    return found


def test_engine_layers_point_one_way():
    """Every engine module imports only modules of the layers above its own (LiverSegLib.LAYERS)."""
    from LiverSegLib import LAYERS

    layer_of = {name: index for index, names in enumerate(LAYERS) for name in names}
    package = PROJECT_ROOT / "LiverSeg" / "LiverSegLib"
    modules = {path.stem for path in package.glob("*.py")} - {"__init__"}
    assert modules == set(layer_of), "LAYERS does not list exactly the engine's modules"
    for name in modules:
        for imported in engine_imports(package / f"{name}.py"):
            assert layer_of[imported] < layer_of[name], f"{name} (layer {layer_of[name]}) imports {imported} (layer {layer_of[imported]})"
