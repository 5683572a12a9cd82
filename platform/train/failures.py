"""Which training failures are worth a restart, and the one line a user sees when a job fails.

Ray Train restarts a failed worker group from the latest checkpoint up to `run.max_failures`
times. That is right for transient faults (a killed worker, a lost node, a storage outage) and
wasted on deterministic ones: a corrupt shard, a config the workers reject, a checkpoint that
cannot be resumed, a watchdog out of rollbacks, or a plain bug raise the same error again after
every restart, each after reloading the checkpoint. `is_deterministic` tells them apart from the
exception alone (Ray-free, so it is unit-tested with plain exceptions); `ray_launch.FailFast` uses
it to stop the run at the first deterministic error without spending restarts.
"""

from __future__ import annotations

import functools

# Raised by advflow for input that does not change on a retry. Imported lazily by name, so this
# module stays a leaf (the classes live in modules that import torch).
_ADVFLOW = {
    "DataError": "advflow.platform.data.shards",  # ShardError and its kin: a bad byte in a shard
    "ConfigError": "advflow.platform.config",
    "ResumeError": "advflow.platform.train.checkpoint",
    "WatchdogError": "advflow.platform.train.recovery",
    "StorageAuthError": "advflow.platform.data.storage",  # credentials rejected: no retry fixes that
}
# Python errors that are bugs or bad input, never a fault of the machine. (RuntimeError is not one:
# gloo/NCCL report a dead peer with it; OSError covers storage outages.)
_BUILTIN = (ValueError, TypeError, KeyError, IndexError, AttributeError, NameError, AssertionError,
            ImportError, NotImplementedError, ZeroDivisionError)


def _inner(exc: BaseException) -> BaseException | None:
    """The exception `exc` wraps: Ray keeps a worker's in `cause`, a controller's in
    `controller_failure`; Python's chaining in __cause__."""
    return getattr(exc, "cause", None) or getattr(exc, "controller_failure", None) or exc.__cause__


class DeterministicFailure(RuntimeError):
    """A worker failed in a way a restart cannot fix; the message is the one-line cause."""


@functools.cache
def _advflow_classes() -> tuple[type, ...]:
    import importlib

    out = []
    for name, module in _ADVFLOW.items():
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # pragma: no cover - a renamed class must not hide failures
            continue
    return tuple(out)


def is_deterministic(exc: BaseException) -> bool:
    """True when retrying from the checkpoint would raise `exc` again."""
    seen = set()
    while exc is not None and id(exc) not in seen:  # also look through wrappers (a `cause`, __cause__)
        seen.add(id(exc))
        if isinstance(exc, _advflow_classes() + _BUILTIN):
            return True
        exc = _inner(exc)
    return False


def one_line(exc: BaseException, limit: int = 600) -> str:
    """`Type: first line of the message` of the innermost cause, as the user-facing line's tail.
    advflow's messages name the culprit (the shard, the field, the step), so that line is enough."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = _inner(exc)
        if inner is None:
            break
        exc = inner
    text = str(exc).strip()
    for marker in ("Training failed due to controller error:", "Training failed due to worker errors:"):
        text = text.replace(marker, "").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last):" in text and lines:
        # A traceback carried as text (a local worker process, a Ray task): its last line is
        # "package.module.Type: message"; keep "Type: message".
        kind, _, message = lines[-1].partition(": ")
        return f"{kind.rsplit('.', 1)[-1]}: {message}"[:limit]
    first = lines[0] if lines else ""
    # A controller error whose cause did not survive serialisation still says "rank N: Type: ...".
    plain = isinstance(exc, DeterministicFailure) or (type(exc).__name__ == "ControllerError" and first.startswith("rank "))
    head = first if plain else f"{type(exc).__name__}: {first}"
    return head if len(head) <= limit else head[: limit - 3] + "..."
