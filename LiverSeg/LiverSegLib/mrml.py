"""The Qt-free MRML layer: a ``vtkMRMLScalarVolumeNode`` in, a ``vtkMRMLSegmentationNode`` out.

Only ``slicer.vtk…`` classes, ``vtk`` and numpy are used, so the same code runs inside 3D Slicer (called
by the module's Logic) and in plain Python with the ``slicer-core`` wheel (the tests). The engine itself
runs in a child process (``job.SegmentationJob``): this layer writes the volume for it, and imports its
label map on the caller's (Slicer's main) thread; torch is never imported here.

Geometry: MRML is RAS, the engine (SimpleITK) is LPS; the volume's IJK→RAS matrix is turned into an LPS
direction and origin, the engine returns a label map on that same voxel grid, and the segments are
written with the volume's IJK→RAS (and under its parent transform), so they are aligned voxel for voxel.
``slicer`` and ``vtk`` are imported when called.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import LiverSegInputError
from .io import check_ct
from .job import SegmentationJob, SegmentationOptions
from .outputs import summary_line
from .segments import LIVER_LESION, LIVERSEG_SEGMENT_TAG, SEGMENTS, terminology_entry

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


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


def set_terminology(segment, entry: str) -> None:
    """The segment's coded terminology on every Slicer in use: ``vtkSegment.SetTerminology`` exists only
    from Slicer 5.10; before, the same serialized entry goes into the ``TerminologyEntry`` tag (which is
    also what 5.10 and later read back with ``GetTerminology``)."""
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(entry)
    else:
        set_terminology_tag(segment, entry)


def set_terminology_tag(segment, entry: str) -> None:
    """Slicer before 5.10 (and SlicerTotalSegmentator on every release): the entry as the segment's tag."""
    segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def liverseg_segments(segmentation) -> dict[str, str]:
    """{our segment key (``liver``, ``liver_lesion``): segment ID} of the segments LiverSeg wrote, found by
    our tag: the user may have renamed or recoloured them, and may have segments of their own."""
    import vtk

    found = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        key = vtk.reference("")
        if segmentation.GetSegment(segment_id).GetTag(LIVERSEG_SEGMENT_TAG, key):
            found[str(key)] = segment_id
    return found


def write_segments(segmentation_node, volume_node, label_kji: np.ndarray, lesions: bool = True) -> None:
    """Replace LiverSeg's own segments with the label map's and leave every other segment alone.

    A replaced segment keeps its place in the list, and the name and colour the user may have given it;
    its voxels and terminology are new. The segmentation follows the volume's parent transform, so the two
    stay aligned when the CT has been moved or registered.
    """
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    segmentation = segmentation_node.GetSegmentation()
    ijk_to_ras = _ijk_to_ras(volume_node)
    previous = liverseg_segments(segmentation)
    for spec in SEGMENTS:
        old_id = previous.get(spec.segment_id)
        name, color, index = spec.name, spec.color_rgb, None
        if old_id:
            old = segmentation.GetSegment(old_id)
            name, color, index = old.GetName(), old.GetColor(), segmentation.GetSegmentIndex(old_id)
            segmentation.RemoveSegment(old_id)
        if spec is LIVER_LESION and not lesions:
            continue
        segment_id = segmentation_node.AddSegmentFromBinaryLabelmapRepresentation(
            _oriented_mask(label_kji == spec.label_value, ijk_to_ras), name, list(color),
            segmentation.GenerateUniqueSegmentID(spec.segment_id),
        )
        segment = segmentation.GetSegment(segment_id)
        segment.SetTag(LIVERSEG_SEGMENT_TAG, spec.segment_id)
        set_terminology(segment, terminology_entry(spec))
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        if index is not None:
            segmentation.SetSegmentIndex(segment_id, index)
    segmentation.CollapseBinaryLabelmaps()


