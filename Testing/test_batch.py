"""``liverseg batch`` (LiverSegLib/batch.py): finding cases, a real local Dask cluster of 2 worker
processes on real CTs, a bad input among them, resuming without redoing, and a worker killed mid-run."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk

from LiverSegLib.batch import (
    EXIT_ALL_DONE, EXIT_SOME_FAILED, SUMMARY_COLUMNS, BatchCase, BatchOptions, already_done, default_workers, find_cases,
    remove_partial_files,
)
from LiverSegLib.case import CaseInput
from LiverSegLib.errors import LiverSegInputError


def batch_cli(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """The real command in its own process (it starts worker processes, so not inside pytest's)."""
    return subprocess.run([sys.executable, "-m", "LiverSegLib.cli", "batch", *args], capture_output=True, text=True, timeout=timeout_s)


def summary_rows(out_dir: Path) -> dict[str, dict]:
    with (out_dir / "summary.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == SUMMARY_COLUMNS
        return {row["name"]: row for row in reader}


def partial_files(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir() if p.name.startswith("."))


@pytest.fixture()
def cohort(tmp_path, data_root) -> Path:
    """The issue's folder: ircad_17's CT, dcmqi_ct3slice's CT and a text file named like a CT."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copy(data_root / "cases" / "ircad_17" / "ct.nii.gz", folder / "ircad_17.nii.gz")
    shutil.copy(data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz", folder / "dcmqi_ct3slice.nii.gz")
    (folder / "notes.nii.gz").write_text("not a CT, only named like one\n")
    return folder


def test_find_cases_in_folders_files_and_a_manifest(tmp_path, data_root):
    dicom = data_root / "dicom" / "dcmqi_ct3slice"  # CT/ (3 slices) and SEG/ (a DICOM SEG, not a CT series)
    cases = find_cases([dicom, data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz"])
    assert [c.name for c in cases] == ["CT", "ct_2"]  # unique ignoring case: one output each on any file system
    assert cases[0].case.series is not None and len(cases[0].case.series.files) == 3
    assert cases[1].case.series is None and not cases[1].error

    manifest = tmp_path / "cohort.csv"
    (tmp_path / "a.nii.gz").write_bytes((data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz").read_bytes())
    manifest.write_text(f"path,name\na.nii.gz,first case\n{dicom / 'CT'},\nmissing.nii.gz,gone\n# a comment\na.nii.gz,first case\n")
    cases = find_cases([manifest])
    assert [c.name for c in cases] == ["first_case", "CT", "gone", "first_case_2"]  # names made safe and unique
    assert cases[0].case.path == tmp_path / "a.nii.gz"  # relative to the manifest's folder
    assert cases[1].case.series is not None
    assert cases[2].error.startswith("input does not exist") and "row 4" in cases[2].error
    with pytest.raises(LiverSegInputError, match="input does not exist"):
        find_cases([tmp_path / "nowhere"])


def test_resume_rule_needs_same_model_and_existing_output(tmp_path):
    options = BatchOptions(tmp_path)
    case = BatchCase("a", CaseInput(tmp_path / "a.nii.gz"))
    row = {"name": "a", "input": str(tmp_path / "a.nii.gz"), "status": "done", "model_name": "m", "model_version": "1"}
    assert not already_done(case, row, options, ("m", "1"))  # no output file
    options.output_of("a").write_bytes(b"x")
    assert already_done(case, row, options, ("m", "1"))
    assert already_done(case, {**row, "status": "skipped"}, options, ("m", "1"))
    assert not already_done(case, row, options, ("m", "2"))  # another model version: redone
    assert not already_done(case, {**row, "status": "failed"}, options, ("m", "1"))
    assert not already_done(case, row, BatchOptions(tmp_path, preview=True), ("m", "1"))  # its sheet is missing


def test_default_workers_follow_cores_and_memory():
    gigabyte = 1 << 30
    assert default_workers(cores=16, available_memory_bytes=64 * gigabyte) == 16
    assert default_workers(cores=16, available_memory_bytes=5_000_000_000) == 2  # 2 GB a worker
    assert default_workers(cores=4, available_memory_bytes=gigabyte) == 1
    assert default_workers(cores=16, available_memory_bytes=64 * gigabyte, gpu=True) == 1


def test_partial_files_of_a_case_are_removed_and_complete_ones_kept(tmp_path):
    options = BatchOptions(tmp_path, preview=True)
    (tmp_path / ".a.nii.gz.k2j3.nii.gz").write_bytes(b"half")
    (tmp_path / ".a.png.x1.png").write_bytes(b"half")
    (tmp_path / ".ab.nii.gz.zz.nii.gz").write_bytes(b"another case's")
    options.output_of("a").write_bytes(b"complete")
    remove_partial_files(options, "a")
    assert partial_files(tmp_path) == [".ab.nii.gz.zz.nii.gz"]
    assert options.output_of("a").read_bytes() == b"complete"


def test_batch_on_a_local_cluster_records_the_bad_file_and_resumes(tmp_path, cohort, data_root):
    out = tmp_path / "out"
    done = batch_cli(str(cohort), "-o", str(out), "--workers", "2", "--device", "cpu", "--preview")
    assert done.returncode == EXIT_SOME_FAILED, done.stderr
    assert "Traceback" not in done.stderr
    rows = summary_rows(out)
    assert set(rows) == {"ircad_17", "dcmqi_ct3slice", "notes"}
    assert rows["notes"]["status"] == "failed" and "notes.nii.gz" in rows["notes"]["error"]
    assert "\n" not in rows["notes"]["error"]
    assert not (out / "notes.nii.gz").exists() and not (out / "notes.png").exists()
    for name in ("ircad_17", "dcmqi_ct3slice"):
        assert rows[name]["status"] == "done" and rows[name]["model_version"] and rows[name]["worker"].startswith("tcp://")
        label = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        ct = sitk.ReadImage(str(data_root / "cases" / name / "ct.nii.gz"))
        assert label.GetSize() == ct.GetSize() and np.allclose(label.GetSpacing(), ct.GetSpacing())
        voxel_ml = float(np.prod(label.GetSpacing())) / 1000
        assert float(rows[name]["liver_ml"]) == pytest.approx(np.count_nonzero(sitk.GetArrayViewFromImage(label) >= 1) * voxel_ml, abs=0.01)
        assert (out / f"{name}.png").stat().st_size > 10_000 and rows[name]["preview"] == f"{name}.png"
    assert float(rows["ircad_17"]["liver_ml"]) > 1000 and int(rows["ircad_17"]["lesion_count"]) >= 1
    assert rows["dcmqi_ct3slice"]["qc_warnings"]  # 3 slices of a liver: cut at the scan's edge
    assert (out / "contact_sheet.png").exists()
    assert partial_files(out) == []

    # Rerun: nothing finished is redone (files untouched); the failed case runs again, and now succeeds.
    stamps = {name: (out / f"{name}.nii.gz").stat().st_mtime_ns for name in ("ircad_17", "dcmqi_ct3slice")}
    shutil.copy(data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz", cohort / "notes.nii.gz")
    (out / ".ircad_17.nii.gz.leftover.nii.gz").write_bytes(b"left by a killed writer")
    again = batch_cli(str(cohort), "-o", str(out), "--workers", "2", "--device", "cpu", "--preview")
    assert again.returncode == EXIT_ALL_DONE, again.stderr
    rows = summary_rows(out)
    assert rows["ircad_17"]["status"] == rows["dcmqi_ct3slice"]["status"] == "skipped"
    assert rows["notes"]["status"] == "done" and (out / "notes.nii.gz").exists()
    assert {name: (out / f"{name}.nii.gz").stat().st_mtime_ns for name in stamps} == stamps
    assert partial_files(out) == []
    assert "0 failed" in again.stdout


def test_bad_usage_is_one_line_and_exit_2(tmp_path, cohort):
    (tmp_path / "file").write_text("x")
    for args, message in (
        ([str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")], "input does not exist"),
        ([str(cohort), "-o", str(tmp_path / "file")], "output folder is a file"),
        ([str(cohort), "-o", str(tmp_path / "o"), "--workers", "0"], "--workers must be at least 1"),
        ([str(tmp_path / "o2"), "-o", str(tmp_path / "o")], "input does not exist"),
    ):
        done = batch_cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = batch_cli(str(empty), "-o", str(tmp_path / "o"))
    assert done.returncode == 2 and "no CT file, DICOM series or manifest row found" in done.stderr
    help_text = batch_cli("--help").stdout
    assert "--scheduler" in help_text and "--workers" in help_text


def _worker_processes(driver: psutil.Process) -> list[psutil.Process]:
    """Dask's worker processes: the driver's spawned children (the nannies live in the driver's process and
    restart a worker that dies; the other child is multiprocessing's resource tracker)."""
    workers = []
    for child in driver.children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:  # gone, or a zombie not yet reaped
            continue
    return workers


def small_first_cohort(tmp_path: Path, data_root: Path, small_name: str) -> tuple[Path, list[str]]:
    """A 3-slice CT (done first) and two whole CTs, and the command that segments them with 2 workers: when
    the first line arrives, the workers are inside the whole CTs."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copy(data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz", cohort / f"{small_name}.nii.gz")
    for name in ("ircad_17", "ircad_07"):
        shutil.copy(data_root / "cases" / name / "ct.nii.gz", cohort / f"{name}.nii.gz")
    out = tmp_path / "out"
    return out, [sys.executable, "-m", "LiverSegLib.cli", "batch", str(cohort), "-o", str(out), "--workers", "2", "--device", "cpu"]


def test_a_worker_killed_mid_run_has_its_case_rerun(tmp_path, data_root):
    out, command = small_first_cohort(tmp_path, data_root, "small")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stderr.readline()  # "[1/3] small: done…": the other worker is inside an ircad case now
        assert first.startswith("[1/3]"), first
        workers = _worker_processes(psutil.Process(process.pid))
        assert len(workers) == 2
        busy = max(workers, key=lambda worker: worker.cpu_times().user)  # the one that has been segmenting longest
        busy.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not any(w.pid not in {v.pid for v in workers} for w in _worker_processes(psutil.Process(process.pid))):
            assert time.monotonic() < deadline and process.poll() is None, "the killed worker was not replaced"
            time.sleep(0.2)
        process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_ALL_DONE
    rows = summary_rows(out)
    assert all(row["status"] == "done" for row in rows.values()), rows
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["ircad_07.nii.gz", "ircad_17.nii.gz", "small.nii.gz"]
    assert partial_files(out) == []


def test_ctrl_c_stops_cleanly_and_a_rerun_goes_on(tmp_path, data_root):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it: exit 130, the finished case kept
    and in the summary, nothing half-written; the rerun does the rest and skips the finished one."""
    out, command = small_first_cohort(tmp_path, data_root, "a_small")
    # As from a terminal: SIGINT at its default, which a launcher without job control (``cmd &`` in a script)
    # would have left ignored, and Python keeps a SIGINT it inherits ignored.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = process.stderr.readline()
        assert first.startswith("[1/3] a_small: done"), first
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    rows = summary_rows(out)
    assert rows["a_small"]["status"] == "done"
    finished = {name for name, row in rows.items() if row["status"] == "done"}
    assert {p.name.removesuffix(".nii.gz") for p in out.glob("*.nii.gz")} == finished
    assert partial_files(out) == []
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == EXIT_ALL_DONE, again.stderr
    rows = summary_rows(out)
    assert rows["a_small"]["status"] == "skipped" and rows["ircad_07"]["status"] in ("done", "skipped")


def test_an_existing_cluster_by_its_scheduler_address_and_dicom_seg_output(tmp_path, data_root):
    """--scheduler: the command submits to a cluster it did not start and leaves it running; a DICOM series
    in, a DICOM SEG out (readable, referencing the series); a NIfTI case with --format dcm fails alone."""
    import pydicom
    from distributed import Client, LocalCluster

    cohort = tmp_path / "cohort"
    shutil.copytree(data_root / "dicom" / "dcmqi_ct3slice" / "CT", cohort / "study" / "CT")
    shutil.copy(data_root / "cases" / "dcmqi_ct3slice" / "ct.nii.gz", cohort / "volume.nii.gz")
    out = tmp_path / "out"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        done = batch_cli(str(cohort), "-o", str(out), "--scheduler", cluster.scheduler_address, "--device", "cpu", "--format", "dcm")
        with Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 1  # still there
    assert done.returncode == EXIT_SOME_FAILED, done.stderr
    rows = summary_rows(out)
    assert rows["volume"]["status"] == "failed" and "needs a DICOM series" in rows["volume"]["error"]
    assert rows["study_CT"]["status"] == "done"
    seg = pydicom.dcmread(out / "study_CT.dcm")
    source = pydicom.dcmread(next((cohort / "study" / "CT").iterdir()), stop_before_pixels=True)
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    bad = batch_cli(str(cohort), "-o", str(tmp_path / "o2"), "--scheduler", "tcp://127.0.0.1:9", "--device", "cpu")
    assert bad.returncode == 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
