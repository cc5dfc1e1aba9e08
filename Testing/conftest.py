"""Shared fixtures. Real data comes from $LIVERSEG_DATA (default ../shared/data); a missing data folder
fails the tests that need it instead of skipping them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import SimpleITK as sitk

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXPERT_CASES = ("ircad_01", "ircad_07", "ircad_17")


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("LIVERSEG_DATA", PROJECT_ROOT.parent / "shared" / "data"))
    if not (root / "cases").is_dir():
        pytest.fail(f"real test data not found at {root} (set LIVERSEG_DATA)")
    return root


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """The ONNX export cache of this test session (tests never touch the user's ~/.cache/liverseg)."""
    cache = tmp_path_factory.mktemp("liverseg-cache")
    os.environ["LIVERSEG_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def segmenter(model_cache):
    from LiverSegLib.pipeline import LiverSegmenter

    return LiverSegmenter(device="cpu")


@pytest.fixture()
def model_copy(tmp_path) -> tuple[Path, Path]:
    """(card, weights) of a copy of the bundled model (its ONNX graphs beside them), for tests that damage it."""
    from LiverSegLib.model import BUNDLED_CARD, read_card

    folder = tmp_path / "model"
    folder.mkdir()
    card = read_card()
    shutil.copy(BUNDLED_CARD, folder / BUNDLED_CARD.name)
    for name in (card.weights_file, card.onnx_file, card.int8_onnx_file):
        shutil.copy(BUNDLED_CARD.parent / name, folder / name)
    return folder / BUNDLED_CARD.name, folder / card.weights_file


def read_case(data_root: Path, name: str) -> tuple[sitk.Image, sitk.Image]:
    folder = data_root / "cases" / name
    if not folder.is_dir():
        pytest.fail(f"case {name} missing from {data_root}")
    return sitk.ReadImage(str(folder / "ct.nii.gz")), sitk.ReadImage(str(folder / "label.nii.gz"))


def tiny_config(tmp_path: Path, data_root: Path, extra: Sequence[str] = ()) -> list[str]:
    """``--set`` overrides (without the flag) of a training small enough for a 2-core CI runner: a
    64-px network, two one-epoch cycles of two steps, on the small weak-label cases; ``extra`` last wins.
    Shared by the training tests (test_train.py) and the cross-validation tests (test_runner.py)."""
    return [
        "model.input_size=64",
        "schedule.cycles=2",
        "schedule.epochs_per_cycle=1",
        "schedule.steps_per_epoch=2",
        "schedule.batch_size=4",
        "threads=2",
        f"data=[{{layout = 'cases', path = '{data_root / 'cases'}'}}]",
        f"cache_dir='{tmp_path / 'cache'}'",
        "split.weak_train=['dcmqi_ct3slice', 'totalseg_example_sm_MODEL']",
        "split.val=['totalseg_example_dicom_MODEL']",
        "split.exclude=['ircad_01', 'ircad_07', 'ircad_17']",
        *extra,
    ]
