"""The engine in a child process: how the Slicer module, its batch script and the tests segment.

Why a child process and not a thread: inside 3D Slicer the main thread holds Python's GIL all the time, so
a worker thread advances about one torch/ONNX operation per timer tick, and a crash in torch would take
Slicer down. Like SlicerTotalSegmentator, SlicerNNUnet and MONAIAuto3DSeg, LiverSeg runs the engine in
another Python (Slicer's ``PythonSlicer``, or ``sys.executable`` elsewhere): the ``liverseg`` CLI with
``--progress json``. Two reader threads only move the child's output lines into a queue (microseconds of
GIL each); everything else, including logging, happens in ``poll()`` on the caller's thread.

Nothing here imports torch, Qt or Slicer: the job is started, polled, cancelled and read back the same way
from a QTimer in Slicer and from pytest.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from .errors import LiverSegInputError

log = logging.getLogger(__name__)

ENGINE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding LiverSegLib: the child imports it from there
CANCEL_GRACE_S = 0.5  # SIGTERM first (the child dies at once: Python keeps the default handler), then SIGKILL
EXIT_INPUT_ERROR = 2  # the CLI's exit code for errors the user can fix (cli.EXIT_INPUT_ERROR; cli is not imported here)


class EngineProcessError(RuntimeError):
    """The child process failed for a reason other than the input: a crash, a kill, a timeout."""


class JobState(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SegmentationOptions:
    """What the user chose; the same names as the CLI's options (``model_card`` empty: the bundled model)."""

    device: str = "auto"
    runtime: str = "auto"
    lesions: bool = True
    postprocess: bool = True
    model_card: str = ""
    batch_size: int | None = None

    def cli_arguments(self) -> list[str]:
        arguments = ["--device", self.device, "--runtime", self.runtime]
        if self.model_card:
            arguments += ["--model", str(self.model_card)]
        if self.batch_size:
            arguments += ["--batch-size", str(self.batch_size)]
        if not self.lesions:
            arguments.append("--no-lesions")
        if not self.postprocess:
            arguments.append("--no-postprocess")
        return arguments


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _hidden_console() -> dict:
    """On Windows a console child would open a terminal window over Slicer. As ``slicer.util.launchConsoleProcess``
    does, the console is created hidden (not absent: PythonSlicer is a launcher whose own child inherits it)."""
    if sys.platform != "win32":
        return {}
    startupinfo = subprocess.STARTUPINFO()
    startupinfo.dwFlags |= subprocess.STARTF_USESHOWWINDOW
    startupinfo.wShowWindow = 0  # SW_HIDE
    return {"startupinfo": startupinfo}


