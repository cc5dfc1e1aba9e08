"""The training package on real cases: every data layout's reader, a two-cycle run that exports a
loadable model and its plots, exact resume, and cross-validation by patient."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LiverSegLib.errors import LiverSegInputError
from LiverSegLib.pipeline import LiverSegmenter
from LiverSegTraining.cli import train_main
from LiverSegTraining.config import load_config
from LiverSegTraining.data import prepare_case
from LiverSegTraining.sources import discover
from LiverSegTraining.train import train

from conftest import read_case

TINY = [
    "--set", "model.input_size=64",
    "--set", "schedule.cycles=2",
    "--set", "schedule.epochs_per_cycle=1",
    "--set", "schedule.steps_per_epoch=2",
    "--set", "schedule.batch_size=4",
    "--set", "threads=2",
]


def write_dicom_series(image: sitk.Image, folder, series_uid: str) -> None:
    """One DICOM file per slice, named like 3D-IRCADb (image_0, image_1, ...)."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # IRCAD files have no extension to pick the format from
    direction = image.GetDirection()
    for index in range(image.GetDepth()):
        slice_image = image[:, :, index]
        position = image.TransformIndexToPhysicalPoint((0, 0, index))
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.8.498.1",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{index + 1}",
            "0020|0013": str(index + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])),
            "0018|0050": f"{image.GetSpacing()[2]:.4f}",
        }.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"image_{index}"))
        writer.Execute(slice_image)


def test_ircad_dicom_layout_reader(data_root, tmp_path):
    ct, label = read_case(data_root, "ircad_01")
    z = int((sitk.GetArrayViewFromImage(label) == 2).sum((1, 2)).argmax())
    ct, label = ct[:, :, z - 4 : z + 4], label[:, :, z - 4 : z + 4]  # a slab through the largest tumour
    patient = tmp_path / "3Dircadb1.1"
    write_dicom_series(ct, patient / "PATIENT_DICOM", "1.2.826.0.1.3680043.8.498.10")
    write_dicom_series(sitk.Cast((label >= 1) * 255, sitk.sitkUInt8), patient / "MASKS_DICOM" / "liver", "1.2.826.0.1.3680043.8.498.11")
    write_dicom_series(sitk.Cast((label == 2) * 255, sitk.sitkUInt8), patient / "MASKS_DICOM" / "livertumor01", "1.2.826.0.1.3680043.8.498.12")
    (case,) = discover("ircad", tmp_path)
    assert case.name == "ircad_01" and case.is_expert and case.has_lesion_label
    loaded_ct, loaded_label = case.load()
    assert np.array_equal(sitk.GetArrayViewFromImage(loaded_ct), sitk.GetArrayViewFromImage(ct))
    assert np.array_equal(loaded_label, sitk.GetArrayViewFromImage(label))
    assert (loaded_label == 2).any()


@pytest.mark.parametrize("layout", ["lits", "msd"])
def test_nifti_challenge_layouts(data_root, tmp_path, layout):
    ct, label = read_case(data_root, "totalseg_example_sm_MODEL")
    if layout == "lits":
        sitk.WriteImage(ct, str(tmp_path / "volume-7.nii"))
        sitk.WriteImage(label, str(tmp_path / "segmentation-7.nii"))
        expected_name = "lits_7"
    else:
        (tmp_path / "imagesTr").mkdir()
        (tmp_path / "labelsTr").mkdir()
        sitk.WriteImage(ct, str(tmp_path / "imagesTr" / "liver_7.nii.gz"))
        sitk.WriteImage(label, str(tmp_path / "labelsTr" / "liver_7.nii.gz"))
        expected_name = "msd_7"
    (case,) = discover(layout, tmp_path)
    loaded_ct, loaded_label = case.load()
    assert case.name == expected_name
    assert np.array_equal(loaded_label, sitk.GetArrayViewFromImage(label))
    assert np.array_equal(sitk.GetArrayViewFromImage(loaded_ct), sitk.GetArrayViewFromImage(ct))


