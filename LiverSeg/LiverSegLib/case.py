"""One case end to end, as ``liverseg segment`` and every task of ``liverseg batch`` run it: read a CT file or
one DICOM series, segment it with a loaded ``LiverSegmenter``, write the segmentation (label map,
``.seg.nrrd`` or DICOM SEG), the preview sheet and the reports, and return the volume report.

Both commands go through these functions so that a case gives the same files and figures whichever command
ran it; the commands differ only in how they find cases and load the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from .errors import LiverSegInputError
from .io import DicomSeries, read_ct, read_dicom_series
from .outputs import volume_report, write_report, write_segmentation
from .pipeline import LiverSegmenter, SegmentationResult

DICOM_SEG_SUFFIX = ".dcm"


@dataclass(frozen=True)
class CaseInput:
    """What one case reads: a CT file (NIfTI, NRRD, MHA, one DICOM file) or one DICOM series, whose sorted
    file list travels with it so that a cohort folder is scanned once, not once per case."""

    path: Path
    series: DicomSeries | None = None

    @property
    def shown(self) -> str:
        """The input as the summary and messages name it: the file, or the series' folder and handle."""
        if self.series is None:
            return str(self.path)
        return f"{self.path} --series {self.series.handle}" if self.series.handle else str(self.path)


@dataclass
class CaseImage:
    image: sitk.Image
    seg_sources: list | None = None  # the series' DICOM datasets, when a DICOM SEG is written


def is_dicom_seg(output: str | os.PathLike) -> bool:
    return str(output).lower().endswith(DICOM_SEG_SUFFIX)


def read_case(case: CaseInput, output: str | os.PathLike) -> CaseImage:
    """The CT in HU; for a DICOM SEG output also the source datasets it must reference (refused for a file)."""
    if is_dicom_seg(output):
        if case.series is None:
            raise LiverSegInputError(f"a DICOM SEG output ({Path(output).name}) needs a DICOM series folder as input")
        from .dicom_seg import source_datasets

        seg_sources = source_datasets(case.series)
        return CaseImage(read_dicom_series(case.series), seg_sources)
    if case.series is not None:
        return CaseImage(read_dicom_series(case.series))
    return CaseImage(read_ct(case.path))


def write_case(
    case: CaseInput,
    read: CaseImage,
    result: SegmentationResult,
    output: Path,
    lesions: bool,
    preview: Path | None = None,
    reports: tuple[Path, ...] = (),
) -> dict:
    """Every file of one case, each written atomically; returns the volume report (``--report`` JSON)."""
    if read.seg_sources is not None:
        from .dicom_seg import write_dicom_seg

        assert case.series is not None
        write_dicom_seg(result, case.series, output, lesions=lesions, datasets=read.seg_sources)
    else:
        write_segmentation(result, output, lesions=lesions)
    report = volume_report(read.image, result, str(case.path), str(output))
    if preview is not None:  # before the reports: a Markdown report never links a sheet that is not there
        from .preview import write_preview

        write_preview(read.image, result.label_image, report, preview)
    for path in reports:
        write_report(report, path, preview=preview)
    return report


def segment_case(
    segmenter: LiverSegmenter,
    case: CaseInput,
    output: Path,
    lesions: bool = True,
    postprocess: bool = True,
    preview: Path | None = None,
    batch_size: int | None = None,
) -> dict:
    """Read, segment and write one case with a model already loaded (a batch worker keeps one per process);
    returns its volume report, which holds every figure of the run."""
    read = read_case(case, output)
    result = segmenter.segment(read.image, lesions=lesions, postprocess=postprocess, batch_size=batch_size)
    return write_case(case, read, result, output, lesions, preview)
