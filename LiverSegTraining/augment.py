"""Batch augmentation on the model grid, applied identically to images and masks.

Geometry (crop, rotation, scale, shear, translation) is one affine per sample, sampled once and used
for the image (bilinear) and the masks (bilinear, re-thresholded at one half). Left-right flips are off
by default: they would teach the network a liver on the patient's left. Reversing the neighbour order
of the 2.5D stack (a craniocaudal flip) is harmless and on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    probability: float = 0.8  # chance that a sample gets the geometric transform
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    shear: float = 0.08
    translate: float = 0.08  # fraction of the image side
    crop_probability: float = 0.3  # random crop resized back to the full grid
    crop_fraction: tuple[float, float] = (0.7, 1.0)
    flip_lr_probability: float = 0.0
    flip_z_probability: float = 0.5
    # Elastic: a smooth random displacement (coarse control grid, bicubic upsampling) that bends organ
    # outlines the way patients differ (the left lobe's reach, the liver's tip), which one affine cannot.
    elastic_probability: float = 0.0
    elastic_magnitude: float = 0.03  # standard deviation of the control-point shift, fraction of the image side
    elastic_control_points: int = 5
    contrast: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.05
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.02


def _uniform(low: float, high: float, count: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def random_affines(batch: int, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, 2, 3) matrices for ``affine_grid`` (output → input coordinates in [-1, 1])."""
    angle = torch.deg2rad(_uniform(-config.rotation_deg, config.rotation_deg, batch, generator))
    scale = _uniform(*config.scale, batch, generator)
    shear = _uniform(-config.shear, config.shear, batch, generator)
    shift = _uniform(-config.translate, config.translate, 2 * batch, generator).view(batch, 2) * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shear_matrix = torch.eye(2).repeat(batch, 1, 1)
    shear_matrix[:, 0, 1] = shear
    linear = rotation @ shear_matrix / scale[:, None, None]
    # Crop: sample a smaller window (fraction of the side) somewhere inside the image, zoomed to fill it.
    crop = torch.rand(batch, generator=generator) < config.crop_probability
    fraction = torch.where(crop, _uniform(*config.crop_fraction, batch, generator), torch.ones(batch))
    centre = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (1 - fraction)[:, None]
    linear = linear * fraction[:, None, None]
    translation = shift + centre
    apply = (torch.rand(batch, generator=generator) < config.probability)[:, None, None]
    identity = torch.eye(2, 3).repeat(batch, 1, 1)
    return torch.where(apply, torch.cat([linear, translation[:, :, None]], 2), identity)


MAX_ELASTIC_SLOPE = 0.5  # largest change of the elastic shift per pixel, in pixels


def random_displacements(batch: int, size: int, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, size, size, 2) smooth offsets in ``affine_grid`` coordinates; zero for samples left undeformed."""
    points = config.elastic_control_points
    coarse = torch.randn(batch, 2, points, points, generator=generator) * (2 * config.elastic_magnitude)
    apply = torch.rand(batch, generator=generator) < config.elastic_probability
    coarse = coarse * apply[:, None, None, None]
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    # A shift that changes faster than half a pixel per pixel could fold the image over itself (the
    # Gaussian tails do at 64 px): scale such samples down so every warp stays one-to-one.
    pixel = 2.0 / size
    steepest = torch.maximum(field.diff(dim=2).abs().amax((1, 2, 3)), field.diff(dim=3).abs().amax((1, 2, 3))) / pixel
    field = field * (MAX_ELASTIC_SLOPE / steepest.clamp(min=MAX_ELASTIC_SLOPE))[:, None, None, None]
    return field.permute(0, 2, 3, 1)


def augment_batch(
    image: torch.Tensor, masks: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """image (B, C, n, n) in [0, 1], masks (B, K, n, n) in {0, 1} → augmented copies."""
    batch = image.shape[0]
    theta = random_affines(batch, config, generator).to(image.device, image.dtype)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    if config.elastic_probability > 0:
        grid = grid + random_displacements(batch, image.shape[-1], config, generator).to(grid.device, grid.dtype)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = (F.grid_sample(masks.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= 0.5).float()

    flip_lr = (torch.rand(batch, generator=generator) < config.flip_lr_probability).to(image.device)
    image = torch.where(flip_lr[:, None, None, None], image.flip(-1), image)
    masks = torch.where(flip_lr[:, None, None, None], masks.flip(-1), masks)
    flip_z = (torch.rand(batch, generator=generator) < config.flip_z_probability).to(image.device)
    image = torch.where(flip_z[:, None, None, None], image.flip(1), image)

    def per_sample(low: float, high: float) -> torch.Tensor:
        return _uniform(low, high, batch, generator).to(image.device)[:, None, None, None]

    image = image.clamp(0, 1) ** per_sample(*config.gamma)
    image = (image - 0.5) * per_sample(*config.contrast) + 0.5 + per_sample(-config.brightness, config.brightness)
    noise = torch.randn(image.shape, generator=generator).to(image.device) * config.noise_std
    return (image + noise).clamp_(0, 1), masks


__all__ = ["AugmentConfig", "augment_batch", "random_affines", "random_displacements"]
