"""Recovery: the divergence watchdog (`trainers.watchdog`) over the method's metric names, and
what a rollback changes (new checkpoint names, new noise, the learning-rate factor). The loop
performs a rollback (it owns the state to restore); this component decides, counts and names.

Every rank decides alike: the rows it checks are all-reduced and the evaluation metric is
broadcast from rank 0. Its state is checkpointed (`watchdog`)."""

from __future__ import annotations

from typing import Any

from advflow.platform.log import get_logger
from advflow.platform.train.checkpoint import NamedJSON
from advflow.trainers.watchdog import Trigger, Watchdog, WatchdogParams

log = get_logger(__name__)


class WatchdogError(RuntimeError):
    """The watchdog fired after its rollbacks were used up (the message names trigger, step and checkpoint)."""


def checkpoint_name(step: int, rollbacks: int = 0) -> str:
    """The stored name of a checkpoint: after a rollback a replayed step gets a new name, so a
    name never points at two different states."""
    return f"checkpoint_{step:06d}" + (f"_r{rollbacks}" if rollbacks else "")


class Recovery:
    """The watchdog (None when `watchdog.enabled` is false) and the rollback bookkeeping."""

    def __init__(self, spec, names):
        w = spec.watchdog
        self.lr_factor_per_rollback, self.skip_batches = w.lr_factor, w.skip_batches
        self.watchdog = Watchdog(WatchdogParams(
            max_rollbacks=w.max_rollbacks, logit_bound=w.logit_bound, grad_spike=w.grad_spike,
            grad_window=w.grad_window, rise_patience=w.rise_patience if spec.eval.kind != "none" else 0,
            rise_tolerance=w.rise_tolerance, mode=spec.auto_phases.mode, loss_keys=names.losses,
            grad_keys=names.grads, logit_keys=names.logits)) if w.enabled else None

    @property
    def rollbacks(self) -> int:
        return self.watchdog.rollbacks if self.watchdog else 0

    def lr_factor(self) -> float:
        """watchdog.lr_factor per rollback so far (1 without rollbacks)."""
        return self.lr_factor_per_rollback ** self.rollbacks

    @property
    def decides(self) -> bool:
        """Whether it needs the evaluation metric at checkpoints (the rise check)."""
        return bool(self.watchdog and self.watchdog.params.rise_patience)

    def parts(self) -> dict[str, Any]:
        return {"watchdog": NamedJSON("watchdog", self.watchdog)} if self.watchdog else {}

    def check_rows(self, rows: list[dict]) -> Trigger | None:
        return self.watchdog.check_rows(rows) if self.watchdog else None

    def check_eval(self, step: int, value: float) -> Trigger | None:
        return self.watchdog.check_eval(step, value) if self.watchdog else None

    def new_phase(self) -> None:
        if self.watchdog:
            self.watchdog.new_phase()

    def name(self, step: int) -> str:
        return checkpoint_name(step, self.rollbacks)

    def passed(self, step: int, name: str) -> None:
        """The checkpoint of `step` passed every check: good from here on (unless a rise is under way)."""
        if self.watchdog and not self.watchdog.rising:
            self.watchdog.mark_good(step, name)

    def begin(self, trigger: Trigger) -> tuple[int, list]:
        """Before the loop restores the last good state: fail past the bound, say where it goes;
        returns what the restore must not undo (the rollback count and events so far)."""
        wd, where = self.watchdog, self.where(trigger)
        if trigger.exhausted:
            raise WatchdogError(f"watchdog: {trigger.kind} at step {trigger.step} ({trigger.reason}); "
                                f"{wd.rollbacks} rollback(s) used, the bound watchdog.max_rollbacks is "
                                f"{wd.params.max_rollbacks}; last good state: {where}")
        log.warning("watchdog: %s at step %d (%s); rolling back to %s (rollback %d of %d)", trigger.kind,
                    trigger.step, trigger.reason, where, wd.rollbacks + 1, wd.params.max_rollbacks)
        return wd.rollbacks, list(wd.events)

    def finish(self, trigger: Trigger, kept: tuple[int, list]) -> None:
        """After the restore: the loaded state predates this rollback; count it."""
        wd = self.watchdog
        wd.rollbacks, wd.events = kept
        wd.rolled_back(trigger)

    @staticmethod
    def where(trigger: Trigger) -> str:
        good = trigger.good_step
        return f"checkpoint of step {good}" if good else "the initial state (no good checkpoint yet)"

    def cannot(self, trigger: Trigger, err: Exception) -> WatchdogError:
        return WatchdogError(f"watchdog: {trigger.kind} at step {trigger.step} ({trigger.reason}); cannot roll "
                             f"back: {err}")
