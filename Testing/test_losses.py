"""Loss terms against values worked out by hand (see the comments), and against smp's Dice loss."""

from __future__ import annotations

import math

import pytest
import torch

from LiverSegTraining.losses import LossWeights, combined_loss, soft_dice_loss, tversky_loss, weighted_bce

# Channel 0 (liver): p = [0.5, 0.75], target [1, 0] → TP 0.5, FP 0.75, FN 0.5
# Channel 1 (lesion): p = [0.25, 0.5], target [1, 1] → TP 0.75, FP 0, FN 1.25
LOGITS = torch.tensor([[[[0.0, math.log(3)]], [[math.log(1 / 3), 0.0]]]])
TARGET = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])
BOTH = torch.ones(1, 2)


def test_soft_dice_by_hand():
    loss = soft_dice_loss(torch.sigmoid(LOGITS), TARGET, BOTH, smooth=1.0)
    # 1 - (2·0.5 + 1)/(2·0.5 + 0.75 + 0.5 + 1) = 1 - 2/3.25 ; 1 - (1.5 + 1)/(1.5 + 1.25 + 1) = 1 - 2.5/3.75
    assert loss.tolist() == pytest.approx([1 - 2 / 3.25, 1 - 2.5 / 3.75], abs=1e-6)


def test_tversky_by_hand():
    loss = tversky_loss(torch.sigmoid(LOGITS), TARGET, BOTH, alpha=0.3, beta=0.7, smooth=1.0)
    # 1 - 1.5/(0.5 + 0.3·0.75 + 0.7·0.5 + 1) ; 1 - 1.75/(0.75 + 0 + 0.7·1.25 + 1)
    assert loss.tolist() == pytest.approx([1 - 1.5 / 2.075, 1 - 1.75 / 2.625], abs=1e-6)


def test_bce_with_positive_weight_by_hand():
    loss = weighted_bce(LOGITS, TARGET, BOTH, torch.tensor([1.0, 5.0]))
    # liver: (-ln 0.5 - ln 0.25)/2 ; lesion: 5·(-ln 0.25 - ln 0.5)/2
    expected = [(math.log(2) + math.log(4)) / 2, 5 * (math.log(4) + math.log(2)) / 2]
    assert loss.tolist() == pytest.approx(expected, abs=1e-5)


def test_combined_loss_by_hand():
    total, terms = combined_loss(LOGITS, TARGET, BOTH, LossWeights())
    bce = ((math.log(2) + math.log(4)) / 2 + 5 * (math.log(4) + math.log(2)) / 2) / 2
    dice = ((1 - 2 / 3.25) + (1 - 2.5 / 3.75)) / 2
    tversky = ((1 - 1.5 / 2.075) + (1 - 1.75 / 2.625)) / 2
    assert terms == pytest.approx({"bce": bce, "dice": dice, "tversky": tversky}, abs=1e-5)
    assert float(total) == pytest.approx(bce + dice + tversky, abs=1e-5)


def test_unlabelled_lesion_channel_is_left_out():
    # A liver-only case (ircad_07): only the liver channel counts.
    total, _ = combined_loss(LOGITS, TARGET, torch.tensor([[1.0, 0.0]]), LossWeights())
    expected = (math.log(2) + math.log(4)) / 2 + (1 - 2 / 3.25) + (1 - 1.5 / 2.075)
    assert float(total) == pytest.approx(expected, abs=1e-5)


def test_term_weights_scale_the_terms():
    weights = LossWeights(bce=0.0, dice=2.0, tversky=0.0)
    total, _ = combined_loss(LOGITS, TARGET, BOTH, weights)
    assert float(total) == pytest.approx(2 * ((1 - 2 / 3.25) + (1 - 2.5 / 3.75)) / 2, abs=1e-6)


def test_soft_dice_matches_smp():
    from segmentation_models_pytorch.losses import DiceLoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 8, 8, generator=generator)
    target = (torch.rand(3, 2, 8, 8, generator=generator) > 0.6).float()
    # smp 0.6 computes Dice as Tversky(0.5, 0.5): (TP + s)/(TP + FP/2 + FN/2 + s), i.e. our smooth = 2·s.
    ours = soft_dice_loss(torch.sigmoid(logits), target, torch.ones(3, 2), smooth=2.0).mean()
    theirs = DiceLoss("multilabel", from_logits=True, smooth=1.0)(logits, target)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)
