"""The DiT size table: `SIZES[name] -> DiTSize` (depth, width, heads, patch).

Plain data with no torch import, so the run config (`advflow.platform.config`) can validate a size
name without loading the networks; `advflow.trainers.models` re-exports both names and builds from
them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DiTSize", "SIZES"]


@dataclass(frozen=True)
class DiTSize:
    """Transformer shape: `depth` blocks of `width` channels, `heads` attention heads, `patch` pixels."""

    depth: int
    width: int
    heads: int
    patch: int


# Patch size is part of the name (DiT convention). "tiny" trains on a CPU in seconds (tests, toys).
# XXS/2 and XS/2 are the CPU capacity ladder between tiny and S/2 (not in DiT's table; named in its
# convention, heads of 64 channels as S..XL): on the 8x8 digits XXS/2 costs 8x tiny's forward FLOPs per
# sample, XS/2 48x and S/2 214x (jobs/bench/bench_sizes.py prints parameters and GFLOPs per sample).
SIZES: dict[str, DiTSize] = {
    "tiny": DiTSize(depth=2, width=64, heads=4, patch=2),
    "XXS/2": DiTSize(depth=4, width=128, heads=2, patch=2),
    "XS/2": DiTSize(depth=6, width=256, heads=4, patch=2),
    "S/2": DiTSize(depth=12, width=384, heads=6, patch=2),
    "B/2": DiTSize(depth=12, width=768, heads=12, patch=2),
    "M/2": DiTSize(depth=16, width=1024, heads=16, patch=2),
    "L/2": DiTSize(depth=24, width=1024, heads=16, patch=2),
    "XL/2": DiTSize(depth=28, width=1152, heads=16, patch=2),
}
