"""Cases prepared once on the model grid (cached on disk) and slice batches sampled from them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
import torch

from LiverSegLib.geometry import canonical_transform
from LiverSegLib.model import ModelCard
from LiverSegLib.outputs import atomic_output
from LiverSegLib.preprocessing import label_crop, prepare_label, prepare_volume, slice_stack

from .augment import AugmentConfig, as_scan_edge, thick_slice_sample, with_synthetic_lesion
from .sources import Case


@dataclass
class PreparedCase:
    """A case on the model grid: image (Z, n, n) float16 in [0, 1], masks (Z, 2, n, n) uint8; slices
    ``spacing_z_mm`` apart (what the slice-thickness augmentation resamples from)."""

    name: str
    image: torch.Tensor
    masks: torch.Tensor
    has_lesion_label: bool
    weak: bool
    spacing_z_mm: float

    @property
    def liver_slices(self) -> torch.Tensor:
        return torch.nonzero(self.masks[:, 0].flatten(1).any(1)).flatten()

    @property
    def lesion_slices(self) -> torch.Tensor:
        """Slices showing a labelled lesion (none where lesions are not labelled: a blank there is no evidence)."""
        if not self.has_lesion_label:
            return torch.zeros(0, dtype=torch.long)
        return torch.nonzero(self.masks[:, 1].flatten(1).any(1)).flatten()


def prepare_case(case: Case, card: ModelCard, cache_dir: Path | None = None) -> PreparedCase:
    """Read, reorient and preprocess with the engine's own functions; reuse the cache when it matches. For
    a cascade's stage 2 (``card.crop_margin_mm`` > 0) only the box around the labelled liver, on every slice
    (``preprocessing.label_crop``): the box stage 2 sees at inference around stage 1's liver."""
    # v2: numpy resizing; v3: the slice spacing is cached too; v4: the crop margin; v5: stage 2's crop on every slice
    key = hashlib.sha1(f"{case.source}|{card.window_hu}|{card.input_size}|{card.crop_margin_mm}|v5".encode()).hexdigest()[:12]
    cache_file = cache_dir / f"{case.name}-{key}.pt" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        image, masks, spacing_z_mm = torch.load(cache_file, weights_only=True)
    else:
        ct, label = case.load()
        transform = canonical_transform(ct.GetDirection())
        ct_canonical, label_canonical = transform.to_canonical(sitk.GetArrayViewFromImage(ct)), transform.to_canonical(label)
        spacing_mm = transform.canonical_spacing_mm(ct.GetSpacing())
        if card.crop_margin_mm > 0:
            crop = label_crop(label_canonical, spacing_mm, card.crop_margin_mm)
            ct_canonical, label_canonical = ct_canonical[crop], label_canonical[crop]
        image = torch.from_numpy(prepare_volume(ct_canonical, card.window_hu, card.input_size)).half()
        masks = torch.from_numpy(prepare_label(label_canonical, card.input_size))
        spacing_z_mm = spacing_mm[0]
        if cache_file is not None:  # atomically: trainings run side by side (folds, seeds) share the cache
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(cache_file, ".pt") as temporary:
                torch.save((image, masks, spacing_z_mm), temporary)
    return PreparedCase(case.name, image, masks, case.has_lesion_label, weak=not case.is_expert, spacing_z_mm=spacing_z_mm)


