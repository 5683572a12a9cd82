"""Per-step metrics: kept on the device while a window runs, averaged over ranks in one collective
when it closes (no per-step host sync), plus the wall-time breakdown of the window."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class StepTimes:
    """Wall-time breakdown of the loop (seconds, summed since the last window closed). `steps`
    holds each engine's step time by engine name (`time/d_step`, `time/g_step`, `time/c_step`)."""

    data: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    checkpoint: float = 0.0
    total: float = 0.0

    def reset(self) -> None:
        """Zero every figure in place (the method keeps a reference to `steps`); the engine names
        seen so far stay, at 0, so every window reports the same keys."""
        self.data = self.checkpoint = self.total = 0.0
        for k in self.steps:
            self.steps[k] = 0.0

    def as_metrics(self) -> dict[str, float]:
        out = {"time/data": self.data, **{f"time/{k}_step": v for k, v in sorted(self.steps.items())},
               "time/checkpoint": self.checkpoint, "time/total": self.total}
        out["time/data_wait_frac"] = self.data / self.total if self.total else 0.0
        return out


class MetricWindow:
    """Collects step metrics, flushes them as rows {'step': s, name: mean over ranks}."""

    def __init__(self, device: torch.device, world_size: int, global_batch: int):
        self.device, self.world_size, self.global_batch = device, world_size, global_batch
        self._pending: list[dict[str, torch.Tensor]] = []
        self._first = 0  # the step before the first pending one
        self.times = StepTimes()
        self._opened = time.perf_counter()

    def restart(self, step: int) -> None:
        """Begin a window after `step` (at the start and after each flush)."""
        self._first = step
        self.times.reset()
        self._opened = time.perf_counter()

    def record(self, metrics: dict[str, torch.Tensor | float]) -> None:
        self._pending.append({k: torch.as_tensor(v, device=self.device).detach().float().reshape(())
                              for k, v in metrics.items()})

    def flush(self) -> tuple[list[dict], dict[str, float]]:
        """Collective: all-reduce the pending rows in ONE call -> (rows, window throughput).

        A row holds the keys its step recorded, no others: a method may record a key on some steps
        only (CAFM: d_loss on D steps, g_loss on G steps), and a key a step did not record is absent
        from its row, not NaN (which the watchdog's non-finite check would take for a divergence).
        Every rank records the same keys at a step (the methods decide by the step number), so the
        zeros standing in for the absent ones in the reduced table are never read."""
        rows: list[dict] = []
        if self._pending:
            keys = sorted(set().union(*self._pending))
            zero = torch.zeros((), device=self.device)
            table = torch.stack([torch.stack([m.get(k, zero) for k in keys]) for m in self._pending])  # (S, K)
            if dist.is_available() and dist.is_initialized() and self.world_size > 1:
                dist.all_reduce(table)
                table /= self.world_size
            rows = [{"step": self._first + i + 1, **{k: v for k, v in zip(keys, map(float, row)) if k in m}}
                    for i, (m, row) in enumerate(zip(self._pending, table.cpu()))]
            self._pending.clear()
        # The window's wall time includes the metric all-reduce (a checkpoint is added after).
        self.times.total = time.perf_counter() - self._opened
        window = {"samples_per_s": len(rows) * self.global_batch / max(self.times.total, 1e-9),
                  "data_wait_frac": self.times.as_metrics()["time/data_wait_frac"]}
        return rows, window
