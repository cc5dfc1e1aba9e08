"""Augmentation (LiverSegTraining/augment.py) on a real liver slice: image and masks move together,
and the elastic warp is smooth enough never to fold."""

from __future__ import annotations

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
