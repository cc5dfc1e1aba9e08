"""DICOM SEG: written with highdicom from real DICOM CT, read back three ways (ours by position,
highdicom by referenced instance, dcmqi's segimage2itkimage), validated by dciodvfy; existing real SEGs
read against their label maps."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegLib.dicom_seg import write_dicom_seg
from LiverSegLib.io import list_dicom_series, read_dicom_series, select_series

from test_cli import run_cli


def read_dicom_seg(path: str | os.PathLike, reference: sitk.Image) -> dict[str, np.ndarray]:
    """Our own reading of a SEG, independent of highdicom's: segment label → boolean (k, j, i) mask on
    ``reference``'s grid, each frame placed by its ImagePositionPatient."""
    import pydicom

    seg = pydicom.dcmread(str(path))
    assert seg.Modality == "SEG", seg.Modality
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    masks = {label: np.zeros(sitk.GetArrayViewFromImage(reference).shape, bool) for label in labels.values()}
    size = reference.GetSize()
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else None

    def functional_group(item, keyword: str):
        """A per-frame functional group, or the shared one when all frames have the same."""
        return getattr(item, keyword, None) or getattr(shared, keyword)

    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        number = int(functional_group(item, "SegmentIdentificationSequence")[0].ReferencedSegmentNumber)
        position = [float(v) for v in functional_group(item, "PlanePositionSequence")[0].ImagePositionPatient]
        index = reference.TransformPhysicalPointToContinuousIndex(position)
        k = int(round(index[2]))
        assert 0 <= k < size[2] and abs(index[2] - k) <= 0.1 and max(abs(index[0]), abs(index[1])) <= 0.1, \
            f"SEG frame at {position} does not lie on a slice of the reference image"
        masks[labels[number]][k] |= frame.astype(bool)
    return masks


@pytest.fixture(scope="module")
def written_seg(data_root, segmenter, tmp_path_factory):
    series = select_series(data_root / "dicom" / "crlm_1004_ct")
    image = read_dicom_series(series)
    result = segmenter.segment(image)
    path = tmp_path_factory.mktemp("seg") / "crlm_1004_liver.dcm"
    write_dicom_seg(result, series, path)
    return path, series, image, sitk.GetArrayFromImage(result.label_image)


def test_seg_reads_back_by_position(written_seg):
    path, _, image, label = written_seg
    masks = read_dicom_seg(path, image)
    assert set(masks) == {"Liver", "Liver lesion"}
    assert np.array_equal(masks["Liver"], label == 1) and np.array_equal(masks["Liver lesion"], label == 2)
    assert masks["Liver"].any()


def test_seg_reads_back_by_referenced_instance_with_highdicom(written_seg):
    import highdicom as hd
    import pydicom

    path, series, _, label = written_seg
    seg = hd.seg.segread(str(path))
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "liverseg-unet-resnet18"
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in series.files]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2], combine_segments=True, skip_overlap_checks=True)
    assert np.array_equal(pixels, label)


def dciodvfy_errors(path) -> list[str]:
    done = subprocess.run([shutil.which("dciodvfy"), "-new", str(path)], capture_output=True, text=True)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def test_seg_passes_dciodvfy(written_seg):
    errors = dciodvfy_errors(written_seg[0])
    assert errors == [], errors


