"""The time a two-stage cascade adds on the CPU: the whole command, single-stage against cascades, same run.

    python benchmarks/cascade_budget.py [--stage2 resnet18:256 tu-regnetx_002:224:64-32-16-8-8 ...] [--margin-mm 20] [--card LABEL=CARD.json ...]
                                        [--cts ircad_01 ircad_17] [--repeats 5] [--work /tmp/liverseg-cascade-budget]

Each cascade is the bundled network as stage 1 plus a stage 2 ``ENCODER:SIZE[:DECODER]`` (the decoder's
channels joined by ``-``; the bundled decoder when not given) on stage 1's liver box grown by ``--margin-mm``. Stage 2's weights are random (seed 0):
its time does not depend on them, only on its shape and on the slices and box stage 1 gives it, which are
the bundled network's. Its fp32 graph and int8 graph are made by the engine's own exporters
(``runtime.export_onnx_graph`` / ``export_int8_graph``, calibrated on the crops of the bundled card's
training cases), so the CPU runs the cascade as it would run a trained one. ``--card LABEL=CARD.json`` times a
model of one's own beside them (a trained cascade: then post-processing is what a trained stage 2 makes it).

Times ``liverseg segment CT -o OUT --device cpu --model CARD --report R.json`` in fresh processes, the
configurations in turn, one untimed round first; prints the median wall time, the medians of the report's
stages, stage 2's crop (slices, rows × columns) and its mm per pixel, with the 1-minute load average.
CTs come from ``$LIVERSEG_DATA`` (default ``../shared/data``). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "benchmarks"))

from cpu_install import load_1min, machine, print_table  # noqa: E402


def cascade_card(stage2_spec: str, margin_mm: float, folder: Path, data_root: Path) -> Path:
    """A model folder: the bundled files and card plus a random-weight stage 2 ``ENCODER:SIZE[:DECODER]`` and its graphs."""
    import torch

    from LiverSegLib.model import BUNDLED_CARD, build_network, read_card, save_model, write_card
    from LiverSegLib.runtime import export_int8_graph, export_onnx_graph

    encoder, size, *decoder = stage2_spec.split(":")
    card_path = folder / "liverseg.json"
    if card_path.exists():
        return card_path
    folder.mkdir(parents=True)
    bundled = read_card(BUNDLED_CARD)
    for name in (bundled.weights_file, bundled.onnx_file, bundled.int8_onnx_file):
        shutil.copy(BUNDLED_CARD.parent / name, folder / name)
    stage2 = read_card(BUNDLED_CARD)
    stage2.encoder, stage2.input_size, stage2.crop_margin_mm = encoder, int(size), margin_mm
    if decoder:
        stage2.decoder_channels = tuple(int(channels) for channels in decoder[0].split("-"))
    stage2.weights_file, stage2.onnx_file, stage2.int8_onnx_file, stage2.int8_calibration = "liverseg.stage2.safetensors", "", "", {}
    torch.manual_seed(0)
    stage2 = save_model(build_network(stage2).eval(), stage2, folder / "stage2-only.json")  # writes its weights, records their hash
    write_card(bundled.with_stage(2, stage2), card_path)
    export_onnx_graph(card_path, stage=2)
    export_int8_graph(card_path, data_root, stage=2)
    return card_path


def one_run(card_path: Path | None, ct: Path, folder: Path) -> tuple[float, dict]:
    """Wall seconds of one ``liverseg segment`` and its report."""
    output, report = folder / "label.nii.gz", folder / "report.json"
    command = [str(Path(sys.executable).parent / "liverseg"), "segment", str(ct), "-o", str(output), "--device", "cpu",
               "--progress", "none", "--report", str(report)]
    command += ["--model", str(card_path)] if card_path else []
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # QC warnings about a random stage 2
    return time.perf_counter() - started, json.loads(report.read_text(encoding="utf-8"))


def crop_figures(card_path: Path, ct_path: Path) -> str:
    """Stage 2's crop on this CT: slices, rows × columns, and mm per pixel of its model grid."""
    import SimpleITK as sitk

    from LiverSegLib.geometry import canonical_transform
    from LiverSegLib.pipeline import LiverSegmenter

    ct = sitk.ReadImage(str(ct_path))
    segmenter = LiverSegmenter(card_path, device="cpu")
    if segmenter.card.stages == 1:
        return "whole slices"
    region = segmenter.segment(ct).region
    if region is None:
        return "no liver"
    depth, rows, cols = (side.stop - side.start for side in region)
    spacing_mm = canonical_transform(ct.GetDirection()).canonical_spacing_mm(ct.GetSpacing())
    mm_per_pixel = max(rows * spacing_mm[1], cols * spacing_mm[2]) / segmenter.card.stage_card(2).input_size
    return f"{depth} slices of {rows}×{cols}, {mm_per_pixel:.2f} mm/pixel"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage2", nargs="*", default=["resnet18:256", "resnet18:192"])
    parser.add_argument("--margin-mm", type=float, default=20.0)
    parser.add_argument("--card", action="append", default=[], metavar="LABEL=CARD.json", help="also time this model card")
    parser.add_argument("--cts", nargs="+", default=["ircad_01"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/liverseg-cascade-budget"))
    args = parser.parse_args()

    import os

    data_root = Path(os.environ.get("LIVERSEG_DATA", PROJECT.parent / "shared" / "data"))
    configs: dict[str, Path | None] = {"single stage (bundled)": None}
    for spec in args.stage2:
        configs[f"cascade, stage 2 {spec}"] = cascade_card(spec, args.margin_mm, args.work / f"model-{spec.replace(':', '-')}-{args.margin_mm:g}mm", data_root)
    for entry in args.card:
        label, _, path = entry.partition("=")
        configs[label] = Path(path)
    print(f"{machine()}; {time.strftime('%Y-%m-%d')}; stage-2 margin {args.margin_mm:g} mm; median of {args.repeats}")
    for name in args.cts:
        ct = data_root / "cases" / name / "ct.nii.gz"
        runs: dict[str, list[tuple[float, dict]]] = {config: [] for config in configs}
        load_before = load_1min()
        for round_index in range(args.repeats + 1):
            for config, card_path in configs.items():
                folder = args.work / "out" / config.replace(" ", "_").replace(",", "").replace(":", "-")
                folder.mkdir(parents=True, exist_ok=True)
                result = one_run(card_path, ct, folder)
                if round_index:  # the first round warms the page cache
                    runs[config].append(result)
        print(f"\n{name} (load {load_before} → {load_1min()})")
        rows = []
        for config, results in runs.items():
            stages = {key: statistics.median(r[1]["timings_s"].get(key, 0.0) for r in results) for key in ("preprocess", "network", "stage2", "gate", "postprocess")}
            crop = crop_figures(configs[config], ct) if configs[config] else "whole slices"
            rows.append([config, f"{statistics.median(r[0] for r in results):.2f}", *(f"{stages[k]:.2f}" for k in stages), crop])
        print_table(["configuration", "whole command (s)", "preprocess", "stage 1 network", "stage 2", "gate (stage 1's cut)", "post-process (stage 2's cut)", "stage 2 sees"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
