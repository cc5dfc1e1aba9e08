"""``liverseg batch``: a cohort of CTs on a Dask cluster, resumable, with one summary table.

Each case is one Dask task. Without ``--scheduler`` the driver starts a local cluster of worker processes
(as many as the cores and the memory allow, ``default_workers``); with it, it submits to that cluster as it
is, so the same command runs on a laptop, on a workstation, on SLURM/PBS through dask-jobqueue and on
Kubernetes through dask-kubernetes (README.md, "Cohorts").

- A worker process loads the model once (``_worker_segmenter``) and keeps it for every later case.
- A case that fails is a row with status ``failed`` and a one-line error; the other cases go on. A worker
  that dies mid-case (killed, out of memory) has its case run again on another worker once, and recorded as
  failed if that dies too (``ALLOWED_FAILURES``).
- Every file is written atomically (``outputs.atomic_output``), so an output that exists is complete; the
  temporary files of a worker killed while writing are removed before a case runs and when the batch stops.
- ``OUT_DIR/summary.csv`` (``SUMMARY_COLUMNS``) is rewritten atomically as cases finish. A rerun skips every
  case whose row is ``done`` or ``skipped`` for the same model name and version and whose output (and sheet,
  with ``--preview``) exists; failed and missing cases run again.
- Exit status (``EXIT_*``): 0 every case done or skipped, 3 some case failed (the others are written),
  2 a usage or input error before any case ran, 130 interrupted (finished cases are kept and in the summary).
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import re
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from distributed.diagnostics.plugin import WorkerPlugin

from .case import CaseInput, segment_case
from .errors import LiverSegInputError, one_line
from .io import IMAGE_SUFFIXES, list_dicom_series
from .model import BUNDLED_CARD, read_card
from .outputs import atomic_output

MANIFEST_SUFFIX = ".csv"
SUMMARY_NAME = "summary.csv"
CONTACT_SHEET_NAME = "contact_sheet.png"
SUMMARY_COLUMNS = (
    "name", "input", "status", "error", "output", "preview", "liver_ml", "lesion_count", "lesion_ml",
    "lesion_burden_pct", "qc_warnings", "seconds", "worker", "model_name", "model_version", "device", "runtime", "precision",
)
FINISHED = ("done", "skipped")
EXIT_ALL_DONE, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 3, 130
# A case whose worker dies runs once more on another worker; a second death records it as failed.
ALLOWED_FAILURES = 1
# Memory to allow per local worker: the largest worker RSS measured on a cohort of the real CTs here, up to
# 512×512×302, was 1.2 GB (benchmarks/batch_throughput.py, benchmarks/README.md); 2 GB leaves room for longer
# scans. The local cluster starts no more workers than the available memory holds at this size.
WORKER_PEAK_MEMORY_BYTES = 2_000_000_000
SUMMARY_WRITE_INTERVAL_S = 5.0


@dataclass(frozen=True)
class BatchCase:
    """One case of the cohort: a unique name (its output files' stem), what it reads, and an error found
    while listing it (a manifest row naming a missing file), which makes it a failed row without a task."""

    name: str
    case: CaseInput
    error: str = ""


@dataclass(frozen=True)
class BatchOptions:
    """What every task needs; small and picklable, sent with each case."""

    out_dir: Path
    output_suffix: str = ".nii.gz"
    card_path: str = str(BUNDLED_CARD)
    device: str = "auto"
    runtime: str = "auto"
    precision: str = "auto"
    lesions: bool = True
    postprocess: bool = True
    preview: bool = False

    def output_of(self, name: str) -> Path:
        return self.out_dir / f"{name}{self.output_suffix}"

    def preview_of(self, name: str) -> Path:
        return self.out_dir / f"{name}.png"


# --- finding the cases -------------------------------------------------------------------------------


def _stem(path: Path) -> str:
    lower = path.name.lower()
    suffix = next((s for s in IMAGE_SUFFIXES if lower.endswith(s)), path.suffix)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def _safe_name(text: str) -> str:
    """A file-name stem from a path or a manifest name: letters, digits, ``.``, ``-``, ``_`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "case"


def _is_ct_file_name(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def _series_cases(folder: Path, root: Path, name: str | None) -> list[tuple[str, CaseInput]]:
    """Every DICOM CT series below ``folder``, named after its folder relative to ``root`` (and its
    ``--series`` handle when a folder holds several)."""
    found = list_dicom_series(folder)
    per_folder: dict[Path, int] = {}
    for series in found:
        per_folder[Path(series.files[0]).parent] = per_folder.get(Path(series.files[0]).parent, 0) + 1
    cases = []
    for series in found:
        parent = Path(series.files[0]).parent
        base = name or (str(parent.relative_to(root)) if parent != root else root.name)
        if per_folder[parent] > 1 or (name and len(found) > 1):
            base += f"_S{series.handle}"
        cases.append((base, CaseInput(parent, series)))
    return cases


def _folder_cases(folder: Path) -> list[tuple[str, CaseInput]]:
    """Each CT file (by its name: .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd) and each DICOM series below ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _is_ct_file_name(p))
    cases = [(str(p.parent.relative_to(folder) / _stem(p)), CaseInput(p)) for p in files]
    return cases + _series_cases(folder, folder, None)


def _manifest_cases(manifest: Path) -> list[tuple[str, CaseInput, str]]:
    """A CSV of ``path[,name]`` rows (a header row ``path,name`` is allowed); relative paths are taken
    from the manifest's folder. A row naming a missing path becomes a failed case, not a stop."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise LiverSegInputError(f"cannot read manifest {manifest}: {error}") from None
    cases = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [cell.strip() for cell in row]
        if not cells or not cells[0] or cells[0].startswith("#"):
            continue
        if number == 1 and cells[0].lower() == "path":
            continue
        path = Path(cells[0]).expanduser()
        path = path if path.is_absolute() else manifest.parent / path
        name = cells[1] if len(cells) > 1 and cells[1] else None
        if path.is_dir():
            series = _series_cases(path, path, name or path.name)
            cases += [(n, c, "") for n, c in series] or [(name or path.name, CaseInput(path), f"no DICOM CT series found in folder: {path}")]
        elif path.exists():
            cases.append((name or _stem(path), CaseInput(path), ""))
        else:
            cases.append((name or _stem(path), CaseInput(path), f"input does not exist: {path} ({manifest.name} row {number})"))
    return cases


def find_cases(inputs: Iterable[str | os.PathLike]) -> list[BatchCase]:
    """The cases of ``liverseg batch INPUT...``: CT files, folders (every CT file and DICOM series in them)
    and CSV manifests, with unique names (``_2``, ``_3`` appended to repeats) in the order given."""
    listed: list[tuple[str, CaseInput, str]] = []
    for given in inputs:
        path = Path(given).absolute()  # workers elsewhere (or in another folder) read the same file
        if not path.exists():
            raise LiverSegInputError(f"input does not exist: {path}")
        if path.is_dir():
            listed += [(n, c, "") for n, c in _folder_cases(path)]
        elif path.suffix.lower() == MANIFEST_SUFFIX:
            listed += _manifest_cases(path)
        else:
            listed.append((_stem(path), CaseInput(path), ""))
    cases, taken = [], set()
    for name, case, error in listed:
        unique = base = _safe_name(name)
        count = 1
        while unique.lower() in taken:
            count += 1
            unique = f"{base}_{count}"
        taken.add(unique.lower())
        cases.append(BatchCase(unique, case, error))
    return cases


# --- one case, on a worker ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _worker_segmenter(card_path: str, device: str, runtime: str, precision: str):
    """The model of this worker process, loaded by its first case and kept for every later one."""
    from .pipeline import LiverSegmenter

    return LiverSegmenter(card_path, device=device, runtime=runtime, precision=precision)


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def remove_partial_files(options: BatchOptions, name: str) -> None:
    """The temporary files a killed writer of this case may have left (``atomic_output`` names them
    ``.<file name>.<random>``); complete outputs are never touched."""
    for final in (options.output_of(name), options.preview_of(name)):
        for partial in options.out_dir.glob(f".{final.name}.*"):
            partial.unlink(missing_ok=True)


def run_case(batch_case: BatchCase, options: BatchOptions) -> dict:
    """Segment one case on this worker and return its summary row; every error becomes a failed row, so a
    bad case never stops the cohort nor makes Dask retry it (only a worker's death does)."""
    started = time.perf_counter()
    row = {"name": batch_case.name, "input": batch_case.case.shown, "worker": _worker_name()}
    output = options.output_of(batch_case.name)
    preview = options.preview_of(batch_case.name) if options.preview else None
    remove_partial_files(options, batch_case.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            segmenter = _worker_segmenter(options.card_path, options.device, options.runtime, options.precision)
            report = segment_case(segmenter, batch_case.case, output, options.lesions, options.postprocess, preview)
        except Exception as error:  # noqa: BLE001 - recorded in the summary, the cohort goes on
            if os.environ.get("LIVERSEG_DEBUG"):
                traceback.print_exc()
            return {**row, "status": "failed", "error": one_line(error), "seconds": round(time.perf_counter() - started, 2)}
    input_warnings = [str(w.message) for w in caught]
    return {
        **row,
        "status": "done",
        "error": "",
        "output": output.name,
        "preview": preview.name if preview else "",
        "liver_ml": report["liver_volume_ml"],
        "lesion_count": "" if report["lesion_count"] is None else report["lesion_count"],
        "lesion_ml": report["lesion_total_ml"] if report["lesions_segmented"] else "",
        "lesion_burden_pct": report["lesion_burden_pct"] if report["lesions_segmented"] else "",
        "qc_warnings": " | ".join(input_warnings + report["qc_warnings"]),
        "seconds": round(time.perf_counter() - started, 2),
        "model_name": report["model"]["name"],
        "model_version": report["model"]["version"],
        "device": report["device"],
        "runtime": report["runtime"],
        "precision": report["precision"],
    }


# --- the summary and resuming -------------------------------------------------------------------------


def read_summary(out_dir: Path) -> dict[str, dict]:
    """The rows of an earlier run's summary by case name (empty when there is none)."""
    path = out_dir / SUMMARY_NAME
    if not path.exists():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        return {row["name"]: row for row in csv.DictReader(handle) if row.get("name")}


def write_summary(rows: Iterable[dict], out_dir: Path) -> Path:
    path = out_dir / SUMMARY_NAME
    with atomic_output(path, ".csv") as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({key: row.get(key, "") for key in SUMMARY_COLUMNS} for row in rows)
    return path


def already_done(batch_case: BatchCase, previous: dict | None, options: BatchOptions, model: tuple[str, str]) -> bool:
    """A case finished by an earlier run with the same model version, whose files are all still there."""
    if previous is None or previous.get("status") not in FINISHED:
        return False
    if (previous.get("model_name"), previous.get("model_version")) != model or previous.get("input") != batch_case.case.shown:
        return False
    if not options.output_of(batch_case.name).exists():
        return False
    return not options.preview or options.preview_of(batch_case.name).exists()


# --- the driver ---------------------------------------------------------------------------------------


def default_workers(cores: int, available_memory_bytes: int, gpu: bool = False) -> int:
    """On the CPU as many worker processes as there are cores, but no more than the memory holds at a
    worker's peak; on a GPU one (each worker would hold its own model and CUDA context on the one device)."""
    if gpu:
        return 1
    return max(1, min(cores, available_memory_bytes // WORKER_PEAK_MEMORY_BYTES))


def uses_gpu(device: str) -> bool:
    """Whether the workers will run on a GPU: asked for, or ``auto`` on a machine with one."""
    from .inference import nvidia_gpu_present

    return device in ("cuda", "mps") or (device == "auto" and (nvidia_gpu_present() or sys.platform == "darwin"))


@dataclass
class BatchRun:
    """What a batch did: its summary rows in case order (earlier rows of other cases after them)."""

    rows: list[dict] = field(default_factory=list)
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(1 for row in self.rows if row.get("status") == status)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_SOME_FAILED if self.count("failed") else EXIT_ALL_DONE


class _InterruptIgnored(WorkerPlugin):
    """On each local worker process (and a restarted one): Ctrl-C in a terminal reaches the whole process
    group, and the driver, not each worker, stops the cohort (cancels the tasks, closes the cluster), so the
    workers ignore SIGINT instead of each printing a traceback. ``setup`` runs in the worker's main thread."""

    def setup(self, worker) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _local_cluster(workers: int, threads_per_worker: int):
    import dask
    from distributed import LocalCluster

    # Each worker process runs its network on its share of the cores (ONNX Runtime and torch read
    # OMP_NUM_THREADS, runtime.cpu_threads); Dask runs one case at a time per worker.
    environment = {"OMP_NUM_THREADS": str(threads_per_worker), "MKL_NUM_THREADS": str(threads_per_worker)}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environment,
                          "distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        # Dask's own log stays quiet below CRITICAL: a case's failure is its summary row, and a worker's heartbeat
        # racing the cluster's shutdown logs an ERROR with a traceback that says nothing about the cohort.
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                            silence_logs=logging.CRITICAL, memory_limit="auto")


def connect(scheduler: str | None, workers: int | None, cores: int, device: str = "cpu") -> tuple:
    """A Dask client: to the cluster at ``scheduler`` as it is, else to a new local cluster (returned too,
    to be closed) of ``workers`` processes (default: ``default_workers``)."""
    from distributed import Client

    if scheduler:
        try:
            return Client(scheduler, timeout="10s"), None
        except (OSError, TimeoutError) as error:
            raise LiverSegInputError(f"cannot reach the Dask scheduler at {scheduler}: {str(error).splitlines()[0]}") from None
    import psutil

    count = workers or default_workers(cores, psutil.virtual_memory().available, uses_gpu(device))
    cluster = _local_cluster(count, max(1, cores // count))
    client = Client(cluster)
    client.register_plugin(_InterruptIgnored(), name="liverseg-ignore-sigint")
    return client, cluster


def _failed_row(batch_case: BatchCase, error: str) -> dict:
    return {"name": batch_case.name, "input": batch_case.case.shown, "status": "failed", "error": error}


def _finished_future(future, batch_case: BatchCase) -> dict:
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker:
        return _failed_row(batch_case, f"the worker died {ALLOWED_FAILURES + 1} times while segmenting this case "
                                       "(killed, or out of memory: fewer --workers leave each more memory)")
    except Exception as error:  # noqa: BLE001 - a task that could not even run (e.g. unpicklable input)
        return _failed_row(batch_case, one_line(error))


def run_batch(
    cases: list[BatchCase],
    options: BatchOptions,
    client,
    on_row: Callable[[dict, int, int], None] = lambda row, finished, total: None,
) -> BatchRun:
    """Run every case not already done on ``client``'s cluster; the summary is kept current as rows arrive.

    A ``KeyboardInterrupt`` cancels the remaining tasks, keeps the finished rows and returns an interrupted
    run (the caller closes the cluster, then calls ``discard_unrecorded``)."""
    from distributed import as_completed

    card = read_card(options.card_path)
    model = (card.name, card.version)
    previous = read_summary(options.out_dir)
    rows: dict[str, dict] = {}
    to_run: list[BatchCase] = []
    for batch_case in cases:
        earlier = previous.get(batch_case.name)
        if batch_case.error:
            rows[batch_case.name] = _failed_row(batch_case, batch_case.error)
        elif already_done(batch_case, earlier, options, model):
            rows[batch_case.name] = {**earlier, "status": "skipped"}
            remove_partial_files(options, batch_case.name)  # left by a writer killed after the output was complete
        else:
            to_run.append(batch_case)
    names = {c.name for c in cases}
    others = [row for name, row in previous.items() if name not in names]
    run = BatchRun()

    def ordered() -> list[dict]:
        return [rows[c.name] for c in cases if c.name in rows] + others

    total, finished = len(cases), 0
    for row in list(rows.values()):
        finished += 1
        on_row(row, finished, total)
    write_summary(ordered(), options.out_dir)
    futures = {client.submit(run_case, c, options, key=f"liverseg-{c.name}-{os.urandom(4).hex()}", pure=False): c for c in to_run}
    last_write = time.monotonic()
    try:
        for future in as_completed(futures):
            batch_case = futures[future]
            rows[batch_case.name] = _finished_future(future, batch_case)
            finished += 1
            on_row(rows[batch_case.name], finished, total)
            if time.monotonic() - last_write >= SUMMARY_WRITE_INTERVAL_S:
                write_summary(ordered(), options.out_dir)
                last_write = time.monotonic()
    except KeyboardInterrupt:
        client.cancel(list(futures))
        run.interrupted = True
    run.rows = ordered()
    write_summary(run.rows, options.out_dir)
    return run


def discard_unrecorded(cases: list[BatchCase], run: BatchRun, options: BatchOptions, started_at: float) -> None:
    """After the cluster is closed: for every case without a row, the partial files of a killed writer and the
    files a worker still finished after an interrupt (written since ``started_at``, a ``time.time()``), so
    that every file this run left in OUT_DIR has its row in the summary. Older outputs are left as they are."""
    recorded = {row["name"] for row in run.rows}  # a case has a row once it is done, skipped or failed
    for batch_case in cases:
        if batch_case.name in recorded:
            continue
        remove_partial_files(options, batch_case.name)
        for path in (options.output_of(batch_case.name), options.preview_of(batch_case.name)):
            if path.exists() and path.stat().st_mtime >= started_at:
                path.unlink()


def check_out_dir(path: str | os.PathLike) -> Path:
    """The output folder, created if missing (its parent must exist), refused when it is a file."""
    out_dir = Path(path)
    if out_dir.exists() and not out_dir.is_dir():
        raise LiverSegInputError(f"output folder is a file: {out_dir}")
    if not out_dir.parent.is_dir():
        raise LiverSegInputError(f"output folder's parent does not exist: {out_dir.parent}")
    out_dir.mkdir(exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise LiverSegInputError(f"output folder is not writable: {out_dir}")
    return out_dir


def format_row(row: dict) -> str:
    """One line per finished case, for logs: name, status, and the liver volume or the error."""
    if row.get("status") == "failed":
        return f"{row['name']}: failed: {row.get('error', '')}"
    lesions = f", {row['lesion_count']} lesion(s) {float(row['lesion_ml']):.1f} mL" if str(row.get("lesion_count", "")) != "" else ""
    qc = " [QC]" if row.get("qc_warnings") else ""
    return f"{row['name']}: {row['status']}, liver {float(row['liver_ml']):.1f} mL{lesions}{qc}"


def print_row(row: dict, finished: int, total: int, stream=None) -> None:
    print(f"[{finished}/{total}] {format_row(row)}", file=stream or sys.stderr, flush=True)
