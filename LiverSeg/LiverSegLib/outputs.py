"""Files LiverSeg writes: label maps, Slicer ``.seg.nrrd`` segmentations, volume reports (and, through
``atomic_output``, the DICOM SEG and the ONNX export of the model cache); the checks of output paths.

Every file is written to a temporary file beside its destination and renamed (``atomic_output``), so a
failed or killed run never leaves a half-written output. Nothing here imports torch: the Slicer module's
main process formats summaries with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import SimpleITK as sitk

from .errors import LiverSegInputError
from .io import IMAGE_SUFFIXES, LABEL_SUFFIXES
from .segments import LIVER, LIVER_LESION, LIVERSEG_SEGMENT_TAG, SEGMENTS, terminology_entry

if TYPE_CHECKING:  # the pipeline imports torch; reports and summaries are read where torch is not (Slicer's main process)
    from .pipeline import SegmentationResult

SEG_NRRD_SUFFIX = ".seg.nrrd"
OUTPUT_SUFFIXES = (SEG_NRRD_SUFFIX,) + LABEL_SUFFIXES
REPORT_SUFFIXES = (".json", ".md")


def as_null(_token: str) -> None:
    """A non-finite float's replacement in the tables, reports and cards: null, a figure never measured."""
    return None


def nan_as_null(value: Any, non_finite: Callable[[str], Any] = as_null, default: Callable[[Any], Any] | None = None) -> Any:
    """``value`` with every non-finite float (NaN, ±Infinity), at any depth, replaced by None, or by what
    ``non_finite`` makes of its token ("NaN", "Infinity", "-Infinity"); ``default`` is ``json.dumps``' for
    objects JSON cannot hold.

    A round trip through ``json``: its encoder writes the non-finite floats as the tokens NaN, Infinity and
    -Infinity, exactly the ones ``parse_constant`` is called for, so nothing else can be replaced.
    """
    return json.loads(json.dumps(value, default=default), parse_constant=non_finite)


def strict_json(value: Any, non_finite: Callable[[str], Any] = as_null, default: Callable[[Any], Any] | None = None) -> str:
    """Indented JSON that any reader loads (jq, JavaScript): a figure never measured is ``null``, not NaN
    (unless ``non_finite`` says otherwise; see ``nan_as_null``); ``allow_nan=False`` makes a missed non-finite
    value an error instead of invalid JSON."""
    return json.dumps(nan_as_null(value, non_finite, default), indent=1, allow_nan=False)


def write_strict_json(value: Any, path: str | os.PathLike, non_finite: Callable[[str], Any] = as_null, default: Callable[[Any], Any] | None = None) -> Path:
    """``strict_json`` written atomically (the model card, reports, training histories and tables, run records)."""
    path = Path(path)
    with atomic_output(path, ".json") as temporary:
        Path(temporary).write_text(strict_json(value, non_finite, default) + "\n", encoding="utf-8")
    return path