def test_slice_set_layout_png_and_npy(data_root, tmp_path):
    ct, label = read_case(data_root, "dcmqi_ct3slice")
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    mask = sitk.GetArrayFromImage(label)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for z in range(hu.shape[0]):
        np.save(tmp_path / "images" / f"p1_{z}.npy", hu[z])
        np.save(tmp_path / "masks" / f"p1_{z}.npy", mask[z])
        png = np.clip((hu[z] + 250) / 500 * 255, 0, 255).round().astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(png), str(tmp_path / "images" / f"p2_{z}.png"))
        sitk.WriteImage(sitk.GetImageFromArray((mask[z] * 255).astype(np.uint8)), str(tmp_path / "masks" / f"p2_{z}.png"))
    cases = {c.name: c for c in discover("slices", tmp_path)}
    assert set(cases) == {"slices_p1", "slices_p2"}
    npy_ct, npy_label = cases["slices_p1"].load()
    assert np.array_equal(sitk.GetArrayViewFromImage(npy_ct), hu) and np.array_equal(npy_label, mask)
    png_ct, png_label = cases["slices_p2"].load()
    inside = (hu > -250) & (hu < 250)
    assert np.abs(sitk.GetArrayViewFromImage(png_ct)[inside] - hu[inside]).max() <= 1.0  # 500 HU / 255 levels
    assert np.array_equal(png_label, mask)


def test_unknown_layout_and_missing_folder(tmp_path):
    with pytest.raises(LiverSegInputError, match="unknown data layout"):
        discover("kaggle", tmp_path)
    with pytest.raises(LiverSegInputError, match="does not exist"):
        discover("cases", tmp_path / "nothing")


def tiny_config(tmp_path, data_root, extra=()):
    overrides = [o for o in TINY if o != "--set"] + [
        f"data=[{{layout = 'cases', path = '{data_root / 'cases'}'}}]",
        f"cache_dir='{tmp_path / 'cache'}'",
        "split.weak_train=['dcmqi_ct3slice', 'totalseg_example_sm_MODEL']",
        "split.val=['totalseg_example_dicom_MODEL']",
        "split.exclude=['ircad_01', 'ircad_07', 'ircad_17']",
        *extra,
    ]
    return overrides


def test_two_cycle_training_exports_a_loadable_model_and_plots(data_root, tmp_path):
    output = tmp_path / "run"
    overrides = tiny_config(tmp_path, data_root)
    argv = ["LiverSegTraining/configs/bundled.toml", "--output", str(output)]
    for override in overrides:
        argv += ["--set", override]
    from conftest import PROJECT_ROOT

    argv[0] = str(PROJECT_ROOT / argv[0])
    assert train_main(argv) == 0
    history = json.loads((output / "final" / "history.json").read_text(encoding="utf-8"))
    assert [(h["cycle"], h["epoch"]) for h in history] == [(0, 0), (1, 0)]
    # The learning rate restarts at the cycle boundary: both epochs end at the same point of the cosine.
    assert history[0]["lr"] == pytest.approx(history[1]["lr"])
    for plot in ("loss.png", "dice.png", "panel_totalseg_example_dicom_MODEL.png"):
        assert (output / "final" / plot).stat().st_size > 5000, plot
    card_path = output / "model" / "liverseg.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    assert card["input_size"] == 64 and len(card["weights_sha256"]) == 64
    assert {c["case"] for c in card["training"]["cases"]} == {"dcmqi_ct3slice", "totalseg_example_sm_MODEL"}
    ct, _ = read_case(data_root, "dcmqi_ct3slice")
    result = LiverSegmenter(card_path, device="cpu").segment(ct)
    assert result.label_image.GetSize() == ct.GetSize()


def test_resume_continues_exactly(data_root, tmp_path):
    overrides = tiny_config(tmp_path, data_root, ["split.val=[]"])
    config = load_config(None, overrides)
    card = config.card()
    cases = [c for c in discover("cases", data_root / "cases") if c.name in ("dcmqi_ct3slice", "totalseg_example_sm_MODEL")]
    prepared = [prepare_case(c, card, tmp_path / "cache") for c in cases]
    straight = train(config, prepared, [], tmp_path / "straight")
    train(config, prepared, [], tmp_path / "interrupted", max_epochs=1)
    resumed = train(config, prepared, [], tmp_path / "interrupted", resume=True)
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in straight.history]
    for name, tensor in straight.network.state_dict().items():
        assert torch.equal(tensor, resumed.network.state_dict()[name]), name


def test_cross_validation_by_patient(data_root, tmp_path):
    """Leave-one-patient-out over two expert cases: each fold tests on the patient it did not train on."""
    from LiverSegTraining.runner import crossvalidate

    overrides = tiny_config(tmp_path, data_root, ["split.exclude=['ircad_07']", "split.weak_train=[]", "split.val=[]"])
    config = load_config(None, overrides)
    rows, summary = crossvalidate(config, tmp_path / "cv")
    assert [r["case"] for r in rows] == ["ircad_01", "ircad_17"]
    assert [r["trained_on"] for r in rows] == ["ircad_17", "ircad_01"]
    assert all(0.0 <= r["liver_dice"] <= 1.0 and "lesion_dice" in r for r in rows)
    assert (tmp_path / "cv" / "crossval.csv").read_text(encoding="utf-8").count("\n") == 3
    assert "lesions_validated" in summary


