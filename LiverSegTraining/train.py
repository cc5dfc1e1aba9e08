"""Multi-cycle training with warm restarts, best-checkpoint selection and full resume."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from LiverSegLib.inference import choose_device, predict_probabilities
from LiverSegLib.model import ModelCard, build_network
from LiverSegLib.outputs import write_strict_json

from .augment import augment_batch
from .config import TrainConfig
from .data import PreparedCase, SliceSampler
from .losses import combined_loss
from .metrics import overlap
from .plots import plot_prediction_panel

log = logging.getLogger(__name__)
LAST_CHECKPOINT = "checkpoint_last.pt"  # full state of the latest epoch, for resuming
BEST_WEIGHTS = "best.pt"  # network weights of the best epoch, the ones a run returns
PANEL_DIR = "panels"  # prediction panels of the validation cases at the end of each cycle
PANEL_CASES = 2  # validation cases shown in the panels
PANEL_LIVER_FRACTIONS = (0.25, 0.5, 0.75)  # where in each case's liver extent (caudal to cranial) the shown slices lie
NAN = float("nan")


@dataclass
class EpochRecord:
    """One epoch of the history. ``lr`` is the LR the epoch started with, so a cycle's first epoch shows the
    cycle's maximum. A Dice that could not be measured (no validation cases; no lesion-labelled sample) is
    NaN here and null in ``history.json``. The training Dice fields come last, with defaults, so that a
    checkpoint written before they existed still restores."""

    cycle: int
    epoch: int
    train_loss: float
    val_liver_dice: float
    val_lesion_dice: float
    lr: float
    seconds: float
    train_liver_dice: float = NAN
    train_lesion_dice: float = NAN


@dataclass
class TrainResult:
    card: ModelCard
    network: torch.nn.Module
    history: list[EpochRecord] = field(default_factory=list)
    best_val_liver_dice: float = NAN  # validation liver Dice of the returned weights (the chosen epoch's)
    stage2: "TrainResult | None" = None  # a cascade's stage 2, trained on the same patients (its card: card.stage_card(2))


@dataclass
class OverlapCounts:
    """Voxel counts per channel (liver, lesion) summed over an epoch's training batches.

    The epoch's training Dice is pooled over every voxel, so a batch with little liver weighs no more than
    its voxels; a sample whose label lacks a channel (no lesion label) is left out of that channel.
    """

    # (intersection, predicted, actual) × (liver, lesion), kept where the batches are: reading them back
    # after every step would make the CPU wait for the GPU each step instead of drawing the next batch.
    totals: torch.Tensor | None = None

    def add(self, logits: torch.Tensor, masks: torch.Tensor, channel_mask: torch.Tensor, threshold: float) -> None:
        """Count one batch: ``logits`` and ``masks`` (B, 2, n, n), ``channel_mask`` (B, 2) with 1 where labelled."""
        with torch.no_grad():
            labelled = (channel_mask > 0)[:, :, None, None]
            predicted = (torch.sigmoid(logits) >= threshold) & labelled
            actual = (masks > 0.5) & labelled
            batch = torch.stack([(predicted & actual).sum((0, 2, 3)), predicted.sum((0, 2, 3)), actual.sum((0, 2, 3))])
            self.totals = batch if self.totals is None else self.totals + batch

    def dice(self) -> tuple[float, float]:
        """(liver, lesion) Dice; NaN for a channel with neither predicted nor labelled voxels (nothing measured)."""
        if self.totals is None:
            return NAN, NAN
        intersection, predicted, actual = self.totals.cpu().double().numpy()
        total = predicted + actual
        return tuple(float(2 * i / t) if t > 0 else NAN for i, t in zip(intersection, total))  # type: ignore[return-value]


def validate(network: torch.nn.Module, cases: list[PreparedCase], card: ModelCard, device: torch.device) -> tuple[float, float]:
    """Mean per-case Dice on the model grid (liver; lesion over cases that label lesions)."""
    liver, lesion = [], []
    for case in cases:
        probabilities, _ = predict_probabilities(network, case.image.float(), card, device)
        predicted = probabilities >= card.threshold
        liver.append(overlap(predicted[:, 0], case.masks[:, 0].numpy())["dice"])
        if case.has_lesion_label:
            lesion.append(overlap(predicted[:, 1], case.masks[:, 1].numpy())["dice"])
    network.train()
    return (float(np.mean(liver)) if liver else float("nan"), float(np.mean(lesion)) if lesion else float("nan"))


def _rng_state(generator: torch.Generator) -> dict:
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


@dataclass
class TrainingState:
    """A run in progress. Everything an epoch changes is what ``checkpoint_last.pt`` holds, so that a
    resumed run continues exactly where the interrupted one stopped; ``card``, ``sampler`` and
    ``device`` come from the config and are rebuilt, not saved."""

    card: ModelCard
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts
    sampler: SliceSampler
    generator: torch.Generator
    device: torch.device
    history: list[EpochRecord] = field(default_factory=list)
    best_score: float = -1.0
    next_epoch: int = 0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch, NumPy and Python, and return the generator that drives sampling and augmentation.

    The network's initial weights come from torch's global RNG, so this must run before ``build``.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


def channels_last(config: TrainConfig, device: torch.device) -> bool:
    """Whether the network and its batches use the channels-last layout (the one tensor cores read): under
    ``schedule.mixed_precision`` on a GPU."""
    return config.schedule.mixed_precision and device.type == "cuda"


def build(config: TrainConfig, train_cases: list[PreparedCase], device: torch.device, generator: torch.Generator) -> TrainingState:
    """Network, AdamW, cosine warm restarts (the LR falls over a cycle's steps, then restarts) and the sampler."""
    schedule, card = config.schedule, config.card()
    network = build_network(card).to(device)
    if channels_last(config, device):  # fixed shapes: let cuDNN time its algorithms
        network = network.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.AdamW(network.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    steps_per_cycle = schedule.epochs_per_cycle * schedule.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=steps_per_cycle, eta_min=schedule.min_lr)
    sampler = SliceSampler(train_cases, schedule.liver_fraction, card.context_slices, schedule.weak_weight, config.augment, schedule.lesion_fraction,
                           card.window_hu)
    network.train()
    return TrainingState(card, network, optimizer, scheduler, sampler, generator, device)


def restore(state: TrainingState, output_dir: Path) -> bool:
    """Load ``checkpoint_last.pt`` into a freshly built ``state``; False (nothing changed) when there is none."""
    last_path = output_dir / LAST_CHECKPOINT
    if not last_path.is_file():
        return False
    saved = torch.load(last_path, weights_only=False)
    state.network.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"], state.generator)
    state.history = [EpochRecord(**record) for record in saved["history"]]
    state.best_score, state.next_epoch = saved["best_dice"], saved["next_epoch"]
    return True


def optimisation_step(
    state: TrainingState, config: TrainConfig, images: torch.Tensor, masks: torch.Tensor, channel_mask: torch.Tensor, weight: torch.Tensor, counts: OverlapCounts
) -> torch.Tensor:
    """One AdamW step on an augmented batch (on the device), the LR stepped after it; returns the loss (a
    tensor where the network runs: read back once an epoch) and adds the batch's predictions (as trained
    on, before the step) to ``counts``. With ``schedule.mixed_precision`` the forward pass runs in bf16
    (no loss scaling needed: bf16 keeps float32's range), the loss in float32."""
    if channels_last(config, state.device):
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=config.schedule.mixed_precision):
        logits = state.network(images)
    logits = logits.float()  # the loss in float32 (a no-op without autocast)
    channel_mask = channel_mask.to(state.device)
    loss, _ = combined_loss(logits, masks, channel_mask * weight.to(state.device)[:, None], config.loss)
    counts.add(logits.detach(), masks, channel_mask, state.card.threshold)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    return loss.detach()


