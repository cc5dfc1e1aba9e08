"""PNG plots: training curves with cycle boundaries, and prediction panels with probability heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:  # train.py imports this module for its panels
    from .train import EpochRecord


def _cycle_boundaries(axis, history: list[EpochRecord]) -> None:
    for index, record in enumerate(history):
        if record.epoch == 0 and index > 0:
            axis.axvline(index + 0.5, color="grey", linestyle="--", linewidth=0.8)


def _measured(series: dict[str, list[float]]) -> dict[str, list[float]]:
    """The curves with at least one finite point: a curve never measured (no validation cases, no lesion
    label) would only add an empty legend entry."""
    return {label: values for label, values in series.items() if np.isfinite(np.asarray(values, dtype=float)).any()}


def _plot_curves(history: list[EpochRecord], series: dict[str, list[float]], ylabel: str, path: Path, log_scale: bool = False) -> Path:
    """One figure of per-epoch curves with the cycle restarts dashed."""
    epochs = np.arange(1, len(history) + 1)
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, values in _measured(series).items():
        axis.plot(epochs, values, marker="o", markersize=3, label=label)
    _cycle_boundaries(axis, history)
    if log_scale:
        axis.set_yscale("log")
    axis.set_xlabel("epoch (dashed: learning-rate restart)")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_history(history: list[EpochRecord], output_dir: Path) -> list[Path]:
    """``loss.png`` (training loss), ``dice.png`` (Dice on the training batches, and on the validation
    cases when there are any) and ``lr.png`` (the LR each epoch started from), per epoch."""
    dice = {
        "train liver": [r.train_liver_dice for r in history],
        "train lesion": [r.train_lesion_dice for r in history],
        "val liver": [r.val_liver_dice for r in history],
        "val lesion": [r.val_lesion_dice for r in history],
    }
    return [
        _plot_curves(history, {"train loss": [r.train_loss for r in history]}, "BCE + Dice + Tversky", output_dir / "loss.png"),
        _plot_curves(history, dice, "Dice", output_dir / "dice.png"),
        _plot_curves(history, {"learning rate": [r.lr for r in history]}, "learning rate at the epoch's start", output_dir / "lr.png", log_scale=True),
    ]


def plot_prediction_panel(
    name: str, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, probability: np.ndarray, path: Path
) -> Path:
    """One axial slice: CT (HU, shown −200…300), ground truth, prediction, and the raw liver probability."""
    figure, axes = plt.subplots(1, 4, figsize=(14, 3.8))
    panels = [("CT", image, "gray", (-200, 300)), ("ground truth", truth, "viridis", (0, 2)), ("prediction", prediction, "viridis", (0, 2)), ("liver probability", probability, "magma", (0, 1))]
    for axis, (title, values, colormap, (low, high)) in zip(axes, panels):
        shown = axis.imshow(values, cmap=colormap, vmin=low, vmax=high)
        axis.set_title(f"{name}: {title}" if title == "CT" else title)
        axis.axis("off")
        if title == "liver probability":
            figure.colorbar(shown, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
