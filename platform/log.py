"""One rank-aware logger for everything advflow prints (as DiT's `create_logger`).

    from advflow.platform.log import get_logger
    log = get_logger(__name__)
    log.info("step %d", step)          # printed by global rank 0 only: "[advflow] step 10"
    log_all(log, "shard %s failed", n)  # printed by every rank: "[advflow] rank 3: shard 7 failed"

Why one place: a line printed by every one of 8 workers is noise, and a line that decides by itself
whether it is on rank 0 gets it wrong when the rank is not known yet. The rank comes from
`set_rank()` (called by the worker bootstrap) or, before that, from the RANK environment variable
that torch.distributed launchers set; drivers and CLIs are rank 0. Lines go to stdout (INFO) and
stderr (WARNING and above), each flushed at once, so Ray forwards them to the driver's log in order.
"""

from __future__ import annotations

import logging
import os
import sys

PREFIX = "[advflow]"
_rank: int | None = None


def set_rank(rank: int) -> None:
    """This process's global rank (the worker bootstrap calls it before the loop starts)."""
    global _rank
    _rank = int(rank)


def rank() -> int:
    if _rank is not None:
        return _rank
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _RankZero(logging.Filter):
    """Drop records on ranks other than 0 unless the record says `all_ranks`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or rank() == 0


class _MaxLevel(logging.Filter):
    def __init__(self, below: int):
        super().__init__()
        self.below = below

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.below


class _Flushing(logging.StreamHandler):
    """A handler on whatever sys.stdout/sys.stderr is *now* (pytest's capsys swaps them)."""

    def __init__(self, which: str):
        super().__init__()
        self.which = which

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self.which)

    @stream.setter
    def stream(self, _value) -> None:  # logging.StreamHandler.__init__ assigns it
        pass

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.flush()


def _root() -> logging.Logger:
    root = logging.getLogger("advflow")
    if not getattr(root, "_advflow_configured", False):
        fmt = logging.Formatter(f"{PREFIX} %(message)s")
        out, err = _Flushing("stdout"), _Flushing("stderr")
        out.setLevel(logging.DEBUG)
        out.addFilter(_MaxLevel(logging.WARNING))
        err.setLevel(logging.WARNING)
        for h in (out, err):
            h.setFormatter(fmt)
            h.addFilter(_RankZero())
            root.addHandler(h)
        root.setLevel(os.environ.get("ADVFLOW_LOG_LEVEL", "INFO").upper())
        root.propagate = False
        root._advflow_configured = True  # type: ignore[attr-defined]
    return root


def get_logger(name: str = "advflow") -> logging.Logger:
    """A logger under the `advflow` root: `[advflow] message`, rank 0 only unless all_ranks."""
    _root()
    if not name.startswith("advflow"):
        name = f"advflow.{name}"
    return logging.getLogger(name)


def log_all(logger: logging.Logger, msg: str, *args, level: int = logging.INFO) -> None:
    """A line every rank prints (e.g. a per-rank failure), tagged with the rank."""
    logger.log(level, f"rank {rank()}: {msg}", *args, extra={"all_ranks": True})