def _liver_slice(data_root, input_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The model-grid slice of ircad_01 with the most liver: (1, 1, n, n) image and (1, 2, n, n) masks."""
    from LiverSegLib.model import ModelCard

    (case,) = [c for c in discover("cases", data_root / "cases") if c.name == "ircad_01"]
    prepared = prepare_case(case, ModelCard(input_size=input_size))
    index = int(prepared.masks[:, 0].flatten(1).sum(1).argmax())
    return prepared.image[index].float()[None, None], prepared.masks[index].float()[None]


def test_augmentation_moves_image_and_masks_together(data_root):
    """With intensity changes off, the augmented liver mask still outlines the augmented liver: the
    image, pushed through the same affine + elastic warp, keeps its HU inside the warped mask."""
    from LiverSegTraining.augment import AugmentConfig, augment_batch

    image, masks = _liver_slice(data_root)
    liver_mean = float(image[masks[:, :1] > 0].mean())
    config = AugmentConfig(probability=1.0, crop_probability=1.0, elastic_probability=1.0, elastic_magnitude=0.04,
                           gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=0.0, noise_std=0.0, flip_z_probability=0.0)
    generator = torch.Generator().manual_seed(3)
    images, warped = augment_batch(image.repeat(8, 1, 1, 1), masks.repeat(8, 1, 1, 1), config, generator)
    # Every sample is warped differently ...
    assert all(not torch.equal(warped[0], warped[k]) for k in range(1, 8))
    assert set(torch.unique(warped).tolist()) <= {0.0, 1.0}
    for k in range(8):
        liver = warped[k, 0] > 0
        assert liver.sum() > 200
        # ... and the image inside each warped mask is still liver (mean within 0.03 of the original's,
        # on a [0, 1] window of 500 HU, i.e. 15 HU).
        assert abs(float(images[k, 0][liver].mean()) - liver_mean) < 0.03
        # Lesions stay inside the liver.
        assert not bool((warped[k, 1] > (warped[k, 0])).any())


def test_elastic_displacement_is_smooth_and_off_by_default():
    from LiverSegTraining.augment import AugmentConfig, random_displacements

    generator = torch.Generator().manual_seed(0)
    assert AugmentConfig().elastic_probability == 0.0
    assert torch.count_nonzero(random_displacements(4, 64, AugmentConfig(), generator)) == 0
    field = random_displacements(4, 64, AugmentConfig(elastic_probability=1.0, elastic_magnitude=0.03), generator)
    assert field.shape == (4, 64, 64, 2)
    # Control-point shifts have a standard deviation of 0.06 in [-1, 1] units (3 % of the side) ...
    assert 0.02 < float(field.std()) < 0.1
    # ... and neighbouring pixels never move more than half a pixel apart (2/64 is one pixel), so the
    # warp cannot fold even where the random control points are extreme.
    for size in (64, 128):
        field = random_displacements(64, size, AugmentConfig(elastic_probability=1.0, elastic_magnitude=0.05), generator)
        steepest = max(float(field.diff(dim=1).abs().max()), float(field.diff(dim=2).abs().max()))
        assert 0.3 * (2 / size) < steepest <= 0.5 * (2 / size) + 1e-6


def test_crossval_folds_option(data_root, tmp_path, capsys):
    """--folds holds out only the named cases and trains no final model; an unknown name is refused."""
    argv = ["--crossval", "--folds", "ircad_17", "--output", str(tmp_path / "cv")]
    for override in tiny_config(tmp_path, data_root, ["split.exclude=['ircad_07']", "split.weak_train=[]", "split.val=[]"]):
        argv += ["--set", override]
    from conftest import PROJECT_ROOT

    config_path = str(PROJECT_ROOT / "LiverSegTraining/configs/bundled.toml")
    assert train_main([config_path, *argv]) == 0
    assert sorted(p.name for p in (tmp_path / "cv").iterdir() if p.is_dir()) == ["fold_ircad_17"]
    assert "| ircad_17 |" in (tmp_path / "cv" / "RESULTS.md").read_text(encoding="utf-8")
    assert train_main([config_path, *argv[:2], "ircad_99", *argv[3:]]) == 2
    assert "ircad_99" in capsys.readouterr().err
    assert train_main([config_path, "--folds", "ircad_17"]) == 2
