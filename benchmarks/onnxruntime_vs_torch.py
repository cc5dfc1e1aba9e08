"""Is ONNX Runtime faster than torch for the bundled network on this CPU, with the same output?

    python benchmarks/onnxruntime_vs_torch.py CT [--batch-size 16] [--repeats 3] [--threads N]

Exports the bundled model (fp32) to ONNX, runs the preprocessed slices of CT through torch and through
ONNX Runtime's CPU provider (and torch with channels-last memory, and a frozen TorchScript trace with
conv/batch-norm folding, the two torch-side alternatives) in the same process with the same thread count, and prints slices per second
for each, the largest probability difference, and the label agreement. Also times the cold start that
each path would cost a CLI run (importing torch + smp + building the network, against importing torch
+ onnxruntime + creating the engine's session: the engine imports torch either way). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLD_TORCH = """
import time; t = time.perf_counter()
import torch
from LiverSegLib.model import load_model
load_model()
print(time.perf_counter() - t)
"""
COLD_ONNX = """
import sys, time; t = time.perf_counter()
from pathlib import Path
from LiverSegLib.runtime import OnnxRuntimeNetwork
OnnxRuntimeNetwork(Path(sys.argv[1]))
print(time.perf_counter() - t)
"""


def cold_start_s(code: str, *args: str) -> float:
    return float(subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ct")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime
    import SimpleITK as sitk
    import torch

    from LiverSegLib.geometry import canonical_transform
    from LiverSegLib.io import read_ct
    from LiverSegLib.model import load_model
    from LiverSegLib.preprocessing import prepare_volume, slice_stack
    from LiverSegLib.runtime import OnnxRuntimeNetwork, export_onnx

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    image = read_ct(args.ct)
    card, network = load_model()
    network = network.float().eval()
    canonical = canonical_transform(image.GetDirection()).to_canonical(sitk.GetArrayViewFromImage(image))
    volume = prepare_volume(canonical, card.window_hu, card.input_size)
    total = volume.shape[0]
    batches = [torch.from_numpy(np.ascontiguousarray(slice_stack(volume, np.arange(s, min(s + args.batch_size, total)), card.context_slices)))
               for s in range(0, total, args.batch_size)]

    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "liverseg.onnx"
        export_onnx(network, card, onnx_path)  # the engine's export and session, as `--runtime onnxruntime` runs them
        onnx_network = OnnxRuntimeNetwork(onnx_path)

        def run_torch() -> np.ndarray:
            with torch.inference_mode():
                return np.concatenate([torch.sigmoid(network(b)).numpy() for b in batches])

        channels_last = copy.deepcopy(network).to(memory_format=torch.channels_last)

        def run_torch_channels_last() -> np.ndarray:
            with torch.inference_mode():
                return np.concatenate([torch.sigmoid(channels_last(b.contiguous(memory_format=torch.channels_last))).numpy() for b in batches])

        with torch.no_grad():
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(copy.deepcopy(network), batches[0])))

        def run_torch_jit_frozen() -> np.ndarray:
            with torch.inference_mode():
                return np.concatenate([torch.sigmoid(frozen(b)).numpy() for b in batches])

        def run_onnx() -> np.ndarray:
            return np.concatenate([torch.sigmoid(torch.from_numpy(onnx_network(b.numpy()))).numpy() for b in batches])

        figures: dict[str, object] = {"ct": args.ct, "slices": total, "batch_size": args.batch_size, "threads": threads,
                                      "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
        results = {}
        variants = {"torch": run_torch, "torch_channels_last": run_torch_channels_last,
                    "torch_jit_frozen": run_torch_jit_frozen, "onnxruntime": run_onnx}
        for name, run in variants.items():
            results[name] = run()  # warm-up
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - started)
            figures[f"{name}_slices_per_s"] = round(total / min(seconds), 1)
        figures["max_abs_probability_difference"] = float(np.abs(results["torch"] - results["onnxruntime"]).max())
        figures["label_agreement"] = float(((results["torch"] >= 0.5) == (results["onnxruntime"] >= 0.5)).mean())
        figures["cold_start_torch_smp_s"] = round(cold_start_s(COLD_TORCH), 2)
        figures["cold_start_onnxruntime_s"] = round(cold_start_s(COLD_ONNX, str(onnx_path)), 2)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
