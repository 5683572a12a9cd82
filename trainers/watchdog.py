"""Divergence watchdog: decides, from numbers every rank agrees on, when a run has gone bad.

Pure bookkeeping, no torch.distributed and no I/O: the trainer feeds it the all-reduced metric
rows of each closed window (`check_rows`) and the evaluation metric at each checkpoint
(`check_eval`), and acts on the `Trigger` it returns (roll back to `good_step`, or fail when
`exhausted`). Because its inputs are identical on every rank, so are its decisions.

What counts as diverged (each threshold is a field of `WatchdogParams`):
- a non-finite loss or gradient norm (NaN/inf in any watched key);
- exploding discriminator logits: |mean logit| beyond `logit_bound`, or the logit-centering term
  `cp` (the mean squared logit) beyond `logit_bound`**2;
- a gradient-norm spike (off unless `grad_spike` > 0): a norm above `grad_spike` times the median
  of the last `grad_window` healthy norms of the same key (after `grad_window` of them were seen);
- a sustained rise of the evaluation metric: `rise_patience` evaluations in a row worse than the
  best so far by more than `rise_tolerance` (relative).

A checkpoint becomes "good" (`mark_good`) only after its window passed the row checks and its
evaluation (if any) did not rise; the trainer never calls it for a checkpoint written after a
trigger, so a rollback always lands on state that passed every check.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

LOSS_KEYS = ("d_loss", "g_loss", "fm_loss")
GRAD_KEYS = ("d_grad_norm", "g_grad_norm")
LOGIT_KEYS = ("d_logit_real", "d_logit_fake", "g_logit_fake")


@dataclass(frozen=True)
class WatchdogParams:
    max_rollbacks: int = 3
    """Rollbacks allowed over the whole run; the next trigger fails the run."""
    logit_bound: float = 1e4
    """|mean D logit| above this (or cp above its square) counts as exploding logits."""
    grad_spike: float = 0.0
    """A gradient norm above this many times the recent median is a spike (0 disables)."""
    grad_window: int = 50
    """How many recent healthy norms the median is taken over."""
    rise_patience: int = 0
    """Evaluations in a row above the best (by more than rise_tolerance) that trigger (0 disables)."""
    rise_tolerance: float = 0.5
    """Relative margin above the best evaluation that counts as a rise (0.5 = 50 % worse)."""
    mode: str = "min"
    """Whether lower (`min`) or higher (`max`) evaluation values are better."""
    loss_keys: tuple[str, ...] = LOSS_KEYS
    """The method's losses (must stay finite)."""
    grad_keys: tuple[str, ...] = GRAD_KEYS
    """The method's gradient norms (finite; the spike check)."""
    logit_keys: tuple[str, ...] = LOGIT_KEYS
    """The method's mean logits (bounded by logit_bound)."""


@dataclass(frozen=True)
class Trigger:
    """Why the watchdog fired: `kind` (nonfinite, logits, grad_spike, metric_rise), the step it saw
    it at, a one-line `reason`, and the state to go back to."""

    kind: str
    step: int
    reason: str
    good_step: int
    good_name: str | None
    exhausted: bool
    """True when the rollback bound is already used up: the run must fail instead."""


@dataclass
class Watchdog:
    params: WatchdogParams = field(default_factory=WatchdogParams)
    rollbacks: int = 0
    good_step: int = 0
    """The latest checkpoint that passed every check (0: the initial state)."""
    good_name: str | None = None
    """That checkpoint's name in the run's storage (None: the initial state)."""
    best: float | None = None
    rising: int = 0
    norms: dict[str, list[float]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    """Every rollback: {step, kind, reason, good_step} (saved in checkpoints, shown in reports)."""

    # ------------------------------------------------------------------ checks

    def check_rows(self, rows: list[dict[str, float]]) -> Trigger | None:
        """The closed window's rows ({'step': s, key: value}, identical on every rank)."""
        for row in rows:
            step = int(row["step"])
            for key in (*self.params.loss_keys, *self.params.grad_keys):
                if key in row and not math.isfinite(row[key]):
                    return self._fire("nonfinite", step, f"{key} = {row[key]} (non-finite)")
            for key in self.params.logit_keys:
                if key in row and abs(row[key]) > self.params.logit_bound:
                    return self._fire("logits", step, f"|{key}| = {abs(row[key]):.4g} > logit_bound "
                                                      f"{self.params.logit_bound:g}")
            if "cp" in row and row["cp"] > self.params.logit_bound ** 2:
                return self._fire("logits", step, f"logit centering cp = {row['cp']:.4g} > logit_bound^2")
            for key in self.params.grad_keys:
                if key not in row:
                    continue
                seen = self.norms.setdefault(key, [])
                spike = self.params.grad_spike
                if spike > 0 and len(seen) >= self.params.grad_window:
                    median = statistics.median(seen)
                    if median > 0 and row[key] > spike * median:
                        return self._fire("grad_spike", step, f"{key} = {row[key]:.4g} > {spike:g} x recent "
                                                              f"median {median:.4g}")
                seen.append(float(row[key]))
                del seen[:-self.params.grad_window]
        return None

    def check_eval(self, step: int, value: float | None) -> Trigger | None:
        """The evaluation metric at a checkpoint (None/NaN: no evaluation there)."""
        if value is None or math.isnan(value):
            return None
        if not math.isfinite(value):
            return self._fire("nonfinite", step, f"evaluation metric = {value}")
        if self.best is None or self._better(value, self.best):
            self.best, self.rising = value, 0
            return None
        p = self.params
        worse = value > self.best * (1 + p.rise_tolerance) if p.mode == "min" else \
            value < self.best * (1 - p.rise_tolerance)
        self.rising = self.rising + 1 if worse else 0
        if p.rise_patience and self.rising >= p.rise_patience:
            return self._fire("metric_rise", step, f"evaluation metric {value:.4g} vs best {self.best:.4g}: "
                                                   f"{self.rising} evaluations in a row beyond {p.rise_tolerance:.0%}")
        return None

    def new_phase(self) -> None:
        """A phase started: its evaluations are compared from here (a planned change of the
        objective may worsen the metric for a while; that is no divergence)."""
        self.best, self.rising = None, 0

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.params.mode == "min" else a > b

    def _fire(self, kind: str, step: int, reason: str) -> Trigger:
        return Trigger(kind, step, reason, self.good_step, self.good_name, exhausted=self.rollbacks >= self.params.max_rollbacks)

    # ------------------------------------------------------------------ actions

    def mark_good(self, step: int, name: str | None = None) -> None:
        """A checkpoint at `step` (stored as `name`) passed every check (its rows, and its evaluation if any)."""
        self.good_step, self.good_name = step, name

    def rolled_back(self, trigger: Trigger) -> None:
        """Record a rollback; the caller has restored the state of `trigger.good_step`."""
        self.rollbacks += 1
        self.rising = 0
        self.norms.clear()
        self.events.append({"step": trigger.step, "kind": trigger.kind, "reason": trigger.reason,
                            "good_step": trigger.good_step})

    # ------------------------------------------------------------------ state (checkpointed)

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "good_step": self.good_step, "good_name": self.good_name,
                "best": self.best,
                "rising": self.rising, "norms": {k: list(v) for k, v in self.norms.items()},
                "events": list(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks = int(state["rollbacks"])
        self.good_step, self.good_name = int(state["good_step"]), state.get("good_name")
        self.best = state["best"]
        self.rising = int(state["rising"])
        self.norms = {k: list(v) for k, v in state["norms"].items()}
        self.events = list(state["events"])
