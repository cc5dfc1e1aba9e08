"""Speed and memory of LiverSeg on one CT: network throughput, end-to-end seconds, peak RSS.

    python benchmarks/benchmark.py CT [--device cpu cuda] [--runtime auto torch onnxruntime] [--precision auto fp32]
                                      [--batch-size N] [--repeats 3] [--model CARD.json]

Network alone: slices per second of ``predict_probabilities`` on the preprocessed volume (after one
warm-up run). End to end: read → segment → write, in a fresh process per device, timed from inside
(model loading included), then the same CT once more with the model loaded and warm (a Slicer session,
a batch run), and the process's peak resident memory. ``--precision``: the int8 graph the model card ships for
ONNX Runtime on the CPU (auto) or the fp32 graph. ``--model``: a model card of one's own (default the bundled
one); for a cascade the network figure is stage 1's, the end-to-end ones run both stages. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from LiverSegLib.options import DEVICES, RUNTIMES
from LiverSegLib.options import PRECISIONS


def end_to_end_child(ct: str, card_path: str, device: str, runtime: str, precision: str, batch_size: int | None) -> None:
    """Runs in a child process so that its peak RSS is its own."""
    started = time.perf_counter()
    from LiverSegLib.io import read_ct
    from LiverSegLib.outputs import write_image_atomic
    from LiverSegLib.pipeline import LiverSegmenter

    imported = time.perf_counter()
    image = read_ct(ct)
    read = time.perf_counter()
    segmenter = LiverSegmenter(card_path, device=device, runtime=runtime, precision=precision)
    loaded = time.perf_counter()
    result = segmenter.segment(image, batch_size=batch_size)
    segmented = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        write_image_atomic(result.label_image, Path(folder) / "label.nii.gz")
        written = time.perf_counter()
        stages_s, runtime_used = result.timings_s, result.runtime
        del image, result  # the warm run must not add to the peak resident memory
        # The same CT again with the model already loaded and warm, as in a Slicer session or a batch run.
        warm_result = segmenter.segment(read_ct(ct), batch_size=batch_size)
        write_image_atomic(warm_result.label_image, Path(folder) / "label.nii.gz")
        warm_written = time.perf_counter()
    print(json.dumps({
        "import_s": imported - started, "read_s": read - imported, "load_model_s": loaded - read,
        "segment_s": segmented - loaded, "write_s": written - segmented,
        "read_to_write_s": written - imported, "stages_s": stages_s, "runtime": f"{runtime_used} {segmenter.precision}",
        "warm_read_to_write_s": warm_written - written, "warm_stages_s": warm_result.timings_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024,
    }))


def network_throughput(ct: str, card_path: str, device_name: str, runtime: str, precision: str, batch_size: int | None, repeats: int) -> float:
    """Slices/s of the network alone, through the engine's own batch loop for the runtime that runs."""
    import SimpleITK as sitk

    from LiverSegLib.geometry import canonical_transform
    from LiverSegLib.inference import choose_device_name, predict_in_batches, predict_probabilities
    from LiverSegLib.io import read_ct
    from LiverSegLib.preprocessing import prepare_volume
    from LiverSegLib.runtime import load_runtime_networks

    image = read_ct(ct)
    device = choose_device_name(device_name)
    card, (network, *_), used_runtime = load_runtime_networks(card_path, device, runtime, precision)
    canonical = canonical_transform(image.GetDirection()).to_canonical(sitk.GetArrayViewFromImage(image))
    volume = prepare_volume(canonical, card.window_hu, card.input_size)

    def run() -> None:
        if used_runtime == "onnxruntime":
            predict_in_batches(network, volume, card, batch_size or 16)
            return
        predict_probabilities(network, volume, card, device, batch_size)
        if device == "cuda":
            import torch

            torch.cuda.synchronize()

    run()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return repeats * volume.shape[0] / (time.perf_counter() - started)


def _stages(seconds_by_stage: dict[str, float]) -> str:
    return ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in seconds_by_stage.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ct")
    parser.add_argument("--device", nargs="+", default=["cpu"], choices=DEVICES)
    parser.add_argument("--runtime", nargs="+", default=["auto"], choices=RUNTIMES, help="onnxruntime: CPU only")
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=PRECISIONS, help="auto: the card's int8 graph in ONNX Runtime")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="model card JSON (default: the bundled model)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from LiverSegLib.model import BUNDLED_CARD

    card_path = str(args.model or BUNDLED_CARD)
    if args.child:
        end_to_end_child(args.ct, card_path, args.device[0], args.runtime[0], args.precision[0], args.batch_size)
        return 0
    import torch

    import SimpleITK as sitk

    size = sitk.ReadImage(args.ct).GetSize() if Path(args.ct).is_file() else "DICOM folder"
    print(f"CT: {args.ct} {size}; model {card_path}; {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for device in args.device:
        for runtime in args.runtime:
            if runtime == "onnxruntime" and device != "cpu":
                continue
            for precision in args.precision if device == "cpu" and runtime != "torch" else ["auto"]:
                tag = f"[{device}, {runtime}, {precision}]"
                slices_per_s = network_throughput(args.ct, card_path, device, runtime, precision, args.batch_size, args.repeats)
                command = [sys.executable, __file__, args.ct, "--child", "--model", card_path, "--device", device, "--runtime", runtime, "--precision", precision]
                if args.batch_size:
                    command += ["--batch-size", str(args.batch_size)]
                child = subprocess.run(command, capture_output=True, text=True, check=True)
                timings = json.loads(child.stdout.strip().splitlines()[-1])
                print(f"{tag} network: {slices_per_s:.1f} slices/s")
                print(f"{tag} end to end (read → segment → write): {timings['read_to_write_s']:.2f} s "
                      f"(read {timings['read_s']:.2f}, model load {timings['load_model_s']:.2f}, segment {timings['segment_s']:.2f} [{_stages(timings['stages_s'])}], write {timings['write_s']:.2f}); "
                      f"python + torch import {timings['import_s']:.2f} s; runtime {timings['runtime']}")
                print(f"{tag} warm (model loaded, the same CT again): read → segment → write {timings['warm_read_to_write_s']:.2f} s [{_stages(timings['warm_stages_s'])}]")
                print(f"{tag} peak RSS of the end-to-end process: {timings['peak_rss_gb']:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
