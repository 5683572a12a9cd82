"""The official-mechanics figures of issue 11, measured on the shipped implementation (a benchmark
script, not a test: the tests assert the same quantities with statistical bounds).

    python jobs/bench/bench_official_mechanics.py

Prints: the paired augmentation at p = 0.4 on 32x32 (P(untouched), mean zeroed fraction; official:
0.1298 exactly, 0.39) and its shift range at p = 1 (official: kornia (0, 0.3) one direction ->
[0, 10] px); the R1/R2 subset size max(round(f N), 1) against ceil(f N) for N = 1..64; and the
un-corrected gradnorm divisor relative to a bias-corrected one at updates 1, 10 and 30.
"""

from __future__ import annotations

import math

import torch

from advflow.trainers.afm import gp_size
from advflow.trainers.augment import paired_augment
from advflow.trainers.gradnorm import GradNormalizer


def main(n: int = 20000, h: int = 32) -> None:
    ones = torch.ones(n, 1, h, h)
    out, _ = paired_augment(ones, ones.clone(), 0.4, generator=torch.Generator().manual_seed(0))
    untouched = (out == 1).flatten(1).all(1).float().mean().item()
    zeroed = (out == 0).flatten(1).float().mean().item()
    print(f"augment p=0.4 {h}x{h}, {n} pairs: P(untouched) {untouched:.4f} (official 0.1298), "
          f"mean zeroed fraction {zeroed:.3f} (official 0.39)")
    coords = torch.arange(1, h * h + 1, dtype=torch.float32).reshape(1, 1, h, h).expand(n, 1, h, h).contiguous()
    out, _ = paired_augment(coords, coords.clone(), 1.0, generator=torch.Generator().manual_seed(1), erase_count=0)
    pos = (out == 1).flatten(1).float().argmax(1)  # where the top-left pixel went
    dy, dx = pos // h, pos % h
    print(f"translate p=1: dy in [{int(dy.min())}, {int(dy.max())}] mean {dy.float().mean():.2f}, "
          f"dx in [{int(dx.min())}, {int(dx.max())}] (official [0, {round(0.3 * h)}])")
    diff = [k for k in range(1, 65) if gp_size(0.25, k) != math.ceil(0.25 * k)]
    print(f"R1/R2 subset max(round(0.25 N), 1) differs from ceil(0.25 N) for {len(diff)} of N = 1..64")
    gn, ratios = GradNormalizer(0.9), []
    for _ in range(30):
        x = torch.ones(8, requires_grad=True)
        gn(x).backward(torch.ones(8))
        ratios.append(float(gn.scale) / math.sqrt(8 * 8))  # bias-corrected EMA of a constant = the constant
    print("gradnorm divisor / bias-corrected divisor at updates 1, 10, 30: "
          + ", ".join(f"{ratios[i - 1]:.3f}" for i in (1, 10, 30)))


if __name__ == "__main__":
    main()
