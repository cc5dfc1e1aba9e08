"""What the engine needs inside 3D Slicer beyond what Slicer bundles (numpy, scipy, SimpleITK, pydicom), by
device, with the version bounds of ``pyproject.toml`` (``Testing/test_project.py`` keeps the two equal).

On the CPU the network runs in ONNX Runtime from the graph that ships with the model: tens of MB, no torch.
A GPU needs torch, which the module installs only through the PyTorch extension's PyTorchUtils (it picks
the build, CUDA version or CPU, that fits the computer, with torchvision beside it), then
segmentation-models-pytorch and safetensors. Every pip call after that names the installed torch and
torchvision with their exact versions, so that pip can never re-resolve them and replace that build.
"""

from __future__ import annotations

TORCH_VERSION = ">=2.3"  # for PyTorchUtils.installTorch(torchVersionRequirement=...)
CPU_REQUIREMENTS = {  # pip requirement → the module it provides
    "onnxruntime>=1.17": "onnxruntime",
}
GPU_REQUIREMENTS = {  # beyond torch and torchvision (PyTorchUtils)
    "segmentation-models-pytorch>=0.5,<0.7": "segmentation_models_pytorch",
    "safetensors>=0.4": "safetensors",
}
PINNED_WITH_TORCH = ("torch", "torchvision")
GPU_INSTALL_HINT = "pip install 'liverseg[gpu]' (torch with CUDA)"  # what the CLI says when torch is missing
GRAPH_CUT_REQUIREMENT = "numba>=0.59"  # a card with a graph cut (mincut.py); pyproject's graphcut extra
GRAPH_CUT_INSTALL_HINT = "pip install 'liverseg[graphcut]' (numba)"


def importable(module: str) -> bool:
    """Whether ``module`` imports here (tried for real: an installed but broken package counts as missing)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def needs_torch(device: str) -> bool:
    """A GPU (``cuda``, ``mps``) runs the torch network; ``cpu`` and ``auto`` run ONNX Runtime unless torch
    is already there (then ``auto`` uses a GPU it finds)."""
    return device in ("cuda", "mps")


def missing_modules(device: str = "cpu", graph_cut: bool = False) -> list[str]:
    """The pip requirements (and ``torch``) that ``device`` needs and this Python cannot import; with
    ``graph_cut`` (a card that cuts its organ on the CT: ``ModelCard.cuts``) Numba too."""
    import importlib.util

    wanted = dict(CPU_REQUIREMENTS)
    if graph_cut:
        wanted[GRAPH_CUT_REQUIREMENT] = "numba"
    missing = []
    if needs_torch(device):
        wanted.update(GPU_REQUIREMENTS)
        if importlib.util.find_spec("torch") is None:
            missing.append("torch")
    return missing + [requirement for requirement, module in wanted.items() if importlib.util.find_spec(module) is None]


def pip_arguments(requirements: list[str]) -> list[str]:
    """The requirements plus ``name==installed version`` for torch and torchvision, so pip keeps them as they are."""
    from importlib import metadata

    pins = []
    for name in PINNED_WITH_TORCH:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return list(requirements) + pins