def train_steps(state: TrainingState, config: TrainConfig) -> tuple[float, OverlapCounts]:
    """One epoch of optimisation: ``steps_per_epoch`` augmented batches, the LR stepped after each.

    Returns the mean training loss and the overlap of the batches' predictions (as trained on, before each
    step) with their labels: a Dice curve that exists even without validation cases.
    """
    losses, counts = [], OverlapCounts()
    for _ in range(config.schedule.steps_per_epoch):
        images, masks, channel_mask, weight = state.sampler.batch(config.schedule.batch_size, state.generator)
        # Augmented where the network runs: on a GPU, resampling a batch and drawing its noise on the CPU
        # takes longer than the network's step (benchmarks/training_step.py).
        images, masks = augment_batch(images.to(state.device), masks.to(state.device), config.augment, state.generator, state.card.window_hu)
        losses.append(optimisation_step(state, config, images, masks, channel_mask, weight, counts))
    return float(torch.stack(losses).double().mean()), counts


def run_epoch(state: TrainingState, config: TrainConfig, val_cases: list[PreparedCase]) -> EpochRecord:
    """Train one epoch, validate, and append the epoch's record. Its ``lr`` is read before the first step:
    the LR the epoch trained from, not the one the scheduler sets after it (at a cycle's end, the restart)."""
    cycle, epoch = divmod(state.next_epoch, config.schedule.epochs_per_cycle)
    lr_at_start = state.lr
    started_s = time.perf_counter()
    train_loss, counts = train_steps(state, config)
    val_liver, val_lesion = validate(state.network, val_cases, state.card, state.device) if val_cases else (NAN, NAN)
    seconds = time.perf_counter() - started_s
    record = EpochRecord(cycle, epoch, train_loss, val_liver, val_lesion, lr_at_start, seconds, *counts.dice())
    state.history.append(record)
    state.next_epoch += 1
    return record


