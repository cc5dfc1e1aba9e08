"""Post-processing on small arrays with hand-known answers and on a real liver: one liver, no holes,
lesions only inside it, lesion volumes, and ITK's labelling against scipy's."""

from __future__ import annotations

import numpy as np
import pytest

from LiverSegLib.postprocessing import compose_label_map, cut_organ, fill_holes, label_components, largest_component, lesion_volumes_ml


def test_largest_component_and_hole_filling():
    mask = np.zeros((9, 9, 9), bool)
    mask[1:6, 1:6, 1:6] = True
    mask[3, 3, 3] = False  # an enclosed hole
    island = mask.copy()
    island[:] = False
    island[8, 8, 8] = True  # not even diagonally touching the cube
    kept = largest_component(mask | island)
    assert not kept[8, 8, 8] and kept.sum() == 124
    assert fill_holes(kept).sum() == 125


def test_hole_filling_in_3d_and_per_slice_by_hand():
    """A cavity sealed in 3D fills; a tunnel open to the top and bottom (a vessel through the organ) is
    not a 3D hole but is one in every slice it crosses, so it fills too; a notch open at the side stays."""
    mask = np.zeros((7, 9, 9), bool)
    mask[1:6, 1:8, 1:8] = True
    mask[3, 2, 2] = False  # sealed cavity
    mask[:, 4, 4] = False  # tunnel through all slices (open in 3D: it reaches the first and last slice)
    mask[1:6, 6:8, 5] = False  # notch reaching the side in every slice
    mask[0, 4, 4] = mask[6, 4, 4] = False
    filled = fill_holes(mask)
    assert filled[3, 2, 2] and filled[1:6, 4, 4].all()
    assert not filled[1:6, 6:8, 5].any() and not filled[0].any() and not filled[6].any()
    assert filled.sum() == 5 * 7 * 7 - 5 * 2


def test_hole_filling_equals_scipy_slice_by_slice_on_a_real_liver(data_root):
    """Same result as scipy's binary_fill_holes in 3D, then in each slice, on ircad_17's expert liver
    with holes punched in: the single-pass labelling replaces the iterative propagation exactly."""
    from scipy import ndimage

    import SimpleITK as sitk

    from conftest import read_case

    liver = sitk.GetArrayFromImage(read_case(data_root, "ircad_17")[1]) >= 1
    generator = np.random.default_rng(1)
    holed = liver & (generator.random(liver.shape) > 0.02)
    expected = ndimage.binary_fill_holes(holed)
    for index in range(expected.shape[0]):
        expected[index] = ndimage.binary_fill_holes(expected[index])
    assert np.array_equal(fill_holes(holed), expected)


@pytest.mark.parametrize(("fully_connected", "density"), [(True, 0.08), (False, 0.25)])  # below percolation
def test_itk_components_partition_like_scipy_on_a_real_liver(data_root, fully_connected, density):
    """ITK's labelling (used for speed) splits a speckled real liver into exactly the components that
    ``ndimage.label`` finds with the 26- or 6-connected structure: same count, one-to-one labels."""
    from scipy import ndimage

    import SimpleITK as sitk

    from conftest import read_case

    liver = sitk.GetArrayFromImage(read_case(data_root, "ircad_17")[1]) >= 1
    speckled = liver & (np.random.default_rng(2).random(liver.shape) < density)  # thousands of components
    structure = ndimage.generate_binary_structure(3, 3 if fully_connected else 1)
    expected, expected_count = ndimage.label(speckled, structure=structure)
    labels, count = label_components(speckled, fully_connected)
    assert count == expected_count > 1000
    assert np.array_equal(labels > 0, expected > 0)
    pairs = np.unique(np.stack([labels[speckled], expected[speckled]]), axis=1)
    assert pairs.shape[1] == count  # each ITK label maps to one scipy label and back


def test_lesions_only_inside_the_cleaned_liver():
    liver = np.zeros((6, 10, 10), bool)
    liver[1:5, 1:6, 1:6] = True
    lesion = np.zeros_like(liver)
    lesion[2, 2, 2] = True  # inside the liver
    lesion[2, 8, 8] = True  # a separate island: removed with the other islands
    label = compose_label_map(liver & ~lesion, lesion)
    assert label[2, 2, 2] == 2 and label[2, 8, 8] == 0
    assert np.count_nonzero(label == 1) == liver.sum() - 1
    raw = compose_label_map(liver, lesion, keep_largest=False, fill=False)
    assert raw[2, 8, 8] == 2


