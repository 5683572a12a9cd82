"""The phase controller: which phase's parameters step k runs with (a manual plan, or
`phases: auto` extending the plan at evaluations), the one-shot events before a step (Table 11:
EMA reload, D snapshot at a phase end, D reload), and `phases: auto`'s decisions.

Every rank decides alike: the plan depends only on the step, and `phases: auto` only on the
evaluation metric that the loop broadcasts from rank 0. Its state is checkpointed (`auto_phases`)."""

from __future__ import annotations

import json
from typing import Any, Callable

from advflow.platform.log import get_logger
from advflow.platform.train.checkpoint import NamedJSON
from advflow.trainers.schedules import AutoPhases, PhaseParams, PhasePlan

log = get_logger(__name__)


def auto_of(spec) -> AutoPhases | None:
    """A fresh `AutoPhases` for `phases: auto` (None for a manual plan)."""
    if spec.phases != "auto":
        return None
    a = spec.auto_phases
    return AutoPhases.from_spec(spec.auto_templates(), spec.phase_base(), patience=a.patience,
                                min_delta=a.min_delta, min_phase_steps=a.min_phase_steps, mode=a.mode)


def plan_of(spec) -> PhasePlan:
    """The run's phase plan at the start (for `phases: auto`: its first template, which the
    controller extends as it decides)."""
    auto = auto_of(spec)
    return auto.plan() if auto is not None else PhasePlan.from_spec(spec.phase_dicts(), spec.phase_base())


class PhaseController:
    """The plan, the automatic schedule's decisions, and the events of each step."""

    def __init__(self, spec, on_event: Callable[[Any], None], on_new_best: Callable[[], None]):
        self.auto = auto_of(spec)
        self.plan = self.auto.plan() if self.auto else plan_of(spec)
        self.on_event, self.on_new_best = on_event, on_new_best
        # D is snapshotted at each new best evaluation only if a phase reloads it from there.
        self.snapshot_best = self.auto is not None and any(t.get("d_reload_from") == "best"
                                                           for t in self.auto.templates)

    def parts(self) -> dict[str, Any]:
        return {"auto_phases": NamedJSON("auto_phases", self.auto)} if self.auto else {}

    def loaded(self) -> None:
        """After a checkpoint load: the phases the checkpointed run had decided."""
        if self.auto:
            self.plan = self.auto.plan()

    def at(self, step: int) -> PhaseParams:
        """Step `step`'s parameters, after performing its events in order."""
        for event in self.plan.events(step):
            self.on_event(event)
        return self.plan.at(step)

    @property
    def decides(self) -> bool:
        """Whether it needs the evaluation metric at checkpoints."""
        return self.auto is not None

    def decide(self, step: int, value: float, logger) -> None:
        """`phases: auto`: feed the evaluation; snapshot at a new best (`d_reload_from: best`);
        start the next phase at `step` on a plateau, logged as a metric, a tag and a line."""
        if self.auto is None or value != value:  # NaN: no evaluation at this checkpoint
            return
        best_before = self.auto.best_step
        transition = self.auto.observe(step, value)
        if self.auto.best_step != best_before and self.snapshot_best:
            self.on_new_best()
        if transition is None:
            return
        self.plan = self.auto.plan()
        log.info("phases: auto: %s -> %s at step %d (%s)", transition.from_name, transition.to_name,
                 step, transition.reason)
        # The tag holds the transition as JSON (jobs/reproduce.py reads it back for its report).
        logger.log_event({f"phase.transition.{transition.to_index}": json.dumps(transition.to_dict())},
                         {"phase/transition": float(transition.to_index)}, step)
