"""The MRML layer against Slicer's real libraries (PyPI ``slicer-core``), on real CT, with the engine in a
real child process (the path of Slicer's Segment Liver button).

Volume nodes are built from a real CT with LPS, RAS and oblique IJK→RAS matrices; the segmentation
read back on the volume's grid must equal the engine's label map voxel for voxel, and a ``.seg.nrrd``
written through the segmentation storage node must read back identically. Re-runs keep the user's own
segments, a CT under a transform gets its segmentation under the same transform, and the terminology
written the pre-5.10 way (a tag) is what Slicer reads back."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import slicer  # noqa: E402  (PyPI slicer-core, a test dependency: a missing one fails the tests)
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from LiverSegLib.errors import LiverSegInputError  # noqa: E402
from LiverSegLib.job import SegmentationOptions  # noqa: E402
from LiverSegLib.mrml import liverseg_segments, segment_volume_node, set_terminology_tag  # noqa: E402
from LiverSegLib.segments import LIVER, LIVER_LESION, SEGMENTS, terminology_entry  # noqa: E402

from conftest import read_case  # noqa: E402

vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)
CPU = SegmentationOptions(device="cpu")


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
    """The segmentation's "Liver" and "Liver lesion" exported onto the volume's grid as a 0/1/2 array [k, j, i]."""
    label = np.zeros(volume_node.GetImageData().GetDimensions()[::-1], np.uint8)
    for spec in (LIVER, LIVER_LESION):
        segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(spec.name)
        if segment_id:
            label[segment_mask(segmentation_node, segment_id, scene, volume_node)] = spec.label_value
    return label


def segment_mask(segmentation_node, segment_id: str, scene, volume_node) -> np.ndarray:
    """One segment as a boolean array on the volume's grid, through Slicer's own export."""
    temporary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, temporary, volume_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    data = temporary.GetImageData()
    mask = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(data.GetDimensions()[::-1]) > 0
    scene.RemoveNode(temporary)
    return mask


def save_and_reload(scene, segmentation_node, path):
    """Write a ``.seg.nrrd`` with Slicer's storage node and read it into a new scene: (new scene, node)."""
    storage_node = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage_node.SetFileName(str(path))
    assert storage_node.WriteData(segmentation_node)
    scene2 = slicer.vtkMRMLScene()
    reread = scene2.AddNewNodeByClass("vtkMRMLSegmentationNode", "reread")
    reader = scene2.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(reread)
    return scene2, reread


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

    segmentation_node = segment_volume_node(volume_node, options=CPU)

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
    assert dice >= 0.9  # a pipeline check (ircad_17 is a training patient of the bundled model), not accuracy

    # .seg.nrrd through Slicer's storage node, read back into a new scene.
    scene2, reread = save_and_reload(scene, segmentation_node, tmp_path / f"liver_{storage}.seg.nrrd")
    volume_in_scene2 = volume_node_from_image(scene2, image, "CT again")
    assert np.array_equal(segment_on_volume_grid(scene2, reread, volume_in_scene2), engine_label)
    assert reread.GetSegmentation().GetSegment("liver").GetName() == "Liver"


def test_rerun_replaces_segments_and_lesions_can_be_off(scene, data_root):
    ct, _ = read_case(data_root, "totalseg_example_sm_MODEL")
    volume_node = volume_node_from_image(scene, ct, "CT")
    segmentation_node = segment_volume_node(volume_node, options=CPU)
    segment_volume_node(volume_node, segmentation_node, options=SegmentationOptions(device="cpu", lesions=False))
    names = [segmentation_node.GetSegmentation().GetNthSegment(i).GetName() for i in range(segmentation_node.GetSegmentation().GetNumberOfSegments())]
    assert names == ["Liver"]


