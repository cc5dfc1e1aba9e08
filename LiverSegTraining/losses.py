"""BCE + Dice + Tversky on sigmoid channels (liver, lesion), with per-sample channel masks.

A channel mask of 0 removes a channel from every term for that sample: a case whose label has the
liver only (ircad_07) then teaches the liver channel and says nothing about lesions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    bce: float = 1.0
    dice: float = 1.0
    tversky: float = 1.0
    tversky_alpha: float = 0.3  # weight of false positives
    tversky_beta: float = 0.7  # weight of false negatives: recall matters for small lesions
    pos_weight: tuple[float, ...] = (1.0, 5.0)  # BCE positive-class weight per channel (rare lesions)
    channel_weight: tuple[float, ...] = (1.0, 1.0)
    smooth: float = 1.0


def _masked_sums(probabilities: torch.Tensor, target: torch.Tensor, channel_mask: torch.Tensor):
    """Per-channel TP, FP, FN summed over valid samples and pixels; and whether a channel has any sample."""
    weight = channel_mask[:, :, None, None].to(probabilities.dtype)
    dims = (0, 2, 3)
    true_positive = (probabilities * target * weight).sum(dims)
    false_positive = (probabilities * (1 - target) * weight).sum(dims)
    false_negative = ((1 - probabilities) * target * weight).sum(dims)
    return true_positive, false_positive, false_negative, channel_mask.sum(0) > 0


def soft_dice_loss(probabilities, target, channel_mask, smooth: float = 1.0) -> torch.Tensor:
    """Per-channel 1 - (2·TP + s) / (2·TP + FP + FN + s), over the whole batch; NaN-free for empty channels."""
    tp, fp, fn, present = _masked_sums(probabilities, target, channel_mask)
    loss = 1 - (2 * tp + smooth) / (2 * tp + fp + fn + smooth)
    return torch.where(present, loss, torch.zeros_like(loss))


def tversky_loss(probabilities, target, channel_mask, alpha: float, beta: float, smooth: float = 1.0) -> torch.Tensor:
    """Per-channel 1 - (TP + s) / (TP + α·FP + β·FN + s)."""
    tp, fp, fn, present = _masked_sums(probabilities, target, channel_mask)
    loss = 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return torch.where(present, loss, torch.zeros_like(loss))


def weighted_bce(logits, target, channel_mask, pos_weight: torch.Tensor) -> torch.Tensor:
    """Per-channel mean BCE-with-logits over valid samples, positives weighted by ``pos_weight``."""
    elementwise = F.binary_cross_entropy_with_logits(
        logits, target, pos_weight=pos_weight[None, :, None, None], reduction="none"
    )
    weight = channel_mask[:, :, None, None].to(logits.dtype).expand_as(elementwise)
    count = weight.sum((0, 2, 3))
    return (elementwise * weight).sum((0, 2, 3)) / count.clamp(min=1)


def combined_loss(
    logits: torch.Tensor, target: torch.Tensor, channel_mask: torch.Tensor, weights: LossWeights
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the three terms, each averaged over the labelled channels with ``channel_weight``."""
    probabilities = torch.sigmoid(logits)
    pos_weight = torch.tensor(weights.pos_weight, device=logits.device, dtype=logits.dtype)
    channel_weight = torch.tensor(weights.channel_weight, device=logits.device, dtype=logits.dtype)
    terms = {
        "bce": weighted_bce(logits, target, channel_mask, pos_weight),
        "dice": soft_dice_loss(probabilities, target, channel_mask, weights.smooth),
        "tversky": tversky_loss(
            probabilities, target, channel_mask, weights.tversky_alpha, weights.tversky_beta, weights.smooth
        ),
    }
    # Average over the channels that some sample labels: a batch without lesion labels is all liver.
    present_weight = channel_weight * (channel_mask.sum(0) > 0).to(logits.dtype)
    per_term = {name: (value * present_weight).sum() / present_weight.sum().clamp(min=1e-8) for name, value in terms.items()}
    total = weights.bce * per_term["bce"] + weights.dice * per_term["dice"] + weights.tversky * per_term["tversky"]
    return total, {name: float(value.detach()) for name, value in per_term.items()}
