"""``liverseg-train`` and ``liverseg-evaluate``: one-line errors, exit 2 on bad input."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from LiverSegLib.errors import LiverSegInputError

from .config import load_config


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="liverseg-train", description="Train the LiverSeg network on labelled CT.")
    parser.add_argument("config", help="TOML config (see LiverSegTraining/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--output", help="output folder (default: the config's output_dir)")
    parser.add_argument("--crossval", action="store_true", help="leave-one-patient-out cross-validation, then train the final model on all expert cases")
    parser.add_argument("--folds", metavar="CASE[,CASE...]", help="with --crossval: hold out only these expert cases and train no final model (for comparing settings)")
    parser.add_argument("--seeds", metavar="N[,N...]", help="with --crossval: cross-validate once per seed (output/seed_N) and report the spread between trainings; the final model trains with the first")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs from their last checkpoints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from .runner import crossvalidate_seeds, train_final, write_results

    try:
        config = load_config(args.config, args.overrides)
        output_dir = Path(args.output or config.output_dir)
        evaluation: dict = {}
        trainings: dict = {}  # shared by the cross-validation and the final model (runner.fit_once)
        if args.folds and not args.crossval:
            raise LiverSegInputError("--folds needs --crossval")
        folds = args.folds.split(",") if args.folds else None
        seeds = parse_seeds(args.seeds, config.seed)
        if args.seeds and not args.crossval:
            raise LiverSegInputError("--seeds needs --crossval")
        config.seed = seeds[0]
        if args.crossval:
            rows, summary = crossvalidate_seeds(config, output_dir, seeds, args.resume, folds, trainings)
            evaluation = {"method": "leave-one-patient-out over expert-labelled volumes, full engine at full resolution", "per_case": rows, "summary": summary, "lesions_validated": summary["lesions_validated"]}
            write_results(rows, summary, output_dir / "RESULTS.md", "liverseg-train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
        if folds:
            print(f"partial cross-validation written: {output_dir / 'RESULTS.md'}")
            return 0
        card_path = train_final(config, output_dir, evaluation, args.resume, trainings)
    except LiverSegInputError as error:
        print(f"liverseg-train: error: {error}", file=sys.stderr)
        return 2
    print(f"model written: {card_path}")
    return 0


def parse_seeds(text: str | None, default: int) -> list[int]:
    """``--seeds 0,1,2`` as distinct integers in order (none given: the config's seed)."""
    if not text:
        return [default]
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise LiverSegInputError(f"--seeds takes comma-separated integers, not '{text}'") from None
    if len(set(seeds)) != len(seeds):
        raise LiverSegInputError(f"--seeds repeats a seed: {text}")
    return seeds


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="liverseg-evaluate", description="Per-case Dice, IoU, accuracy, ASSD, HD95, volume error, lesion recall and false lesions of a model.")
    parser.add_argument("--model", help="model card JSON (default: the bundled model)")
    parser.add_argument("--data", required=True, help="data folder")
    parser.add_argument("--layout", default="cases", help="cases | ircad | lits | msd | slices")
    parser.add_argument("--cases", help="comma-separated case names (default: every case)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("-o", "--output", help="table path stem: writes STEM.csv and STEM.json")
    args = parser.parse_args(argv)
    from LiverSegLib.model import BUNDLED_CARD
    from LiverSegLib.pipeline import LiverSegmenter

    from .runner import evaluate_case, format_table, write_table
    from .sources import discover

    try:
        cases = discover(args.layout, args.data)
        if args.cases:
            wanted = args.cases.split(",")
            missing = set(wanted) - {c.name for c in cases}
            if missing:
                raise LiverSegInputError(f"cases not found in {args.data}: {', '.join(sorted(missing))}")
            cases = [c for c in cases if c.name in wanted]
        segmenter = LiverSegmenter(args.model or BUNDLED_CARD, device=args.device)
        rows = [evaluate_case(segmenter, case) for case in cases]
    except LiverSegInputError as error:
        print(f"liverseg-evaluate: error: {error}", file=sys.stderr)
        return 2
    print(format_table(rows))
    weak = [r["case"] for r in rows if r["label"] != "expert"]
    if weak:
        print(f"note: {', '.join(weak)} carry model-made or semi-automatic labels: agreement figures, not accuracy")
    if args.output:
        write_table(rows, Path(args.output))
    return 0