def test_label_map_and_empty_nodes_are_refused(scene, data_root):
    _, label = read_case(data_root, "totalseg_example_sm_MODEL")
    label_node = volume_node_from_image(scene, label, "labels", label=True)
    with pytest.raises(LiverSegInputError, match="label map"):
        segment_volume_node(label_node, options=CPU)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(LiverSegInputError, match="no voxels"):
        segment_volume_node(empty, options=CPU)


def test_our_terminology_strings_equal_slicers_serializer():
    logic = slicer.vtkSlicerTerminologiesModuleLogic
    for spec in SEGMENTS:
        expected = logic.SerializeTerminologyEntry(
            "Segmentation category and type - DICOM master list",
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
    assert liverseg_segments(segmentation) == {"liver": "liver", "liver_lesion": "liver_lesion"}, "LiverSeg's tag did not survive the file"


def test_rerun_keeps_the_users_segments_and_replaces_liversegs(scene, data_root, segmenter):
    ct, _ = read_case(data_root, "totalseg_example_sm_MODEL")
    volume_node = volume_node_from_image(scene, ct, "CT")
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "work")
    segmentation = segmentation_node.GetSegmentation()
    # The user's own segment, given the ID LiverSeg would pick for its liver.
    user_mask = np.zeros(volume_node.GetImageData().GetDimensions()[::-1], np.uint8)
    user_mask[5:15, 40:60, 40:60] = 1
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    oriented = slicer.vtkOrientedImageData()
    oriented.ShallowCopy(segment_image(user_mask))
    oriented.SetImageToWorldMatrix(matrix)
    segmentation_node.AddSegmentFromBinaryLabelmapRepresentation(oriented, "Liver", [0.1, 0.9, 0.1], "liver")

    segment_volume_node(volume_node, segmentation_node, options=CPU)
    ours = liverseg_segments(segmentation)
    assert set(ours) == {"liver", "liver_lesion"} and "liver" not in ours.values(), ours
    assert segment_mask(segmentation_node, ours["liver"], scene, volume_node).sum() > 1000
    # The user renames and recolours LiverSeg's liver, then runs again without lesions.
    segmentation.GetSegment(ours["liver"]).SetName("Liver (checked)")
    segmentation.GetSegment(ours["liver"]).SetColor(0.2, 0.3, 0.9)
    segment_volume_node(volume_node, segmentation_node, options=SegmentationOptions(device="cpu", lesions=False))

    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    assert len(ids) == len(set(ids)) == 2, ids
    assert np.array_equal(segment_mask(segmentation_node, "liver", scene, volume_node), user_mask > 0), "the user's segment changed"
    assert segmentation.GetSegment("liver").GetName() == "Liver"
    again = liverseg_segments(segmentation)
    assert set(again) == {"liver"}, again
    replaced = segmentation.GetSegment(again["liver"])
    assert replaced.GetName() == "Liver (checked)" and replaced.GetColor() == pytest.approx((0.2, 0.3, 0.9))
    liver_only = sitk.GetArrayFromImage(segmenter.segment(ct, lesions=False).label_image) == LIVER.label_value
    assert np.array_equal(segment_mask(segmentation_node, again["liver"], scene, volume_node), liver_only)
    assert segmentation_node.GetAttribute("LiverSeg.LesionCount") is None
    assert "lesions off" in segmentation_node.GetAttribute("LiverSeg.Summary")


def segment_image(mask_kji: np.ndarray):
    data = vtk.vtkImageData()
    data.SetDimensions(mask_kji.shape[2], mask_kji.shape[1], mask_kji.shape[0])
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(mask_kji).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    return data


