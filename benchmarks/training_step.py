"""Where a training step's time goes: drawing the batch, augmenting it, and the network's step, per stage.

    python benchmarks/training_step.py [--config LiverSegTraining/configs/cascade.toml] [--device cpu|cuda]
                                       [--steps 20] [--threads 2] [--set KEY=VALUE ...]

For each stage of the config (one, or a cascade's two) the script prepares the training patients exactly as
``liverseg-train`` does (``data.prepare_case`` on ``$LIVERSEG_DATA``, the config's cache folder), builds the
training state (``train.build``: network, AdamW, warm restarts, sampler) and times ``--steps`` steps after
three untimed ones, split into

- **draw**: ``SliceSampler.batch`` on the CPU (slices, the slice-thickness and scan-edge augmentations);
- **augment**: ``augment.augment_batch`` where the training runs it (on the device: ``train.train_steps``);
- **network**: ``train.optimisation_step`` (forward, loss, backward, AdamW);

and, on a GPU, **augment on the CPU** as training did before (the batch augmented, then copied), for
comparison. The GPU is synchronised around each part. It prints the median milliseconds of each part, a
step's total, and what the config's schedule (cycles × epochs × steps) costs at that rate, validation and
evaluation not counted. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "benchmarks"))
sys.path.insert(0, str(PROJECT / "LiverSeg"))
sys.path.insert(0, str(PROJECT))

from cpu_install import load_1min, machine, print_table  # noqa: E402


def timed_ms(part: Callable[[], object], synchronise: Callable[[], None]) -> tuple[object, float]:
    synchronise()
    started = time.perf_counter()
    value = part()
    synchronise()
    return value, (time.perf_counter() - started) * 1e3


def stage_rows(config, device, steps: int, label: str) -> list[list[str]]:
    import torch

    from LiverSegTraining.augment import augment_batch
    from LiverSegTraining.runner import _prepare, load_cases, split_cases
    from LiverSegTraining.train import OverlapCounts, build, optimisation_step, seed_everything

    card = config.card()
    train_cases, _ = split_cases(load_cases(config), config)
    state = build(config, _prepare(train_cases, config, card), device, seed_everything(config.seed))
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    size, counts = config.schedule.batch_size, OverlapCounts()
    times: dict[str, list[float]] = {"draw": [], "augment": [], "network": [], "augment on the CPU": []}
    for step in range(steps + 3):
        batch, draw_ms = timed_ms(lambda: state.sampler.batch(size, state.generator), synchronise)
        images, masks, channel_mask, weight = batch
        if device.type != "cpu":
            _, cpu_ms = timed_ms(lambda: augment_batch(images, masks, config.augment, torch.Generator().manual_seed(step), card.window_hu), synchronise)
        (images, masks), augment_ms = timed_ms(
            lambda: augment_batch(images.to(device), masks.to(device), config.augment, state.generator, card.window_hu), synchronise)
        _, network_ms = timed_ms(lambda: optimisation_step(state, config, images, masks, channel_mask, weight, counts), synchronise)
        if step >= 3:
            times["draw"].append(draw_ms)
            times["augment"].append(augment_ms)
            times["network"].append(network_ms)
            if device.type != "cpu":
                times["augment on the CPU"].append(cpu_ms)
    median = {part: statistics.median(values) for part, values in times.items() if values}
    step_ms = median["draw"] + median["augment"] + median["network"]
    schedule = config.schedule
    total_steps = schedule.cycles * schedule.epochs_per_cycle * schedule.steps_per_epoch
    cpu_augment = f"{median['augment on the CPU']:.1f}" if "augment on the CPU" in median else "–"
    return [[label, f"{card.encoder} {card.input_size} px, batch {size}", f"{median['draw']:.1f}", f"{median['augment']:.1f}",
             f"{median['network']:.1f}", f"{step_ms:.1f}", cpu_augment, f"{total_steps}", f"{total_steps * step_ms / 60e3:.1f}"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(PROJECT / "LiverSegTraining" / "configs" / "cascade.toml"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads (liverseg-train's `threads`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="a config override, as liverseg-train's --set")
    args = parser.parse_args()

    import torch

    from LiverSegTraining.config import load_config

    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    rows = stage_rows(config, device, args.steps, "stage 1" if config.stage2 else "single stage")
    if config.stage2:
        rows += stage_rows(config.stage2_config(), device, args.steps, "stage 2")
    gpu = f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    print(f"# {machine()}{gpu}; torch {torch.__version__}, {args.threads} threads, device {device.type}; load {load_1min()}")
    print(f"# {Path(args.config).name} {' '.join('--set ' + o for o in args.overrides)}; median of {args.steps} steps (ms)")
    print_table(["stage", "network", "draw", "augment", "network step", "step", "augment on the CPU", "steps in the schedule", "minutes at this rate"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