def test_dcmqi_reads_our_seg_identically(written_seg, tmp_path):
    path, _, image, label = written_seg
    done = subprocess.run(
        [shutil.which("segimage2itkimage"), "--inputDICOM", str(path), "--outputDirectory", str(tmp_path), "--outputType", "nrrd", "--prefix", "seg"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    for number, value in ((1, 1), (2, 2)):
        segment = sitk.ReadImage(str(tmp_path / f"seg-{number}.nrrd"))
        on_grid = sitk.Resample(segment, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        assert np.array_equal(sitk.GetArrayViewFromImage(on_grid) > 0, label == value), number


@pytest.mark.parametrize(
    "seg_path, case",
    [("dcmqi_ct3slice/SEG", "dcmqi_ct3slice"), ("totalseg_example/SEG", "totalseg_example_dicom_MODEL")],
)
def test_existing_real_segs_match_their_label_maps(data_root, seg_path, case):
    path = data_root / "dicom" / seg_path
    if path.is_dir():
        path = next(p for p in sorted(path.iterdir()) if p.is_file())
    reference = sitk.ReadImage(str(data_root / "cases" / case / "ct.nii.gz"))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(data_root / "cases" / case / "label.nii.gz")))
    masks = read_dicom_seg(path, reference)
    liver = next(mask for name, mask in masks.items() if "liver" in name.lower())
    assert liver.any() and np.array_equal(liver, label >= 1)


def test_dicom_seg_output_needs_dicom_input(capsys, tmp_path, data_root):
    code, _, err = run_cli(capsys, "segment", data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz", "-o", tmp_path / "x.dcm")
    assert code == 2 and "needs a DICOM series folder" in err and not (tmp_path / "x.dcm").exists()


def test_malformed_export_without_uids(capsys, tmp_path, data_root):
    """The TotalSegmentator example's empty UIDs: read as a volume, refused (clearly) as a SEG source."""
    folder = data_root / "dicom" / "totalseg_example" / "CT"
    code, out, err = run_cli(capsys, "segment", folder, "-o", tmp_path / "ok.nii.gz")
    assert code == 0 and (tmp_path / "ok.nii.gz").exists(), err
    code, _, err = run_cli(capsys, "segment", folder, "-o", tmp_path / "bad.dcm")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("liverseg: error:") and "empty StudyInstanceUID" in lines[0], err
    assert not (tmp_path / "bad.dcm").exists()


def test_seg_from_series_with_empty_specific_character_set(capsys, tmp_path, data_root):
    """dcmqi's CT slices carry an empty (0008,0005), which highdicom rejects when it copies it: the SEG
    is written with ISO_IR 100, is valid, references every source instance, and the source is untouched."""
    import hashlib

    import pydicom

    folder = data_root / "dicom" / "dcmqi_ct3slice" / "CT"
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    assert len(files) == 3, f"dcmqi_ct3slice CT slices missing from {folder}"
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert all(s.data_element("SpecificCharacterSet").value == "" for s in sources)  # the case under test
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    output = tmp_path / "seg.dcm"
    code, _, err = run_cli(capsys, "segment", folder, "-o", output)
    assert code == 0 and output.exists(), err
    assert dciodvfy_errors(output) == []
    seg = pydicom.dcmread(output)
    assert seg.Modality == "SEG" and seg.SpecificCharacterSet == "ISO_IR 100"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    uids = {s.SOPInstanceUID for s in sources}
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence} == uids
    frame_sources = [
        reference.ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for reference in derivation.SourceImageSequence
    ]
    assert len(frame_sources) == int(seg.NumberOfFrames) and set(frame_sources) <= uids
    assert "Liver" in {str(item.SegmentLabel) for item in seg.SegmentSequence}
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == digests


def test_study_folder_through_the_cli(capsys, tmp_path, data_root):
    """Two real series (one JPEG 2000 compressed) and a reformat slice in one study: refused with the
    list without --series; with it, that series is segmented and written as a DICOM SEG."""
    import pydicom

    study = tmp_path / "study"
    shutil.copytree(data_root / "dicom" / "crlm_1004_ct", study / "a")
    shutil.copytree(data_root / "dicom" / "totalseg_example" / "CT_uidfixed", study / "b")
    reformat = pydicom.dcmread(sorted((data_root / "dicom" / "crlm_1004_ct").iterdir())[5])
    reformat.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.778"
    reformat.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    reformat.save_as(study / "sagittal_reformat.dcm")
    code, _, err = run_cli(capsys, "segment", study, "-o", tmp_path / "x.dcm")
    assert code == 2 and "choose one with --series" in err and "CT CH/AB/PEL" in err and "CT Body 3.0" in err
    uid = next(s.uid for s in list_dicom_series(study) if len(s.files) == 20)
    output = tmp_path / "totalseg_seg.dcm"
    code, out, err = run_cli(capsys, "segment", study, "--series", uid, "-o", output)
    assert code == 0, err
    seg = pydicom.dcmread(output)
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    source = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in sorted((study / "b").iterdir())}
    assert referenced == source
    assert str(pydicom.dcmread(next((study / "b").iterdir())).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.90"  # JPEG 2000