def test_ct_under_a_transform_gets_its_segmentation_under_the_same_transform(scene, data_root, segmenter):
    ct, _ = read_case(data_root, "totalseg_example_sm_MODEL")
    volume_node = volume_node_from_image(scene, ct, "CT")
    transform_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    moved = vtk.vtkTransform()
    moved.Translate(30.0, -12.5, 80.0)
    moved.RotateZ(20)
    transform_node.SetMatrixTransformToParent(moved.GetMatrix())
    volume_node.SetAndObserveTransformNodeID(transform_node.GetID())

    segmentation_node = segment_volume_node(volume_node, options=CPU)

    assert segmentation_node.GetTransformNodeID() == transform_node.GetID()
    # Same local grid as the CT (the transform moves both together): voxel for voxel the engine's label map.
    engine_label = sitk.GetArrayFromImage(segmenter.segment(ct).label_image)
    assert np.array_equal(segment_on_volume_grid(scene, segmentation_node, volume_node), engine_label)
    # In world coordinates the liver's centre moved with the CT.
    bounds_moved, bounds_local = [0.0] * 6, [0.0] * 6
    liver_id = liverseg_segments(segmentation_node.GetSegmentation())["liver"]
    segmentation_node.GetSegmentation().GetSegment(liver_id).GetBounds(bounds_local)
    segmentation_node.GetRASBounds(bounds_moved)
    centre_local = np.array([(bounds_local[0] + bounds_local[1]) / 2, (bounds_local[2] + bounds_local[3]) / 2, (bounds_local[4] + bounds_local[5]) / 2, 1])
    expected = np.array([[moved.GetMatrix().GetElement(r, c) for c in range(4)] for r in range(4)]) @ centre_local
    centre_world = [(bounds_moved[0] + bounds_moved[1]) / 2, (bounds_moved[2] + bounds_moved[3]) / 2, (bounds_moved[4] + bounds_moved[5]) / 2]
    assert np.allclose(centre_world, expected[:3], atol=15.0), (centre_world, expected)


def test_terminology_written_as_a_tag_before_slicer_5_10_is_what_slicer_reads(scene, tmp_path):
    """Slicer 5.8 has no ``vtkSegment.SetTerminology``: the entry goes into the tag, which current Slicer
    reads back as the segment's terminology, in the scene and from a saved ``.seg.nrrd``."""
    mask = np.zeros((4, 6, 8), np.uint8)
    mask[1:3, 2:4, 2:6] = 1
    oriented = slicer.vtkOrientedImageData()
    oriented.ShallowCopy(segment_image(mask))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tagged")
    for spec in SEGMENTS:
        segment_id = node.AddSegmentFromBinaryLabelmapRepresentation(oriented, spec.name, list(spec.color_rgb), spec.segment_id)
        set_terminology_tag(node.GetSegmentation().GetSegment(segment_id), terminology_entry(spec))
        assert node.GetSegmentation().GetSegment(segment_id).GetTerminology() == terminology_entry(spec)
    _, reread = save_and_reload(scene, node, tmp_path / "tagged.seg.nrrd")
    for spec in SEGMENTS:
        assert reread.GetSegmentation().GetSegment(spec.segment_id).GetTerminology() == terminology_entry(spec)


def test_a_cancelled_run_leaves_the_segmentation_untouched(scene, data_root):
    from LiverSegLib.mrml import finish_segmentation, start_segmentation

    ct, _ = read_case(data_root, "ircad_01")
    volume_node = volume_node_from_image(scene, ct, "CT")
    segmentation_node = segment_volume_node(volume_node, options=SegmentationOptions(device="cpu", lesions=False))
    before = segment_on_volume_grid(scene, segmentation_node, volume_node)
    attributes = segmentation_node.GetAttribute("LiverSeg.Summary")
    volume_job = start_segmentation(volume_node, segmentation_node, SegmentationOptions(device="cpu", batch_size=4))
    while volume_job.job.done_slices == 0:
        assert not volume_job.job.poll(), volume_job.job.error
    volume_job.job.cancel()
    with pytest.raises(Exception, match="cancelled"):
        finish_segmentation(volume_job)
    assert not volume_job.job.work_dir.exists()
    assert np.array_equal(segment_on_volume_grid(scene, segmentation_node, volume_node), before)
    assert segmentation_node.GetAttribute("LiverSeg.Summary") == attributes
    assert set(liverseg_segments(segmentation_node.GetSegmentation())) == {"liver"}
