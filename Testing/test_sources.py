"""Every data layout's reader (LiverSegTraining/sources.py) on real cases: the public 3D-IRCADb DICOM
folders, LiTS and MSD NIfTI, 2D slice sets (PNG and NumPy), and the refusals of an unknown layout or
a missing folder."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegLib.errors import LiverSegInputError
from LiverSegTraining.sources import discover

from conftest import read_case


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