def store_result(segmentation_node, volume_node, label_kji: np.ndarray, report: dict) -> None:
    """Write a run's label map into the node (main thread in Slicer), with its figures as attributes.

    ``report`` is the engine's volume report (``outputs.volume_report``, the ``result`` event of the child)."""
    write_segments(segmentation_node, volume_node, label_kji, lesions=report["lesions_segmented"])
    attributes = {
        "LiverSeg.LiverVolumeMl": f"{report['liver_volume_ml']:.1f}",
        "LiverSeg.LesionCount": str(report["lesion_count"]) if report["lesions_segmented"] else None,
        "LiverSeg.LesionVolumeMl": f"{report['lesion_total_ml']:.1f}" if report["lesions_segmented"] else None,
        "LiverSeg.LesionsValidated": str(report["lesions_validated"]),
        "LiverSeg.Device": report["device"],
        "LiverSeg.Runtime": report["runtime"],
        "LiverSeg.Seconds": f"{report['seconds']:.2f}",
        "LiverSeg.Model": f"{report['model']['name']} {report['model']['version']}",
        "LiverSeg.Summary": summary_line(report),
    }
    for key, value in attributes.items():
        if value is None:
            segmentation_node.RemoveAttribute(key)
        else:
            segmentation_node.SetAttribute(key, value)


def new_segmentation_node(volume_node):
    node = volume_node.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} liver segmentation")
    node.CreateDefaultDisplayNodes()
    return node


@dataclass
class VolumeJob:
    """A child-process run bound to the nodes it was started for, so that the result goes where the user
    asked even if the module's selection changed meanwhile. ``segmentation_node`` None: a new node at the end."""

    job: SegmentationJob
    volume_node: Any
    segmentation_node: Any = None


def start_segmentation(
    volume_node,
    segmentation_node=None,
    options: SegmentationOptions = SegmentationOptions(),
    python_executable: str | None = None,
    timeout_s: float | None = None,
) -> VolumeJob:
    """Check the volume and start the engine on it in a child process; returns at once.

    The volume's voxels and IJK→RAS go to the child as a temporary NRRD (LPS, as every file is). A volume
    that cannot be a CT is refused here, before the child's start-up; the child checks the rest."""
    image = image_from_volume_node(volume_node)
    with warnings.catch_warnings():  # the child warns again, and its warnings reach the caller through the job
        warnings.simplefilter("ignore")
        check_ct(image, f"volume '{volume_node.GetName()}'")
    job = SegmentationJob.for_image(image, options, python_executable=python_executable, timeout_s=timeout_s)
    return VolumeJob(job, volume_node, segmentation_node)


def finish_segmentation(volume_job: VolumeJob):
    """Main thread, once the job has ended: import its label map into the segmentation node (a new one when
    none was given) and remove the job's files. Raises the job's error if it failed or was cancelled."""
    job, volume_node = volume_job.job, volume_job.volume_node
    try:
        label_image = job.label_image()
        if volume_node.GetScene() is None:
            raise LiverSegInputError(f"volume '{volume_node.GetName()}' was removed from the scene during the run")
        label_kji = sitk.GetArrayViewFromImage(label_image)
        if label_kji.shape != tuple(volume_node.GetImageData().GetDimensions()[::-1]):
            raise LiverSegInputError(f"volume '{volume_node.GetName()}' changed size during the run; run again")
        segmentation_node = volume_job.segmentation_node
        if segmentation_node is None or segmentation_node.GetScene() is None:
            segmentation_node = volume_job.segmentation_node = new_segmentation_node(volume_node)
        store_result(segmentation_node, volume_node, label_kji, job.report)
        return segmentation_node
    finally:
        job.close()


def segment_volume_node(volume_node, segmentation_node=None, options: SegmentationOptions = SegmentationOptions(), **job_arguments):
    """Segment a CT volume node and wait; returns the segmentation node ("Liver", "Liver lesion").

    The same path as Slicer's button: start the child, wait for it, import its result
    (``job_arguments``: ``python_executable``, ``timeout_s``)."""
    volume_job = start_segmentation(volume_node, segmentation_node, options, **job_arguments)
    volume_job.job.wait()
    return finish_segmentation(volume_job)
