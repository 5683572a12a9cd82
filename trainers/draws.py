"""Random draws that belong to samples, not to workers.

A data-parallel step splits one global batch of `total` samples over the workers; worker r holds
rows [start, start + rows). If each worker drew its noise from its own generator, the numbers a
sample gets would depend on how many workers there are, and a run resumed on another number of
workers (elastic resume) would train on other noise. `BatchSlice` fixes that: every worker seeds
the same generator, draws the tensor of the WHOLE global batch and keeps its own rows. Sample i of
the global batch then gets the same numbers whatever the split, and a single worker (start 0, rows
= total) draws exactly what a plain generator would.

The cost is drawing `total` rows instead of `rows` on every worker: noise the size of one global
batch of latents (e.g. 256 x 4 x 32 x 32 floats, 4 MiB) per draw, negligible next to a DiT step.

The functions below take either a `torch.Generator` (drawn as is: the pure-function tests and
single-process callers) or a `BatchSlice`. A draw for a subset of the batch (the R1/R2 samples)
has k rows out of `rows`; it is a draw of k * total / rows global rows, of which this worker keeps
its share, so the subset must be the same fraction of every worker's rows (afm.gp_indices is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchSlice:
    """This worker's rows [start, start + rows) of a global batch of `total` samples, and the
    generator every worker seeds alike for the step."""

    generator: torch.Generator
    start: int
    rows: int
    total: int

    def __post_init__(self) -> None:
        assert 0 <= self.start and 0 < self.rows and self.start + self.rows <= self.total, self

    @property
    def device(self) -> torch.device:
        return self.generator.device


def _span(g: BatchSlice, k: int) -> tuple[int, int]:
    """(global rows, this worker's first row) of a draw with k local rows."""
    total, start = k * g.total, k * g.start
    if total % g.rows or start % g.rows:
        raise ValueError(f"a draw of {k} rows out of this worker's {g.rows} is not the same fraction of "
                         f"every worker's rows (global batch {g.total}); choose sizes that divide evenly")
    return total // g.rows, start // g.rows


def _draw(fn, args: tuple, shape, generator, device, dtype, batch_dim: int) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    if not isinstance(generator, BatchSlice):
        return fn(*args, shape, generator=generator, device=device, dtype=dtype)
    k = shape[batch_dim]
    total, first = _span(generator, k)
    full_shape = shape[:batch_dim] + (total,) + shape[batch_dim + 1:]
    full = fn(*args, full_shape, generator=generator.generator, device=generator.device, dtype=dtype)
    return full.narrow(batch_dim, first, k).to(device=device if device is not None else generator.device)


def randn(shape, generator=None, *, device=None, dtype=None, batch_dim: int = 0) -> torch.Tensor:
    """torch.randn(shape) whose rows along `batch_dim` are samples (see module doc)."""
    return _draw(torch.randn, (), shape, generator, device, dtype, batch_dim)


def rand(shape, generator=None, *, device=None, dtype=None, batch_dim: int = 0) -> torch.Tensor:
    """torch.rand(shape) whose rows along `batch_dim` are samples."""
    return _draw(torch.rand, (), shape, generator, device, dtype, batch_dim)


def randint(low: int, high: int, shape, generator=None, *, device=None, dtype=None,
            batch_dim: int = 0) -> torch.Tensor:
    """torch.randint(low, high, shape) whose rows along `batch_dim` are samples."""
    return _draw(torch.randint, (low, high), shape, generator, device, dtype if dtype is not None else torch.int64,
                 batch_dim)
