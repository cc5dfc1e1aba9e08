"""``liverseg``: segment a CT or a cohort (``batch``, on Dask) from the command line, list the series of a DICOM folder.

Errors the user can fix are one line on stderr with exit code 2; nothing is written unless the run
succeeds (the output goes to a temporary file that is renamed at the end).

``--progress json`` is for programs that run ``liverseg`` as a child process (the Slicer module's runner,
``LiverSegLib.job``): stdout then carries only JSON objects, one per line and flushed as they happen:
``{"event": "stage", "stage": "reading" | "loading model" | "segmenting" | "writing"}``,
``{"event": "progress", "done": slices_done, "total": slices}`` after every network batch,
``{"event": "warning", "message": …}``, and last either ``{"event": "result", "summary": …, "report": {…}}``
(the ``--report`` JSON) or ``{"event": "error", "message": …, "exit_code": …}``. The human-readable lines
and the engine's log stay on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import LiverSegInputError, one_line
from .options import BATCH_FORMATS, DEVICES, PRECISIONS, RUNTIMES

PRECISION_HELP = "CPU network: auto runs the model's int8 graph when it ships one (2.2-2.5 times the fp32 network's speed here, liver Dice within 0.0003 of fp32 on the expert cases: benchmarks/README.md), fp32 the full-precision graph"

EXIT_INPUT_ERROR = 2
PROGRESS_MODES = ("bar", "json", "none")


class JsonEvents:
    """``--progress json``: one JSON object per line on stdout, flushed at once so that a parent process
    sees each batch as it finishes. Thread-safe: the model loads in a second thread that may warn."""

    def __init__(self, stream=None) -> None:
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()

    def emit(self, event: str, **fields) -> None:
        line = json.dumps({"event": event, **fields})
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def stage(self, name: str) -> None:
        self.emit("stage", stage=name)

    def progress(self, done: int, total: int) -> None:
        self.emit("progress", done=done, total=total)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liverseg", description="Liver and liver-lesion segmentation of CT.")
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment a CT volume or DICOM series folder")
    segment.add_argument("input", help="CT as .nii.gz/.nii/.nrrd/.mha or a DICOM series folder")
    segment.add_argument("-o", "--output", required=True, help="label map: .nii.gz, .nii, .nrrd or .mha (0 background, 1 liver, 2 lesion), a Slicer segmentation .seg.nrrd, or DICOM SEG .dcm (DICOM input)")
    segment.add_argument("--device", default="auto", choices=DEVICES)
    segment.add_argument("--model", help="model card JSON (default: the bundled model)")
    segment.add_argument("--runtime", default="auto", choices=RUNTIMES, help="what runs the network; auto: ONNX Runtime on the CPU when installed (faster), else torch")
    segment.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    segment.add_argument("--batch-size", type=int, help="slices per network batch (default: sized to the device)")
    segment.add_argument("--series", help="which series, when a folder holds several: what `liverseg series` lists under --series (series number, SeriesInstanceUID, or @position)")
    segment.add_argument("--no-lesions", action="store_true", help="liver only")
    segment.add_argument("--no-postprocess", action="store_true", help="keep every liver component and hole")
    segment.add_argument("--report", action="append", default=[], metavar="PATH", help="volume report: .json and/or .md (repeatable)")
    segment.add_argument("--preview", metavar="PNG", help="a PNG sheet to check the result at a glance: three axial slices, a coronal and a sagittal reformat through the liver with its outlines and the run's figures (needs matplotlib: the preview extra); a .md report embeds it")
    segment.add_argument("--progress", default="bar", choices=PROGRESS_MODES, help="bar: a progress bar on a terminal; json: machine-readable events on stdout, one JSON object per line (for a parent process); none")
    batch = commands.add_parser(
        "batch", help="segment a cohort on a Dask cluster (local worker processes, or an existing cluster): resumable, one summary.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each CT file (.nii.gz .nii .nrrd .nhdr .mha .mhd) and each DICOM series in a folder is a case; a CSV manifest lists\n"
               "path[,name] rows. OUT_DIR gets NAME.<format> per case (NAME.png with --preview, and contact_sheet.png) and\n"
               "summary.csv (one row per case: status done/skipped/failed, error, liver mL, lesions, QC warnings, seconds,\n"
               "worker, model). A rerun skips the cases finished with the same model version and redoes failed ones.\n"
               "Exit status: 0 every case done or skipped; 3 some case failed (the rest are written); 2 a usage or input\n"
               "error before any case ran; 130 interrupted (finished cases are kept; rerun the command to go on).")
    batch.add_argument("inputs", nargs="+", metavar="INPUT", help="CT files, folders of CT files and DICOM series, or CSV manifests")
    batch.add_argument("-o", "--output-dir", required=True, metavar="OUT_DIR", help="folder for the outputs and summary.csv (created if missing)")
    batch.add_argument("--workers", type=int, help="local worker processes (default on the CPU: the cores, fewer if memory is short; on a GPU: 1); ignored with --scheduler")
    batch.add_argument("--scheduler", metavar="ADDRESS", help="use the running Dask cluster at this scheduler address (tcp://host:8786) as it is; its workers need liverseg installed and the paths readable")
    batch.add_argument("--device", default="auto", choices=DEVICES)
    batch.add_argument("--runtime", default="auto", choices=RUNTIMES)
    batch.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    batch.add_argument("--model", help="model card JSON (default: the bundled model)")
    batch.add_argument("--format", default="nii.gz", choices=tuple(BATCH_FORMATS), help="output per case: label map .nii.gz, Slicer .seg.nrrd, or DICOM SEG .dcm (DICOM series only)")
    batch.add_argument("--preview", action="store_true", help="a sheet NAME.png per case and contact_sheet.png of the cohort (needs matplotlib: the preview extra)")
    batch.add_argument("--no-lesions", action="store_true", help="liver only")
    batch.add_argument("--no-postprocess", action="store_true", help="keep every liver component and hole")
    series = commands.add_parser("series", help="list the DICOM series in a folder")
    series.add_argument("folder")
    export = commands.add_parser("export-onnx", help="write a model's ONNX graph beside its weights (which it reads from the safetensors file) and record it in the card, so that the CPU runs it without torch; needs torch and onnx")
    export.add_argument("--model", help="model card JSON (default: the bundled model)")
    return parser


def _progress_bar(total_hint: str):
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=100, desc=total_hint, unit="%", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.n = int(100 * done / total)
        bar.refresh()

    return update, bar.close


def _load_segmenter(card_path: str | Path, device: str, runtime: str, precision: str = "auto"):
    from .pipeline import LiverSegmenter

    return LiverSegmenter(card_path, device=device, runtime=runtime, precision=precision)


def _check_preview(path: str | None) -> Path | None:
    """``--preview``: refused before any work when matplotlib is missing or the path is wrong."""
    if path is None:
        return None
    from .preview import check_matplotlib, check_preview_path

    check_matplotlib()
    return check_preview_path(path)


def _segment(args: argparse.Namespace, events: JsonEvents | None) -> int:
    from .case import DICOM_SEG_SUFFIX, CaseInput, read_case, write_case
    from .io import check_input_path, select_series
    from .model import BUNDLED_CARD
    from .outputs import OUTPUT_SUFFIXES, check_output_path, check_report_path, summary_line

    if args.batch_size is not None and args.batch_size < 1:
        raise LiverSegInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    output = check_output_path(args.output, OUTPUT_SUFFIXES + (DICOM_SEG_SUFFIX,))
    reports = [check_report_path(path) for path in args.report]
    preview = _check_preview(args.preview)
    input_path = check_input_path(args.input)
    if output.exists() and output.resolve() == input_path.resolve():
        raise LiverSegInputError(f"output would overwrite the input: {output}")
    stage = events.stage if events else (lambda name: None)
    stage("reading")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="liverseg-model") as pool:
        # The model loads (torch import, weight check, ONNX session or CUDA start-up) while the CT is read:
        # SimpleITK releases the GIL while it decodes, so the two overlap (benchmarks/README.md).
        loading = pool.submit(_load_segmenter, args.model or BUNDLED_CARD, args.device, args.runtime, args.precision)
        case = CaseInput(input_path, select_series(input_path, args.series) if input_path.is_dir() else None)
        read = read_case(case, output)
        stage("loading model")
        segmenter = loading.result()
    stage("segmenting")
    if events:
        progress, close = events.progress, (lambda: None)
    elif args.progress == "bar":
        progress, close = _progress_bar("segmenting")
    else:
        progress, close = None, (lambda: None)
    try:
        result = segmenter.segment(
            read.image,
            lesions=not args.no_lesions,
            postprocess=not args.no_postprocess,
            batch_size=args.batch_size,
            progress=progress,
        )
    finally:
        close()
    stage("writing")
    report = write_case(case, read, result, output, not args.no_lesions, preview, tuple(reports))
    for warning in result.qc_warnings:
        _warn(warning, events)
    if events:
        events.emit("result", summary=summary_line(report), report=report)
        return 0
    print(f"{output}: {summary_line(report)}")
    if report["lesion_count"]:
        print(f"lesion burden {report['lesion_burden_pct']:.2f} % of the liver; largest lesions (mL): "
              + ", ".join(f"{v:.1f}" for v in report["lesion_volumes_ml"][:5]))
    if report["lesions_segmented"] and not report["lesions_validated"]:
        print("note: lesion output is experimental (cross-validated lesion Dice below 0.5; see the model card)")
    return 0


def _batch(args: argparse.Namespace) -> int:
    from .batch import BatchOptions, check_out_dir, connect, discard_unrecorded, find_cases, run_batch
    from .model import BUNDLED_CARD, read_card
    from .runtime import usable_cores

    if args.workers is not None and args.workers < 1:
        raise LiverSegInputError(f"--workers must be at least 1, got {args.workers}")
    if args.preview:
        from .preview import check_matplotlib

        check_matplotlib()
    card_path = str(Path(args.model or BUNDLED_CARD).resolve())
    read_card(card_path)  # a wrong --model is one line now, not a failure in every task
    cases = find_cases(args.inputs)
    if not cases:
        raise LiverSegInputError("no CT file, DICOM series or manifest row found in: " + " ".join(args.inputs))
    options = BatchOptions(check_out_dir(args.output_dir).resolve(), BATCH_FORMATS[args.format], card_path, args.device,
                           args.runtime, args.precision, not args.no_lesions, not args.no_postprocess, args.preview)
    on_row, close_bar = _batch_progress(len(cases))
    started_at = time.time()
    client, cluster = connect(args.scheduler, args.workers, usable_cores(), args.device)
    try:
        run = run_batch(cases, options, client, on_row)
    finally:
        close_bar()
        client.close()
        if cluster is not None:
            cluster.close()
    discard_unrecorded(cases, run, options, started_at)
    if args.preview:
        from .preview import write_contact_sheets

        for path in write_contact_sheets(run.rows, options.out_dir):
            print(f"contact sheet: {path}", file=sys.stderr)
    counts = ", ".join(f"{run.count(s)} {s}" for s in ("done", "skipped", "failed"))
    print(f"{options.out_dir / 'summary.csv'}: {len(cases)} case(s): {counts}" + (" (interrupted; rerun to go on)" if run.interrupted else ""))
    return run.exit_code


def _batch_progress(total: int):
    """A progress bar on a terminal (failures printed above it), else one line per finished case (logs)."""
    from .batch import format_row, print_row

    if not sys.stderr.isatty():
        return print_row, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="cases", unit="case", file=sys.stderr)

    def on_row(row: dict, finished: int, total: int) -> None:
        if row.get("status") == "failed":
            bar.write(format_row(row), file=sys.stderr)
        bar.n = finished
        bar.refresh()

    return on_row, bar.close


def _export_onnx(args: argparse.Namespace) -> int:
    from .model import BUNDLED_CARD
    from .runtime import export_onnx_graph

    card_path = Path(args.model or BUNDLED_CARD)
    card = export_onnx_graph(card_path)
    for stage in range(1, card.stages + 1):
        stage_card = card.stage_card(stage)
        print(f"{card_path.parent / stage_card.onnx_file}: SHA-256 {stage_card.onnx_sha256}, recorded in {card_path}")
    return 0


def _series(args: argparse.Namespace) -> int:
    from .io import list_dicom_series

    folder = Path(args.folder)
    if not folder.is_dir():
        raise LiverSegInputError(f"not a folder: {folder}")
    found = list_dicom_series(folder)
    if not found:
        raise LiverSegInputError(f"no DICOM CT series found in folder: {folder}")
    print(f"{'--series':>8}  {'number':>6}  {'slices':>6}  {'spacing':>8}  description / SeriesInstanceUID")
    for series in found:
        handle = series.handle if len(series.handle) <= 8 else "UID"
        print(f"{handle:>8}  {series.number or '-':>6}  {len(series.files):6d}  {series.spacing_mm:6.2f}mm  {series.description or '(no description)'}  {series.uid or '(no UID)'}")
    return 0


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (a StreamHandler would keep the first one)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _show_engine_messages() -> None:
    """The engine's own log lines (one-time ONNX export, OOM retries) on stderr, prefixed like warnings."""
    engine_log = logging.getLogger("LiverSegLib")
    if not any(isinstance(h, _StderrHandler) for h in engine_log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("liverseg: %(message)s"))
        engine_log.addHandler(handler)
        engine_log.setLevel(logging.INFO)


