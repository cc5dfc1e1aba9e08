"""The two network runtimes on real CT: ONNX Runtime (the CPU default) and torch give the same label
map. The bundled model ships its ONNX graph, which reads its weights from the safetensors file and runs
without torch (checked in a process where torch cannot be imported); a graph or weights that do not match
the card are refused. A model without a graph is exported once into the cache, re-exported when the cache
file is damaged, and run by torch when the cache cannot be written. The CPU runs the model's int8 graph
(also reading its weights from the safetensors file) when the card ships one: within 0.005 liver Dice of
the fp32 graph on every expert case, and reproduced by its export command."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegLib.errors import LiverSegInputError, ModelIntegrityError
from LiverSegLib.model import BUNDLED_CARD, read_card, sha256_of
from LiverSegLib.pipeline import LiverSegmenter
from LiverSegLib.runtime import export_int8_graph, export_onnx_graph, onnx_cache_path

from conftest import EXPERT_CASES, PROJECT_ROOT, read_case

SAMPLE = PROJECT_ROOT / "LiverSeg" / "Resources" / "Samples" / "CRLM-CT-1004.nii.gz"
TORCH_FAMILY = ("torch", "segmentation_models_pytorch", "timm", "torchvision")
# Runs the CLI in a Python where importing torch or its family raises, as on a CPU install without torch.
WITHOUT_TORCH = f"""
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TORCH_FAMILY!r}:
            raise ImportError(name + " is not installed")
