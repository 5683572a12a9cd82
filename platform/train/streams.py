"""The data streams of one worker: one `LatentStream` per name a method reads (AFM: "d" and "g",
separate record sequences for D's and G's steps), timed as the window's data wait, checkpointed as
one part (`readers.json`: a stream's position is the same on every rank and for every number of
workers that divides `data.partitions`, so the file is rank 0's and the checkpoint is elastic)."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from advflow.platform.data.reader import LatentStream
from advflow.platform.train.checkpoint import SharedJSON
from advflow.platform.train.metrics import StepTimes


class Streams:
    """Named record streams; `next(name)` gives the next micro-batch on the device."""

    def __init__(self, spec, names: tuple[str, ...], *, rank: int, world_size: int, micro_batch: int,
                 device: torch.device, times: StepTimes, factory: Callable[..., Any] | None = None):
        d = spec.data
        factory = factory or LatentStream
        self.device, self.names, self.times = device, names, times
        self.by_name = {name: factory(d.prefix, micro_batch, stream=name, rank=rank, world_size=world_size,
                                      seed=spec.train.seed, partitions=spec.partitions, shuffle_buffer=d.shuffle_buffer,
                                      prefetch=d.prefetch)
                        for name in names}
        self.manifest = self.by_name[names[0]].manifest
        self.reset()

    def reset(self) -> None:
        """Iterators from the streams' current state (after a load)."""
        self.iters = {k: iter(s) for k, s in self.by_name.items()}

    def next(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        x, y = next(self.iters[name])
        self.times.data += time.perf_counter() - t0  # the window's data wait
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def skip(self, batches: int) -> None:
        """Drop `batches` micro-batches of every stream (a new data order after a rollback)."""
        for it in self.iters.values():
            for _ in range(batches):
                next(it)

    def part(self):
        """The checkpoint part: one file, the same for every rank and every number of workers."""
        return SharedJSON(self.by_name, after_load=self.reset)

    def close(self) -> None:
        for s in self.by_name.values():
            s.close()
