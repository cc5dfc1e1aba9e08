"""Which runtime executes the network: ONNX Runtime on the CPU (without torch), or torch.

On a CPU, ONNX Runtime runs the bundled U-Net faster than channels-last torch with the same probabilities
(to 1e-5) and starts sooner (figures: benchmarks/README.md). So ``auto`` picks it on the CPU whenever
onnxruntime is installed, and torch everywhere else (CUDA/MPS, training, or no onnxruntime).

A model card names an ONNX graph (``onnx_file``, with its SHA-256) whose initializers are stored as
external data inside the safetensors weights file itself: the graph is a small file, the weights exist
once, and ONNX Runtime reads the fp16 tensors from the weights file and casts them to fp32 once, when the
session is built. With it the CPU path imports neither torch nor segmentation-models-pytorch.
``export_onnx_graph`` writes it (``liverseg export-onnx``, and training for every model it saves). A card
without one (an older or user-trained model) is exported on first use into a per-user cache instead, named
by the weights' SHA-256, which needs torch. Either way the safetensors hash is checked on every load
(``model.verify_model``) and the graph's own hash too.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import warnings
from pathlib import Path

import numpy as np

from .dependencies import GPU_INSTALL_HINT, importable
from .errors import LiverSegInputError, ModelIntegrityError
from .model import ModelCard, load_network, read_card, sha256_of, verify_model, verify_onnx, write_card
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
    return importable("onnxruntime")


def cpu_threads() -> int:
    """Threads for the CPU network: ``OMP_NUM_THREADS`` when set (a batch's local cluster gives each worker
    process its share of the cores that way, as Dask and HPC schedulers do), else every core this process may use."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else usable_cores()


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class OnnxRuntimeNetwork:
    """An ONNX Runtime session on the CPU: a (B, C, n, n) float32 batch in, logits out (numpy)."""

    def __init__(self, onnx_path: Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = cpu_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"slices": np.ascontiguousarray(batch, dtype=np.float32)})[0]


