"""The run's per-step metric rows, outside the checkpoints: one JSON-lines object per closed window.

Why not in trainer.json: the history grows with every step (600k rows by the end of an XL/2 run)
and would be written again into every checkpoint, so checkpoints would grow linearly and each
save would take longer. Here each window is written once, as its own object, so a checkpoint stays
the same size and appending costs the window only. The same rows also go to MLflow (RunLogger).

Layout under the run's storage (`<run.storage_path>/<run.name>`, local or S3):

    metrics/steps-000000001-000000010.jsonl   one row per step, {"step": k, ...}, steps 1..10

Append-only from a resume point: a run restored from the checkpoint of step S (a restart, or a
watchdog rollback) first drops the windows after S, which the failed attempt wrote and the resumed
run trains and writes again; windows up to S are never touched. Rank 0 writes; every write is
atomic (`Storage.write_atomic`), so a reader sees whole windows only.
"""

from __future__ import annotations

import json
import re

from advflow.platform.data.storage import Storage

DIR = "metrics"
_NAME = re.compile(r"steps-(\d{9})-(\d{9})\.jsonl$")


def window_name(first: int, last: int) -> str:
    return f"{DIR}/steps-{first:09d}-{last:09d}.jsonl"


class MetricsLog:
    """The metric windows of one run: `append` a closed window, `truncate` to a resume point,
    `read` them all back in step order."""

    def __init__(self, storage: Storage | str):
        self.storage = storage if isinstance(storage, Storage) else Storage(storage)

    def _windows(self) -> list[tuple[int, int, str]]:
        """(first, last, name) of every stored window, in step order."""
        try:
            listed = self.storage.list_sizes(DIR)
        except FileNotFoundError:
            return []
        out = []
        for name in listed:
            m = _NAME.search(name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), f"{DIR}/{m.group(0)}"))
        return sorted(out)

    def append(self, rows: list[dict]) -> None:
        """Write one closed window (rows of consecutive steps, in order)."""
        if not rows:
            return
        first, last = int(rows[0]["step"]), int(rows[-1]["step"])
        assert last - first + 1 == len(rows), f"window {first}..{last} has {len(rows)} rows"
        body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        self.storage.write_atomic(window_name(first, last), body.encode())

    def truncate(self, step: int) -> int:
        """Drop every row after `step` (a resume or rollback point); returns the windows removed.
        A window reaching past `step` is rewritten with its rows up to `step` (windows end at
        checkpoint steps, so this happens only if the cadence changed between attempts)."""
        removed = 0
        for first, last, name in self._windows():
            if last <= step:
                continue
            keep = [r for r in self._rows(name) if r["step"] <= step] if first <= step else []
            self.storage.remove(name)
            removed += 1
            if keep:
                self.append(keep)
        return removed

    def _rows(self, name: str) -> list[dict]:
        return [json.loads(line) for line in self.storage.read(name).decode().splitlines() if line]

    def read(self) -> list[dict]:
        """Every row, in step order (what an uninterrupted run would have logged)."""
        rows = [r for _, _, name in self._windows() for r in self._rows(name)]
        steps = [r["step"] for r in rows]
        assert steps == sorted(set(steps)), "metric windows overlap; truncate() keeps them disjoint"
        return rows
