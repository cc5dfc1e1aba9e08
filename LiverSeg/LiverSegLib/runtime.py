"""Which runtime executes the network: torch, or ONNX Runtime on the CPU.

On a CPU, ONNX Runtime runs the bundled U-Net faster than channels-last torch with the same probabilities
(to 1e-5), and a run that finds its ONNX file cached never imports segmentation-models-pytorch (timm,
torchvision, torch._dynamo), so it is ready sooner (figures: benchmarks/README.md). So ``auto`` picks it on
the CPU whenever onnxruntime is installed, and torch everywhere else (CUDA/MPS, training, or no
onnxruntime, as in a bare Slicer).

The repository keeps one copy of the weights (safetensors). The ONNX file is exported from them on
first use into a per-user cache, named by the weights' SHA-256, with its own SHA-256 beside it: a
changed or broken cache file is exported again, never run. The safetensors hash is checked on every
load either way (``model.verify_model``).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import LiverSegInputError
from .model import ModelCard, load_network, sha256_of, verify_model
from .options import RUNTIMES

log = logging.getLogger(__name__)
ONNX_EXPORT_VERSION = 1  # bump when the export itself changes (opset, names), so old cache files go unused
ONNX_OPSET = 17


def cache_dir() -> Path:
    """``$LIVERSEG_CACHE``, else ``$XDG_CACHE_HOME/liverseg``, else ``~/.cache/liverseg``."""
    if os.environ.get("LIVERSEG_CACHE"):
        return Path(os.environ["LIVERSEG_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "liverseg"


def onnx_cache_path(card: ModelCard) -> Path:
    return cache_dir() / "onnx" / f"{card.weights_sha256[:32]}-{card.input_size}-v{ONNX_EXPORT_VERSION}.onnx"


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxRuntimeNetwork(torch.nn.Module):
    """An ONNX Runtime session behind the torch module interface that ``predict_probabilities`` uses.

    It has no parameters, so ``.to(cpu)`` and ``.eval()`` are no-ops; logits come back as a torch tensor.
    """

    def __init__(self, onnx_path: Path):
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        slices = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"slices": slices})[0])

    def to(self, *args, **kwargs):  # type: ignore[override]
        device = torch.device(args[0]) if args and isinstance(args[0], (str, torch.device)) else kwargs.get("device")
        if device is not None and torch.device(device).type != "cpu":
            raise LiverSegInputError(f"the ONNX Runtime network runs on the CPU only, not on {device}")
        return self


def export_onnx(network: torch.nn.Module, card: ModelCard, onnx_path: Path) -> None:
    """Export the fp32 network with a dynamic batch, atomically, and record the file's SHA-256."""
    from .outputs import atomic_output  # the one atomic writer; outputs is torch-free and light

    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, card.in_channels, card.input_size, card.input_size)
    with atomic_output(onnx_path, ".onnx") as temporary:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its own deprecation
            torch.onnx.export(
                network.float().eval(), (example,), temporary, input_names=["slices"], output_names=["logits"],
                dynamic_axes={"slices": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False,
            )
        digest = sha256_of(temporary)
    onnx_path.with_suffix(".sha256").write_text(digest + "\n", encoding="utf-8")


def cached_onnx_is_intact(onnx_path: Path) -> bool:
    recorded = onnx_path.with_suffix(".sha256")
    if not (onnx_path.is_file() and recorded.is_file()):
        return False
    return recorded.read_text(encoding="utf-8").strip() == sha256_of(onnx_path)


def load_runtime_network(
    card_path: str | Path, device: torch.device, runtime: str = "auto"
) -> tuple[ModelCard, torch.nn.Module]:
    """(card, network) for ``device``: ONNX Runtime where it is the faster choice and can run, else torch.

    The ONNX file comes from the cache when intact; otherwise the torch network is loaded once, exported,
    and, under ``auto``, is what runs if the export or the session fails (read-only cache, no `onnx`).
    """
    if runtime not in RUNTIMES:
        raise LiverSegInputError(f"unknown runtime '{runtime}', choose one of {', '.join(RUNTIMES)}")
    card, weights_path = verify_model(card_path)
    if runtime == "onnxruntime":
        if device.type != "cpu":
            raise LiverSegInputError(f"--runtime onnxruntime runs on the CPU only; the device is {device.type}")
        if not onnxruntime_available():
            raise LiverSegInputError("--runtime onnxruntime was asked for but onnxruntime is not installed (pip install onnxruntime)")
    elif not (runtime == "auto" and device.type == "cpu" and onnxruntime_available()):
        return card, load_network(card, weights_path)
    onnx_path = onnx_cache_path(card)
    network = None
    try:
        if not cached_onnx_is_intact(onnx_path):
            if onnx_path.exists():
                log.warning("cached ONNX model %s does not match its recorded SHA-256: exporting it again", onnx_path)
            network = load_network(card, weights_path)  # unloadable weights fail here, before any announcement
            log.info("preparing the model for ONNX Runtime (first run of this model only): %s", onnx_path)
            export_onnx(network, card, onnx_path)
        return card, OnnxRuntimeNetwork(onnx_path)
    except (OSError, ImportError, RuntimeError) as error:  # read-only cache, no `onnx` to export with
        if runtime == "onnxruntime" and isinstance(error, OSError):
            raise LiverSegInputError(f"cannot write the ONNX model cache under {cache_dir()} ({error.strerror or error}); set LIVERSEG_CACHE to a writable folder") from None
        if runtime == "onnxruntime":
            raise
        log.warning("ONNX Runtime unavailable (%s): running the network with torch", str(error).splitlines()[0])
    return card, network if network is not None else load_network(card, weights_path)


__all__ = ["OnnxRuntimeNetwork", "cache_dir", "load_runtime_network", "onnx_cache_path", "onnxruntime_available"]
