"""The MRML layer against Slicer's real libraries (PyPI ``slicer-core``), on real CT.

Volume nodes are built from a real CT with LPS, RAS and oblique IJK→RAS matrices; the segmentation
read back on the volume's grid must equal the engine's label map voxel for voxel, and a ``.seg.nrrd``
written through the segmentation storage node must read back identically."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import slicer  # noqa: E402  (PyPI slicer-core, a test dependency: a missing one fails the tests)
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from LiverSegLib.errors import LiverSegInputError  # noqa: E402
from LiverSegLib.mrml import segment_volume_node  # noqa: E402
from LiverSegLib.segments import LIVER, LIVER_LESION, SEGMENTS, terminology_entry  # noqa: E402

from conftest import read_case  # noqa: E402

vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)


def volume_node_from_image(scene, image: sitk.Image, name: str, label: bool = False):
    """A volume node holding the image's voxels with its geometry converted from LPS to RAS."""
    array = sitk.GetArrayFromImage(image)
    data = vtk.vtkImageData()
    data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtk_type = vtk.VTK_UNSIGNED_CHAR if label else vtk.VTK_SHORT
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True, array_type=vtk_type))
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(data)
    flip = np.diag([-1.0, -1.0, 1.0])
    matrix = vtk.vtkMatrix4x4()
    linear = flip @ np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    origin = flip @ np.asarray(image.GetOrigin())
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, linear[r, c])
        matrix.SetElement(r, 3, origin[r])
    node.SetIJKToRASMatrix(matrix)
    return node


def segment_on_volume_grid(scene, segmentation_node, volume_node) -> np.ndarray:
    """The segmentation exported onto the volume's grid as a 0/1/2 array [k, j, i]."""
    label = np.zeros(volume_node.GetImageData().GetDimensions()[::-1], np.uint8)
    for spec in (LIVER, LIVER_LESION):
        segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(spec.name)
        if not segment_id:
            continue
        temporary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, temporary, volume_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
        )
        data = temporary.GetImageData()
        mask = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(data.GetDimensions()[::-1]) > 0
        label[mask] = spec.label_value
        scene.RemoveNode(temporary)
    return label


@pytest.fixture()
def scene():
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    yield scene
    scene.Clear(1)


def storage_variants(ct: sitk.Image) -> dict[str, sitk.Image]:
    oblique = sitk.Image(ct)
    angle = np.deg2rad(15)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique.SetDirection(tuple((rotation @ np.asarray(ct.GetDirection()).reshape(3, 3)).ravel()))
    return {"lps": ct, "ras": sitk.Flip(ct, [True, True, False]), "oblique": oblique}


@pytest.mark.parametrize("storage", ["lps", "ras", "oblique"])
def test_segmentation_node_equals_engine_label_map(scene, data_root, segmenter, tmp_path, storage):
    ct, expert = read_case(data_root, "ircad_17")
    image = storage_variants(ct)[storage]
    expert_image = storage_variants(expert)[storage]
    volume_node = volume_node_from_image(scene, image, f"CT {storage}")

    segmentation_node = segment_volume_node(volume_node, segmenter=segmenter)

    engine_label = sitk.GetArrayFromImage(segmenter.segment(image).label_image)
    on_grid = segment_on_volume_grid(scene, segmentation_node, volume_node)
    assert np.array_equal(on_grid, engine_label)
    segmentation = segmentation_node.GetSegmentation()
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Liver"))
    assert "SCT^10200004^Liver" in liver.GetTerminology()
    assert liver.GetColor() == pytest.approx(LIVER.color_rgb)
    lesion = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Liver lesion"))
    assert "SCT^108369006^Neoplasm" in lesion.GetTerminology()
    assert float(segmentation_node.GetAttribute("LiverSeg.LiverVolumeMl")) > 500

    truth = sitk.GetArrayViewFromImage(expert_image) >= 1
    predicted = on_grid >= 1
    dice = 2 * np.count_nonzero(predicted & truth) / (predicted.sum() + truth.sum())
    print(f"\n{storage}: liver Dice vs expert label through MRML = {dice:.4f}")
    assert dice >= 0.9

    # .seg.nrrd through Slicer's storage node, read back into a new scene.
    path = tmp_path / f"liver_{storage}.seg.nrrd"
    storage_node = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage_node.SetFileName(str(path))
    assert storage_node.WriteData(segmentation_node)
    scene2 = slicer.vtkMRMLScene()
    reread = scene2.AddNewNodeByClass("vtkMRMLSegmentationNode", "reread")
    reader = scene2.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(reread)
    volume_in_scene2 = volume_node_from_image(scene2, image, "CT again")
    assert np.array_equal(segment_on_volume_grid(scene2, reread, volume_in_scene2), engine_label)
    assert reread.GetSegmentation().GetSegment("liver").GetName() == "Liver"


def test_rerun_replaces_segments_and_lesions_can_be_off(scene, data_root, segmenter):
    ct, _ = read_case(data_root, "totalseg_example_sm_MODEL")
    volume_node = volume_node_from_image(scene, ct, "CT")
    segmentation_node = segment_volume_node(volume_node, segmenter=segmenter)
    segment_volume_node(volume_node, segmentation_node, segmenter=segmenter, lesions=False)
    names = [segmentation_node.GetSegmentation().GetNthSegment(i).GetName() for i in range(segmentation_node.GetSegmentation().GetNumberOfSegments())]
    assert names == ["Liver"]


def test_label_map_and_empty_nodes_are_refused(scene, data_root, segmenter):
    _, label = read_case(data_root, "totalseg_example_sm_MODEL")
    label_node = volume_node_from_image(scene, label, "labels", label=True)
    with pytest.raises(LiverSegInputError, match="label map"):
        segment_volume_node(label_node, segmenter=segmenter)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(LiverSegInputError, match="no voxels"):
        segment_volume_node(empty, segmenter=segmenter)


def test_our_terminology_strings_equal_slicers_serializer():
    logic = slicer.vtkSlicerTerminologiesModuleLogic
    for spec in SEGMENTS:
        expected = logic.SerializeTerminologyEntry(
            "Segmentation category and type - 3D Slicer General Anatomy list",
            *spec.category, *spec.type, "", "", "",
            "Anatomic codes - DICOM master list", *spec.anatomic_region, "", "", "",
        )
        assert terminology_entry(spec) == expected


def test_cli_seg_nrrd_opens_in_slicer_as_named_segments(scene, data_root, segmenter, tmp_path):
    """A ``.seg.nrrd`` written by the engine without Slicer is read by Slicer's own storage node."""
    from LiverSegLib.outputs import write_segmentation

    ct, _ = read_case(data_root, "ircad_01")
    result = segmenter.segment(ct)
    path = tmp_path / "engine.seg.nrrd"
    write_segmentation(result, path)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "from engine")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    for spec in SEGMENTS:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(spec.name))
        assert segment is not None, spec.name
        assert segment.GetColor() == pytest.approx(spec.color_rgb, abs=1e-5)
        assert segment.GetTerminology() == terminology_entry(spec)
    volume_node = volume_node_from_image(scene, ct, "CT")
    assert np.array_equal(segment_on_volume_grid(scene, node, volume_node), sitk.GetArrayFromImage(result.label_image))
