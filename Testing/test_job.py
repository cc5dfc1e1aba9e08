"""The child-process runner (``LiverSegLib.job``) against the real ``liverseg`` CLI in a real child process,
on real CT: progress to 100 %, cancel, input errors, a killed child, a timeout, and nothing left behind."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegLib.errors import LiverSegInputError
from LiverSegLib.job import EngineProcessError, JobState, SegmentationJob, SegmentationOptions

from conftest import PROJECT_ROOT

SAMPLE = PROJECT_ROOT / "LiverSeg" / "Resources" / "Samples" / "CRLM-CT-1004.nii.gz"
CPU = SegmentationOptions(device="cpu")


@pytest.fixture(autouse=True)
def job_temp_dir(tmp_path, monkeypatch):
    """Jobs make their folders under this test's own temporary folder, so "nothing left" can be checked."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def wait_for(job: SegmentationJob, condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition(job):
        assert not job.poll(), f"job ended ({job.state}, {job.error}) before the awaited point"
        assert time.monotonic() < deadline, "the awaited point never came"
        time.sleep(0.02)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_progress_reaches_100_percent_and_the_label_map_comes_back(job_temp_dir):
    job = SegmentationJob(SAMPLE, CPU)
    fractions, stages = [], []
    while not job.poll():
        fractions.append(job.fraction_done)
        stages.append(job.stage)
        time.sleep(0.02)
    assert job.state is JobState.SUCCEEDED, (job.error, list(job.stderr_tail))
    assert job.fraction_done == 1.0 and 0 < job.done_slices == job.total_slices <= 41  # slices near the liver only
    assert fractions == sorted(fractions), "progress went backwards"
    assert any(0 < f < 1 for f in fractions), "no progress was seen before the end"
    order = ["starting", "reading", "loading model", "segmenting", "writing"]
    seen = [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]]
    assert "segmenting" in seen and seen == sorted(seen, key=order.index), seen

    label = job.label_image()
    ct = sitk.ReadImage(str(SAMPLE))
    assert label.GetSize() == ct.GetSize()
    assert np.allclose(label.GetOrigin(), ct.GetOrigin()) and np.allclose(label.GetDirection(), ct.GetDirection())
    voxels = sitk.GetArrayViewFromImage(label)
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000
    assert job.report["liver_volume_ml"] == pytest.approx(np.count_nonzero(voxels >= 1) * voxel_ml, abs=0.01)
    assert job.summary.startswith(f"liver {job.report['liver_volume_ml']:.1f} mL")
    assert 800 < job.report["liver_volume_ml"] < 3500
    job.close()
    assert list(job_temp_dir.iterdir()) == [], "the job's files were not removed"
    assert process_gone(job.pid)


def test_for_image_writes_the_volume_for_the_child_and_removes_it(data_root, job_temp_dir):
    ct = sitk.ReadImage(str(data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz"))
    with SegmentationJob.for_image(ct, SegmentationOptions(device="cpu", lesions=False)) as job:
        assert job.wait() is JobState.SUCCEEDED, job.error
        label = job.label_image()
        assert label.GetSize() == ct.GetSize() and np.allclose(label.GetSpacing(), ct.GetSpacing())
        assert 2 not in np.unique(sitk.GetArrayViewFromImage(label))
        assert job.report["lesions_segmented"] is False
    assert list(job_temp_dir.iterdir()) == []


def test_cancel_mid_run_stops_the_child_within_a_second_and_leaves_nothing(data_root, job_temp_dir):
    job = SegmentationJob(data_root / "cases" / "ircad_01" / "ct.nii.gz", SegmentationOptions(device="cpu", batch_size=4))
    wait_for(job, lambda j: 0 < j.done_slices < j.total_slices)
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 1.0
    assert job.state is JobState.CANCELLED and job.finished
    assert process_gone(job.pid)
    assert not job.output_path.exists()
    assert list(job_temp_dir.iterdir()) == [], "temporary files left after cancel"
    with pytest.raises(EngineProcessError, match="cancelled"):
        job.label_image()


def test_an_input_error_comes_back_as_the_jobs_one_line_error(data_root, job_temp_dir):
    job = SegmentationJob(data_root / "cases" / "ircad_17" / "label.nii.gz", CPU)
    assert job.wait() is JobState.FAILED
    assert job.exit_code == 2
    assert "looks like a label map" in job.error and "\n" not in job.error
    assert not job.error.startswith("error:")
    with pytest.raises(LiverSegInputError, match="label map"):
        job.raise_for_failure()
    assert list(job_temp_dir.iterdir()) == []


def test_a_killed_child_is_reported_as_killed(data_root, job_temp_dir):
    job = SegmentationJob(data_root / "cases" / "ircad_01" / "ct.nii.gz", SegmentationOptions(device="cpu", batch_size=4))
    wait_for(job, lambda j: j.done_slices > 0)
    os.kill(job.pid, signal.SIGKILL)
    assert job.wait(timeout_s=10) is JobState.FAILED
    assert "ended unexpectedly (killed by signal SIGKILL)" in job.error
    with pytest.raises(EngineProcessError, match="SIGKILL"):
        job.raise_for_failure()
    assert list(job_temp_dir.iterdir()) == []


def test_a_job_past_its_timeout_is_stopped(job_temp_dir):
    job = SegmentationJob(SAMPLE, CPU, timeout_s=0.5)
    started = time.monotonic()
    assert job.wait() is JobState.FAILED
    assert time.monotonic() - started < 3.0
    assert "did not finish within 0.5 s" in job.error
    assert process_gone(job.pid) and list(job_temp_dir.iterdir()) == []


def test_a_python_that_cannot_start_is_a_clear_error(job_temp_dir):
    with pytest.raises(EngineProcessError, match="cannot start the engine process"):
        SegmentationJob(SAMPLE, CPU, python_executable=str(job_temp_dir / "no-such-python"))
    assert list(job_temp_dir.iterdir()) == []


def test_the_child_is_started_with_the_options_given():
    options = SegmentationOptions(device="cpu", runtime="torch", lesions=False, postprocess=False, model_card="/m/card.json", batch_size=8)
    assert options.cli_arguments() == ["--device", "cpu", "--runtime", "torch", "--model", "/m/card.json", "--batch-size", "8",
                                       "--no-lesions", "--no-postprocess"]
    with SegmentationJob(SAMPLE, options, python_executable=sys.executable) as job:
        assert job.command[:4] == [sys.executable, "-m", "LiverSegLib.cli", "segment"]
        assert job.command[job.command.index("--progress") + 1] == "json"
        assert job.wait() is JobState.FAILED  # the model card does not exist: the child says so
        assert job.exit_code == 2 and "/m/card.json" in job.error
