"""What the output segments are: names, label values, colours and coded terminology.

One definition shared by every output (Slicer segmentation nodes, ``.seg.nrrd``, DICOM SEG) so that a
segment is called, coloured and coded the same way wherever it appears.
"""

from __future__ import annotations

from dataclasses import dataclass

Code = tuple[str, str, str]  # (code value, coding scheme designator, code meaning)
# Slicer's DICOM master list holds both codes (SegmentationCategoryTypeModifier-DICOM-Master.json: Liver 10200004
# under Anatomical Structure, Neoplasm 108369006 under Morphologically Altered Structure); its default "3D Slicer
# General Anatomy list" holds neither, so naming it would leave the segments with codes Slicer cannot look up.
# SlicerTotalSegmentator codes its liver and liver tumour the same way.
SLICER_CATEGORY_TYPE_CONTEXT = "Segmentation category and type - DICOM master list"
SLICER_REGION_CONTEXT = "Anatomic codes - DICOM master list"
# A segment tag (in Slicer and in .seg.nrrd files) that marks LiverSeg's own segments, its value the segment's
# key (``SegmentSpec.segment_id``): a re-run replaces them, whatever the user renamed them to, and nothing else.
LIVERSEG_SEGMENT_TAG = "LiverSeg.Segment"


@dataclass(frozen=True)
class SegmentSpec:
    segment_id: str
    name: str
    label_value: int
    color_rgb: tuple[float, float, float]
    category: Code
    type: Code
    anatomic_region: Code = ("", "", "")


# Slicer's liver colour (221, 130, 101, as in its terminology lists); SNOMED CT codes as in Slicer's DICOM master list.
LIVER = SegmentSpec(
    "liver", "Liver", 1, (221 / 255, 130 / 255, 101 / 255),
    ("123037004", "SCT", "Anatomical Structure"), ("10200004", "SCT", "Liver"),
)
LIVER_LESION = SegmentSpec(
    "liver_lesion", "Liver lesion", 2, (0.78, 0.20, 0.20),
    ("49755003", "SCT", "Morphologically Altered Structure"), ("108369006", "SCT", "Neoplasm"),
    ("10200004", "SCT", "Liver"),
)
SEGMENTS = (LIVER, LIVER_LESION)


def _triplet(code: Code) -> str:
    value, scheme, meaning = code
    return f"{scheme}^{value}^{meaning}"


def terminology_entry(spec: SegmentSpec) -> str:
    """Slicer's serialized terminology (``TerminologyEntry`` tag), the same string as
    ``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry`` builds (tested against it)."""
    return "~".join(
        (
            SLICER_CATEGORY_TYPE_CONTEXT,
            _triplet(spec.category),
            _triplet(spec.type),
            "^^",
            SLICER_REGION_CONTEXT,
            _triplet(spec.anatomic_region),
            "^^",
        )
    )