def check_output_path(path: str | os.PathLike, suffixes: tuple[str, ...] = LABEL_SUFFIXES) -> Path:
    """Validate an output path before any work is done, so a bad path costs nothing."""
    path = Path(path)
    if not any(str(path).lower().rstrip("/\\").endswith(s) for s in suffixes):
        raise LiverSegInputError(f"output must end with one of {', '.join(suffixes)}: {path}")
    if path.is_dir():
        raise LiverSegInputError(f"output is an existing folder, not a file name: {path}")
    if not path.parent.is_dir():
        raise LiverSegInputError(f"output folder does not exist: {path.parent}")
    try:  # a real probe: permission bits say nothing for root, read-only mounts or special file systems
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError:
        raise LiverSegInputError(f"output folder is not writable: {path.parent}") from None
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it.

    The rename is atomic on one file system, so readers see the old file or the complete new one and a
    failed run leaves nothing. The file gets the permissions a plain ``open`` would give it.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_image_atomic(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write an image (format from the extension) without ever leaving a half-written file."""
    suffix = next(s for s in LABEL_SUFFIXES + IMAGE_SUFFIXES if str(path).lower().endswith(s))
    with atomic_output(path, suffix) as temporary:
        sitk.WriteImage(image, temporary, useCompression=True)


def seg_nrrd_image(label_image: sitk.Image, lesions: bool = True) -> sitk.Image:
    """The label map with the header keys by which Slicer opens it as named, coloured segments."""
    image = sitk.Cast(label_image, sitk.sitkUInt8)
    size = image.GetSize()
    extent = f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}"
    specs = [s for s in SEGMENTS if lesions or s is not LIVER_LESION]
    for index, spec in enumerate(specs):
        prefix = f"Segment{index}_"
        for key, value in (
            ("ID", spec.segment_id),
            ("Name", spec.name),
            ("NameAutoGenerated", "0"),
            ("Color", " ".join(f"{c:.6f}" for c in spec.color_rgb)),
            ("ColorAutoGenerated", "0"),
            ("LabelValue", str(spec.label_value)),
            ("Layer", "0"),
            ("Extent", extent),
            ("Tags", f"{LIVERSEG_SEGMENT_TAG}:{spec.segment_id}|TerminologyEntry:{terminology_entry(spec)}|"),
        ):
            image.SetMetaData(prefix + key, value)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    return image


def write_segmentation(result: SegmentationResult, path: str | os.PathLike, lesions: bool = True) -> None:
    """``.seg.nrrd`` (a Slicer segmentation) or a plain label map, chosen by the extension."""
    if str(path).lower().endswith(SEG_NRRD_SUFFIX):
        write_image_atomic(seg_nrrd_image(result.label_image, lesions), path)
    else:
        write_image_atomic(result.label_image, path)


def volume_report(image: sitk.Image, result: SegmentationResult, input_path: str = "", output_path: str = "") -> dict:
    """Liver and lesion volumes, lesion burden, HU statistics inside the liver, model, device, timings."""
    label = sitk.GetArrayViewFromImage(result.label_image)
    hu = sitk.GetArrayViewFromImage(image)
    liver_hu = hu[label >= LIVER.label_value]
    parenchyma_hu = hu[label == LIVER.label_value]
    stats = {}
    for name, values in (("liver", liver_hu), ("parenchyma", parenchyma_hu)):
        if values.size:
            p5, median, p95 = np.percentile(values, [5, 50, 95])
            stats[name] = {"mean": float(values.mean()), "std": float(values.std()), "median": float(median), "p5": float(p5), "p95": float(p95)}
    return {
        "input": input_path,
        "output": output_path,
        "liver_volume_ml": round(result.liver_ml, 2),
        "lesions_segmented": result.lesion_count is not None,
        "lesions_validated": result.lesions_validated,
        "lesion_count": result.lesion_count,
        "lesion_volumes_ml": [round(v, 2) for v in sorted(result.lesion_volumes_ml, reverse=True)],
        "lesion_total_ml": round(result.lesion_ml, 2),
        "lesion_burden_pct": round(100.0 * result.lesion_ml / result.liver_ml, 3) if result.liver_ml else 0.0,
        "hu_inside_liver": stats,
        "model": {"name": result.model_name, "version": result.model_version},
        "device": result.device,
        "runtime": result.runtime,
        "precision": result.precision,
        "seconds": round(result.seconds, 3),
        "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
        "qc_warnings": list(result.qc_warnings),
    }


def summary_line(report: dict) -> str:
    """The one-line summary of a run that the CLI prints and the Slicer panel shows, from its report."""
    if report["lesions_segmented"]:
        lesions = f"{report['lesion_count']} lesion(s), {report['lesion_total_ml']:.1f} mL"
        lesions += "" if report["lesions_validated"] else " [experimental]"
    else:
        lesions = "lesions off"
    runtime = "" if report["runtime"] == "torch" else f" ({report['runtime']} {report.get('precision', 'fp32')})"
    return f"liver {report['liver_volume_ml']:.1f} mL; {lesions}; {report['seconds']:.1f} s on {report['device']}{runtime}"


def report_markdown(report: dict, preview: str | None = None) -> str:
    """The report as Markdown; ``preview``: the ``--preview`` sheet's path relative to the report, embedded."""
    lines = [
        "# LiverSeg volume report",
        "",
        *([f"![preview]({preview})", ""] if preview else []),
        f"- Input: `{report['input']}`",
        f"- Segmentation: `{report['output']}`",
        f"- Model: {report['model']['name']} {report['model']['version']} on {report['device']} ({report['runtime']}, {report.get('precision', 'fp32')}), {report['seconds']:.1f} s",
        "",
        "| measure | value |",
        "|---|---|",
        f"| liver volume (incl. lesions) | {report['liver_volume_ml']:.1f} mL |",
    ]
    if report["lesions_segmented"]:
        note = "" if report["lesions_validated"] else " (experimental)"
        lines += [
            f"| lesions{note} | {report['lesion_count']} |",
            f"| lesion volume, total | {report['lesion_total_ml']:.1f} mL |",
            f"| lesion burden | {report['lesion_burden_pct']:.2f} % of the liver |",
        ]
    liver = report["hu_inside_liver"].get("liver")
    if liver:
        lines.append(f"| HU inside the liver: mean ± SD (median; 5th–95th pct) | {liver['mean']:.1f} ± {liver['std']:.1f} ({liver['median']:.0f}; {liver['p5']:.0f}–{liver['p95']:.0f}) |")
    if report["lesion_volumes_ml"]:
        lines += ["", "Lesions by volume (mL): " + ", ".join(f"{v:.2f}" for v in report["lesion_volumes_ml"])]
    if report["qc_warnings"]:
        lines += ["", "Warnings:"] + [f"- {warning}" for warning in report["qc_warnings"]]
    return "\n".join(lines) + "\n"


def check_report_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise LiverSegInputError(f"report must end with .json or .md: {path}")
    if not path.parent.is_dir():
        raise LiverSegInputError(f"report folder does not exist: {path.parent}")
    return path


def write_report(report: dict, path: str | os.PathLike, preview: str | os.PathLike | None = None) -> None:
    """``.json`` or ``.md`` by the extension; a Markdown report embeds the ``preview`` sheet by a relative link
    (so the report and the picture can be moved together)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        write_strict_json(report, path)
        return
    link = None if preview is None else Path(os.path.relpath(Path(preview).resolve(), path.parent.resolve())).as_posix()
    text = report_markdown(report, link)
    with atomic_output(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")
