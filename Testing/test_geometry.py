"""Canonical orientation: hand-checked transforms, exact round trips, engine output on the input grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegLib.geometry import canonical_transform

from conftest import read_case

IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def test_identity_lps_needs_nothing():
    transform = canonical_transform(IDENTITY)
    assert transform.axes == (0, 1, 2) and transform.flip == (False, False, False)


def test_ras_flips_rows_and_columns():
    # NIfTI-style RAS storage: i runs to the right (-L), j anterior (-P), k superior.
    transform = canonical_transform((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert transform.axes == (0, 1, 2) and transform.flip == (False, True, True)


def test_permuted_axes_are_found():
    # i runs superior, j left, k posterior (a sagittal-like storage order).
    direction = np.zeros((3, 3))
    direction[2, 0] = 1  # i → S
    direction[0, 1] = 1  # j → L
    direction[1, 2] = -1  # k → A
    transform = canonical_transform(direction.ravel())
    # numpy axes of the (k, j, i) array: S is i (numpy 2), P is k (numpy 0, flipped), L is j (numpy 1)
    assert transform.axes == (2, 0, 1) and transform.flip == (False, True, False)


def test_oblique_picks_nearest_axes():
    angle = np.deg2rad(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    transform = canonical_transform(rotation.ravel())
    assert transform.axes == (0, 1, 2) and transform.flip == (False, False, False)


def test_singular_direction_is_refused():
    with pytest.raises(ValueError):
        canonical_transform((1, 0, 0, 1, 0, 0, 0, 0, 1))


def orientations(image: sitk.Image) -> dict[str, sitk.Image]:
    """The same physical CT stored with different voxel orders (exact: no resampling)."""
    oblique = sitk.Image(image)
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    oblique.SetDirection(tuple((rotation @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel()))
    return {
        "as_stored": image,
        "flipped_lr": sitk.Flip(image, [True, False, False]),
        "flipped_all": sitk.Flip(image, [True, True, True]),
        "permuted": sitk.PermuteAxes(image, [1, 2, 0]),
        "permuted_flipped": sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [False, True, False]),
        "oblique": oblique,
    }


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetDirection(), b.GetDirection())
    )


@pytest.mark.parametrize("case", ["totalseg_example_sm_MODEL", "ircad_17"])
def test_canonical_arrays_agree_and_round_trip(data_root, case):
    ct, _ = read_case(data_root, case)
    variants = orientations(ct)
    reference = canonical_transform(ct.GetDirection()).to_canonical(sitk.GetArrayViewFromImage(ct))
    for name, image in variants.items():
        array = sitk.GetArrayFromImage(image)
        transform = canonical_transform(image.GetDirection())
        canonical = transform.to_canonical(array)
        assert np.array_equal(canonical, reference), name
        assert np.array_equal(transform.from_canonical(canonical), array), name


def test_drawn_mask_comes_back_where_it_was(data_root):
    ct, _ = read_case(data_root, "totalseg_example_sm_MODEL")
    for name, image in orientations(ct).items():
        mask = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
        mask[3:7, 10:30, 40:45] = 1  # an arbitrary box in the input's own voxel order
        transform = canonical_transform(image.GetDirection())
        assert np.array_equal(transform.from_canonical(transform.to_canonical(mask)), mask), name


def test_engine_output_is_on_the_input_grid_in_every_orientation(data_root, segmenter):
    """The bundled model segments one real CT stored six ways; every label map lies on its input's grid,
    matches the expert label there, and equals the others voxel for voxel once mapped to one grid."""
    ct, label = read_case(data_root, "ircad_17")
    reference = None
    for name, image in orientations(ct).items():
        result = segmenter.segment(image)
        assert same_grid(result.label_image, image), name
        # Carry the expert label through the same storage change and compare where it lands.
        label_variant = orientations(label)[name]
        prediction = sitk.GetArrayViewFromImage(result.label_image) >= 1
        truth = sitk.GetArrayViewFromImage(label_variant) >= 1
        dice = 2 * np.count_nonzero(prediction & truth) / (prediction.sum() + truth.sum())
        assert dice >= 0.9, (name, dice)
        if name != "oblique":  # the oblique variant moves the anatomy in space, so it has no common grid
            back = sitk.Resample(result.label_image, ct, sitk.Transform(), sitk.sitkNearestNeighbor)
            array = sitk.GetArrayFromImage(back)
            if reference is None:
                reference = array
            assert np.array_equal(array, reference), name
