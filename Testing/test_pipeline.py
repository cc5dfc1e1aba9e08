"""The engine's entry point (``LiverSegmenter.segment``) on a real CT: what a result holds and how its
switches act. Geometry in every orientation is tested in test_geometry.py, the runtimes in test_runtime.py."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from conftest import read_case

CASE = "totalseg_example_sm_MODEL"  # small (122×101×30) and whole in the field of view but cut at the slices


def test_result_figures_are_what_the_label_map_holds(data_root, segmenter):
    ct, _ = read_case(data_root, CASE)
    progress = []
    result = segmenter.segment(ct, progress=lambda done, total: progress.append((done, total)), keep_probabilities=True)
    label = sitk.GetArrayFromImage(result.label_image)
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000
    assert result.label_image.GetSize() == ct.GetSize() and set(np.unique(label)) <= {0, 1, 2}
    assert result.liver_ml == np.count_nonzero(label >= 1) * voxel_ml
    assert result.lesion_ml == sum(result.lesion_volumes_ml)
    assert abs(result.lesion_ml - np.count_nonzero(label == 2) * voxel_ml) < 1e-6
    assert result.lesion_count == len(result.lesion_volumes_ml)
    assert progress[-1] == (30, 30) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert result.probabilities.shape == (30, 2, segmenter.card.input_size, segmenter.card.input_size)
    assert result.probabilities.dtype == np.float32 and 0 <= result.probabilities.min() and result.probabilities.max() <= 1
    assert set(result.timings_s) == {"preprocess", "network", "postprocess", "to_input_grid", "lesion_count"}
    assert (result.device, result.runtime) == ("cpu", "onnxruntime")
    assert result.qc_warnings == ["the liver reaches the first or last slice: part of it may lie outside the scan, so its volume is understated"]


def test_lesions_off_gives_no_lesion_label_and_no_count(data_root, segmenter):
    ct, _ = read_case(data_root, CASE)
    result = segmenter.segment(ct, lesions=False)
    assert result.lesion_count is None and result.lesion_volumes_ml == [] and result.lesion_ml == 0
    assert 2 not in np.unique(sitk.GetArrayViewFromImage(result.label_image))


def test_post_processing_is_the_largest_component_with_holes_filled(data_root, segmenter):
    """With post-processing the organ (liver and lesions) is exactly the largest 26-connected component
    of the network's own output with its holes filled; without it the output is left as it is."""
    from LiverSegLib.postprocessing import fill_holes, largest_component

    ct, _ = read_case(data_root, CASE)
    cleaned = sitk.GetArrayFromImage(segmenter.segment(ct).label_image) >= 1
    raw = sitk.GetArrayFromImage(segmenter.segment(ct, postprocess=False).label_image) >= 1
    assert np.array_equal(cleaned, fill_holes(largest_component(raw)))
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(raw.astype(np.uint8)), True))
    print(f"\nthe network's output has {components.max()} components; post-processing keeps one")


def test_near_liver_pass_gives_the_label_map_of_the_whole_pass(data_root, segmenter, monkeypatch):
    """The CPU path runs the network near the liver only (inference.predict_near_liver); with
    post-processing the label map is exactly the one of running every slice."""
    from LiverSegLib import inference, pipeline

    ct, _ = read_case(data_root, "ircad_07")
    near = sitk.GetArrayFromImage(segmenter.segment(ct).label_image)
    monkeypatch.setattr(pipeline, "predict_near_liver", inference.predict_in_batches)
    whole = sitk.GetArrayFromImage(segmenter.segment(ct).label_image)
    assert np.array_equal(near, whole)


def test_clean_up_in_the_box_gives_the_label_map_of_the_whole_grid(data_root, segmenter):
    """The engine upsamples and cleans up only inside the box where the network's output can reach the
    threshold; on a real CT with lesions the label map, liver volume and lesion volumes equal those of
    upsampling whole slices and cleaning up the whole volume."""
    from LiverSegLib.geometry import canonical_transform
    from LiverSegLib.postprocessing import compose_label_map, lesion_volumes_ml
    from LiverSegLib.preprocessing import SliceGrid, to_slice_grid

    ct, _ = read_case(data_root, "ircad_17")
    result = segmenter.segment(ct, keep_probabilities=True)
    transform = canonical_transform(ct.GetDirection())
    label = transform.to_canonical(sitk.GetArrayViewFromImage(result.label_image))
    grid = SliceGrid(*label.shape[1:])
    probabilities = result.probabilities
    masks = np.concatenate([to_slice_grid(probabilities[i : i + 8], grid) >= segmenter.card.threshold
                            for i in range(0, len(probabilities), 8)])
    whole = compose_label_map(masks[:, 0], masks[:, 1])
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000
    assert np.array_equal(label, whole) and 2 in label
    assert result.liver_ml == np.count_nonzero(whole >= 1) * voxel_ml
    assert result.lesion_volumes_ml == lesion_volumes_ml(whole, voxel_ml)


def test_lesion_settings_at_their_defaults_keep_the_label_map(data_root, segmenter):
    """On a real CT with lesions, through the near-liver pass and the box clean-up: a card that states the
    lesion threshold as the card's threshold and no minimum size gives the bundled card's label map voxel
    for voxel; a higher lesion threshold keeps fewer lesion voxels, and a minimum size above every lesion
    turns them all into liver, leaving the liver as it was."""
    import copy
    import dataclasses

    ct, _ = read_case(data_root, "ircad_17")
    before = sitk.GetArrayFromImage(segmenter.segment(ct).label_image)

    def segment_with(**settings) -> np.ndarray:
        tuned = copy.copy(segmenter)
        tuned.card = dataclasses.replace(segmenter.card, **settings)
        return sitk.GetArrayFromImage(tuned.segment(ct).label_image)

    assert np.array_equal(segment_with(lesion_threshold=segmenter.card.threshold, min_lesion_ml=0.0), before) and 2 in before
    stricter = segment_with(lesion_threshold=0.9)
    assert np.count_nonzero(stricter == 2) < np.count_nonzero(before == 2)
    no_lesions = segment_with(min_lesion_ml=1e6)
    assert 2 not in no_lesions and np.array_equal(no_lesions >= 1, before >= 1)
