"""Batch augmentation on the model grid, applied identically to images and masks.

Geometry (crop, rotation, scale, shear, translation) is one affine per sample, sampled once and used
for the image (bilinear) and the masks (bilinear, re-thresholded at one half). Left-right flips are off
by default: they would teach the network a liver on the patient's left. Reversing the neighbour order
of the 2.5D stack (a craniocaudal flip) is harmless and on.

Other scanners differ in noise, calibration and contrast, field of view and slice thickness. Contrast,
brightness, gamma and a fixed noise level have always been on; a per-sample noise level in HU, a circular
field of view that cuts the liver at the image edge, slice thickness (``thick_slab``) and a scan that ends
at the sample's slice (``as_scan_edge``; these two applied by ``data.SliceSampler`` where the whole volume
is at hand) are off by default, so that a config that does
not enable them trains bit for bit as before: they draw no random numbers when off.

The batch may live on the GPU: every per-sample factor is drawn from the CPU generator (a few numbers a
sample) and the resampling, intensity changes and noise run where the batch is. On the CPU that is the
same arithmetic in the same order as always; on a GPU the per-pixel noise comes from a generator on the
GPU seeded from the CPU one (``standard_normal``), so a training stays reproducible from its seed alone.
"""

from __future__ import annotations

import math
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
    # Intensities, in the model's normalised units (the card's HU window mapped to [0, 1]; with the default
    # 500 HU window 0.01 is 5 HU): x → clamp(x)^gamma, then (x − 0.5)·contrast + 0.5 + brightness, then
    # Gaussian noise of std noise_std, each factor drawn per sample from its range.
    contrast: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.05  # offset drawn from ±brightness (calibration differences between scanners)
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.02
    # Scanner noise: a per-sample Gaussian noise level, std drawn from noise_hu in HU (converted through
    # the card's window), added on the model grid (the engine's resizing to input_size already averages a
    # native scan's pixels, so the same scanner's noise is smaller here), only where the pixel lies inside
    # the window: air and bone clipped at its ends stay clipped, as on a real noisy scan. (0, 0): off.
    noise_hu: tuple[float, float] = (0.0, 0.0)
    # Field of view: with fov_probability, the sample becomes a smaller scan: a square window of
    # fov_fraction of the side (anywhere inside the image) zoomed to fill the grid, as a reconstruction
    # with a smaller field of view appears after the engine's resizing, and everything outside the
    # reconstruction circle inscribed in the grid is set to air (image 0) and unlabelled (masks 0). The
    # liver is then often cut at the image edge; the network learns to segment it as far as it goes.
    fov_probability: float = 0.0
    fov_fraction: tuple[float, float] = (0.6, 0.9)
    # Slice thickness (data.SliceSampler, on the prepared volume): with thickness_probability, the 2.5D
    # stack and the labels come from the volume resampled in z to a thickness drawn from thickness_mm:
    # each channel is the mean over a slab of that thickness (box slice profile), the neighbours lie that
    # far apart, and the masks are the slab mean of the labels thresholded at one half. A slab never gets
    # thinner than the native slices (nothing finer can be made up); only the neighbours come closer.
    thickness_probability: float = 0.0
    thickness_mm: tuple[float, float] = (1.0, 5.0)
    # Scan edge (data.SliceSampler): with edge_probability, the sample is the first or last slice of a scan
    # that ends there: its 2.5D neighbours on one side (drawn at random) repeat the slice itself, as
    # ``slice_stack`` makes them at a scan's first and last slice. A scan that ends inside the liver shows
    # this stack on liver slices; training shows it otherwise only at the training scans' ends, where there
    # is rarely liver, so the network would meet it first on a patient. With it, a liver cut off at the
    # scan's edge is segmented as far as it goes.
    edge_probability: float = 0.0
    # Synthetic lesion (data.SliceSampler, before the geometry): with synthetic_lesion_probability, a sample
    # that shows liver gets a round hypodense lesion inside it, labelled lesion (and liver), as "label-free"
    # tumour synthesis does (Hu et al., CVPR 2023): here three patients hold nine lesions, and a network that
    # never saw a lesion leaves them out of the liver (LiverSegTraining/RESULTS.md). Its radius is drawn from
    # synthetic_lesion_radius (fractions of the image side: 2–18 mm on stage 2's 1 mm pixels), its
    # darkening at the centre from synthetic_lesion_hu (HU below the liver, converted through the card's
    # window); the liver's texture and noise stay. The same disc on every slice of the 2.5D stack (a slice
    # or two apart, a sphere's section changes little), cut to the sample's liver.
    synthetic_lesion_probability: float = 0.0
    synthetic_lesion_radius: tuple[float, float] = (0.01, 0.08)
    synthetic_lesion_hu: tuple[float, float] = (20.0, 80.0)


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