sys.meta_path.insert(0, NoTorch())
from LiverSegLib.cli import main
code = main(sys.argv[1:])
print("imported:", sorted(m for m in sys.modules if m.split(".")[0] in {TORCH_FAMILY!r}), file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture()
def card_without_graph(model_copy):
    """A copy of the bundled model whose card names no ONNX graph (an older or user-trained model)."""
    card_path, weights = model_copy
    data = json.loads(card_path.read_text(encoding="utf-8"))
    for name in (data["onnx_file"], data["int8_onnx_file"]):
        (card_path.parent / name).unlink()
    data["onnx_file"] = data["onnx_sha256"] = data["int8_onnx_file"] = data["int8_onnx_sha256"] = ""
    data["int8_calibration"] = {}
    card_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return card_path


def test_onnxruntime_and_torch_agree_on_a_real_ct(data_root, segmenter):
    ct, _ = read_case(data_root, "ircad_17")
    assert (segmenter.runtime, segmenter.precision) == ("onnxruntime", "int8")  # the CPU default with onnxruntime
    fp32 = LiverSegmenter(device="cpu", precision="fp32")
    assert (fp32.runtime, fp32.precision) == ("onnxruntime", "fp32")
    with_onnx = fp32.segment(ct, keep_probabilities=True)
    with_torch = LiverSegmenter(device="cpu", runtime="torch").segment(ct, keep_probabilities=True)
    assert (with_onnx.runtime, with_torch.runtime) == ("onnxruntime", "torch")
    # The CPU path runs the network near the liver only (inference.predict_near_liver): compare where it ran.
    ran = with_onnx.probabilities.reshape(len(with_onnx.probabilities), -1).any(axis=1)
    assert ran.sum() > 0.9 * len(ran)
    assert float(np.abs(with_onnx.probabilities[ran] - with_torch.probabilities[ran]).max()) < 1e-4
    labels_onnx = sitk.GetArrayViewFromImage(with_onnx.label_image)
    labels_torch = sitk.GetArrayViewFromImage(with_torch.label_image)
    # Probabilities equal to 1e-4 can only flip voxels sitting on the threshold: a handful at most.
    assert np.count_nonzero(labels_onnx != labels_torch) <= 20
    assert with_onnx.liver_ml == pytest.approx(with_torch.liver_ml, abs=0.1)
    assert with_onnx.liver_ml > 1000


def test_shipped_graph_is_what_export_onnx_writes_and_holds_no_weights(card_without_graph):
    """The committed graph is reproduced by the export command from the verified weights, and it is small:
    every weight is read from the safetensors file."""
    bundled = read_card()
    card = export_onnx_graph(card_without_graph)
    graph = card_without_graph.parent / card.onnx_file
    assert card.onnx_file == bundled.onnx_file and card.onnx_sha256 == bundled.onnx_sha256 == sha256_of(graph)
    assert graph.stat().st_size < 200_000 < (card_without_graph.parent / card.weights_file).stat().st_size


def dice(first: np.ndarray, second: np.ndarray) -> float:
    return 2 * np.count_nonzero(first & second) / (np.count_nonzero(first) + np.count_nonzero(second))


@pytest.mark.parametrize("case", EXPERT_CASES)
def test_int8_graph_is_within_half_a_hundredth_of_fp32(data_root, segmenter, case):
    """The int8 graph (the CPU default) against the fp32 graph on each expert case: liver Dice against the
    expert label within 0.005 of fp32's, the two liver masks within Dice 0.995 of each other, and the same
    lesions found (the bundled model trained on these patients: a check of the quantisation, not accuracy)."""
    from LiverSegTraining.metrics import lesion_detection

    ct, label = read_case(data_root, case)
    fp32 = LiverSegmenter(device="cpu", precision="fp32")
    results = {"int8": segmenter.segment(ct), "fp32": fp32.segment(ct)}
    assert {name: result.precision for name, result in results.items()} == {"int8": "int8", "fp32": "fp32"}
    truth = sitk.GetArrayViewFromImage(label)
    truth = truth == 1 if case == "ircad_07" else truth  # its 'tumour' label lies outside the liver: not a lesion
    maps = {name: sitk.GetArrayFromImage(result.label_image) for name, result in results.items()}
    liver_dice = {name: dice(found >= 1, truth >= 1) for name, found in maps.items()}
    print(f"\n{case}: liver Dice int8 {liver_dice['int8']:.4f}, fp32 {liver_dice['fp32']:.4f}")
    assert abs(liver_dice["int8"] - liver_dice["fp32"]) <= 0.005
    assert dice(maps["int8"] >= 1, maps["fp32"] >= 1) >= 0.995
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000
    found = {name: lesion_detection(found == 2, truth == 2, voxel_ml) for name, found in maps.items()}
    assert found["int8"]["lesion_detected_count"] == found["fp32"]["lesion_detected_count"]
    # False lesions, 30 mL on ircad_07: within 1 mL or 5 % (int8 convolutions run on other kernels by CPU:
    # 0.5 mL apart on an AVX-512 EPYC, 1.15 mL on an AVX2 one, 2026-11-30)
    false_ml = found["fp32"]["lesion_false_ml"]
    assert abs(found["int8"]["lesion_false_ml"] - false_ml) <= max(1.0, 0.05 * false_ml)
    if (truth == 2).any():
        assert abs(dice(maps["int8"] == 2, truth == 2) - dice(maps["fp32"] == 2, truth == 2)) <= 0.005


def test_shipped_int8_graph_is_what_its_command_writes_and_holds_no_weights(model_copy, data_root):
    """The committed int8 graph is reproduced by export_int8_graph from the verified weights and the card's
    training cases, and it is small: its weights are read from the safetensors file and quantised when the
    session starts. With the onnxruntime version the card records: the same nodes, initializers and zero
    points, the activation scales equal up to float rounding (their calibration min/max come from ONNX
    Runtime's float kernels, which differ by instruction set: bit for bit on the AVX-512 EPYC that made it,
    within 3.3e-7 relative on an AVX2 one)."""
    import onnx
    import onnxruntime
    from onnx import numpy_helper

    card_path, weights = model_copy
    bundled = read_card()
    graph = onnx.load(str(BUNDLED_CARD.parent / bundled.int8_onnx_file), load_external_data=False).graph
    inside = [init for init in graph.initializer if init.data_location != onnx.TensorProto.EXTERNAL]
    assert max(int(np.prod(init.dims)) for init in inside) <= 512  # scales and zero points, one per channel at most
    assert {node.op_type for node in graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    assert (BUNDLED_CARD.parent / bundled.int8_onnx_file).stat().st_size < 400_000
    (card_path.parent / bundled.int8_onnx_file).unlink()
    card = export_int8_graph(card_path, data_root)
    assert card.int8_calibration == {**bundled.int8_calibration, "onnxruntime": onnxruntime.__version__}
    assert card.int8_onnx_sha256 == sha256_of(card_path.parent / card.int8_onnx_file)
    if onnxruntime.__version__ == bundled.int8_calibration["onnxruntime"]:
        written = onnx.load(str(card_path.parent / card.int8_onnx_file), load_external_data=False).graph
        assert [(n.op_type, list(n.input), list(n.output)) for n in written.node] == [(n.op_type, list(n.input), list(n.output)) for n in graph.node]
        shipped_values = {init.name: init for init in graph.initializer}
        assert sorted(shipped_values) == sorted(init.name for init in written.initializer)
        for init in written.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                assert shipped_values[init.name].data_location == onnx.TensorProto.EXTERNAL
                continue
            value, shipped_value = numpy_helper.to_array(init), numpy_helper.to_array(shipped_values[init.name])
            if np.issubdtype(value.dtype, np.floating):
                np.testing.assert_allclose(value, shipped_value, rtol=1e-5, atol=0, err_msg=init.name)
            else:
                assert np.array_equal(value, shipped_value), init.name


def test_segments_without_torch_installed(data_root, tmp_path):
    """The CPU path in a Python where torch, segmentation-models-pytorch, timm and torchvision cannot be
    imported: ircad_17 is segmented (a pipeline check: it is a training patient, not an accuracy figure)."""
    output = tmp_path / "ircad_17.nii.gz"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, "segment", str(data_root / "cases" / "ircad_17" / "ct.nii.gz"), "-o", str(output), "--device", "cpu"],
        capture_output=True, text=True, env=os.environ.copy(),
    )
    assert done.returncode == 0, done.stderr
    assert "imported: []" in done.stderr and "(onnxruntime int8)" in done.stdout
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(output))) >= 1
    truth = sitk.GetArrayFromImage(read_case(data_root, "ircad_17")[1]) >= 1
    assert 2 * np.count_nonzero(predicted & truth) / (predicted.sum() + truth.sum()) >= 0.90


