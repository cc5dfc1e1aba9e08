"""The reader: DICOM folders sorted by position (not name), several series, and checks on bad volumes."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegLib.errors import LiverSegInputError
from LiverSegLib.io import check_ct, list_dicom_series, read_ct


def shuffled_copy(source, target, seed=0):
    """Copy a DICOM series with file names that sort in a scrambled slice order."""
    target.mkdir(parents=True)
    files = sorted(p for p in source.iterdir() if p.is_file())
    names = [f"img{n:03d}" for n in range(len(files))]
    random.Random(seed).shuffle(names)
    for name, path in zip(names, files):
        shutil.copy(path, target / name)
    return target


def test_dicom_folder_out_of_name_order_equals_its_nifti(data_root, tmp_path):
    folder = shuffled_copy(data_root / "dicom" / "crlm_1004_ct", tmp_path / "crlm")
    from_dicom = read_ct(folder)
    from_nifti = read_ct(data_root / "unlabelled" / "CRLM-CT-1004" / "ct.nii.gz")
    assert from_dicom.GetSize() == from_nifti.GetSize()
    assert np.allclose(from_dicom.GetSpacing(), from_nifti.GetSpacing(), atol=1e-4)
    assert np.allclose(from_dicom.GetOrigin(), from_nifti.GetOrigin(), atol=1e-3)
    assert np.allclose(from_dicom.GetDirection(), from_nifti.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(from_dicom), sitk.GetArrayViewFromImage(from_nifti))


def test_dicom_and_nifti_segment_identically(data_root, tmp_path, segmenter):
    folder = shuffled_copy(data_root / "dicom" / "crlm_1004_ct", tmp_path / "crlm", seed=3)
    from_dicom = segmenter.segment(read_ct(folder))
    from_nifti = segmenter.segment(read_ct(data_root / "unlabelled" / "CRLM-CT-1004" / "ct.nii.gz"))
    assert from_dicom.liver_ml > 100
    assert np.array_equal(sitk.GetArrayViewFromImage(from_dicom.label_image), sitk.GetArrayViewFromImage(from_nifti.label_image))


def test_two_series_in_one_folder_need_a_choice(data_root, tmp_path):
    study = tmp_path / "study"
    shuffled_copy(data_root / "dicom" / "crlm_1004_ct", study / "a")
    shutil.copytree(data_root / "dicom" / "dcmqi_ct3slice" / "CT", study / "b")
    for path in list((study / "b").iterdir()) + list((study / "a").iterdir()):
        path.rename(study / f"{path.parent.name}_{path.name}")
    series = list_dicom_series(study)
    assert sorted(len(s.files) for s in series) == [3, 41]
    with pytest.raises(LiverSegInputError, match="holds 2 DICOM CT series"):
        read_ct(study)
    chosen = next(s for s in series if len(s.files) == 3)
    assert read_ct(study, chosen.uid).GetSize()[2] == 3
    with pytest.raises(LiverSegInputError, match="not found"):
        read_ct(study, "1.2.3.4")


@pytest.mark.parametrize(
    "image, message",
    [
        (sitk.Image([32, 32], sitk.sitkInt16), "2D image"),
        (sitk.Image([8, 8, 8, 3], sitk.sitkInt16), "4D image"),
        (sitk.Image([32, 32, 1], sitk.sitkInt16), "single slice"),
        (sitk.Image([16, 16, 16], sitk.sitkInt16), "empty"),
        (sitk.Image([16, 16, 16], sitk.sitkVectorFloat32, 3), "channels"),
    ],
)
def test_volumes_that_are_not_ct_are_refused(image, message):
    with pytest.raises(LiverSegInputError, match=message):
        check_ct(image, "test")


def test_label_map_as_input_is_refused(data_root):
    with pytest.raises(LiverSegInputError, match="label map"):
        read_ct(data_root / "cases" / "ircad_17" / "label.nii.gz")


def test_nan_and_infinite_voxels_are_read_as_air(data_root):
    ct = sitk.Cast(sitk.ReadImage(str(data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz")), sitk.sitkFloat32)
    voxels = sitk.GetArrayFromImage(ct)
    voxels[3, 4, 5], voxels[6, 7, 8], voxels[9, 10, 11] = np.nan, np.inf, -np.inf
    damaged = sitk.GetImageFromArray(voxels)
    damaged.CopyInformation(ct)
    with pytest.warns(UserWarning, match=r"3 voxels \(0.00081 %\) are NaN or infinite; they are read as air \(-1024 HU\)"):
        checked = sitk.GetArrayFromImage(check_ct(damaged, "damaged"))
    assert checked[3, 4, 5] == checked[6, 7, 8] == checked[9, 10, 11] == -1024
    untouched = np.isfinite(voxels)
    assert np.array_equal(checked[untouched], voxels[untouched])
    voxels[:] = np.nan
    all_nan = sitk.GetImageFromArray(voxels)
    with pytest.raises(LiverSegInputError, match="holds no finite value"):
        check_ct(all_nan, "all-nan")


def test_study_folder_with_reformat_and_subfolders(data_root, tmp_path):
    """Two real series in nested folders plus a single-slice reformat made from a real slice: the
    reformat is dropped, the two series are listed, --series picks one."""
    import pydicom

    study = tmp_path / "study"
    shutil.copytree(data_root / "dicom" / "crlm_1004_ct", study / "ct" / "series_a")
    shutil.copytree(data_root / "dicom" / "totalseg_example" / "CT_uidfixed", study / "other" / "deeper")
    reformat = pydicom.dcmread(sorted((data_root / "dicom" / "crlm_1004_ct").iterdir())[10])
    reformat.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.777"
    reformat.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal reformat of one slice
    reformat.save_as(study / "reformat.dcm")
    (study / "notes.txt").write_text("not DICOM", encoding="utf-8")
    series = list_dicom_series(study)
    assert sorted(len(s.files) for s in series) == [20, 41]
    with pytest.raises(LiverSegInputError, match="holds 2 DICOM CT series"):
        read_ct(study)
    assert read_ct(study, "2").GetSize() == (512, 512, 41)


def test_missing_slice_is_reported_not_interpolated(data_root, tmp_path):
    folder = shuffled_copy(data_root / "dicom" / "crlm_1004_ct", tmp_path / "gap")
    series = list_dicom_series(folder)[0]
    Path(series.files[20]).unlink()
    with pytest.raises(LiverSegInputError, match="missing slice"):
        read_ct(folder)


def test_localizer_and_non_ct_objects_are_not_series(data_root, tmp_path):
    import pydicom

    folder = tmp_path / "mixed"
    folder.mkdir()
    for index, path in enumerate(sorted((data_root / "dicom" / "crlm_1004_ct").iterdir())[:3]):
        dataset = pydicom.dcmread(path)
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        dataset.save_as(folder / f"scout{index}.dcm")
    shutil.copy(data_root / "dicom" / "dcmqi_ct3slice" / "SEG" / "liver_seg.dcm", folder / "seg.dcm")
    assert list_dicom_series(folder) == []
    with pytest.raises(LiverSegInputError, match="no DICOM CT series"):
        read_ct(folder)
