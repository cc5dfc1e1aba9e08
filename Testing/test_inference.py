"""Inference apart from any trained weights: the torch-free batch loop, sigmoid, device choice, and the
mapping of model-grid probabilities to masks on the slice grid."""

from __future__ import annotations

import numpy as np
import pytest

from LiverSegLib.errors import LiverSegInputError
from LiverSegLib.inference import choose_device_name, predict_in_batches, predict_near_liver, probabilities_to_masks, sigmoid
from LiverSegLib.model import ModelCard
from LiverSegLib.preprocessing import SliceGrid, to_slice_grid


def test_sigmoid_by_hand_and_without_overflow():
    values = sigmoid(np.array([-1000.0, -np.log(3), 0.0, np.log(3), 1000.0], np.float32))
    assert np.allclose(values, [0.0, 0.25, 0.5, 0.75, 1.0]) and values.dtype == np.float32


def test_batches_give_each_slice_its_neighbours_and_report_progress():
    """A 'network' that returns its three input channels as logits: the probabilities show which
    neighbours each slice was given (edges repeated), and progress reaches the total."""
    card = ModelCard(context_slices=1, channels=("liver", "liver_lesion", "third"))
    volume = np.broadcast_to(np.arange(5, dtype=np.float32)[:, None, None], (5, 2, 2)).copy() / 10
    progress = []
    probabilities = predict_in_batches(lambda batch: batch, volume, card, batch_size=2, progress=lambda d, t: progress.append((d, t)))
    given = np.log(probabilities[:, :, 0, 0] / (1 - probabilities[:, :, 0, 0]))  # back through the sigmoid
    assert np.allclose(given, np.array([[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]) / 10, atol=1e-5)
    assert progress == [(2, 5), (4, 5), (5, 5)]


def test_device_names():
    assert choose_device_name("cpu") == "cpu"
    assert choose_device_name("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(LiverSegInputError, match="unknown device 'tpu'"):
        choose_device_name("tpu")


def test_masks_from_probabilities_skip_empty_slices_exactly():
    """Slices whose model-grid probabilities stay below the threshold are skipped; the rest equal a
    plain full-volume upsampling, and a slice just under the threshold everywhere stays empty."""
    probabilities = np.random.default_rng(0).random((7, 2, 16, 16), dtype=np.float32)
    probabilities[[1, 4]] *= 0.49 / probabilities[[1, 4]].max()  # under 0.5 everywhere
    grid = SliceGrid(40, 52)
    masks = probabilities_to_masks(probabilities, grid, 0.5, chunk_slices=2)
    assert np.array_equal(masks, to_slice_grid(probabilities, grid) >= 0.5)
    assert not masks[[1, 4]].any() and masks[[0, 2, 3, 5, 6]].reshape(5, -1).any(1).all()


@pytest.mark.parametrize("side", [40, 16])  # resized back, or already on the slice grid's square
def test_box_masks_hold_every_mask_voxel_and_equal_whole_slices(side):
    """The masks are computed only inside the box where an upsampled probability can reach the threshold:
    every voxel of the whole-slice masks lies in it, and inside it the masks are the whole slices' ones."""
    from LiverSegLib.inference import mask_box, probabilities_to_box_masks

    probabilities = np.random.default_rng(3).random((9, 2, 16, 16), dtype=np.float32) * 0.45
    probabilities[2:6, 0, 5:9, 4:12] = 0.9  # an organ
    probabilities[4, 1, 7, 10] = 0.6  # a lesion voxel at its edge
    probabilities[7, 0, 2, 3] = 0.5  # exactly at the threshold, apart from it
    grid = SliceGrid(side - 6, side)
    whole = to_slice_grid(probabilities, grid) >= 0.5
    box, boxed = probabilities_to_box_masks(probabilities, grid, 0.5, chunk_slices=2)
    assert box == mask_box(probabilities, grid, 0.5) and box[0] == slice(2, 8)
    assert np.array_equal(boxed, whole[box[0], :, box[1], box[2]])
    outside = whole.copy()
    outside[box[0], :, box[1], box[2]] = False
    assert not outside.any() and boxed[:, 1].any() and boxed.size < whole.size / 3
    assert np.array_equal(probabilities_to_masks(probabilities, grid, 0.5), whole)


def test_no_probability_at_the_threshold_gives_an_empty_box():
    from LiverSegLib.inference import probabilities_to_box_masks

    probabilities = np.full((3, 2, 8, 8), 0.49, np.float32)
    box, boxed = probabilities_to_box_masks(probabilities, SliceGrid(20, 20), 0.5)
    assert box == (slice(0, 0),) * 3 and boxed.shape == (0, 2, 0, 0)
    assert not probabilities_to_masks(probabilities, SliceGrid(20, 20), 0.5).any()


def test_near_liver_pass_gives_the_same_probabilities_where_it_matters(data_root, segmenter):
    """On a real CT the probe-then-near-liver pass returns the whole pass's probabilities on every slice it
    runs, skips over 20 of its 151 slices, and runs every slice of the expert liver. Progress ends at its
    total. (A skipped slice may hold a stray false positive, which post-processing removes: the label map
    equals the whole pass's, test_pipeline.py.)"""
    import SimpleITK as sitk

    from LiverSegLib.geometry import canonical_transform
    from LiverSegLib.preprocessing import prepare_volume

    from conftest import read_case

    ct, label = read_case(data_root, "ircad_07")  # a third of its slices lie above the liver
    canonical = canonical_transform(ct.GetDirection()).to_canonical(sitk.GetArrayViewFromImage(ct))
    card = segmenter.card
    volume = prepare_volume(canonical, card.window_hu, card.input_size)
    whole = predict_in_batches(segmenter.network, volume, card)
    progress = []
    near = predict_near_liver(segmenter.network, volume, card, progress=lambda done, total: progress.append((done, total)))
    ran = near.reshape(len(near), -1).any(axis=1)
    assert np.abs(near[ran] - whole[ran]).max() < 1e-6
    assert (~ran).sum() > 20 and progress[-1][0] == progress[-1][1] == ran.sum()
    liver_slices = np.flatnonzero((sitk.GetArrayViewFromImage(label) >= 1).any(axis=(1, 2)))
    assert ran[liver_slices.min() : liver_slices.max() + 1].all()  # every expert liver slice was run


def test_a_scan_whose_probes_show_no_liver_is_run_whole(segmenter):
    """Air only (a CT's value outside the body): no probe shows liver, so every slice is run."""
    volume = np.zeros((24, segmenter.card.input_size, segmenter.card.input_size), np.float32)  # −1024 HU windowed
    progress = []
    near = predict_near_liver(segmenter.network, volume, segmenter.card, progress=lambda done, total: progress.append((done, total)))
    assert np.array_equal(near, predict_in_batches(segmenter.network, volume, segmenter.card))
    assert progress[-1] == (24, 24)


def test_each_channel_meets_its_own_threshold():
    """A lesion probability of 0.45 is a lesion at a lesion threshold of 0.4 and not at 0.5, whatever the
    liver's threshold; the box then holds it even where the liver channel is below its own."""
    from LiverSegLib.inference import probabilities_to_box_masks

    probabilities = np.zeros((4, 2, 8, 8), np.float32)
    probabilities[1:3, 0, 2:6, 2:6] = 0.9
    probabilities[3, 1, 4, 4] = 0.45  # a lesion voxel on a slice with no liver above 0.5
    grid = SliceGrid(8, 8)
    assert not probabilities_to_masks(probabilities, grid, 0.5)[:, 1].any()
    masks = probabilities_to_masks(probabilities, grid, (0.5, 0.4))
    assert masks[3, 1, 4, 4] and masks[:, 1].sum() == 1 and np.array_equal(masks[:, 0], probabilities[:, 0] >= 0.5)
    box, _ = probabilities_to_box_masks(probabilities, grid, (0.5, 0.4))
    assert box[0] == slice(1, 4)
    assert np.array_equal(probabilities_to_masks(probabilities, grid, (0.5, 0.5)), probabilities_to_masks(probabilities, grid, 0.5))