def test_cropping_to_the_organ_changes_nothing():
    """Post-processing inside the bounding box equals the same steps on the whole volume."""
    from LiverSegLib.postprocessing import bounding_box

    generator = np.random.default_rng(0)
    liver = np.zeros((20, 40, 40), bool)
    liver[5:15, 10:30, 8:33] = generator.random((10, 20, 25)) > 0.25
    liver[0, 0, 0] = liver[19, 39, 39] = False
    lesion = np.zeros_like(liver)
    lesion[8:11, 15:18, 15:18] = True
    organ = liver | lesion
    expected = fill_holes(largest_component(organ)).astype(np.uint8)
    expected[lesion & (expected == 1)] = 2
    assert np.array_equal(compose_label_map(liver, lesion), expected)
    assert bounding_box(organ) == (slice(4, 16), slice(9, 31), slice(7, 34))


def test_any_box_holding_the_organ_gives_the_whole_volume_label_map():
    """The engine cleans up inside the box where the network's output can reach the threshold, which holds
    the organ but may fit it without a rim (pipeline.py): in any such box the label map is the whole
    volume's, with pockets opening onto the box's faces and an organ cut by the volume's edge."""
    generator = np.random.default_rng(4)
    liver = np.zeros((16, 30, 30), bool)
    liver[3:12, 5:25, 0:20] = generator.random((9, 20, 20)) > 0.3  # reaches the edge of the volume
    lesion = np.zeros_like(liver)
    lesion[6:8, 10:13, 10:13] = True
    lesion[14, 28, 28] = True  # a stray lesion voxel: part of the organ's box, not of its largest component
    expected = compose_label_map(liver, lesion)
    for box in [(slice(3, 15), slice(5, 29), slice(0, 29)), (slice(1, 16), slice(2, 30), slice(0, 30))]:
        label = np.zeros(liver.shape, np.uint8)
        label[box] = compose_label_map(liver[box], lesion[box])
        assert np.array_equal(label, expected)


def test_holes_are_filled_in_the_kept_organs_box_as_in_the_whole_volume():
    """Hole filling runs inside the box of the component that is kept, which is smaller than the organ's
    box when islands far from it are removed: the same label map as the steps on the whole volume, with a
    sealed cavity, a tunnel open in 3D and a notch at the side of the kept organ."""
    organ = np.zeros((30, 24, 24), bool)
    organ[2:12, 3:20, 2:22] = True
    organ[6, 8, 8] = False  # sealed cavity
    organ[2:12, 10, 10] = False  # tunnel through every slice
    organ[4:9, 18:20, 12] = False  # notch at the side
    island = np.zeros_like(organ)
    island[24:28, 1:5, 18:23] = True
    island[26, 3, 20] = False  # a cavity in the island: removed with it
    lesion = np.zeros_like(organ)
    lesion[7, 12:14, 12:14] = True
    expected = fill_holes(largest_component(organ | island | lesion)).astype(np.uint8)
    expected[lesion & (expected == 1)] = 2
    label = compose_label_map(organ | island, lesion)
    assert np.array_equal(label, expected)
    assert label[6, 8, 8] == 1 and label[2:12, 10, 10].all() and not label[4:9, 18:20, 12].any() and not label[20:].any()


def test_lesion_volumes_by_hand():
    """Two lesions, one of them two cubes touching only at a corner (26-connected: one lesion)."""
    label = np.zeros((10, 12, 12), np.uint8)
    label[1:9, 1:11, 1:11] = 1
    label[2:4, 2:4, 2:4] = 2  # 8 voxels
    label[4:5, 4:5, 4:5] = 2  # touches the first at a corner: same lesion, 9 voxels
    label[6:8, 7:10, 7:8] = 2  # 6 voxels
    assert sorted(lesion_volumes_ml(label, 0.5)) == [3.0, 4.5]
    assert lesion_volumes_ml(np.zeros((3, 3, 3), np.uint8), 1.0) == []


def _liver_with_two_lesions() -> tuple[np.ndarray, np.ndarray]:
    """A 10³-voxel liver holding a 1-voxel lesion and a 2×2×2 lesion (diagonal neighbours of the small
    one count: lesions are 26-connected)."""
    liver = np.zeros((12, 12, 12), bool)
    liver[1:11, 1:11, 1:11] = True
    lesion = np.zeros_like(liver)
    lesion[3, 3, 3] = True
    lesion[6:8, 6:8, 6:8] = True
    return liver, lesion


@pytest.mark.parametrize(("min_lesion_ml", "kept_voxels"), [(0.0, 9), (0.2, 8), (0.8, 8), (0.9, 0)])
def test_lesions_below_the_minimum_size_become_liver(min_lesion_ml, kept_voxels):
    """At 0.1 mL a voxel, the 1-voxel lesion (0.1 mL) goes below any bar above 0.1 mL and the 8-voxel one
    (0.8 mL) at a bar above 0.8 mL; dropped lesions stay liver, the liver itself is unchanged."""
    liver, lesion = _liver_with_two_lesions()
    label = compose_label_map(liver, lesion, min_lesion_ml=min_lesion_ml, voxel_ml=0.1)
    assert np.count_nonzero(label == 2) == kept_voxels
    assert np.array_equal(label >= 1, liver)
    assert lesion_volumes_ml(label, 0.1) == pytest.approx([0.1, 0.8] if kept_voxels == 9 else [0.8] if kept_voxels else [])