def _warn(message: str, events: JsonEvents | None) -> None:
    """Every warning of a run, LiverSeg's own and the engine's Python warnings: a line on stderr, and an
    event with ``--progress json``."""
    print(f"liverseg: warning: {message}", file=sys.stderr)
    if events:
        events.emit("warning", message=message)


def _fail(message: str, exit_code: int, events: JsonEvents | None) -> int:
    print(f"liverseg: {message}", file=sys.stderr)
    if events:
        events.emit("error", message=message.removeprefix("error: "), exit_code=exit_code)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    events = JsonEvents() if getattr(args, "progress", None) == "json" else None
    _show_engine_messages()
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the same warning for a second input is still said
        warnings.showwarning = lambda message, *rest: _warn(str(message), events)
        try:
            command = {"segment": lambda: _segment(args, events), "batch": lambda: _batch(args), "series": lambda: _series(args), "export-onnx": lambda: _export_onnx(args)}
            return command[args.command]()
        except LiverSegInputError as error:
            return _fail(f"error: {error}", EXIT_INPUT_ERROR, events)
        except KeyboardInterrupt:
            return _fail("interrupted, nothing written", 130, events)
        except Exception as error:  # noqa: BLE001 - the user gets one line; LIVERSEG_DEBUG=1 shows the traceback
            if os.environ.get("LIVERSEG_DEBUG"):
                raise
            return _fail(f"error: {one_line(error)}; rerun with LIVERSEG_DEBUG=1 for details", 1, events)


if __name__ == "__main__":
    sys.exit(main())
