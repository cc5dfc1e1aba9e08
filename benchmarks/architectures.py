"""Speed of candidate networks: encoder × input size, the same U-Net shape as the bundled model.

    python benchmarks/architectures.py [--encoders resnet18 resnet34 mobilenet_v2 efficientnet-b0]
                                       [--sizes 128 160 192] [--slices 128] [--device cpu]

Speed does not depend on the weights, so each network is built with random weights (the engine's own
``build_network``) and fed the 3-channel 2.5D slices of the bundled card's shape. Prints parameters,
slices per second (best of 3 passes over ``--slices`` slices after a warm-up) and, on CUDA, peak GPU
memory. The accuracy column of the table in README.md comes from cross-validation runs, not from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["resnet18", "resnet34", "mobilenet_v2", "efficientnet-b0"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 160, 192])
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from LiverSegLib.inference import choose_device, predict_probabilities
    from LiverSegLib.model import build_network, read_card

    device = choose_device(args.device)
    bundled = read_card()
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"decoder {bundled.decoder_channels}, {bundled.in_channels} input channels")
    print("| encoder | input | parameters (M) | slices/s |" + (" peak GPU memory (GB) |" if device.type == "cuda" else ""))
    print("|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    for encoder in args.encoders:
        for size in args.sizes:
            card = dataclasses.replace(bundled, encoder=encoder, input_size=size)
            network = build_network(card).eval()
            volume = torch.rand(args.slices, size, size)
            predict_probabilities(network, volume, card, device, args.batch_size)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            seconds = []
            for _ in range(3):
                started = time.perf_counter()
                predict_probabilities(network, volume, card, device, args.batch_size)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - started)
            parameters_m = sum(p.numel() for p in network.parameters()) / 1e6
            row = f"| {encoder} | {size} | {parameters_m:.1f} | {args.slices / min(seconds):.1f} |"
            if device.type == "cuda":
                row += f" {torch.cuda.max_memory_allocated() / 1e9:.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