def test_diagonal_lesion_voxels_are_one_component_for_the_size_bar():
    """Two voxels touching only at a corner are one 26-connected lesion of 0.2 mL, kept at a 0.15 mL bar."""
    liver, lesion = _liver_with_two_lesions()
    lesion[4, 4, 4] = True  # corner neighbour of (3, 3, 3)
    label = compose_label_map(liver, lesion, min_lesion_ml=0.15, voxel_ml=0.1)
    assert label[3, 3, 3] == label[4, 4, 4] == 2


def test_no_minimum_size_leaves_the_label_map_as_before():
    liver, lesion = _liver_with_two_lesions()
    assert np.array_equal(compose_label_map(liver, lesion, min_lesion_ml=0.0, voxel_ml=0.1), compose_label_map(liver, lesion))


def _checkered_liver_with_a_dark_block() -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
    """A 20 mm cube of liver (1 mm voxels) at 95 and 105 HU in a checkerboard, with a 6 mm block at 40 HU
    on its edge: 216 dark voxels, 3892 at 95, 3892 at 105. By hand: the median is 95 (the 4000th and
    4001st values), the absolute deviations are 55 (216), 0 (3892) and 10 (3892), so the MAD is 10 and
    the robust spread 14.826."""
    ct = np.full((24, 24, 24), -100.0, np.float32)
    liver = np.zeros(ct.shape, bool)
    liver[2:22, 2:22, 2:22] = True
    z, y, x = np.indices(ct.shape)
    ct[liver] = np.where((z + y + x) % 2 == 0, 95.0, 105.0)[liver]
    block = (slice(9, 15), slice(9, 15), slice(2, 8))  # touches the cube's face at x = 2
    ct[block] = 40.0
    return ct, liver, block


@pytest.mark.parametrize(
    "k_mad, erode_mm, kept_columns",
    [(2.0, 0.0, slice(2, 8)),  # 95 − 2 × 14.826 = 65.3: the block, nothing else
     (4.0, 0.0, None),  # 95 − 4 × 14.826 = 35.7: not even the block
     (2.0, 3.0, slice(5, 8))],  # column 2 lies 1 mm from the outside voxel next to it, 5, 6 and 7 lie 4, 5 and 6 mm from it
)
def test_darker_than_liver_by_hand(k_mad, erode_mm, kept_columns):
    from LiverSegLib.postprocessing import darker_than_liver

    ct, liver, block = _checkered_liver_with_a_dark_block()
    expected = np.zeros(ct.shape, bool)
    if kept_columns is not None:
        expected[block[0], block[1], kept_columns] = True
    found = darker_than_liver(ct, liver, (1.0, 1.0, 1.0), sigma_mm=0.0, erode_mm=erode_mm, k_mad=k_mad)
    assert np.array_equal(found, expected)


def test_the_lesion_rule_replaces_the_networks_lesions_in_a_box_and_keeps_the_size_bar():
    """``mark_darker_lesions`` on a label map of part of a volume: a lesion the network drew elsewhere is
    liver again, the dark block is the lesion, and a size bar above its 0.216 mL makes it liver too."""
    from LiverSegLib.postprocessing import mark_darker_lesions

    ct, liver, block = _checkered_liver_with_a_dark_block()
    box = (slice(1, 23), slice(1, 23), slice(1, 23))
    rule = {"sigma_mm": 0.0, "erode_mm": 0.0, "k_mad": 2.0}
    for min_lesion_ml, lesion_voxels in ((0.0, 216), (0.2, 216), (0.3, 0)):
        label_map = liver[box].astype(np.uint8)
        label_map[15:18, 15:18, 15:18] = 2  # the network's lesion, where the CT is plain liver
        mark_darker_lesions(label_map, box, ct, (1.0, 1.0, 1.0), rule, min_lesion_ml, voxel_ml=0.001)
        assert np.count_nonzero(label_map == 2) == lesion_voxels
        assert np.count_nonzero(label_map >= 1) == 8000  # the organ is untouched
        if lesion_voxels:
            assert np.all(label_map[tuple(slice(s.start - 1, s.stop - 1) for s in block)] == 2)


