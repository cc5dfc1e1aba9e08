"""The two network runtimes on real CT: ONNX Runtime (the CPU default) and torch give the same label
map; the ONNX file is exported once into the cache, reused without importing segmentation-models-pytorch,
re-exported when it is damaged, and never lets tampered weights through."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegLib.errors import LiverSegInputError, ModelIntegrityError
from LiverSegLib.model import read_card
from LiverSegLib.pipeline import LiverSegmenter
from LiverSegLib.runtime import onnx_cache_path

from conftest import PROJECT_ROOT, read_case

SAMPLE = PROJECT_ROOT / "LiverSeg" / "Resources" / "Samples" / "CRLM-CT-1004.nii.gz"


def test_onnxruntime_and_torch_agree_on_a_real_ct(data_root, segmenter):
    ct, _ = read_case(data_root, "ircad_17")
    assert segmenter.runtime == "onnxruntime"  # the CPU default once onnxruntime is installed
    with_onnx = segmenter.segment(ct, keep_probabilities=True)
    with_torch = LiverSegmenter(device="cpu", runtime="torch").segment(ct, keep_probabilities=True)
    assert (with_onnx.runtime, with_torch.runtime) == ("onnxruntime", "torch")
    assert float((with_onnx.probabilities - with_torch.probabilities).abs().max()) < 1e-4
    labels_onnx = sitk.GetArrayViewFromImage(with_onnx.label_image)
    labels_torch = sitk.GetArrayViewFromImage(with_torch.label_image)
    # Probabilities equal to 1e-4 can only flip voxels sitting on the threshold: a handful at most.
    assert np.count_nonzero(labels_onnx != labels_torch) <= 20
    assert with_onnx.liver_ml == pytest.approx(with_torch.liver_ml, abs=0.1)
    assert with_onnx.liver_ml > 1000


def test_cached_model_is_reused_without_importing_smp(segmenter):
    """A second process finds the export and segments the sample without segmentation-models-pytorch."""
    assert onnx_cache_path(read_card()).is_file()
    code = (
        "import sys; from LiverSegLib.io import read_ct; from LiverSegLib.pipeline import LiverSegmenter;"
        f"r = LiverSegmenter(device='cpu').segment(read_ct({str(SAMPLE)!r}));"
        "print(r.runtime, round(r.liver_ml), 'segmentation_models_pytorch' in sys.modules, 'timm' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(), check=True)
    runtime, liver_ml, smp_imported, timm_imported = done.stdout.split()
    assert (runtime, smp_imported, timm_imported) == ("onnxruntime", "False", "False")
    assert 800 < int(liver_ml) < 3500  # an adult liver: CRLM-CT-1004 covers it whole


def test_damaged_cache_is_exported_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LIVERSEG_CACHE", str(tmp_path / "cache"))
    card = read_card()
    LiverSegmenter(device="cpu")
    onnx_path = onnx_cache_path(card)
    good = onnx_path.read_bytes()
    onnx_path.write_bytes(good[:-1000] + b"\0" * 1000)
    with caplog.at_level(logging.WARNING, logger="LiverSegLib.runtime"):
        segmenter = LiverSegmenter(device="cpu")
    assert "does not match its recorded SHA-256" in caplog.text
    assert onnx_path.read_bytes() == good and segmenter.runtime == "onnxruntime"


def test_tampered_weights_are_refused_even_with_a_cached_export(model_copy, segmenter):
    """The ONNX cache is keyed by the card's hash; the weights are still checked on every load."""
    card, weights = model_copy
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    for runtime in ("auto", "onnxruntime", "torch"):
        with pytest.raises(ModelIntegrityError, match="SHA-256"):
            LiverSegmenter(card, device="cpu", runtime=runtime)


def test_unusable_cache_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    """A cache path that cannot be a folder (here a file) costs speed, not the segmentation."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    monkeypatch.setenv("LIVERSEG_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger="LiverSegLib.runtime"):
        segmenter = LiverSegmenter(device="cpu")
    assert segmenter.runtime == "torch" and "running the network with torch" in caplog.text
    with pytest.raises(LiverSegInputError, match="cannot write the ONNX model cache under .*not-a-folder"):
        LiverSegmenter(device="cpu", runtime="onnxruntime")


def test_unknown_runtime_is_an_input_error():
    with pytest.raises(LiverSegInputError, match="unknown runtime 'tensorrt'"):
        LiverSegmenter(device="cpu", runtime="tensorrt")


def test_cli_says_when_it_prepares_the_onnx_model(tmp_path, monkeypatch, capsys):
    """The one-time export is announced on stderr; the next run is silent about it."""
    from LiverSegLib.cli import main

    monkeypatch.setenv("LIVERSEG_CACHE", str(tmp_path / "cache"))
    argv = ["segment", str(SAMPLE), "-o", str(tmp_path / "liver.nii.gz"), "--no-lesions"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "liverseg: preparing the model for ONNX Runtime (first run of this model only)" in first.err
    assert "(onnxruntime)" in first.out
    assert main(argv[:3] + [str(tmp_path / "again.nii.gz"), "--no-lesions"]) == 0
    assert "preparing the model" not in capsys.readouterr().err
