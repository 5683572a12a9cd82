"""The capacity ladder's figures: parameters and forward GFLOPs per sample of every DiT size, for the
generator (1NFE, any-step) and the discriminator, on a given input (the digits' 1x8x8 by default,
ImageNet's 4x32x32 SD-VAE latents with --input 4x32x32).

FLOPs are counted by torch's FlopCounterMode (matrix multiplies and attention: a multiply-add is 2
FLOPs) on a batch of 2, divided by 2. One training step costs more than one forward: AFM about 14.5
forward units per G update, flow matching 3, MeanFlow 4 (the paper's accounting, shared notes).

    python jobs/bench/bench_sizes.py [--input 1x8x8] [--sizes tiny XXS/2 XS/2 S/2]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from advflow.trainers.models import SIZES, build_discriminator, build_generator, parameter_count


def forward_gflops(model: torch.nn.Module, *args) -> float:
    """GFLOPs of one forward per sample (batch of args' first dimension)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops() / args[0].shape[0] / 1e9


def row(name: str, channels: int, side: int, num_classes: int = 10) -> dict:
    opts = dict(in_channels=channels, input_size=side, num_classes=num_classes)
    n = 2
    x, y = torch.randn(n, channels, side, side), torch.arange(n) % num_classes
    s, t = torch.ones(n), torch.zeros(n)
    g1 = build_generator(name, kind="1nfe", **opts).eval()
    ga = build_generator(name, kind="anystep", **opts).eval()
    d = build_discriminator(name, **opts).eval()
    return {"size": name, "depth": SIZES[name].depth, "width": SIZES[name].width,
            "g_params_M": parameter_count(g1) / 1e6, "d_params_M": parameter_count(d) / 1e6,
            "g1_gflops": forward_gflops(g1, x, y), "ga_gflops": forward_gflops(ga, x, y, s, t),
            "d_gflops": forward_gflops(d, x, y, t)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="1x8x8", help="CxHxW of the network's input (default 1x8x8, the digits)")
    p.add_argument("--sizes", nargs="+", default=["tiny", "XXS/2", "XS/2", "S/2"])
    a = p.parse_args(argv)
    c, h, w = (int(v) for v in a.input.split("x"))
    if h != w:
        p.error(f"--input {a.input}: the DiTs take square inputs")
    rows = [row(name, c, h) for name in a.sizes]
    base = rows[0]["g1_gflops"]
    print(f"input {a.input}; GFLOPs are one forward per sample")
    print("| size | depth x width | G params (M) | D params (M) | G 1NFE GFLOPs | G any-step GFLOPs "
          f"| D GFLOPs | G compute vs {rows[0]['size']} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['depth']} x {r['width']} | {r['g_params_M']:.3f} | {r['d_params_M']:.3f} "
              f"| {r['g1_gflops']:.4f} | {r['ga_gflops']:.4f} | {r['d_gflops']:.4f} | {r['g1_gflops'] / base:.1f}x |")


if __name__ == "__main__":
    main()
