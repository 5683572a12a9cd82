"""The one cadence rule every periodic thing in the worker uses (checkpoints, grids, evaluation,
registration, metric windows, progress lines).

`Cadence(every, last_step).due(step, since)`: the run's last step is always due; otherwise `step` is
due when a multiple of `every` falls in (since, step]. Checked at every step (`since` = step - 1)
that is exactly "step % every == 0". Checked only at checkpoints (`since` = the previous checkpoint),
it is "the first checkpoint at or after each multiple" — how evaluation and registration, which need
every rank's state consistent, follow their own cadence without a checkpoint at each multiple.
`every` = 0 means "only at the last step".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cadence:
    every: int
    last_step: int

    def due(self, step: int, since: int | None = None) -> bool:
        if step == self.last_step:
            return True
        if self.every <= 0:
            return False
        since = step - 1 if since is None else since
        return step // self.every > max(since, 0) // self.every