def _exported_graph(network, card: ModelCard, constant_folding: bool) -> bytes:
    """The torch network as ONNX bytes (fp32 initializers inside), with a dynamic batch."""
    import torch

    example = torch.zeros(1, card.in_channels, card.input_size, card.input_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its own deprecation
        torch.onnx.export(
            network.float().eval(), (example,), buffer, input_names=["slices"], output_names=["logits"],
            dynamic_axes={"slices": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False,
            do_constant_folding=constant_folding,
        )
    return buffer.getvalue()


def export_onnx(network, card: ModelCard, onnx_path: Path) -> None:
    """Export the fp32 network (weights inside) into the cache, atomically, and record the file's SHA-256."""
    from .outputs import atomic_output  # the one atomic writer; outputs is torch-free and light

    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(onnx_path, ".onnx") as temporary:
        Path(temporary).write_bytes(_exported_graph(network, card, constant_folding=True))
        digest = sha256_of(temporary)
    onnx_path.with_suffix(".sha256").write_text(digest + "\n", encoding="utf-8")


def _safetensors_layout(weights_path: Path) -> tuple[int, dict]:
    """(byte offset of the data, {tensor name: {dtype, shape, data_offsets}}) of a safetensors file, checked
    to be complete: a file cut short (its hash recorded after the damage) is refused as unloadable."""
    try:
        with open(weights_path, "rb") as stream:
            header_bytes = struct.unpack("<Q", stream.read(8))[0]
            header = json.loads(stream.read(header_bytes))
        header.pop("__metadata__", None)
        data_start = 8 + header_bytes
        data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelIntegrityError(f"model weights {weights_path} cannot be loaded: not a safetensors file ({error})") from None
    if data_start + data_end > weights_path.stat().st_size:
        raise ModelIntegrityError(f"model weights {weights_path} cannot be loaded: the file ends before its tensors do")
    return data_start, header


def graph_on_safetensors(graph_bytes: bytes, weights_path: Path) -> bytes:
    """Rewrite an exported graph so that every initializer stored in fp16 in the weights file is read from
    there (external data at its byte offset) and cast to fp32 by a Cast node, which ONNX Runtime folds once
    when the session is built."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(graph_bytes)
    data_start, layout = _safetensors_layout(weights_path)
    initializers, casts = [], []
    for initializer in model.graph.initializer:
        stored = layout.get(initializer.name)
        if stored is None or stored["dtype"] != "F16" or list(stored["shape"]) != list(initializer.dims):
            initializers.append(initializer)  # not in the weights file as fp16: stays inside the graph
            continue
        begin, end = stored["data_offsets"]
        external = TensorProto(name=f"{initializer.name}::fp16", data_type=TensorProto.FLOAT16, dims=list(initializer.dims),
                               data_location=TensorProto.EXTERNAL)
        for key, value in (("location", weights_path.name), ("offset", str(data_start + begin)), ("length", str(end - begin))):
            entry = external.external_data.add()
            entry.key, entry.value = key, value
        initializers.append(external)
        casts.append(helper.make_node("Cast", [external.name], [initializer.name], to=TensorProto.FLOAT, name=f"fp32::{initializer.name}"))
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(casts + nodes)  # casts first: the graph stays topologically sorted
    return model.SerializeToString()


def export_onnx_graph(card_path: str | Path) -> ModelCard:
    """Write ``<weights stem>.onnx`` beside the card's verified weights (the graph, reading its weights from
    the safetensors file) and record it in the card. Needs torch and onnx; runs once per model."""
    from .outputs import atomic_output

    missing = [module for module in ("torch", "segmentation_models_pytorch", "safetensors", "onnx") if not importable(module)]
    if missing:
        raise LiverSegInputError(f"exporting the ONNX graph needs {', '.join(missing)}: {GPU_INSTALL_HINT}")
    card_path = Path(card_path)
    card, weights_path = verify_model(card_path)
    graph = graph_on_safetensors(_exported_graph(load_network(card, weights_path), card, constant_folding=False), weights_path)
    onnx_path = weights_path.with_suffix(".onnx")
    with atomic_output(onnx_path, ".onnx") as temporary:
        Path(temporary).write_bytes(graph)
    card.onnx_file, card.onnx_sha256 = onnx_path.name, sha256_of(onnx_path)
    write_card(card, card_path)
    return read_card(card_path)


def cached_onnx_is_intact(onnx_path: Path) -> bool:
    recorded = onnx_path.with_suffix(".sha256")
    if not (onnx_path.is_file() and recorded.is_file()):
        return False
    return recorded.read_text(encoding="utf-8").strip() == sha256_of(onnx_path)


def load_runtime_network(card_path: str | Path, device: str, runtime: str = "auto") -> tuple[ModelCard, object, str]:
    """(card, network, runtime name) for ``device`` ("cpu", "cuda", "mps"): ONNX Runtime where it is the
    faster choice and can run, else torch.

    ONNX Runtime runs the card's own graph when it has one (no torch at all), else a graph exported into
    the cache; under ``auto`` the torch network runs if the export or the session fails (read-only cache,
    no `onnx`).
    """
    if runtime not in RUNTIMES:
        raise LiverSegInputError(f"unknown runtime '{runtime}', choose one of {', '.join(RUNTIMES)}")
    card, weights_path = verify_model(card_path)
    if runtime == "onnxruntime":
        if device != "cpu":
            raise LiverSegInputError(f"--runtime onnxruntime runs on the CPU only; the device is {device}")
        if not onnxruntime_available():
            raise LiverSegInputError("--runtime onnxruntime was asked for but onnxruntime is not installed (pip install onnxruntime)")
    elif not (runtime == "auto" and device == "cpu" and onnxruntime_available()):
        why = "--runtime torch" if runtime == "torch" else (f"the {device} device" if device != "cpu" else "running without onnxruntime")
        return card, _torch_network(card, weights_path, why), "torch"
    shipped = verify_onnx(card, card_path)
    if shipped is not None:
        _safetensors_layout(weights_path)  # the graph reads its weights from there: refuse a cut file clearly
        return card, OnnxRuntimeNetwork(shipped), "onnxruntime"
    onnx_path = onnx_cache_path(card)
    network = None
    try:
        if not cached_onnx_is_intact(onnx_path):
            if onnx_path.exists():
                log.warning("cached ONNX model %s does not match its recorded SHA-256: exporting it again", onnx_path)
            network = _torch_network(card, weights_path, "a model without an ONNX graph (exported once)")  # unloadable weights fail here
            log.info("preparing the model for ONNX Runtime (first run of this model only): %s", onnx_path)
            export_onnx(network, card, onnx_path)
        return card, OnnxRuntimeNetwork(onnx_path), "onnxruntime"
    except (OSError, ImportError, RuntimeError) as error:  # read-only cache, no `onnx` to export with
        if runtime == "onnxruntime" and isinstance(error, OSError):
            raise LiverSegInputError(f"cannot write the ONNX model cache under {cache_dir()} ({error.strerror or error}); set LIVERSEG_CACHE to a writable folder") from None
        if runtime == "onnxruntime":
            raise
        log.warning("ONNX Runtime unavailable (%s): running the network with torch", str(error).splitlines()[0])
    return card, network if network is not None else _torch_network(card, weights_path, "a model without an ONNX graph"), "torch"


def _torch_network(card: ModelCard, weights_path: Path, why: str):
    if not importable("torch"):
        raise LiverSegInputError(f"{why} needs torch, which is not installed: {GPU_INSTALL_HINT}")
    return load_network(card, weights_path)


__all__ = ["OnnxRuntimeNetwork", "cache_dir", "export_onnx_graph", "load_runtime_network", "onnx_cache_path", "onnxruntime_available"]
