"""What the engine needs inside 3D Slicer beyond what Slicer bundles (numpy, scipy, SimpleITK, pydicom), with
the version bounds of ``pyproject.toml`` (``Testing/test_project.py`` keeps the two equal).

torch is not in the pip list: the module installs it only through the PyTorch extension's PyTorchUtils, which
picks the build (CUDA version or CPU) that fits the computer, with torchvision beside it. Every later pip call
names the installed torch and torchvision with their exact versions, so that pip can never re-resolve them and
replace that build with PyPI's default one.
"""

from __future__ import annotations

TORCH_VERSION = ">=2.3"  # for PyTorchUtils.installTorch(torchVersionRequirement=...)
PIP_REQUIREMENTS = {  # pip requirement → the module it provides
    "segmentation-models-pytorch>=0.5,<0.7": "segmentation_models_pytorch",
    "safetensors>=0.4": "safetensors",
    "onnxruntime>=1.17": "onnxruntime",  # the CPU runtime (faster than torch on the CPU)
    "onnx>=1.15": "onnx",  # to export the network for ONNX Runtime once per model
}
PINNED_WITH_TORCH = ("torch", "torchvision")


def missing_modules() -> list[str]:
    """The pip requirements (and ``torch``) whose module cannot be imported in this Python."""
    import importlib.util

    missing = ["torch"] if importlib.util.find_spec("torch") is None else []
    return missing + [requirement for requirement, module in PIP_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


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
