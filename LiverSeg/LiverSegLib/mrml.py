"""The Qt-free MRML layer: a ``vtkMRMLScalarVolumeNode`` in, a ``vtkMRMLSegmentationNode`` out.

Only ``slicer.vtk…`` classes, ``vtk`` and numpy are used, so the same code runs inside 3D Slicer (called
by the module's Logic) and in plain Python with the ``slicer-core`` wheel (the tests). Geometry: MRML
is RAS, the engine (SimpleITK) is LPS; the volume's IJK→RAS matrix is turned into an LPS direction and
origin, the engine returns a label map on that same voxel grid, and the segments are written with the
volume's IJK→RAS, so they are aligned voxel for voxel. ``slicer`` and ``vtk`` are imported when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import LiverSegInputError
from .io import check_ct

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class SegmentSpec:
    """Name, label value, colour and coded terminology of one output segment."""

    segment_id: str
    name: str
    label_value: int
    color_rgb: tuple[float, float, float]
    category: tuple[str, str, str]  # (code, scheme, meaning)
    type: tuple[str, str, str]
    anatomic_region: tuple[str, str, str] = ("", "", "")


# Slicer's "liver" colour from its General Anatomy colour table, SNOMED CT codes as Slicer's terminology.
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


def terminology_entry(spec: SegmentSpec) -> str:
    import slicer

    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        "Segmentation category and type - 3D Slicer General Anatomy list",
        *spec.category, *spec.type, "", "", "",
        "Anatomic codes - DICOM master list", *spec.anatomic_region, "", "", "",
    )


def _ijk_to_ras(volume_node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def image_from_volume_node(volume_node) -> sitk.Image:
    """The node's voxels and IJK→RAS geometry as an LPS SimpleITK image (what the engine reads)."""
    from vtk.util import numpy_support

    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise LiverSegInputError("input must be a scalar volume node (a CT), not empty or another node type")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise LiverSegInputError(f"'{volume_node.GetName()}' is a label map, not a CT volume")
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise LiverSegInputError(f"volume '{volume_node.GetName()}' has no voxels")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise LiverSegInputError(f"volume '{volume_node.GetName()}' has {image_data.GetNumberOfScalarComponents()} components; a CT has one")
    dims_ijk = image_data.GetDimensions()
    voxels_kji = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims_ijk[::-1])
    image = sitk.GetImageFromArray(voxels_kji)
    ijk_to_ras = _ijk_to_ras(volume_node)
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    if np.any(spacing == 0):
        raise LiverSegInputError(f"volume '{volume_node.GetName()}' has a zero voxel spacing")
    direction_lps = RAS_TO_LPS @ (ijk_to_ras[:3, :3] / spacing)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in RAS_TO_LPS @ ijk_to_ras[:3, 3]))
    image.SetDirection(tuple(float(v) for v in direction_lps.ravel()))
    return image


def _oriented_mask(mask_kji: np.ndarray, ijk_to_ras: np.ndarray):
    import slicer
    import vtk
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetDimensions(mask_kji.shape[2], mask_kji.shape[1], mask_kji.shape[0])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask_kji, dtype=np.uint8).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras))
    return image


def write_segments(segmentation_node, volume_node, label_kji: np.ndarray, lesions: bool = True) -> None:
    """Replace the node's LiverSeg segments with the label map's, on the volume's geometry."""
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation = segmentation_node.GetSegmentation()
    ijk_to_ras = _ijk_to_ras(volume_node)
    for spec in SEGMENTS:
        existing = segmentation.GetSegmentIdBySegmentName(spec.name)
        if existing:
            segmentation.RemoveSegment(existing)
        if spec is LIVER_LESION and not lesions:
            continue
        segment_id = segmentation_node.AddSegmentFromBinaryLabelmapRepresentation(
            _oriented_mask(label_kji == spec.label_value, ijk_to_ras), spec.name, list(spec.color_rgb), spec.segment_id
        )
        segment = segmentation.GetSegment(segment_id)
        segment.SetTerminology(terminology_entry(spec))
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
    segmentation.CollapseBinaryLabelmaps()


def store_result(segmentation_node, volume_node, result, lesions: bool = True) -> None:
    """Write a ``SegmentationResult`` into the node (main thread in Slicer) with its figures as attributes."""
    write_segments(segmentation_node, volume_node, sitk.GetArrayViewFromImage(result.label_image), lesions=lesions)
    for key, value in (
        ("LiverSeg.LiverVolumeMl", f"{result.liver_ml:.1f}"),
        ("LiverSeg.LesionCount", str(result.lesion_count)),
        ("LiverSeg.LesionVolumeMl", f"{result.lesion_ml:.1f}"),
        ("LiverSeg.Device", result.device),
        ("LiverSeg.Seconds", f"{result.seconds:.2f}"),
        ("LiverSeg.Model", f"{result.model_name} {result.model_version}"),
        ("LiverSeg.LesionsValidated", str(result.lesions_validated)),
    ):
        segmentation_node.SetAttribute(key, value)


def new_segmentation_node(volume_node):
    node = volume_node.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} liver segmentation")
    node.CreateDefaultDisplayNodes()
    return node


def segment_volume_node(volume_node, segmentation_node=None, segmenter: Any = None, **options):
    """Segment a CT volume node; returns the segmentation node ("Liver", "Liver lesion").

    ``options`` go to ``LiverSegmenter.segment`` (lesions, postprocess, batch_size, progress) and to
    ``LiverSegmenter`` (``model``: card path, ``device``). A new segmentation node is added to the
    volume's scene when none is given. The figures of the run are stored on the node as attributes.
    """
    from .model import BUNDLED_CARD
    from .pipeline import LiverSegmenter

    image = check_ct(image_from_volume_node(volume_node), f"volume '{volume_node.GetName()}'")
    model, device = options.pop("model", None), options.pop("device", "auto")
    if segmenter is None:
        segmenter = LiverSegmenter(model or BUNDLED_CARD, device=device)
    result = segmenter.segment(image, **options)
    if segmentation_node is None:
        segmentation_node = new_segmentation_node(volume_node)
    store_result(segmentation_node, volume_node, result, lesions=options.get("lesions", True))
    return segmentation_node
