"""DICOM SEG out (highdicom) for DICOM input, and DICOM SEG in (for checks against label maps).

Writing: one segment per class with SNOMED CT codes, algorithm type AUTOMATIC with the model's name and
version, frames referencing the source CT instances. The engine's label map lies on the grid of the
series read by ``io.read_ct``, whose slice k is ``series.files[k]`` (both come from GDCM's position
sort), so frame k of the SEG is slice k of the label map.

Reading: frames are placed by their Image Position (Patient) on a reference grid, not by the
referenced UIDs, as viewers do when UIDs are missing or do not point at the files at hand.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from .errors import LiverSegInputError
from .io import DicomSeries
from .outputs import atomic_output
from .pipeline import SegmentationResult
from .segments import LIVER_LESION, SEGMENTS, SegmentSpec


@contextlib.contextmanager
def _quiet_person_names():
    """Single-component patient names ("CRLM-CT-1004") are common in real exports; pydicom warns on each."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        yield


def _character_set(dataset) -> str | list[str]:
    """The source's Specific Character Set as highdicom accepts it for the SEG.

    highdicom copies (0008,0005) from the first source image and rejects an empty value (``''`` is
    not one of its ``SpecificCharacterSetValues``), yet DICOM allows it: empty or absent means the
    default repertoire, and an empty first value of several means ISO 2022 IR 6 (PS3.3 C.12.1.1.2).
    pydicom decodes text without a character set as Latin-1, a superset of that repertoire, so
    ISO_IR 100 describes the text exactly as read. Only the SEG gets this value, never the source.
    """
    value = dataset.get("SpecificCharacterSet")
    values = [value] if value is None or isinstance(value, str) else list(value)
    values = [str(v or "").strip() for v in values]
    if not any(values):
        return "ISO_IR 100"
    if len(values) == 1:
        return values[0]
    return [values[0] or "ISO 2022 IR 6", *values[1:]]


def _code(triplet: tuple[str, str, str]):
    from pydicom.sr.coding import Code

    value, scheme, meaning = triplet
    return Code(value, scheme, meaning)


def _lab_color(rgb: tuple[float, float, float]):
    """sRGB (0..1) → CIELab (D65 white), the colour space of DICOM's Recommended Display CIELab Value."""
    from highdicom.color import CIELabColor

    linear = [((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92 for c in rgb]
    matrix = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = matrix @ np.array(linear) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lightness, a, b = 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])
    return CIELabColor(float(np.clip(lightness, 0, 100)), float(np.clip(a, -128, 127)), float(np.clip(b, -128, 127)))


def _description(number: int, spec: SegmentSpec, model_name: str, model_version: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=spec.name,
        segmented_property_category=_code(spec.category),
        segmented_property_type=_code(spec.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model_name, family=codes.cid7162.ArtificialIntelligence, version=model_version
        ),
        anatomic_regions=[_code(spec.anatomic_region)] if spec.anatomic_region[0] else None,
        display_color=_lab_color(spec.color_rgb),
    )


def source_datasets(series: DicomSeries) -> list:
    """The series' headers, checked for what a DICOM SEG must reference: called before the network runs, so
    that a series a SEG cannot be made for is refused at once."""
    import pydicom

    with _quiet_person_names():
        datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]
    for dataset in datasets:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not str(getattr(dataset, keyword, "") or "").strip():
                raise LiverSegInputError(
                    f"source DICOM {Path(dataset.filename).name} has an empty {keyword}: a DICOM SEG cannot reference it; "
                    "write .nii.gz/.seg.nrrd instead or fix the UIDs"
                )
    return datasets


def build_dicom_seg(result: SegmentationResult, datasets: list, lesions: bool = True):
    """A highdicom ``Segmentation`` of ``result`` referencing the CT instances ``datasets`` (``source_datasets``)."""
    import highdicom as hd

    label = sitk.GetArrayViewFromImage(result.label_image)
    if label.shape[0] != len(datasets) or label.shape[1:] != (int(datasets[0].Rows), int(datasets[0].Columns)):
        raise LiverSegInputError("the label map does not match the DICOM series' frames")
    specs = [s for s in SEGMENTS if lesions or s is not LIVER_LESION]
    pixels = np.stack([label == spec.label_value for spec in specs], axis=-1).astype(np.uint8)
    first = datasets[0]
    with _quiet_person_names():
        return hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_description(i + 1, s, result.model_name, result.model_version) for i, s in enumerate(specs)],
            series_instance_uid=hd.UID(),
            series_number=int(getattr(first, "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="LiverSeg",
            manufacturer_model_name=result.model_name,
            software_versions=f"LiverSeg {__version__}; model {result.model_version}",
            device_serial_number="0",
            content_description="Liver and liver lesion segmentation",
            content_label="LIVERSEG",
            series_description="LiverSeg liver segmentation",
            omit_empty_frames=bool(pixels.any()),
            specific_character_set=_character_set(first),
        )


def write_dicom_seg(result: SegmentationResult, series: DicomSeries, path: str | os.PathLike, lesions: bool = True,
                    datasets: list | None = None) -> None:
    seg = build_dicom_seg(result, datasets if datasets is not None else source_datasets(series), lesions)
    with atomic_output(path, ".dcm") as temporary:
        seg.save_as(temporary)