def panel_slices(case: PreparedCase) -> list[int]:
    """Fixed slices of a validation case to show every cycle: spread over its liver's extent (the middle
    slice of the case when its label shows no liver), so that successive cycles compare like with like."""
    liver = case.liver_slices.tolist()
    if not liver:
        return [case.image.shape[0] // 2]
    return sorted({liver[min(len(liver) - 1, int(fraction * len(liver)))] for fraction in PANEL_LIVER_FRACTIONS})


def write_cycle_panels(state: TrainingState, val_cases: list[PreparedCase], cycle: int, output_dir: Path) -> list[Path]:
    """Prediction panels (CT, truth, prediction, liver probability) of the first validation cases' fixed
    slices, on the model grid, written as ``panels/cycleN_CASE_zZ.png`` at the end of cycle N."""
    folder = output_dir / PANEL_DIR
    folder.mkdir(exist_ok=True)
    low_hu, high_hu = state.card.window_hu
    paths = []
    for case in val_cases[:PANEL_CASES]:
        probabilities, _ = predict_probabilities(state.network, case.image.float(), state.card, state.device)
        predicted = probabilities >= state.card.threshold
        prediction = predicted[:, 0].astype(np.uint8) + (predicted[:, 0] & predicted[:, 1])
        truth = case.masks[:, 0].numpy() + case.masks[:, 1].numpy()
        ct_hu = low_hu + case.image.float().numpy() * (high_hu - low_hu)  # the window the network sees, back in HU
        for z in panel_slices(case):
            path = folder / f"cycle{cycle + 1}_{case.name}_z{z:03d}.png"
            paths.append(plot_prediction_panel(f"{case.name} z{z}", ct_hu[z], truth[z], prediction[z], probabilities[z, 0], path))
    state.network.train()
    return paths


def checkpoint(state: TrainingState, score: float, output_dir: Path) -> None:
    """Save the weights as ``best.pt`` when ``score`` beats every earlier epoch's, and always the full
    state as ``checkpoint_last.pt``, so that an interrupted run loses at most the epoch in progress."""
    if score > state.best_score:
        state.best_score = score
        torch.save(state.network.state_dict(), output_dir / BEST_WEIGHTS)
    torch.save(
        {
            "model": state.network.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "rng": _rng_state(state.generator),
            "history": [asdict(r) for r in state.history],
            "best_dice": state.best_score,
            "next_epoch": state.next_epoch,
        },
        output_dir / LAST_CHECKPOINT,
    )


def log_epoch(record: EpochRecord, epochs_left: int, mean_epoch_s: float, device: torch.device) -> None:
    """One line per epoch with the time left: the schedule that takes minutes on a GPU takes hours on
    a CPU, and the user should know after the first epoch."""
    log.info(
        "cycle %d epoch %d: loss %.4f, train liver Dice %.4f, val liver Dice %.4f, lesion %.4f, lr %.2e, %.0f s (about %.0f min left in this training, on %s)",
        record.cycle + 1, record.epoch + 1, record.train_loss, record.train_liver_dice, record.val_liver_dice, record.val_lesion_dice, record.lr,
        record.seconds, epochs_left * mean_epoch_s / 60, device.type,
    )


def train(
    config: TrainConfig,
    train_cases: list[PreparedCase],
    val_cases: list[PreparedCase],
    output_dir: Path,
    resume: bool = False,
    max_epochs: int | None = None,
) -> TrainResult:
    """Train ``cycles × epochs_per_cycle`` epochs; the LR restarts at each cycle (cosine warm restarts).

    Every epoch writes ``checkpoint_last.pt`` (model, optimizer, scheduler, RNG, position, history) so
    an interrupted run resumes exactly; the best validation liver Dice is kept in ``best.pt``. Without
    validation cases, or with ``split.select_on_val`` off (validation labels too weak to choose by), the
    last epoch counts as best. Each cycle's last epoch writes prediction panels of the validation cases.
    ``max_epochs`` stops early (a time-boxed run) so that a later ``resume`` finishes the schedule.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = choose_device(config.device)
    state = build(config, train_cases, device, seed_everything(config.seed))
    total_epochs = config.schedule.cycles * config.schedule.epochs_per_cycle
    if resume and restore(state, output_dir):
        log.info("resuming at epoch %d of %d", state.next_epoch, total_epochs)
    start = state.next_epoch
    stop = total_epochs if max_epochs is None else min(total_epochs, start + max_epochs)
    select_on_val = bool(val_cases) and config.split.select_on_val
    for global_epoch in range(start, stop):
        record = run_epoch(state, config, val_cases)
        checkpoint(state, record.val_liver_dice if select_on_val else float(global_epoch), output_dir)
        log_epoch(record, stop - global_epoch - 1, float(np.mean([r.seconds for r in state.history[start:]])), device)
        if val_cases and record.epoch == config.schedule.epochs_per_cycle - 1:
            write_cycle_panels(state, val_cases, record.cycle, output_dir)
    write_strict_json([asdict(r) for r in state.history], output_dir / "history.json")
    state.network.load_state_dict(torch.load(output_dir / BEST_WEIGHTS, weights_only=True))
    return TrainResult(state.card, state.network.eval(), state.history, kept_val_liver_dice(state, val_cases, select_on_val))


def kept_val_liver_dice(state: TrainingState, val_cases: list[PreparedCase], select_on_val: bool) -> float:
    """Validation liver Dice of the weights the run returns: the best epoch's when validation chose them,
    else the last epoch's (NaN without validation cases)."""
    if not val_cases or not state.history:
        return NAN
    return state.best_score if select_on_val else state.history[-1].val_liver_dice
