"""Augmentation (LiverSegTraining/augment.py) on a real liver slice: image and masks move together,
and the elastic warp is smooth enough never to fold. The augmentations for other scanners against
hand-computed values: noise std in HU, the contrast mapping, the field-of-view circle, slice thickness on
a z-ramp; and, off, they leave training bit for bit as it was."""

from __future__ import annotations

import pytest
import torch

from LiverSegTraining.data import prepare_case
from LiverSegTraining.sources import discover


def _liver_slice(data_root, input_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The model-grid slice of ircad_01 with the most liver: (1, 1, n, n) image and (1, 2, n, n) masks."""
    from LiverSegLib.model import ModelCard

    (case,) = [c for c in discover("cases", data_root / "cases") if c.name == "ircad_01"]
    prepared = prepare_case(case, ModelCard(input_size=input_size))
    index = int(prepared.masks[:, 0].flatten(1).sum(1).argmax())
    return prepared.image[index].float()[None, None], prepared.masks[index].float()[None]


def test_augmentation_moves_image_and_masks_together(data_root):
    """With intensity changes off, the augmented liver mask still outlines the augmented liver: the
    image, pushed through the same affine + elastic warp, keeps its HU inside the warped mask."""
    from LiverSegTraining.augment import AugmentConfig, augment_batch

    image, masks = _liver_slice(data_root)
    liver_mean = float(image[masks[:, :1] > 0].mean())
    config = AugmentConfig(probability=1.0, crop_probability=1.0, elastic_probability=1.0, elastic_magnitude=0.04,
                           gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=0.0, noise_std=0.0, flip_z_probability=0.0)
    generator = torch.Generator().manual_seed(3)
    images, warped = augment_batch(image.repeat(8, 1, 1, 1), masks.repeat(8, 1, 1, 1), config, generator)
    # Every sample is warped differently ...
    assert all(not torch.equal(warped[0], warped[k]) for k in range(1, 8))
    assert set(torch.unique(warped).tolist()) <= {0.0, 1.0}
    for k in range(8):
        liver = warped[k, 0] > 0
        assert liver.sum() > 200
        # ... and the image inside each warped mask is still liver (mean within 0.03 of the original's,
        # on a [0, 1] window of 500 HU, i.e. 15 HU).
        assert abs(float(images[k, 0][liver].mean()) - liver_mean) < 0.03
        # Lesions stay inside the liver.
        assert not bool((warped[k, 1] > (warped[k, 0])).any())


def test_elastic_displacement_is_smooth_and_off_by_default():
    from LiverSegTraining.augment import AugmentConfig, random_displacements

    generator = torch.Generator().manual_seed(0)
    assert AugmentConfig().elastic_probability == 0.0
    assert torch.count_nonzero(random_displacements(4, 64, AugmentConfig(), generator)) == 0
    field = random_displacements(4, 64, AugmentConfig(elastic_probability=1.0, elastic_magnitude=0.03), generator)
    assert field.shape == (4, 64, 64, 2)
    # Control-point shifts have a standard deviation of 0.06 in [-1, 1] units (3 % of the side) ...
    assert 0.02 < float(field.std()) < 0.1
    # ... and neighbouring pixels never move more than half a pixel apart (2/64 is one pixel), so the
    # warp cannot fold even where the random control points are extreme.
    for size in (64, 128):
        field = random_displacements(64, size, AugmentConfig(elastic_probability=1.0, elastic_magnitude=0.05), generator)
        steepest = max(float(field.diff(dim=1).abs().max()), float(field.diff(dim=2).abs().max()))
        assert 0.3 * (2 / size) < steepest <= 0.5 * (2 / size) + 1e-6


def _intensities_off(**changes):
    """An AugmentConfig with geometry, flips and the always-on intensity changes off, plus ``changes``."""
    from LiverSegTraining.augment import AugmentConfig

    quiet = dict(probability=0.0, crop_probability=0.0, flip_z_probability=0.0, gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=0.0, noise_std=0.0)
    return AugmentConfig(**{**quiet, **changes})


def test_scanner_augmentations_are_off_by_default():
    """Configs that do not enable them train as before: the new keys default to off."""
    from LiverSegTraining.augment import AugmentConfig

    config = AugmentConfig()
    assert config.noise_hu == (0.0, 0.0) and config.fov_probability == 0.0 and config.thickness_probability == 0.0
    assert config.edge_probability == 0.0


def test_off_augmentations_draw_no_random_numbers():
    """With the scanner augmentations off, a batch and the generator's state after it are exactly those of
    the same call without them (the code path existing configs take); turned on, they change both."""
    from LiverSegTraining.augment import AugmentConfig, augment_batch

    image, masks = torch.rand(4, 3, 32, 32), (torch.rand(4, 2, 32, 32) > 0.5).float()
    runs = []
    for config in (AugmentConfig(), AugmentConfig(noise_hu=(10.0, 30.0), fov_probability=0.5)):
        generator = torch.Generator().manual_seed(5)
        runs.append((*augment_batch(image, masks, config, generator, (-200.0, 300.0)), generator.get_state()))
    generator = torch.Generator().manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], (*augment_batch(image, masks, AugmentConfig(), generator), generator.get_state())))
    assert not torch.equal(runs[0][0], runs[1][0]) and not torch.equal(runs[0][2], runs[1][2])


def test_scanner_noise_std_in_hu_on_a_constant_image():
    """noise_hu = (25, 25) on a 500 HU window is a std of 0.05 in image units, measured on a constant
    image inside the window; pixels clipped at the window's ends (air, bone) get none."""
    from LiverSegTraining.augment import augment_batch

    image = torch.full((8, 1, 64, 64), 0.5)
    image[:, :, :, :8] = 0.0  # air
    image[:, :, :, -8:] = 1.0  # bone
    noisy, _ = augment_batch(image, torch.zeros(8, 2, 64, 64), _intensities_off(noise_hu=(25.0, 25.0)), torch.Generator().manual_seed(0), (-200.0, 300.0))
    assert float(noisy[..., 8:-8].std()) == pytest.approx(0.05, rel=0.03)
    assert float(noisy[..., 8:-8].mean()) == pytest.approx(0.5, abs=0.002)
    assert bool((noisy[..., :8] == 0).all()) and bool((noisy[..., -8:] == 1).all())
    with pytest.raises(ValueError, match="window_hu"):
        augment_batch(image, torch.zeros(8, 2, 64, 64), _intensities_off(noise_hu=(25.0, 25.0)), torch.Generator())


def test_contrast_and_brightness_map_known_values():
    """x → (x − 0.5)·contrast + 0.5 + brightness: with contrast 1.2 and brightness drawn from ±0 (none),
    0.3 → 0.26 and 0.9 → 0.98; the window centre 0.5 stays; results clamp to [0, 1]."""
    from LiverSegTraining.augment import augment_batch

    image = torch.tensor([0.3, 0.5, 0.9, 0.95]).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    mapped, _ = augment_batch(image, torch.zeros(1, 2, 4, 4), _intensities_off(contrast=(1.2, 1.2)), torch.Generator().manual_seed(0))
    assert mapped[0, 0, 0].tolist() == pytest.approx([0.26, 0.5, 0.98, 1.0])
    # Brightness only: every sample is shifted by one offset within ±0.1, the same for all its pixels.
    shifted, _ = augment_batch(image.repeat(6, 1, 1, 1), torch.zeros(6, 2, 4, 4), _intensities_off(brightness=0.1), torch.Generator().manual_seed(0))
    offsets = (shifted - image)[:, 0, :, :3]
    assert all(float(o.max() - o.min()) < 1e-6 and abs(float(o.mean())) <= 0.1 for o in offsets)
    assert len({round(float(o.mean()), 5) for o in offsets}) == 6


def test_field_of_view_cuts_image_and_masks_at_the_reconstruction_circle():
    """A field of view of half the side: outside the inscribed circle the image is air and unlabelled,
    masks stay binary and aligned with the image (a pattern drawn into both stays identical), the lesion
    stays inside the liver, and stripes 8 px apart come out about 16 px apart (the half window is zoomed
    to fill the grid)."""
    from LiverSegTraining.augment import augment_batch, outside_reconstruction_circle

    n = 64
    stripes = ((torch.arange(n) // 4) % 2).float().view(1, 1, 1, n).expand(8, 1, n, n).contiguous()  # period 8 px
    masks = torch.cat([torch.ones(8, 1, n, n), stripes], 1)  # liver everywhere, "lesion" on the stripes
    config = _intensities_off(fov_probability=1.0, fov_fraction=(0.5, 0.5))
    image, cut = augment_batch(stripes, masks, config, torch.Generator().manual_seed(1))
    outside = outside_reconstruction_circle(n)
    # The circle inscribed in a 64-px grid: pixel centres inside it, counted by hand formula.
    centres = torch.arange(n) + 0.5 - n / 2
    assert int((~outside).sum()) == int(((centres[:, None] ** 2 + centres[None, :] ** 2) <= (n / 2) ** 2).sum())
    assert set(torch.unique(cut).tolist()) == {0.0, 1.0}
    for k in range(8):
        assert torch.equal(cut[k, 0], (~outside).float())  # the liver, as far as the scan goes
        assert bool((image[k, 0][outside] == 0).all())
        assert torch.equal(cut[k, 1], (image[k, 0] >= 0.5).float())  # image and masks moved together
        assert not bool((cut[k, 1] > cut[k, 0]).any())
        rises = int((cut[k, 1, n // 2].diff() > 0).sum())  # stripes starting along the middle row
        assert 3 <= rises <= 5  # 32 source pixels hold 4 periods of 8 px (8 without the zoom)


def test_thick_slab_of_a_z_ramp():
    """On a volume whose slice z holds the value z over [z − 0.5, z + 0.5], a slab centred on a slice (or
    symmetric about slice borders) averages to its centre; otherwise to the overlap-weighted mean of the
    slices it covers; at the volume's end the edge slice repeats."""
    from LiverSegTraining.augment import slab_weights, thick_slab

    ramp = torch.arange(20, dtype=torch.float16)[:, None, None].expand(20, 4, 4)
    assert float(thick_slab(ramp, 10, 3.0)[0, 0]) == pytest.approx(10.0)
    # [9, 11.5] covers half of slice 9 and all of 10 and 11: (0.5·9 + 10 + 11) / 2.5
    assert float(thick_slab(ramp, 10.25, 2.5)[0, 0]) == pytest.approx(10.2)
    indices, weights = slab_weights(10.0, 2.5, 20)  # slices 9..11 covered by 0.75, 1, 0.75 of 2.5
    assert indices.tolist() == [9, 10, 11] and weights.tolist() == pytest.approx([0.3, 0.4, 0.3])
    assert float(thick_slab(ramp, 0, 3.0)[0, 0]) == pytest.approx(1 / 3)  # slices 0, 0 (repeated), 1
    assert float(thick_slab(ramp, 10, 0.5)[0, 0]) == 10.0  # never thinner than one native slice


def test_thick_slice_sample_spaces_neighbours_and_thresholds_labels():
    """A 4.8 mm scan simulated from 1.6 mm slices (3 slices): the 2.5D neighbours of slice 10 lie at 7 and
    13, each a 3-slice mean; a label starting at slice 10 covers 2/3 of slice 10's slab (kept) and 1/3 of
    slice 9's (dropped)."""
    from LiverSegTraining.augment import thick_slice_sample

    ramp = torch.arange(20, dtype=torch.float16)[:, None, None].expand(20, 4, 4)
    masks = torch.zeros(20, 2, 4, 4, dtype=torch.uint8)
    masks[10:, 0] = 1
    stack, label = thick_slice_sample(ramp, masks, 10, 1, 4.8 / 1.6)
    assert stack[:, 0, 0].tolist() == pytest.approx([7.0, 10.0, 13.0])
    assert label[:, 0, 0].tolist() == [1.0, 0.0]
    assert thick_slice_sample(ramp, masks, 9, 1, 3.0)[1][0, 0, 0] == 0.0
    stack, _ = thick_slice_sample(ramp, masks, 10, 1, 4.0 / 1.6)  # 2.5 slices: neighbours between slices
    assert stack[:, 0, 0].tolist() == pytest.approx([7.5, 10.0, 12.5])


def test_sampler_thickness_augmentation_on_a_real_case(data_root, tmp_path):
    """The sampler knows each case's slice spacing (3 mm for totalseg_example_sm_MODEL); with the thickness
    augmentation off it draws exactly the batches it drew before, on, it draws thick-slice batches whose
    masks stay binary with lesions inside the liver."""
    from LiverSegLib.model import ModelCard as Card
    from LiverSegLib.preprocessing import slice_stack
    from LiverSegTraining.augment import AugmentConfig
    from LiverSegTraining.data import SliceSampler

    (case,) = [c for c in discover("cases", data_root / "cases") if c.name == "totalseg_example_sm_MODEL"]
    prepared = prepare_case(case, Card(input_size=64), tmp_path / "cache")
    assert prepared.spacing_z_mm == pytest.approx(3.0, rel=1e-3)
    assert prepare_case(case, Card(input_size=64), tmp_path / "cache").spacing_z_mm == prepared.spacing_z_mm  # from the cache

    generator = torch.Generator().manual_seed(0)
    images, masks, _, _ = SliceSampler([prepared], 0.7, 1).batch(6, generator)
    # The old sampling, by hand: the same draws, the stored slices.
    replay = torch.Generator().manual_seed(0)
    picks = []
    for _ in range(6):
        pool = prepared.liver_slices.tolist() if torch.rand(1, generator=replay) < 0.7 else list(range(prepared.image.shape[0]))
        picks.append(pool[int(torch.randint(len(pool), (1,), generator=replay))])
    assert torch.equal(images, slice_stack(prepared.image, picks, 1).float()) and torch.equal(masks, prepared.masks[picks].float())
    assert torch.equal(generator.get_state(), replay.get_state())

    thick = SliceSampler([prepared], 1.0, 1, augment=AugmentConfig(thickness_probability=1.0, thickness_mm=(6.0, 9.0)))
    images, masks, _, _ = thick.batch(8, torch.Generator().manual_seed(0))
    assert images.shape == (8, 3, 64, 64) and set(torch.unique(masks).tolist()) <= {0.0, 1.0}
    assert not bool((masks[:, 1] > masks[:, 0]).any())
    stored = slice_stack(prepared.image, prepared.liver_slices.tolist(), 1).float()
    assert not any(torch.equal(image, s) for image in images for s in stored)  # every sample resampled


@pytest.mark.parametrize("context_slices", [1, 2])
def test_scan_edge_stack_is_the_stack_of_a_scan_cut_there(context_slices):
    """On a z-ramp (slice z holds the value z) slice 5's stack is [4, 5, 6] with one neighbour a side; at
    a scan's start it is [5, 5, 6], at its end [4, 5, 5]: what slice_stack gives on the scan cut there."""
    from LiverSegLib.preprocessing import slice_stack
    from LiverSegTraining.augment import as_scan_edge

    ramp = torch.arange(10, dtype=torch.float32)[:, None, None].expand(10, 4, 4).contiguous()
    stack = slice_stack(ramp, [5], context_slices)[0]
    start, end = as_scan_edge(stack, context_slices, -1), as_scan_edge(stack, context_slices, 1)
    if context_slices == 1:
        assert start[:, 0, 0].tolist() == [5.0, 5.0, 6.0] and end[:, 0, 0].tolist() == [4.0, 5.0, 5.0]
    assert torch.equal(start, slice_stack(ramp[5:], [0], context_slices)[0])
    assert torch.equal(end, slice_stack(ramp[:6], [5], context_slices)[0])
    assert stack[:, 0, 0].tolist() == [5.0 + k for k in range(-context_slices, context_slices + 1)]  # the input is left as it was


def test_sampler_scan_edge_augmentation_on_a_real_case(data_root, tmp_path):
    """With edge_probability 1 every stack of ircad_17 (whose liver begins on its scan's second slice) is an edge
    stack: one side's neighbour equals the slice itself, both sides about equally often, the masks untouched."""
    from LiverSegLib.model import ModelCard as Card
    from LiverSegLib.preprocessing import slice_stack
    from LiverSegTraining.augment import AugmentConfig
    from LiverSegTraining.data import SliceSampler

    (case,) = [c for c in discover("cases", data_root / "cases") if c.name == "ircad_17"]
    prepared = prepare_case(case, Card(input_size=64), tmp_path / "cache")
    sampler = SliceSampler([prepared], 1.0, 1, augment=AugmentConfig(edge_probability=1.0))
    generator = torch.Generator().manual_seed(0)
    sides = []
    for _ in range(8):
        z = int(prepared.liver_slices[int(torch.randint(len(prepared.liver_slices), (1,), generator=generator))])
        stack, masks = sampler.sample(prepared, z, generator)
        stored = slice_stack(prepared.image, [z], 1)[0].float()
        assert torch.equal(masks, prepared.masks[z].float()) and torch.equal(stack[1], stored[1])
        before, after = torch.equal(stack[0], stack[1]), torch.equal(stack[2], stack[1])
        assert before != after or torch.equal(stored[0], stored[1]) or torch.equal(stored[2], stored[1])
        sides.append(-1 if before else 1)
    assert set(sides) == {-1, 1}


def test_sampler_draws_lesion_slices_at_the_lesion_fraction(data_root, tmp_path):
    """ircad_17 (two labelled lesions) and totalseg_example_sm_MODEL (lesions not labelled): the lesion pool
    holds ircad_17's lesion slices only. With lesion_fraction 1 every sample shows a lesion; with 0.5 the
    share drawn from the lesion pool follows the generator's own draws, replayed by hand."""
    from LiverSegLib.model import ModelCard as Card
    from LiverSegTraining.data import SliceSampler

    cases = {c.name: c for c in discover("cases", data_root / "cases") if c.name in ("ircad_17", "totalseg_example_sm_MODEL")}
    lesions = prepare_case(cases["ircad_17"], Card(input_size=64), tmp_path / "cache")
    unlabelled = prepare_case(cases["totalseg_example_sm_MODEL"], Card(input_size=64), tmp_path / "cache")
    assert len(unlabelled.lesion_slices) == 0 and 0 < len(lesions.lesion_slices) < len(lesions.liver_slices)
    expected = sorted(int(z) for z in torch.nonzero(lesions.masks[:, 1].flatten(1).any(1)).flatten())
    sampler = SliceSampler([unlabelled, lesions], 0.7, 1, lesion_fraction=1.0)
    assert sampler.lesion_slices == [(1, z) for z in expected]
    _, masks, _, _ = sampler.batch(16, torch.Generator().manual_seed(0))
    assert all(bool(mask[1].any()) for mask in masks)
    half = SliceSampler([unlabelled, lesions], 0.7, 1, lesion_fraction=0.5)
    generator, replay = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    pools = [half._pool(generator) for _ in range(40)]
    from_lesions = sum(pool is half.lesion_slices for pool in pools)
    replayed = 0
    for _ in range(40):
        if float(torch.rand(1, generator=replay)) < 0.5:
            replayed += 1
        else:
            torch.rand(1, generator=replay)  # the liver-or-any draw
    assert from_lesions == replayed and 10 < from_lesions < 30


def test_synthetic_lesion_by_hand():
    """A 64-px stack at 0.6 whose whole slice is liver, a lesion of radius 8 px (0.125 of the side) 50 HU deep
    in the 500 HU window (0.1): 0.5 at its centre, 0.6 from 8 px out, 0.6 − 0.1 × (8 − d) / 2.4 on the ramp;
    labelled lesion within 6.8 px (85 % of the radius). With the liver on the left half only, nothing changes
    on the right half. Without liver the sample is left as it is."""
    from LiverSegTraining.augment import AugmentConfig, with_synthetic_lesion

    config = AugmentConfig(synthetic_lesion_radius=(0.125, 0.125), synthetic_lesion_hu=(50.0, 50.0))
    stack, masks = torch.full((3, 64, 64), 0.6), torch.zeros(2, 64, 64)
    masks[0] = 1.0
    lesioned, labelled = with_synthetic_lesion(stack, masks, config, (-200.0, 300.0), torch.Generator().manual_seed(0))
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    plateau = lesioned[1] < 0.5 + 1e-6  # within 70 % of the radius, around the drawn centre (away from the edge for this seed)
    centre = (float(rows[plateau].mean()), float(cols[plateau].mean()))
    assert all(abs(value - round(value)) < 1e-4 and 8 <= value <= 56 for value in centre)
    distance = torch.sqrt((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2)
    expected = 0.6 - 0.1 * ((8 - distance) / 2.4).clamp(0, 1)
    assert all(torch.allclose(lesioned[c], expected, atol=1e-6) for c in range(3))
    assert torch.equal(labelled[1], (distance <= 6.8).float()) and torch.equal(labelled[0], masks[0])

    left = masks.clone()
    left[0, :, 32:] = 0.0
    for seed in range(5):
        lesioned, labelled = with_synthetic_lesion(stack, left, config, (-200.0, 300.0), torch.Generator().manual_seed(seed))
        assert torch.equal(lesioned[:, :, 32:], stack[:, :, 32:]) and not labelled[1, :, 32:].any() and labelled[1].any()
    empty = torch.zeros(2, 64, 64)
    lesioned, labelled = with_synthetic_lesion(stack, empty, config, (-200.0, 300.0), torch.Generator().manual_seed(0))
    assert torch.equal(lesioned, stack) and torch.equal(labelled, empty)


def test_sampler_synthetic_lesions_on_a_real_lesion_free_liver(data_root, tmp_path):
    """ircad_07 (no lesion): with synthetic_lesion_probability 1 every liver sample has a lesion label, inside
    its liver, where the image got darker; with 0 (the default) the samples are the stored ones."""
    from LiverSegLib.model import ModelCard as Card
    from LiverSegLib.preprocessing import slice_stack
    from LiverSegTraining.augment import AugmentConfig
    from LiverSegTraining.data import SliceSampler

    (case,) = [c for c in discover("cases", data_root / "cases") if c.name == "ircad_07"]
    prepared = prepare_case(case, Card(input_size=64), tmp_path / "cache")
    with_lesions = SliceSampler([prepared], 1.0, 1, augment=AugmentConfig(synthetic_lesion_probability=1.0))
    plain = SliceSampler([prepared], 1.0, 1)
    generator = torch.Generator().manual_seed(0)
    for z in prepared.liver_slices[::10].tolist():
        stack, masks = with_lesions.sample(prepared, z, generator)
        stored = slice_stack(prepared.image, [z], 1)[0].float()
        lesion = masks[1] > 0
        assert lesion.any() and not (lesion & (masks[0] == 0)).any()
        assert bool((stack[1][lesion] < stored[1][lesion]).all())
        assert torch.equal(plain.sample(prepared, z, torch.Generator().manual_seed(0))[0], stored)