@pytest.mark.parametrize(("arguments", "message"), [
    (["--device", "cuda"], "--device cuda needs torch, which is not installed: pip install 'liverseg[gpu]'"),
    (["--runtime", "torch"], "--runtime torch needs torch, which is not installed: pip install 'liverseg[gpu]'"),
])
def test_without_torch_what_needs_it_says_how_to_get_it(tmp_path, arguments, message):
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "segment", str(SAMPLE), "-o", str(tmp_path / "x.nii.gz"), *arguments],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith(f"liverseg: error: {message}")
    assert not (tmp_path / "x.nii.gz").exists()


def test_without_torch_the_export_command_says_what_it_needs(card_without_graph):
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "export-onnx", "--model", str(card_without_graph)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith("liverseg: error: exporting the ONNX graph needs torch")
    assert not (card_without_graph.parent / "liverseg.onnx").exists()


def test_tampered_graph_or_weights_are_refused(model_copy):
    card_path, weights = model_copy
    for name, precision in ((read_card(card_path).onnx_file, "fp32"), (read_card(card_path).int8_onnx_file, "auto")):
        graph = card_path.parent / name
        original = graph.read_bytes()
        graph.write_bytes(original[:-10] + bytes(10))
        with pytest.raises(ModelIntegrityError, match=f"{name} fails its SHA-256 check"):
            LiverSegmenter(card_path, device="cpu", precision=precision)
        graph.write_bytes(original)
    data = json.loads(card_path.read_text(encoding="utf-8"))
    data["int8_calibration"]["weights_sha256"] = "0" * 64  # calibrated for other weights
    card_path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelIntegrityError, match="liverseg.int8.onnx was made for other weights"):
        LiverSegmenter(card_path, device="cpu")
    assert LiverSegmenter(card_path, device="cpu", precision="fp32").precision == "fp32"  # the fp32 graph is not its business
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    for runtime in ("auto", "onnxruntime", "torch"):
        with pytest.raises(ModelIntegrityError, match="SHA-256"):
            LiverSegmenter(card_path, device="cpu", runtime=runtime)


def test_a_model_without_graph_is_exported_once_into_the_cache(card_without_graph, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LIVERSEG_CACHE", str(tmp_path / "cache"))
    card = read_card(card_without_graph)
    with caplog.at_level(logging.INFO, logger="LiverSegLib.runtime"):
        assert LiverSegmenter(card_without_graph, device="cpu").runtime == "onnxruntime"
    assert "preparing the model for ONNX Runtime (first run of this model only)" in caplog.text
    onnx_path = onnx_cache_path(card)
    good = onnx_path.read_bytes()
    onnx_path.write_bytes(good[:-1000] + b"\0" * 1000)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="LiverSegLib.runtime"):
        segmenter = LiverSegmenter(card_without_graph, device="cpu")
    assert "does not match its recorded SHA-256" in caplog.text
    assert onnx_path.read_bytes() == good and segmenter.runtime == "onnxruntime"


def test_unusable_cache_falls_back_to_torch(card_without_graph, tmp_path, monkeypatch, caplog):
    """A cache path that cannot be a folder (here a file) costs speed, not the segmentation."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    monkeypatch.setenv("LIVERSEG_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger="LiverSegLib.runtime"):
        segmenter = LiverSegmenter(card_without_graph, device="cpu")
    assert segmenter.runtime == "torch" and "running the network with torch" in caplog.text
    with pytest.raises(LiverSegInputError, match="cannot write the ONNX model cache under .*not-a-folder"):
        LiverSegmenter(card_without_graph, device="cpu", runtime="onnxruntime")
    assert LiverSegmenter(BUNDLED_CARD, device="cpu").runtime == "onnxruntime"  # a shipped graph needs no cache


def test_unknown_runtime_or_precision_is_an_input_error():
    with pytest.raises(LiverSegInputError, match="unknown runtime 'tensorrt'"):
        LiverSegmenter(device="cpu", runtime="tensorrt")
    with pytest.raises(LiverSegInputError, match="unknown precision 'fp8'"):
        LiverSegmenter(device="cpu", precision="fp8")


def test_cli_says_when_it_prepares_the_onnx_model(card_without_graph, tmp_path, monkeypatch, capsys):
    """The one-time export is announced on stderr; the next run is silent about it."""
    from LiverSegLib.cli import main

    monkeypatch.setenv("LIVERSEG_CACHE", str(tmp_path / "cache"))
    argv = ["segment", str(SAMPLE), "-o", str(tmp_path / "liver.nii.gz"), "--no-lesions", "--model", str(card_without_graph)]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "liverseg: preparing the model for ONNX Runtime (first run of this model only)" in first.err
    assert "(onnxruntime fp32)" in first.out  # a card without graphs has no int8 one either
    argv[3] = str(tmp_path / "again.nii.gz")
    assert main(argv) == 0
    assert "preparing the model" not in capsys.readouterr().err