class SegmentationJob:
    """One ``liverseg segment`` run in a child process, working in a private temporary folder.

    The input is a CT file (``for_image`` writes one from an in-memory image); the output is a label map
    in the job's folder, read back with ``label_image()``. Cancel, failure and ``close()`` remove the
    folder, so nothing is left behind whatever happens; success keeps it until ``close()``.
    """

    OUTPUT_NAME = "label.nrrd"

    def __init__(
        self,
        input_path: str | os.PathLike,
        options: SegmentationOptions = SegmentationOptions(),
        python_executable: str | None = None,
        timeout_s: float | None = None,
        work_dir: str | os.PathLike | None = None,
    ) -> None:
        self.options = options
        self.timeout_s = timeout_s
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="liverseg-job-"))
        self.input_path = Path(input_path).resolve()
        self.output_path = self.work_dir / self.OUTPUT_NAME
        self.state = JobState.RUNNING
        self.stage = "starting"
        self.done_slices = 0
        self.total_slices = 0
        self.warnings: list[str] = []
        self.error: str | None = None
        self.exit_code: int | None = None
        self.report: dict | None = None
        self.summary: str | None = None
        self.stderr_tail: deque[str] = deque(maxlen=50)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel_requested = False
        self._timed_out = False
        self._started = time.monotonic()
        command = [python_executable or sys.executable, "-m", "LiverSegLib.cli", "segment", str(self.input_path),
                   "-o", str(self.output_path), "--progress", "json", *options.cli_arguments()]
        environment = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ENGINE_ROOT), environment.get("PYTHONPATH")]))
        try:
            self._process = subprocess.Popen(
                command, cwd=str(ENGINE_ROOT), env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", bufsize=1, **_hidden_console(),
            )
        except OSError as error:
            self._remove_work_dir()
            raise EngineProcessError(f"cannot start the engine process {command[0]}: {error}") from error
        self.command = command
        self._readers = [
            threading.Thread(target=self._read, args=(self._process.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(self._process.stderr, "stderr"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @classmethod
    def for_image(cls, image: sitk.Image, options: SegmentationOptions = SegmentationOptions(), **kwargs) -> "SegmentationJob":
        """Write the image (voxels and LPS geometry) into a new job folder and start on it."""
        work_dir = Path(tempfile.mkdtemp(prefix="liverseg-job-"))
        input_path = work_dir / "ct.nrrd"
        try:
            sitk.WriteImage(image, str(input_path), useCompression=False)  # uncompressed: fastest to write and read
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        return cls(input_path, options, work_dir=work_dir, **kwargs)

    # -- reading the child (reader threads: only queue the lines) --

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self._events.put((name, line.rstrip("\r\n")))
        stream.close()

    def _handle(self, name: str, line: str) -> None:
        if name == "stderr":
            if line:
                self.stderr_tail.append(line)
                log.info("%s", line)
            return
        try:
            event = json.loads(line)
            kind = event["event"]
        except (ValueError, KeyError, TypeError):
            log.info("%s", line)  # not ours (a library printing to stdout): keep it in the log
            return
        if kind == "progress":
            self.done_slices, self.total_slices = int(event["done"]), int(event["total"])
        elif kind == "stage":
            self.stage = event["stage"]
        elif kind == "warning":
            self.warnings.append(event["message"])
        elif kind == "result":
            self.report, self.summary = event["report"], event["summary"]
        elif kind == "error":
            self.error, self.exit_code = event["message"], int(event.get("exit_code", 1))

    def _drain(self) -> None:
        while True:
            try:
                name, line = self._events.get_nowait()
            except queue.Empty:
                return
            self._handle(name, line)

    # -- the caller's side --

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def finished(self) -> bool:
        return self.state is not JobState.RUNNING

    @property
    def fraction_done(self) -> float:
        return self.done_slices / self.total_slices if self.total_slices else 0.0

    def poll(self) -> bool:
        """Take in what the child said since the last call; True once the job has ended (any outcome)."""
        if self.finished:
            return True
        self._drain()
        if self.timeout_s is not None and time.monotonic() - self._started > self.timeout_s and self._process.poll() is None:
            self._timed_out = True
            self._stop_process()
        returncode = self._process.poll()
        if returncode is None:
            return False
        for reader in self._readers:
            reader.join(timeout=5)
        self._drain()
        self._conclude(returncode)
        return True

    def _conclude(self, returncode: int) -> None:
        if self._cancel_requested:
            self.state = JobState.CANCELLED
        elif self._timed_out:
            self.state, self.error = JobState.FAILED, f"the engine did not finish within {self.timeout_s:g} s and was stopped"
        elif returncode == 0 and self.report is not None and self.output_path.is_file():
            self.state = JobState.SUCCEEDED
        else:
            self.state = JobState.FAILED
            if self.error is None or returncode < 0:
                last = f": {self.stderr_tail[-1]}" if self.stderr_tail else ""
                self.error = f"the engine process ended unexpectedly ({_describe_exit(returncode)}){last}"
        self.exit_code = self.exit_code if self.exit_code is not None else returncode
        if self.state is not JobState.SUCCEEDED:
            self._remove_work_dir()

    def wait(self, timeout_s: float | None = None, interval_s: float = 0.05) -> JobState:
        """Block until the job ends (scripts, tests, Slicer's batch mode); ``timeout_s`` then stops it."""
        waited_from = time.monotonic()
        while not self.poll():
            if timeout_s is not None and time.monotonic() - waited_from > timeout_s:
                self._timed_out, self.timeout_s = True, timeout_s
                self._stop_process()
            time.sleep(interval_s)
        return self.state

    def _stop_process(self) -> None:
        if self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def cancel(self) -> None:
        """Stop the child (within a second) and remove the job's files; the result, if any, is dropped."""
        if self.finished:
            if self.state is JobState.SUCCEEDED:
                self.state = JobState.CANCELLED
                self._remove_work_dir()
            return
        self._cancel_requested = True
        self._stop_process()
        self.poll()

    def raise_for_failure(self) -> None:
        """The job's error as an exception: the CLI's input errors stay ``LiverSegInputError``."""
        if self.state is JobState.FAILED:
            if self.exit_code == EXIT_INPUT_ERROR:
                raise LiverSegInputError(self.error)
            raise EngineProcessError(self.error)
        if self.state is JobState.CANCELLED:
            raise EngineProcessError("the segmentation was cancelled")
        if self.state is JobState.RUNNING:
            raise EngineProcessError("the segmentation is still running")

    def label_image(self) -> sitk.Image:
        """The label map the child wrote (0 background, 1 liver, 2 lesion) on the input's grid."""
        self.raise_for_failure()
        return sitk.ReadImage(str(self.output_path))

    def close(self) -> None:
        """Stop the child if it still runs and remove the job's files (idempotent)."""
        if not self.finished:
            self.cancel()
        self._remove_work_dir()

    def _remove_work_dir(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "SegmentationJob":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
