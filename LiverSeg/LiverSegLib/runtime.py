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

A card may also name an int8 graph (``int8_onnx_file``, with its SHA-256 and its calibration): the same
network quantised (QDQ; weights int8 per output channel, activations uint8 calibrated on the training
cases), which the CPU runs by default. It too reads the fp16 weights from the safetensors file: nodes fold
the batch normalisations into the convolutions and quantise the weights with the recorded scales, and ONNX
Runtime computes them once when the session starts, so the graph is a few hundred kB.
``export_int8_graph`` writes it (needs onnx and the training cases' CTs).
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import threading
import warnings
from pathlib import Path

import numpy as np

from .dependencies import GPU_INSTALL_HINT, importable
from .errors import LiverSegInputError, ModelIntegrityError
from .model import ModelCard, load_network, read_card, sha256_of, stage_weights_path, verify_int8_onnx, verify_model, verify_onnx, write_card
from .options import PRECISIONS, RUNTIMES

log = logging.getLogger(__name__)
ONNX_EXPORT_VERSION = 1  # bump when the export itself changes (opset, names), so old cache files go unused
ONNX_OPSET = 17
INT8_SLICE_STRIDE = 4  # int8 calibration: every 4th slice of every training case
INT8_BATCH = 8
_WORKING_FOLDER_LOCK = threading.Lock()  # int8_graph changes the process's working folder for a moment


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
    """An ONNX Runtime session on the CPU: a (B, C, n, n) float32 batch in, logits out (numpy).

    The session options were measured (benchmarks/README.md): the default graph optimisation (all levels,
    with the NCHWc layout), one thread per usable core, sequential execution, the memory arena; spinning
    threads and denormals as zero gained nothing, and spinning competed with the post-processing."""

    def __init__(self, onnx_path: Path, precision: str = "fp32"):
        import onnxruntime

        self.precision = precision  # "fp32", or "int8" for a quantised graph
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


def export_onnx_graph(card_path: str | Path, stage: int | None = None) -> ModelCard:
    """Write ``<weights stem>.onnx`` beside the card's verified weights (the graph, reading its weights from
    the safetensors file) and record it in the card, for one stage of a cascade or (``None``) every stage.
    Needs torch and onnx; runs once per model."""
    from .outputs import atomic_output

    missing = [module for module in ("torch", "segmentation_models_pytorch", "safetensors", "onnx") if not importable(module)]
    if missing:
        raise LiverSegInputError(f"exporting the ONNX graph needs {', '.join(missing)}: {GPU_INSTALL_HINT}")
    card_path = Path(card_path)
    card, _ = verify_model(card_path)
    for each_stage in range(1, card.stages + 1) if stage is None else (stage,):
        stage_card = card.stage_card(each_stage)
        weights_path = stage_weights_path(stage_card, card_path)
        graph = graph_on_safetensors(_exported_graph(load_network(stage_card, weights_path), stage_card, constant_folding=False), weights_path)
        onnx_path = weights_path.with_suffix(".onnx")
        with atomic_output(onnx_path, ".onnx") as temporary:
            Path(temporary).write_bytes(graph)
        stage_card.onnx_file, stage_card.onnx_sha256 = onnx_path.name, sha256_of(onnx_path)
        card = card.with_stage(each_stage, stage_card)
    write_card(card, card_path)
    return read_card(card_path)


def _fp32_calibration_graph(model, weights_path: Path):
    """The shipped graph (fp16 weights read from the safetensors file, cast to fp32) as a plain fp32 graph for
    the quantiser, with every BatchNormalization folded into the Conv before it, as ONNX Runtime folds it
    when a session starts. Returns the graph and, per folded weight, the names its value is made of."""
    import onnx
    from onnx import helper, numpy_helper

    data_start, layout = _safetensors_layout(weights_path)
    with open(weights_path, "rb") as stream:
        raw = stream.read()

    def stored(name: str) -> np.ndarray:  # an fp16 tensor of the weights file, as fp32
        begin, end = layout[name]["data_offsets"]
        return np.frombuffer(raw, np.float16, (end - begin) // 2, data_start + begin).reshape(layout[name]["shape"]).astype(np.float32)

    graph = model.graph
    aliases = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Identity"}
    source = lambda name: aliases.get(name, name)  # noqa: E731 - the exporter's deduplicated initializers
    producer = {output: node for node in graph.node for output in node.output}
    folded_into = {producer[node.input[0]].output[0]: node for node in graph.node if node.op_type == "BatchNormalization"}
    recipes, initializers, nodes = {}, [], []
    for node in graph.node:
        if node.op_type in ("Cast", "Identity") and source(node.output[0]) in layout or node.op_type == "BatchNormalization":
            continue  # casts of stored weights become initializers; normalisations are folded below
        node = onnx.NodeProto.FromString(node.SerializeToString())
        if node.op_type == "Conv" and node.output[0] in folded_into:
            norm = folded_into[node.output[0]]
            assert len(node.input) == 2, "a Conv followed by BatchNormalization has no bias"
            epsilon = next(helper.get_attribute_value(a) for a in norm.attribute if a.name == "epsilon")
            weight, gamma, beta, mean, variance = (source(name) for name in (node.input[1], *norm.input[1:]))
            scale = stored(gamma) / np.sqrt(stored(variance) + np.float32(epsilon))
            recipes[f"{weight}::folded"] = ("weight", weight, gamma, variance, epsilon)
            recipes[f"{weight}::folded_bias"] = ("bias", weight, gamma, variance, epsilon, beta, mean)
            initializers += [numpy_helper.from_array(stored(weight) * scale[:, None, None, None], f"{weight}::folded"),
                             numpy_helper.from_array(stored(beta) - stored(mean) * scale, f"{weight}::folded_bias")]
            node.input[1:] = [f"{weight}::folded", f"{weight}::folded_bias"]
            node.output[0] = norm.output[0]
        else:
            for index, name in enumerate(node.input):
                if source(name) in layout:
                    node.input[index] = source(name)
                    if all(i.name != source(name) for i in initializers):
                        initializers.append(numpy_helper.from_array(stored(source(name)), source(name)))
                        recipes[source(name)] = ("plain", source(name))
        nodes.append(node)
    plain = helper.make_model(helper.make_graph(nodes, graph.name, graph.input, graph.output, initializers),
                              opset_imports=model.opset_import, ir_version=model.ir_version)
    return plain, recipes


def _weights_computed_at_start(quantised, shipped, recipes):
    """The quantised graph with each of its int8 weights and int32 biases replaced by nodes that compute it
    from the shipped graph's fp16 tensors (external data in the weights file): the normalisation folded
    again, then QuantizeLinear with the recorded scales (weights), or divided by the bias scale, rounded
    and cast (biases). ONNX Runtime folds these constants when the session starts, so the graph holds no
    weights and the repository keeps one copy of them."""
    from onnx import TensorProto, helper, numpy_helper

    external = {init.name: init for init in shipped.graph.initializer}
    nodes, constants, made = [], [], set()

    def add(op: str, inputs: list[str], output: str, **attributes) -> str:
        if output not in made:
            made.add(output)
            nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def fp32(name: str) -> str:
        return add("Cast", [f"{name}::fp16"], f"{name}::fp32", to=TensorProto.FLOAT)

    def folded_scale(weight: str, gamma: str, variance: str, epsilon: float) -> str:
        if f"{weight}::eps" not in made:
            made.add(f"{weight}::eps")
            constants.append(numpy_helper.from_array(np.array(epsilon, np.float32), f"{weight}::eps"))
        spread = add("Sqrt", [add("Add", [fp32(variance), f"{weight}::eps"], f"{weight}::var_eps")], f"{weight}::std")
        return add("Div", [fp32(gamma), spread], f"{weight}::bn_scale")

    def value(name: str) -> str:  # the float value the quantiser saw under ``name`` (which its graph still uses)
        kind, weight, *rest = recipes[name]
        if kind == "plain":
            return fp32(weight)
        scale = folded_scale(weight, *rest[:3])
        if kind == "weight":
            if "::per_channel" not in made:
                made.add("::per_channel")
                constants.append(numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "::per_channel"))
            return add("Mul", [fp32(weight), add("Reshape", [scale, "::per_channel"], f"{weight}::bn_scale_4d")], f"{name}::value")
        beta, mean = rest[3:]
        return add("Sub", [fp32(beta), add("Mul", [fp32(mean), scale], f"{weight}::mean_scaled")], f"{name}::value")

    dequantised_by = {node.input[0]: node for node in quantised.graph.node if node.op_type == "DequantizeLinear"}
    kept = []
    for init in quantised.graph.initializer:
        dequantise = dequantised_by.get(init.name)
        original = init.name.removesuffix("_quantized")
        if dequantise is None or original not in recipes:
            kept.append(init)  # scales, zero points, activation constants
            continue
        scale, zero_point = dequantise.input[1], dequantise.input[2]
        if init.data_type == TensorProto.INT32:  # bias: zero point 0, scale = input scale × weight scale
            units = add("Div", [value(original), scale], f"{original}::units")
            add("Cast", [add("Round", [units], f"{original}::rounded")], init.name, to=TensorProto.INT32)
        else:
            axis = [helper.get_attribute_value(a) for a in dequantise.attribute if a.name == "axis"]
            add("QuantizeLinear", [value(original), scale, zero_point], init.name, axis=axis[0] if axis else 1)
    used = sorted({node.input[0] for node in nodes if node.input[0].endswith("::fp16")})
    graph = helper.make_graph(nodes + list(quantised.graph.node), "liverseg-int8", quantised.graph.input, quantised.graph.output,
                              [external[name] for name in used] + kept + constants)
    return helper.make_model(graph, opset_imports=quantised.opset_import, ir_version=quantised.ir_version)


def calibration_batches(card: ModelCard, data_root: str | Path, stage: int = 1, stride: int = INT8_SLICE_STRIDE) -> tuple[list[np.ndarray], list[str]]:
    """Network inputs for the int8 calibration of one stage, made as the engine makes them: every
    ``stride``-th slice of each training case of the card (``data_root/cases/NAME/ct.nii.gz``), whole slices
    for stage 1, stage 2's crop around the case's labelled liver (``label.nii.gz``) for stage 2, in
    batches of ``INT8_BATCH``."""
    import SimpleITK as sitk

    from .geometry import canonical_transform
    from .io import read_ct
    from .preprocessing import label_crop, prepare_volume, slice_stack

    stage_card = card.stage_card(stage)
    names = [entry["case"] for entry in card.training.get("cases", [])]
    if not names:
        raise LiverSegInputError("the model card lists no training cases to calibrate the int8 graph on")
    batches = []
    for name in names:
        ct = read_ct(Path(data_root) / "cases" / name / "ct.nii.gz")
        transform = canonical_transform(ct.GetDirection())
        canonical = transform.to_canonical(sitk.GetArrayViewFromImage(ct))
        if stage_card.crop_margin_mm > 0:
            label = transform.to_canonical(sitk.GetArrayFromImage(sitk.ReadImage(str(Path(data_root) / "cases" / name / "label.nii.gz"))))
            canonical = canonical[label_crop(label, transform.canonical_spacing_mm(ct.GetSpacing()), stage_card.crop_margin_mm)]
        volume = prepare_volume(canonical, stage_card.window_hu, stage_card.input_size)
        picked = np.arange(0, len(volume), stride)
        batches += [np.ascontiguousarray(slice_stack(volume, picked[start : start + INT8_BATCH], stage_card.context_slices), dtype=np.float32)
                    for start in range(0, len(picked), INT8_BATCH)]
    return batches, names


def int8_graph(graph_bytes: bytes, weights_path: Path, batches: list[np.ndarray]) -> bytes:
    """The shipped fp32 graph quantised to int8 (QDQ; activations uint8 per tensor, calibrated by min/max on
    ``batches``; weights int8 per output channel, symmetric), reading its weights from the safetensors file
    and quantising them when the session starts (``_weights_computed_at_start``)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    shipped = onnx.load_from_string(graph_bytes)
    plain, recipes = _fp32_calibration_graph(shipped, weights_path)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(batches)

        def get_next(self):
            batch = next(self.remaining, None)
            return None if batch is None else {"slices": batch}

    with tempfile.TemporaryDirectory(prefix="liverseg-int8-") as folder:
        plain_path, inferred, quantised_path = (Path(folder) / name for name in ("plain.onnx", "inferred.onnx", "int8.onnx"))
        onnx.save(plain, plain_path)
        with _WORKING_FOLDER_LOCK:  # the working folder is the process's: two exports in threads take turns
            working_folder = os.getcwd()
            os.chdir(folder)  # where ORT's symbolic shape inference leaves sym_shape_infer_temp.onnx when it fails
            try:
                quant_pre_process(str(plain_path), str(inferred), skip_optimization=True)  # shapes for the quantiser
            finally:
                os.chdir(working_folder)
        quantize_static(str(inferred), str(quantised_path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        quantised = onnx.load(str(quantised_path))
    return _weights_computed_at_start(quantised, shipped, recipes).SerializeToString()


def export_int8_graph(card_path: str | Path, data_root: str | Path, stage: int | None = None) -> ModelCard:
    """Write ``<weights stem>.int8.onnx`` beside the card's verified weights and fp32 graph, for one stage of
    a cascade or (``None``) every stage: the network quantised to int8, calibrated on the card's training
    cases under ``data_root`` (every ``INT8_SLICE_STRIDE``-th slice), reading its weights from the
    safetensors file; record it, its SHA-256 and the calibration in the card. Needs onnx; the same
    onnxruntime version writes the same graph, up to the last bits of its activation scales on another kind of
    CPU (their min/max come from ONNX Runtime's float kernels, which differ by instruction set)."""
    import onnxruntime

    from .outputs import atomic_output

    if not importable("onnx"):
        raise LiverSegInputError(f"exporting the int8 graph needs onnx: {GPU_INSTALL_HINT}")
    card_path = Path(card_path)
    card, _ = verify_model(card_path)
    for each_stage in range(1, card.stages + 1) if stage is None else (stage,):
        stage_card = card.stage_card(each_stage)
        weights_path = stage_weights_path(stage_card, card_path)
        shipped = verify_onnx(stage_card, card_path)
        if shipped is None:
            raise LiverSegInputError(f"{card_path} names no ONNX graph of stage {each_stage} to quantise: run liverseg export-onnx first")
        batches, names = calibration_batches(card, data_root, each_stage)
        graph = int8_graph(shipped.read_bytes(), weights_path, batches)
        onnx_path = weights_path.with_suffix(".int8.onnx")
        with atomic_output(onnx_path, ".onnx") as temporary:
            Path(temporary).write_bytes(graph)
        stage_card.int8_onnx_file, stage_card.int8_onnx_sha256 = onnx_path.name, sha256_of(onnx_path)
        stage_card.int8_calibration = {
            "cases": names, "slice_stride": INT8_SLICE_STRIDE, "slices": int(sum(len(batch) for batch in batches)),
            "activations": "uint8 per tensor, min/max calibration", "weights": "int8 per output channel, symmetric",
            "onnxruntime": onnxruntime.__version__, "weights_sha256": stage_card.weights_sha256,
            "command": "python -c \"from LiverSegLib.runtime import export_int8_graph; export_int8_graph('CARD', 'DATA')\" "
                       "(DATA holds cases/NAME/ct.nii.gz)",
        }
        if each_stage == 2:
            stage_card.int8_calibration["crop"] = "each case's labelled liver, preprocessing.label_crop"
        card = card.with_stage(each_stage, stage_card)
    write_card(card, card_path)
    return read_card(card_path)


def cached_onnx_is_intact(onnx_path: Path) -> bool:
    recorded = onnx_path.with_suffix(".sha256")
    if not (onnx_path.is_file() and recorded.is_file()):
        return False
    return recorded.read_text(encoding="utf-8").strip() == sha256_of(onnx_path)


def load_runtime_networks(
    card_path: str | Path, device: str, runtime: str = "auto", precision: str = "auto"
) -> tuple[ModelCard, list, str]:
    """(card, a network per stage, runtime name) for ``device`` ("cpu", "cuda", "mps"): ONNX Runtime where it
    is the faster choice and can run, else torch. Every stage's weights are verified once (``verify_model``);
    a cascade's stage 2 runs in the runtime stage 1 got.

    ONNX Runtime runs the card's own graph when it has one (no torch at all), else a graph exported into
    the cache; under ``auto`` the torch network runs if the export or the session fails (read-only cache,
    no `onnx`). ``precision`` "auto" runs the card's int8 graph in ONNX Runtime when it has one (2.5 times
    the fp32 speed on the CPU here, liver Dice within 0.001: benchmarks/README.md), "fp32" the fp32 graph.
    """
    if runtime not in RUNTIMES:
        raise LiverSegInputError(f"unknown runtime '{runtime}', choose one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise LiverSegInputError(f"unknown precision '{precision}', choose one of {', '.join(PRECISIONS)}")
    card, _ = verify_model(card_path)
    networks = []
    for stage in range(1, card.stages + 1):
        network, runtime = _stage_network(card.stage_card(stage), card_path, device, runtime, precision)
        networks.append(network)
    return card, networks, runtime


def _stage_network(card: ModelCard, card_path: str | Path, device: str, runtime: str, precision: str) -> tuple[object, str]:
    """(network, runtime name) of one stage's (verified) card: ``load_runtime_networks``' choice."""
    weights_path = stage_weights_path(card, card_path)
    if runtime == "onnxruntime":
        if device != "cpu":
            raise LiverSegInputError(f"--runtime onnxruntime runs on the CPU only; the device is {device}")
        if not onnxruntime_available():
            raise LiverSegInputError("--runtime onnxruntime was asked for but onnxruntime is not installed (pip install onnxruntime)")
    elif not (runtime == "auto" and device == "cpu" and onnxruntime_available()):
        why = "--runtime torch" if runtime == "torch" else (f"the {device} device" if device != "cpu" else "running without onnxruntime")
        return _torch_network(card, weights_path, why), "torch"
    if card.onnx_file or card.int8_onnx_file:
        _safetensors_layout(weights_path)  # the graphs read their weights from there: refuse a cut file clearly
    quantised = verify_int8_onnx(card, card_path) if precision == "auto" else None
    if quantised is not None:
        return OnnxRuntimeNetwork(quantised, "int8"), "onnxruntime"
    shipped = verify_onnx(card, card_path)
    if shipped is not None:
        return OnnxRuntimeNetwork(shipped), "onnxruntime"
    onnx_path = onnx_cache_path(card)
    network = None
    try:
        if not cached_onnx_is_intact(onnx_path):
            if onnx_path.exists():
                log.warning("cached ONNX model %s does not match its recorded SHA-256: exporting it again", onnx_path)
            network = _torch_network(card, weights_path, "a model without an ONNX graph (exported once)")  # unloadable weights fail here
            log.info("preparing the model for ONNX Runtime (first run of this model only): %s", onnx_path)
            export_onnx(network, card, onnx_path)
        return OnnxRuntimeNetwork(onnx_path), "onnxruntime"
    except (OSError, ImportError, RuntimeError) as error:  # read-only cache, no `onnx` to export with
        if runtime == "onnxruntime" and isinstance(error, OSError):
            raise LiverSegInputError(f"cannot write the ONNX model cache under {cache_dir()} ({error.strerror or error}); set LIVERSEG_CACHE to a writable folder") from None
        if runtime == "onnxruntime":
            raise
        log.warning("ONNX Runtime unavailable (%s): running the network with torch", str(error).splitlines()[0])
    return network if network is not None else _torch_network(card, weights_path, "a model without an ONNX graph"), "torch"


def _torch_network(card: ModelCard, weights_path: Path, why: str):
    if not importable("torch"):
        raise LiverSegInputError(f"{why} needs torch, which is not installed: {GPU_INSTALL_HINT}")
    return load_network(card, weights_path)


__all__ = ["OnnxRuntimeNetwork", "cache_dir", "export_int8_graph", "export_onnx_graph", "load_runtime_networks", "onnx_cache_path",
           "onnxruntime_available"]
