"""Multi-cycle training with warm restarts, best-checkpoint selection and full resume."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from LiverSegLib.inference import choose_device, predict_probabilities
from LiverSegLib.model import ModelCard, build_network

from .augment import augment_batch
from .config import TrainConfig
from .data import PreparedCase, SliceSampler
from .losses import combined_loss
from .metrics import overlap

log = logging.getLogger(__name__)


@dataclass
class EpochRecord:
    cycle: int
    epoch: int
    train_loss: float
    val_liver_dice: float
    val_lesion_dice: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    card: ModelCard
    network: torch.nn.Module
    history: list[EpochRecord] = field(default_factory=list)
    best_val_liver_dice: float = float("nan")


def validate(network: torch.nn.Module, cases: list[PreparedCase], card: ModelCard, device: torch.device) -> tuple[float, float]:
    """Mean per-case Dice on the model grid (liver; lesion over cases that label lesions)."""
    liver, lesion = [], []
    for case in cases:
        probabilities, _ = predict_probabilities(network, case.image.float(), card, device)
        predicted = probabilities >= card.threshold
        liver.append(overlap(predicted[:, 0].numpy(), case.masks[:, 0].numpy())["dice"])
        if case.has_lesion_label:
            lesion.append(overlap(predicted[:, 1].numpy(), case.masks[:, 1].numpy())["dice"])
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
    validation cases the last epoch counts as best. ``max_epochs`` stops early (a time-boxed session)
    so that a later ``resume`` finishes the schedule.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    card = config.card()
    device = choose_device(config.device)
    schedule = config.schedule
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    network = build_network(card).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    steps_per_cycle = schedule.epochs_per_cycle * schedule.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=steps_per_cycle, eta_min=schedule.min_lr)
    sampler = SliceSampler(train_cases, schedule.liver_fraction, card.context_slices, schedule.weak_weight)
    history: list[EpochRecord] = []
    best_dice, start = -1.0, 0
    last_path, best_path = output_dir / "checkpoint_last.pt", output_dir / "best.pt"
    if resume and last_path.is_file():
        state = torch.load(last_path, weights_only=False)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], generator)
        history = [EpochRecord(**record) for record in state["history"]]
        best_dice, start = state["best_dice"], state["next_epoch"]
        log.info("resuming at epoch %d of %d", start, schedule.cycles * schedule.epochs_per_cycle)
    total_epochs = schedule.cycles * schedule.epochs_per_cycle
    network.train()
    stop = total_epochs if max_epochs is None else min(total_epochs, start + max_epochs)
    for global_epoch in range(start, stop):
        cycle, epoch = divmod(global_epoch, schedule.epochs_per_cycle)
        started, losses = time.perf_counter(), []
        for _ in range(schedule.steps_per_epoch):
            images, masks, channel_mask, weight = sampler.batch(schedule.batch_size, generator)
            images, masks = augment_batch(images, masks, config.augment, generator)
            logits = network(images.to(device))
            loss, _ = combined_loss(logits, masks.to(device), (channel_mask * weight[:, None]).to(device), config.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        val_liver, val_lesion = validate(network, val_cases, card, device) if val_cases else (float("nan"), float("nan"))
        record = EpochRecord(cycle, epoch, float(np.mean(losses)), val_liver, val_lesion, optimizer.param_groups[0]["lr"], time.perf_counter() - started)
        history.append(record)
        score = val_liver if val_cases else float(global_epoch)
        if score > best_dice:
            best_dice = score
            torch.save(network.state_dict(), best_path)
        torch.save(
            {
                "model": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(generator),
                "history": [asdict(r) for r in history],
                "best_dice": best_dice,
                "next_epoch": global_epoch + 1,
            },
            last_path,
        )
        # The schedule that takes 4.5 min on a GPU takes hours on a CPU: say so after the first epoch.
        minutes_left = (stop - global_epoch - 1) * float(np.mean([r.seconds for r in history[start:]])) / 60
        log.info(
            "cycle %d epoch %d: loss %.4f, val liver Dice %.4f, lesion %.4f, lr %.2e, %.0f s (about %.0f min left in this training, on %s)",
            cycle + 1, epoch + 1, record.train_loss, val_liver, val_lesion, record.lr, record.seconds, minutes_left, device.type,
        )
    (output_dir / "history.json").write_text(json.dumps([asdict(r) for r in history], indent=1), encoding="utf-8")
    network.load_state_dict(torch.load(best_path, weights_only=True))
    return TrainResult(card, network.eval(), history, best_dice if val_cases else float("nan"))