class SliceSampler:
    """Draws slice batches: a fraction from slices showing a lesion (``lesion_fraction``, 0 by default),
    a fraction of the rest from slices showing liver, the rest from any slice.

    Liver slices are a third of a CT or less; over-representing them spends the CPU on what matters,
    while the remaining draws keep the network honest about empty slices. Lesions sit on a few slices of
    a few patients: drawn as any liver slice they are a small share of the lesion channel's training
    signal (nnU-Net draws a third of its patches around foreground for the same reason). The slice-thickness and
    scan-edge augmentations (``augment.thickness_probability``, ``augment.edge_probability``) happen here,
    where the whole volume is at hand: a 2D batch holds only the three neighbouring slices, too few to
    resample in z. A synthetic lesion (``augment.synthetic_lesion_probability``) is added here too, to the
    slice as stored, so that the geometric augmentation then moves it with the liver.
    """

    def __init__(
        self,
        cases: list[PreparedCase],
        liver_fraction: float,
        context_slices: int,
        weak_weight: float = 0.5,
        augment: AugmentConfig | None = None,
        lesion_fraction: float = 0.0,
        window_hu: tuple[float, float] = ModelCard.window_hu,
    ):
        self.cases = cases
        self.liver_fraction = liver_fraction
        self.lesion_fraction = lesion_fraction
        self.context_slices = context_slices
        self.weak_weight = weak_weight
        self.augment = augment or AugmentConfig()
        self.window_hu = window_hu  # the card's: a synthetic lesion's darkening is given in HU
        self.all_slices = [(c, z) for c, case in enumerate(cases) for z in range(case.image.shape[0])]
        self.liver_slices = [(c, int(z)) for c, case in enumerate(cases) for z in case.liver_slices]
        self.lesion_slices = [(c, int(z)) for c, case in enumerate(cases) for z in case.lesion_slices]

    def _pool(self, generator: torch.Generator) -> list[tuple[int, int]]:
        """The slices the next sample is drawn from. No random number is drawn for lesions when
        ``lesion_fraction`` is 0, so such configs sample exactly as before it existed."""
        if self.lesion_fraction > 0 and self.lesion_slices and float(torch.rand(1, generator=generator)) < self.lesion_fraction:
            return self.lesion_slices
        return self.liver_slices if self.liver_slices and torch.rand(1, generator=generator) < self.liver_fraction else self.all_slices

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (B, C, n, n), masks (B, 2, n, n), channel_mask (B, 2), sample_weight (B,))."""
        picks = []
        for _ in range(size):
            pool = self._pool(generator)
            picks.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
        images, masks, channel_mask, weights = [], [], [], []
        for case_index, z in picks:
            case = self.cases[case_index]
            image, mask = self.sample(case, z, generator)
            images.append(image)
            masks.append(mask)
            channel_mask.append(torch.tensor([1.0, 1.0 if case.has_lesion_label else 0.0]))
            weights.append(self.weak_weight if case.weak else 1.0)
        return torch.stack(images), torch.stack(masks), torch.stack(channel_mask), torch.tensor(weights)

    def sample(self, case: PreparedCase, z: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack (C, n, n) and masks (2, n, n) of slice ``z``: as stored, or, with the thickness augmentation,
        as a scan with slices of a random thickness in ``augment.thickness_mm`` would show them; then, with
        the scan-edge augmentation, as the first or last slice of a scan that ends there. No random number
        is drawn for an augmentation that is off, so configs without it sample exactly as before."""
        probability = self.augment.thickness_probability
        if probability > 0 and float(torch.rand(1, generator=generator)) < probability:
            low_mm, high_mm = self.augment.thickness_mm
            thickness_mm = low_mm + (high_mm - low_mm) * float(torch.rand(1, generator=generator))
            stack, masks = thick_slice_sample(case.image, case.masks, z, self.context_slices, thickness_mm / case.spacing_z_mm)
        else:
            stack, masks = slice_stack(case.image, [z], self.context_slices)[0].float(), case.masks[z].float()
        edge = self.augment.edge_probability
        if edge > 0 and float(torch.rand(1, generator=generator)) < edge:
            stack = as_scan_edge(stack, self.context_slices, -1 if float(torch.rand(1, generator=generator)) < 0.5 else 1)
        synthetic = self.augment.synthetic_lesion_probability
        if synthetic > 0 and float(torch.rand(1, generator=generator)) < synthetic:
            stack, masks = with_synthetic_lesion(stack, masks, self.augment, self.window_hu, generator)
        return stack, masks


__all__ = ["PreparedCase", "SliceSampler", "prepare_case"]
