"""``liverseg segment`` end to end, and every bad input: one line, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegLib.cli import main

from conftest import PROJECT_ROOT

SAMPLE = PROJECT_ROOT / "LiverSeg" / "Resources" / "Samples" / "CRLM-CT-1004.nii.gz"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(capsys, tmp_path, args, message):
    output = tmp_path / "out" / "label.nii.gz"
    output.parent.mkdir(exist_ok=True)
    before = set(output.parent.iterdir())
    code, out, err = run_cli(capsys, "segment", *args, "-o", output)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("liverseg: error:"), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert set(output.parent.iterdir()) == before, "a partial output was left behind"


def test_segment_writes_an_aligned_label_map(capsys, tmp_path, data_root):
    output = tmp_path / "ircad_17.nrrd"
    code, out, err = run_cli(capsys, "segment", data_root / "cases" / "ircad_17" / "ct.nii.gz", "-o", output, "--device", "cpu", "--batch-size", "8")
    assert code == 0, err
    assert "liver" in out and "mL" in out and "on cpu" in out
    ct = sitk.ReadImage(str(data_root / "cases" / "ircad_17" / "ct.nii.gz"))
    label = sitk.ReadImage(str(output))
    assert label.GetSize() == ct.GetSize() and np.allclose(label.GetSpacing(), ct.GetSpacing())
    assert np.allclose(label.GetOrigin(), ct.GetOrigin()) and np.allclose(label.GetDirection(), ct.GetDirection())
    assert set(np.unique(sitk.GetArrayViewFromImage(label))) <= {0, 1, 2}
    assert [p.name for p in tmp_path.iterdir()] == ["ircad_17.nrrd"], "temporary files left behind"


def test_no_lesions_and_no_postprocess(capsys, tmp_path, data_root):
    ct = data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz"
    plain, raw = tmp_path / "plain.nii.gz", tmp_path / "raw.mha"
    assert run_cli(capsys, "segment", ct, "-o", plain, "--no-lesions")[0] == 0
    assert run_cli(capsys, "segment", ct, "-o", raw, "--no-postprocess")[0] == 0
    assert 2 not in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(plain))))
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(raw))).any()


def test_readme_command_on_the_shipped_sample(tmp_path):
    """The README's main job, as a user runs it: the console command on the bundled sample CT."""
    output = tmp_path / "sample_liver.nii.gz"
    done = subprocess.run(
        [shutil.which("liverseg") or "liverseg", "segment", str(SAMPLE), "-o", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    liver_ml = float(done.stdout.split("liver ")[1].split(" mL")[0])
    assert 800 < liver_ml < 3500, done.stdout  # an adult liver, CRLM-CT-1004 covers it whole
    assert sitk.ReadImage(str(output)).GetSize() == sitk.ReadImage(str(SAMPLE)).GetSize()


def test_missing_input(capsys, tmp_path):
    assert_refused(capsys, tmp_path, [tmp_path / "nope.nii.gz"], "does not exist")


def test_not_an_image(capsys, tmp_path):
    fake = tmp_path / "notes.nii.gz"
    fake.write_text("this is not an image", encoding="utf-8")
    assert_refused(capsys, tmp_path, [fake], "not a readable image")


def test_truncated_nifti(capsys, tmp_path, data_root):
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes((data_root / "cases" / "ircad_17" / "ct.nii.gz").read_bytes()[:200_000])
    assert_refused(capsys, tmp_path, [truncated], "truncated.nii.gz")


def test_2d_image(capsys, tmp_path, data_root):
    ct = sitk.ReadImage(str(data_root / "cases" / "ircad_17" / "ct.nii.gz"))
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(ct[:, :, 60], str(path))
    assert_refused(capsys, tmp_path, [path], "2D image")


def test_4d_image(capsys, tmp_path, data_root):
    ct = sitk.ReadImage(str(data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz"))
    path = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([ct, ct]), str(path))
    assert_refused(capsys, tmp_path, [path], "4D image")


def test_empty_volume(capsys, tmp_path):
    path = tmp_path / "zeros.nii.gz"
    sitk.WriteImage(sitk.Image([64, 64, 20], sitk.sitkInt16), str(path))
    assert_refused(capsys, tmp_path, [path], "empty")


def test_unreadable_dicom_folder(capsys, tmp_path, data_root):
    folder = tmp_path / "broken_dicom"
    folder.mkdir()
    for index, source in enumerate(sorted((data_root / "dicom" / "crlm_1004_ct").iterdir())[:4]):
        (folder / f"{index}.dcm").write_bytes(source.read_bytes()[:3000])
    assert_refused(capsys, tmp_path, [folder], "DICOM")


def test_folder_without_dicom(capsys, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("hello", encoding="utf-8")
    assert_refused(capsys, tmp_path, [folder], "no DICOM CT series")


def test_output_folder_missing(capsys, tmp_path, data_root):
    code, _, err = run_cli(capsys, "segment", data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz", "-o", tmp_path / "no" / "where.nii.gz")
    assert code == 2 and "output folder does not exist" in err and len(err.strip().splitlines()) == 1


def test_output_must_not_overwrite_input(capsys, tmp_path, data_root):
    ct = tmp_path / "ct.nii.gz"
    shutil.copy(data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz", ct)
    before = ct.read_bytes()
    code, _, err = run_cli(capsys, "segment", ct, "-o", ct)
    assert code == 2 and "overwrite the input" in err and ct.read_bytes() == before


def test_tampered_weights_are_refused(capsys, tmp_path, data_root, model_copy):
    card, weights = model_copy
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    ct = data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz"
    assert_refused(capsys, tmp_path, [ct, "--model", card], "SHA-256")


def test_truncated_weights_with_a_matching_card_are_refused(capsys, tmp_path, data_root, model_copy):
    from LiverSegLib.model import sha256_of

    card, weights = model_copy
    weights.write_bytes(weights.read_bytes()[:5000])
    data = json.loads(card.read_text(encoding="utf-8"))
    data["weights_sha256"] = sha256_of(weights)
    card.write_text(json.dumps(data), encoding="utf-8")
    ct = data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz"
    assert_refused(capsys, tmp_path, [ct, "--model", card], "cannot be loaded")


def test_missing_or_broken_card(capsys, tmp_path, data_root):
    ct = data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz"
    assert_refused(capsys, tmp_path, [ct, "--model", tmp_path / "none.json"], "model card not found")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    assert_refused(capsys, tmp_path, [ct, "--model", broken], "not valid JSON")


def test_series_command_lists_series(capsys, data_root):
    code, out, _ = run_cli(capsys, "series", data_root / "dicom" / "crlm_1004_ct")
    assert code == 0 and "    41    5.00mm  CT CH/AB/PEL" in out


def test_usage_errors_exit_2():
    done = subprocess.run([sys.executable, "-m", "LiverSegLib.cli", "segment"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_seg_nrrd_and_reports(capsys, tmp_path, data_root):
    ct_path = data_root / "cases" / "ircad_01" / "ct.nii.gz"
    output = tmp_path / "ircad_01.seg.nrrd"
    code, out, err = run_cli(capsys, "segment", ct_path, "-o", output, "--report", tmp_path / "r.json", "--report", tmp_path / "r.md")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    label = sitk.ReadImage(str(output))
    voxel_ml = np.prod(label.GetSpacing()) / 1000
    array = sitk.GetArrayViewFromImage(label)
    assert report["liver_volume_ml"] == pytest.approx(np.count_nonzero(array >= 1) * voxel_ml, abs=0.01)
    assert report["lesion_total_ml"] == pytest.approx(np.count_nonzero(array == 2) * voxel_ml, abs=0.05)
    assert report["lesion_count"] == len(report["lesion_volumes_ml"])
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_path)))
    assert report["hu_inside_liver"]["liver"]["mean"] == pytest.approx(float(ct[array >= 1].mean()), abs=0.01)
    assert report["lesion_burden_pct"] == pytest.approx(100 * report["lesion_total_ml"] / report["liver_volume_ml"], abs=0.01)
    assert "liver volume" in (tmp_path / "r.md").read_text(encoding="utf-8")
    assert label.GetMetaData("Segment0_Name") == "Liver" and label.GetMetaData("Segment1_Name") == "Liver lesion"
    assert "SCT^10200004^Liver" in label.GetMetaData("Segment0_Tags")


def test_precision_choice_is_run_and_reported(capsys, tmp_path, data_root):
    """--precision: the int8 graph by default on the CPU, the fp32 one when asked; the report and the summary
    line say which ran, and the two liver masks of a real CT nearly coincide."""
    ct_path = data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz"
    masks = {}
    for precision, expected in (("auto", "int8"), ("fp32", "fp32")):
        output, report_path = tmp_path / f"{precision}.nii.gz", tmp_path / f"{precision}.json"
        code, out, err = run_cli(capsys, "segment", ct_path, "-o", output, "--device", "cpu", "--precision", precision, "--report", report_path)
        assert code == 0, err
        assert json.loads(report_path.read_text(encoding="utf-8"))["precision"] == expected
        assert f"(onnxruntime {expected})" in out
        masks[expected] = sitk.GetArrayFromImage(sitk.ReadImage(str(output))) >= 1
    overlap = 2 * np.count_nonzero(masks["int8"] & masks["fp32"]) / (masks["int8"].sum() + masks["fp32"].sum())
    assert 0.99 < overlap < 1.0 or np.array_equal(masks["int8"], masks["fp32"])


def test_bad_report_path_is_refused_before_work(capsys, tmp_path, data_root):
    ct = data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz"
    assert_refused(capsys, tmp_path, [ct, "--report", tmp_path / "report.txt"], "report must end with")


def test_jpeg_input(capsys, tmp_path, data_root):
    ct = sitk.ReadImage(str(data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz"))
    photo = tmp_path / "slice.jpg"
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(ct[:, :, 1], 0, 255), sitk.sitkUInt8), str(photo))
    assert_refused(capsys, tmp_path, [photo], "2D image")


def test_huge_header_without_data(capsys, tmp_path):
    header = tmp_path / "huge.nrrd"  # a valid header for 10¹³ voxels, and no pixel data at all
    header.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 100000 100000 1000\nendian: little\nencoding: raw\n\n")
    assert_refused(capsys, tmp_path, [header], "more than LiverSeg accepts")


def test_single_dicom_slice_file_and_folder(capsys, tmp_path, data_root):
    source = sorted((data_root / "dicom" / "crlm_1004_ct").iterdir())[20]
    assert_refused(capsys, tmp_path, [source], "single slice")
    folder = tmp_path / "one_slice"
    folder.mkdir()
    shutil.copy(source, folder / "only.dcm")
    assert_refused(capsys, tmp_path, [folder], "no DICOM CT series")


def test_output_parent_is_a_file(capsys, tmp_path, data_root):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    code, _, err = run_cli(capsys, "segment", data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz", "-o", tmp_path / "afile" / "out.nii.gz")
    assert code == 2 and "output folder does not exist" in err


def test_mr_like_volume_gets_qc_warnings_in_the_cli_and_the_report(capsys, tmp_path):
    """The sample CT mapped to 0..800 (as an MR or a raw export could be): the run goes on, and the CLI, the
    JSON and Markdown reports all say that the input is not CT-like and the liver volume is implausible."""
    ct = sitk.ReadImage(str(SAMPLE))
    mr_like = tmp_path / "mr.nii.gz"
    sitk.WriteImage(sitk.Cast(sitk.Clamp(ct, lowerBound=-200, upperBound=600) + 200, sitk.sitkInt16), str(mr_like))
    code, _, err = run_cli(capsys, "segment", mr_like, "-o", tmp_path / "mr_label.nii.gz", "--report", tmp_path / "r.json",
                           "--report", tmp_path / "r.md")
    assert code == 0 and (tmp_path / "mr_label.nii.gz").exists()
    printed = [line.removeprefix("liverseg: warning: ") for line in err.splitlines() if line.startswith("liverseg: warning:")]
    report = json.loads((tmp_path / "r.json").read_text())
    assert printed == report["qc_warnings"]
    assert any("0..800 do not look like CT Hounsfield units" in w for w in printed), printed
    if not 500 <= report["liver_volume_ml"] <= 3500:
        assert any(f"liver volume {report['liver_volume_ml']:.0f} mL is outside" in w for w in printed), printed
    markdown = (tmp_path / "r.md").read_text()
    assert all(f"- {w}" in markdown for w in printed)


def test_a_clean_ct_has_no_qc_warning_and_a_cut_liver_has_one(capsys, tmp_path):
    code, _, err = run_cli(capsys, "segment", SAMPLE, "-o", tmp_path / "whole.nii.gz", "--report", tmp_path / "whole.json")
    assert code == 0 and "warning" not in err
    assert json.loads((tmp_path / "whole.json").read_text())["qc_warnings"] == []
    ct = sitk.ReadImage(str(SAMPLE))
    cut = tmp_path / "cut.nii.gz"
    sitk.WriteImage(ct[:, :, 18:], str(cut))  # the scan now starts inside the liver
    code, _, err = run_cli(capsys, "segment", cut, "-o", tmp_path / "cut_label.nii.gz", "--report", tmp_path / "cut.json")
    assert code == 0
    warnings = json.loads((tmp_path / "cut.json").read_text())["qc_warnings"]
    assert warnings == ["the liver reaches the first or last slice: part of it may lie outside the scan, so its volume is understated"]
    assert f"liverseg: warning: {warnings[0]}" in err


def test_nan_voxels_are_read_as_air_with_a_warning_and_never_become_lesions(capsys, tmp_path):
    """A NaN block inside the abdomen (as a float volume with a masked region has)."""
    ct = sitk.Cast(sitk.ReadImage(str(SAMPLE)), sitk.sitkFloat32)
    voxels = sitk.GetArrayFromImage(ct)
    block = (slice(14, 24), slice(200, 300), slice(150, 250))
    voxels[block] = np.nan
    voxels[0, 0, :10] = np.inf
    nan_ct = sitk.GetImageFromArray(voxels)
    nan_ct.CopyInformation(ct)
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(nan_ct, str(path))
    code, out, err = run_cli(capsys, "segment", path, "-o", tmp_path / "label.nii.gz", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "100010 voxels" in err and "NaN or infinite; they are read as air (-1024 HU)" in err
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "label.nii.gz")))
    assert not (label[block] == 2).any(), "lesions made of NaN voxels"


def nifti_with_pixdim(data_root, tmp_path, axis: int, value: float):
    """The small real CT as an uncompressed NIfTI whose pixdim[axis] is overwritten (qform and sform kept)."""
    import gzip
    import struct

    data = bytearray(gzip.open(data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz").read())
    data[76 + 4 * axis : 80 + 4 * axis] = struct.pack("<f", value)
    path = tmp_path / f"pixdim{axis}_{value:g}.nii"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_nifti_with_unknown_slice_spacing_is_refused(capsys, tmp_path, data_root, value):
    path = nifti_with_pixdim(data_root, tmp_path, 3, value)
    assert_refused(capsys, tmp_path, [path], f"the NIfTI header gives voxel size {value:g} along axis 3 (pixdim[3])")


def test_nifti_with_negative_spacing_warns_and_uses_its_size(capsys, tmp_path, data_root):
    path = nifti_with_pixdim(data_root, tmp_path, 3, -3.0)
    code, out, err = run_cli(capsys, "segment", path, "-o", tmp_path / "label.nrrd")
    assert code == 0
    assert "negative voxel size -3 along axis 3 (pixdim[3]); using 3 mm" in err
    assert sitk.ReadImage(str(tmp_path / "label.nrrd")).GetSpacing()[2] == pytest.approx(3.0)


def test_output_that_is_an_existing_folder_is_refused(capsys, tmp_path, data_root):
    folder = tmp_path / "out" / "label.nii.gz"
    folder.mkdir(parents=True)
    for output in (folder, str(folder) + "/"):
        code, out, err = run_cli(capsys, "segment", data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz", "-o", output)
        assert code == 2 and err.strip() == f"liverseg: error: output is an existing folder, not a file name: {folder}"
    assert list(folder.iterdir()) == []


def test_empty_file_is_named_as_such(capsys, tmp_path):
    empty = tmp_path / "in" / "ct.nii.gz"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    assert_refused(capsys, tmp_path, [empty], f"empty file (0 bytes): {empty}")


def test_a_corrupt_dicom_slice_is_named_and_no_internals_leak(capsys, tmp_path, data_root):
    series = tmp_path / "series"
    shutil.copytree(data_root / "dicom" / "crlm_1004_ct", series)
    broken = series / "1-10.dcm"
    broken.write_bytes(broken.read_bytes()[:-200_000])
    code, out, err = run_cli(capsys, "segment", series, "-o", tmp_path / "label.nii.gz")
    assert code == 2
    assert f"{broken}" in err and "slice 32 of 41" in err
    assert not re.search(r"0x[0-9a-f]{6,}|\.cxx|\.hxx|ITK ERROR|GDCMImageIO", err), err


def test_series_without_number_or_uid_can_be_chosen(capsys, tmp_path, data_root):
    study = tmp_path / "study"
    shutil.copytree(data_root / "dicom" / "totalseg_example" / "CT", study / "no_uid")
    shutil.copytree(data_root / "dicom" / "crlm_1004_ct", study / "crlm")
    code, listing, err = run_cli(capsys, "series", study)
    assert code == 0 and "#?" not in listing
    handles = [line.split()[0] for line in listing.splitlines()[1:]]
    assert len(handles) == 2 and "@1" in handles, listing
    code, out, err = run_cli(capsys, "segment", study, "--series", "@1", "-o", tmp_path / "label.nii.gz")
    assert code == 0, err
    assert sitk.ReadImage(str(tmp_path / "label.nii.gz")).GetSize()[2] == 20


def test_truncated_uncompressed_nifti(capsys, tmp_path, data_root):
    full = tmp_path / "full.nii"
    sitk.WriteImage(sitk.ReadImage(str(data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz")), str(full))
    truncated = tmp_path / "cut.nii"
    truncated.write_bytes(full.read_bytes()[:100_000])
    assert_refused(capsys, tmp_path, [truncated], "truncated image")


def test_empty_folder(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(capsys, tmp_path, [empty], "no DICOM CT series")


def test_label_map_given_as_input(capsys, tmp_path, data_root):
    assert_refused(capsys, tmp_path, [data_root / "cases" / "ircad_17" / "label.nii.gz"], "looks like a label map")


def test_series_with_a_missing_slice(capsys, tmp_path, data_root):
    folder = tmp_path / "gap"
    shutil.copytree(data_root / "dicom" / "crlm_1004_ct", folder)
    from LiverSegLib.io import list_dicom_series

    Path(list_dicom_series(folder)[0].files[17]).unlink()
    assert_refused(capsys, tmp_path, [folder], "missing slice")


def test_output_folder_not_writable(capsys, tmp_path, data_root):
    """/proc/self cannot take files, whoever runs the tests (root ignores permission bits elsewhere)."""
    code, _, err = run_cli(capsys, "segment", data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz", "-o", "/proc/self/label.nii.gz")
    assert code == 2 and "output folder is not writable" in err and len(err.strip().splitlines()) == 1


def json_events(out: str) -> list[dict]:
    """Every stdout line of ``--progress json`` must be one JSON object with an ``event``."""
    events = [json.loads(line) for line in out.splitlines()]
    assert all(isinstance(e, dict) and "event" in e for e in events), out
    return events


def test_progress_json_streams_stages_batches_and_the_result(capsys, tmp_path):
    output = tmp_path / "sample.nii.gz"
    code, out, err = run_cli(capsys, "segment", SAMPLE, "-o", output, "--device", "cpu", "--batch-size", "8", "--progress", "json")
    assert code == 0, err
    events = json_events(out)
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages == ["reading", "loading model", "segmenting", "writing"]
    progress = [(e["done"], e["total"]) for e in events if e["event"] == "progress"]
    # The network first sees every 4th slice, then the slices near the liver: batches of 8 after that.
    assert progress[-1][0] == progress[-1][1] <= 41 and len({total for _, total in progress}) == 1, progress
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert all(b - a <= 8 for (a, _), (b, _) in zip(progress, progress[1:])), progress
    result = events[-1]
    assert result["event"] == "result" and [e["event"] for e in events].count("result") == 1
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    voxel_ml = float(np.prod(sitk.ReadImage(str(SAMPLE)).GetSpacing())) / 1000
    assert result["report"]["liver_volume_ml"] == pytest.approx(np.count_nonzero(label >= 1) * voxel_ml, abs=0.01)
    assert result["summary"].startswith(f"liver {result['report']['liver_volume_ml']:.1f} mL;")
    assert "Traceback" not in err


def test_progress_json_reports_an_input_error_as_its_last_event(capsys, tmp_path, data_root):
    label = data_root / "cases" / "ircad_17" / "label.nii.gz"
    code, out, err = run_cli(capsys, "segment", label, "-o", tmp_path / "x.nii.gz", "--progress", "json")
    assert code == 2
    events = json_events(out)
    assert events[-1]["event"] == "error" and events[-1]["exit_code"] == 2
    assert "looks like a label map" in events[-1]["message"] and not events[-1]["message"].startswith("error")
    assert err.strip().splitlines()[-1].startswith("liverseg: error:") and list(tmp_path.iterdir()) == []


def test_progress_json_carries_warnings_as_events(capsys, tmp_path, data_root):
    """A CT whose intensities do not look like HU (shifted so that none is below 0) warns."""
    ct = sitk.ReadImage(str(SAMPLE))
    ct = ct - int(sitk.GetArrayViewFromImage(ct).min())
    shifted = tmp_path / "shifted.nrrd"
    sitk.WriteImage(ct, str(shifted))
    code, out, err = run_cli(capsys, "segment", shifted, "-o", tmp_path / "x.nii.gz", "--device", "cpu", "--progress", "json")
    assert code == 0, err
    warnings = [e["message"] for e in json_events(out) if e["event"] == "warning"]
    assert any("do not look like CT Hounsfield units" in w for w in warnings), warnings
    assert [line.removeprefix("liverseg: warning: ") for line in err.splitlines() if "warning" in line] == warnings