def random_fields_of_view(batch: int, config: AugmentConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(applied (B,), zoom (B,), centre (B, 2)): the window of each sample's field of view in ``affine_grid``
    units, a fraction of the side placed anywhere inside the image; zoom 1 and centre 0 where not applied."""
    applied = torch.rand(batch, generator=generator) < config.fov_probability
    zoom = torch.where(applied, _uniform(*config.fov_fraction, batch, generator), torch.ones(batch))
    centre = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (1 - zoom)[:, None]
    return applied, zoom, centre


def with_field_of_view(theta: torch.Tensor, zoom: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``theta`` applied after the field-of-view window: output u → zoom·u + centre → theta. One resampling
    for both, so the image is interpolated once."""
    linear, shift = theta[:, :, :2], theta[:, :, 2:]
    return torch.cat([linear * zoom[:, None, None], linear @ centre[:, :, None] + shift], 2)


def outside_reconstruction_circle(size: int) -> torch.Tensor:
    """(size, size) True outside the circle inscribed in the grid (pixel centres, ``align_corners=False``)."""
    centres = (2 * torch.arange(size, dtype=torch.float64) + 1) / size - 1
    return centres[:, None] ** 2 + centres[None, :] ** 2 > 1


def standard_normal(shape: torch.Size | tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """N(0, 1) noise of ``shape`` on ``device``. On the CPU straight from ``generator``; elsewhere from a
    device generator seeded by one draw of ``generator``: a batch's pixels of noise drawn on the CPU cost
    more than the GPU's whole training step (tens of ms for 32 slices at 224 px), and the seed keeps the
    stream a function of ``generator`` alone (nothing more to checkpoint)."""
    if device.type == "cpu":
        return torch.randn(shape, generator=generator)
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)


def add_scanner_noise(image: torch.Tensor, noise_hu: tuple[float, float], window_hu: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise with a std drawn per sample from ``noise_hu`` (HU), on pixels inside the window."""
    batch = image.shape[0]
    std = _uniform(*noise_hu, batch, generator) / (window_hu[1] - window_hu[0])
    noise = standard_normal(image.shape, generator, image.device) * std.to(image.device)[:, None, None, None]
    inside = (image > 0) & (image < 1)
    return torch.where(inside, image + noise.to(image.dtype), image)


def slab_weights(centre: float, thickness: float, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of the native slices that make a slab ``thickness`` slices thick around
    ``centre`` (slice units; slice i covers [i − 0.5, i + 0.5]): each weight is the slice's overlap with the
    slab, normalised to sum 1. Beyond the volume the edge slices repeat, as in ``slice_stack``."""
    thickness = max(thickness, 1.0)  # a slab is at least one native slice: thinner would invent detail
    low, high = centre - thickness / 2, centre + thickness / 2
    cells = torch.arange(math.floor(low + 0.5), math.ceil(high - 0.5) + 1, dtype=torch.float64)
    overlap = (torch.minimum(cells + 0.5, torch.tensor(high)) - torch.maximum(cells - 0.5, torch.tensor(low))).clamp(min=0)
    return cells.long().clamp(0, depth - 1), overlap / overlap.sum()


def as_scan_edge(stack: torch.Tensor, context_slices: int, side: int) -> torch.Tensor:
    """The 2.5D stack (C, n, n) of a slice at the scan's start (``side`` −1: the neighbours before it are
    replaced by the slice itself) or end (+1: those after it), exactly as ``slice_stack`` would give it on
    a scan cut there."""
    edged = stack.clone()
    if side < 0:
        edged[:context_slices] = stack[context_slices]
    else:
        edged[context_slices + 1 :] = stack[context_slices]
    return edged


def thick_slab(volume: torch.Tensor, centre: float, thickness: float) -> torch.Tensor:
    """Mean of ``volume`` (Z, ...) over a slab ``thickness`` slices thick around ``centre``, as float32."""
    indices, weights = slab_weights(centre, thickness, volume.shape[0])
    return torch.tensordot(weights.float(), volume[indices].float(), dims=1)


def thick_slice_sample(
    image: torch.Tensor, masks: torch.Tensor, z: int, context_slices: int, thickness_slices: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2.5D stack (C, n, n) and masks (K, n, n) that slice ``z`` of ``image`` (Z, n, n) and ``masks``
    (Z, K, n, n) would give on a scan ``thickness_slices`` native slices thick and apart: each channel a slab
    mean, neighbours ``thickness_slices`` away, the labels' slab mean thresholded at one half."""
    stack = [thick_slab(image, z + k * thickness_slices, thickness_slices) for k in range(-context_slices, context_slices + 1)]
    return torch.stack(stack), (thick_slab(masks, z, thickness_slices) >= 0.5).float()


def with_synthetic_lesion(
    stack: torch.Tensor, masks: torch.Tensor, config: AugmentConfig, window_hu: tuple[float, float], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``stack`` (C, n, n) in [0, 1] and ``masks`` (2, n, n) with a synthetic lesion in the liver of
    ``masks[0]`` (unchanged when it shows no liver). The lesion's profile falls linearly from 1 over its
    outer 30 % to 0 at the radius, the darkening is the profile times the drawn depth, and the lesion label is
    where the profile reaches one half (85 % of the radius), inside the liver."""
    liver = masks[0] > 0.5
    pixels = torch.nonzero(liver)
    if len(pixels) == 0:
        return stack, masks
    centre = pixels[int(torch.randint(len(pixels), (1,), generator=generator))].to(torch.float32)
    size = stack.shape[-1]
    radius = float(_uniform(*config.synthetic_lesion_radius, 1, generator)) * size
    depth = float(_uniform(*config.synthetic_lesion_hu, 1, generator)) / (window_hu[1] - window_hu[0])
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    distance = torch.sqrt((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2)
    profile = ((radius - distance) / (0.3 * radius)).clamp(0, 1) * liver
    lesion_masks = masks.clone()
    lesion_masks[1] = torch.maximum(masks[1], (profile >= 0.5).to(masks.dtype))
    return (stack - depth * profile).clamp(0, 1), lesion_masks


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
    image: torch.Tensor,
    masks: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
    window_hu: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """image (B, C, n, n) in [0, 1], masks (B, K, n, n) in {0, 1} → augmented copies. ``window_hu``, the
    card's window, converts ``noise_hu`` to the image's units (needed only when that noise is on)."""
    batch = image.shape[0]
    theta = random_affines(batch, config, generator)
    if config.fov_probability > 0:
        fov_applied, zoom, centre = random_fields_of_view(batch, config, generator)
        theta = with_field_of_view(theta, zoom, centre)
    theta = theta.to(image.device, image.dtype)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    if config.elastic_probability > 0:
        grid = grid + random_displacements(batch, image.shape[-1], config, generator).to(grid.device, grid.dtype)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = (F.grid_sample(masks.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= 0.5).float()
    if config.fov_probability > 0:
        cut = fov_applied.to(image.device)[:, None, None, None] & outside_reconstruction_circle(image.shape[-1]).to(image.device)
        image, masks = image.masked_fill(cut, 0.0), masks.masked_fill(cut, 0.0)
    if config.noise_hu[1] > 0:
        if window_hu is None:
            raise ValueError("augment.noise_hu needs the model's window_hu")
        image = add_scanner_noise(image, config.noise_hu, window_hu, generator)

    flip_lr = (torch.rand(batch, generator=generator) < config.flip_lr_probability).to(image.device)
    image = torch.where(flip_lr[:, None, None, None], image.flip(-1), image)
    masks = torch.where(flip_lr[:, None, None, None], masks.flip(-1), masks)
    flip_z = (torch.rand(batch, generator=generator) < config.flip_z_probability).to(image.device)
    image = torch.where(flip_z[:, None, None, None], image.flip(1), image)

    def per_sample(low: float, high: float) -> torch.Tensor:
        return _uniform(low, high, batch, generator).to(image.device)[:, None, None, None]

    image = image.clamp(0, 1) ** per_sample(*config.gamma)
    image = (image - 0.5) * per_sample(*config.contrast) + 0.5 + per_sample(-config.brightness, config.brightness)
    noise = standard_normal(image.shape, generator, image.device) * config.noise_std
    return (image + noise).clamp_(0, 1), masks


__all__ = ["AugmentConfig", "augment_batch", "random_affines", "random_displacements", "thick_slice_sample", "with_synthetic_lesion"]
