"""PNG plots: training curves with cycle boundaries, and prediction panels with probability heatmaps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .train import EpochRecord  # noqa: E402


def _cycle_boundaries(axis, history: list[EpochRecord]) -> None:
    for index, record in enumerate(history):
        if record.epoch == 0 and index > 0:
            axis.axvline(index + 0.5, color="grey", linestyle="--", linewidth=0.8)


def plot_history(history: list[EpochRecord], output_dir: Path) -> list[Path]:
    """``loss.png`` (training loss per epoch) and ``dice.png`` (validation Dice per epoch)."""
    epochs = np.arange(1, len(history) + 1)
    paths = []
    for name, series, ylabel in (
        ("loss", {"train loss": [r.train_loss for r in history]}, "BCE + Dice + Tversky"),
        ("dice", {"val liver": [r.val_liver_dice for r in history], "val lesion": [r.val_lesion_dice for r in history]}, "Dice"),
    ):
        figure, axis = plt.subplots(figsize=(7, 4))
        for label, values in series.items():
            axis.plot(epochs, values, marker="o", markersize=3, label=label)
        _cycle_boundaries(axis, history)
        axis.set_xlabel("epoch (dashed: learning-rate restart)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        path = output_dir / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


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