def test_itk_distance_inside_a_real_liver_equals_scipys(data_root):
    """``distance_to_outside_mm`` (ITK's Maurer transform) against scipy's exact EDT on ircad_17's liver
    with its anisotropic voxels (0.74 × 0.74 × 1.6 mm), in the liver's box with a margin."""
    import SimpleITK as sitk
    from scipy import ndimage

    from LiverSegLib.geometry import bounding_box
    from LiverSegLib.postprocessing import distance_to_outside_mm

    label = sitk.ReadImage(str(data_root / "cases" / "ircad_17" / "label.nii.gz"))
    liver = sitk.GetArrayFromImage(label) >= 1
    liver = liver[bounding_box(liver, margin=2)]
    spacing_mm = tuple(reversed(label.GetSpacing()))
    expected = ndimage.distance_transform_edt(liver, sampling=spacing_mm)
    assert np.allclose(distance_to_outside_mm(liver, spacing_mm), expected, atol=1e-3)


@pytest.mark.parametrize("case, lesion_dice_above", [("ircad_01", 0.6), ("ircad_17", 0.5)])
def test_the_lesion_rule_inside_an_expert_liver_finds_its_lesions(data_root, case, lesion_dice_above):
    """The rule that the folds holding out ``ircad_01`` and ``ircad_17`` chose on the other patients
    (LiverSegTraining/RESULTS.md), inside the expert liver: lesion Dice above the bar, no false lesion."""
    import SimpleITK as sitk

    from LiverSegTraining.metrics import lesion_detection
    from LiverSegLib.postprocessing import mark_darker_lesions

    ct = sitk.ReadImage(str(data_root / "cases" / case / "ct.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data_root / "cases" / case / "label.nii.gz")))
    label_map = truth.copy()
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000
    whole = tuple(slice(0, n) for n in truth.shape)
    mark_darker_lesions(label_map, whole, sitk.GetArrayFromImage(ct), tuple(reversed(ct.GetSpacing())),
                        {"sigma_mm": 1.5, "erode_mm": 5.0, "k_mad": 3.0}, 0.5, voxel_ml)
    found, lesions = label_map == 2, truth == 2
    assert 2 * np.count_nonzero(found & lesions) / (np.count_nonzero(found) + np.count_nonzero(lesions)) > lesion_dice_above
    assert lesion_detection(found, lesions, voxel_ml)["lesion_false_count"] == 0


@pytest.mark.parametrize(("smoothness", "step_hu", "expected"), [
    (0.3, 0.0, [True, False]),  # the boundary between them costs less than making the second voxel organ
    (0.5, 0.0, [True, True]),   # it costs more
    (0.5, 100.0, [True, False]),  # an edge of 100 HU makes the boundary almost free (σ 25 HU: e^-8)
])
def test_graph_cut_of_two_voxels_by_hand(smoothness, step_hu, expected):
    """p 0.9 and 0.4 side by side, 1 mm apart. Organ/organ costs −ln 0.9 − ln 0.4 = 1.022 nats; organ/background
    −ln 0.9 − ln 0.6 + w = 0.616 + w: the cut keeps the second voxel out when w = smoothness · e^(−ΔHU²/2σ²)
    is under 0.405."""
    probability = np.array([[[0.9, 0.4]]], np.float32)
    ct_hu = np.array([[[50.0, 50.0 + step_hu]]], np.float32)
    assert cut_organ(probability, ct_hu, (1.0, 1.0, 1.0), smoothness, 25.0).ravel().tolist() == expected


def test_graph_cut_that_would_empty_the_organ_keeps_the_networks():
    """A 3×3×3 blob at p 0.6 in a sure background: a boundary of 54 faces at smoothness 100 costs far more than
    the blob's 27 × 0.405 nats, so the cut would drop it; the network's organ is kept instead. A mild cut
    keeps the blob and drops a lone voxel beside it."""
    probability = np.full((9, 9, 9), 0.01, np.float32)
    probability[3:6, 3:6, 3:6] = 0.6
    ct_hu = np.zeros(probability.shape, np.float32)
    assert np.array_equal(cut_organ(probability, ct_hu, (1.0, 1.0, 1.0), 100.0, 25.0), probability >= 0.5)
    probability[3, 3, 7] = 0.6
    mild = cut_organ(probability, ct_hu, (1.0, 1.0, 1.0), 0.2, 25.0)
    assert mild[3:6, 3:6, 3:6].all() and np.count_nonzero(mild) == 27


def test_graph_cut_adds_organ_only_within_its_reach():
    """A line of 1 mm voxels: sure organ for 5 mm, then unsure (p 0.45, 0.2 nats a voxel to be organ). A
    boundary worth 10 nats would move to the line's end 30 mm away; the cut is solved in the organ's box
    grown by 10 mm (and one voxel), so the organ stops there."""
    probability = np.full((1, 1, 30), 0.45, np.float32)
    probability[..., :5] = 0.9
    organ = cut_organ(probability, np.zeros(probability.shape, np.float32), (1.0, 1.0, 1.0), 10.0, 25.0)
    assert organ.ravel().tolist() == [True] * 16 + [False] * 14
