"""Scalar schedules and the phase plan (the paper's hand-triggered Table 11 schedule).

A `Schedule` maps a step count to a float (lambda_ot decay, learning rates, lambda_gp, augment p).
A `PhasePlan` is a list of `Phase`s with start steps; `PhasePlan.at(step)` resolves every
hyperparameter for a global training step and `PhasePlan.events(step)` lists the one-shot actions
(phase entry, EMA reload, D reload, tagged checkpoint) to perform before that step runs.

Step counting inside phases (decision): a schedule counts from the start of the phase that
DEFINES it. A phase that does not mention a field inherits it from the previous phase, and an
inherited schedule keeps running uninterrupted (it is not restarted at the new phase's start).
So phase 1's cosine decay of lambda_ot continues into phase 2 unless phase 2 sets lambda_ot.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

SCHEDULE_KINDS = ("constant", "linear", "cosine")


def _finite(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer number of steps, got {v!r}")
    return v


@dataclass(frozen=True)
class Schedule:
    """A scalar that changes with the step count.

    kind:   "constant" (always `start`), "linear" or "cosine" (from `start` to `end` over `steps`).
    start:  value at the beginning of the decay.
    end:    value after the decay (required for linear/cosine; must be None for constant).
    steps:  decay duration in steps (>= 1 for linear/cosine); after it the value stays at `end`.
    warmup: optional linear ramp from 0 before the decay: step k < warmup gives
            start * (k + 1) / warmup. The decay starts at step `warmup` (warmup precedes it).
    Cosine: end + (start - end) * (1 + cos(pi * p)) / 2 with p = clamp((k - warmup) / steps, 0, 1),
    so the midpoint value is (start + end) / 2.
    """

    kind: str = "constant"
    start: float = 0.0
    end: float | None = None
    steps: int = 0
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind={self.kind!r} is not one of {SCHEDULE_KINDS}")
        object.__setattr__(self, "start", _finite("schedule start", self.start))
        _count("schedule warmup", self.warmup)
        _count("schedule steps", self.steps)
        if self.kind == "constant":
            if self.end is not None:
                raise ValueError(
                    "schedule end is only used by linear/cosine schedules; remove it or set kind"
                )
        else:
            if self.end is None:
                raise ValueError(f"schedule end is required for kind={self.kind!r} (the final value)")
            object.__setattr__(self, "end", _finite("schedule end", self.end))
            if self.steps < 1:
                raise ValueError(
                    f"schedule steps must be >= 1 for kind={self.kind!r} (the decay duration), "
                    f"got {self.steps}"
                )

    def value(self, step: int) -> float:
        """Value at `step` (counted from the schedule's own origin, >= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup:
            return self.start * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.start
        p = min(1.0, (step - self.warmup) / self.steps)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * p
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))

    def bounds(self) -> tuple[float, float]:
        """(min, max) over all steps; used to validate ranges (e.g. probabilities in [0, 1])."""
        vals = [self.start] + ([self.end] if self.end is not None else []) + ([0.0] if self.warmup else [])
        return min(vals), max(vals)

    def to_dict(self) -> float | dict:
        """A plain float for an un-warmed constant (YAML-friendly), else a dict."""
        if self.kind == "constant" and self.warmup == 0:
            return self.start
        d: dict[str, Any] = {"kind": self.kind, "start": self.start}
        if self.kind != "constant":
            d["end"] = self.end
            d["steps"] = self.steps
        if self.warmup:
            d["warmup"] = self.warmup
        return d

    @classmethod
    def coerce(cls, v: Any, name: str = "schedule") -> "Schedule":
        """Accept a Schedule, a number (constant) or a dict (from YAML); `name` labels errors."""
        if isinstance(v, Schedule):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return cls("constant", float(v))
        if isinstance(v, Mapping):
            allowed = {f.name for f in dataclasses.fields(cls)}
            unknown = set(v) - allowed
            if unknown:
                raise ValueError(f"{name}: unknown schedule keys {sorted(unknown)}; valid: {sorted(allowed)}")
            try:
                return cls(**dict(v))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        raise ValueError(
            f"{name} must be a number or a mapping like {{kind: cosine, start: 0.2, end: 0.005, "
            f"steps: 1000000}}, got {v!r}"
        )


# Fields of Phase that inherit from the previous phase when None, with the value used by the first
# phase when it does not set them. lr and lambda_ot have no default: the first phase must set them.
_INHERITED_DEFAULTS: dict[str, Any] = {
    "lr": None,
    "lr_d": None,  # None all the way down means "same as lr"
    "lambda_ot": None,
    "lambda_gp": 0.25,
    "lambda_cp": 0.01,
    "ema_reload_every": 0,
    "guidance": False,
    "lambda_cg": 0.0,
    "cg_t_range": (0.0, 0.1),
    "augment_p": 0.0,
}
_SCHEDULE_FIELDS = ("lr", "lr_d", "lambda_ot", "lambda_gp", "lambda_cp", "augment_p")


@dataclass(frozen=True)
class Phase:
    """One phase of training. Every hyperparameter left as None is inherited from the previous
    phase (the first phase uses the defaults: lambda_gp 0.25, lambda_cp 0.01, no EMA reload, no
    guidance, augment_p 0; it must set lr and lambda_ot).

    name:             unique label; tagged checkpoints are "<name>_end".
    start:            first global step of the phase (the first phase starts at 0).
    lr:               learning rate for G and D (Schedule or number). The generator's depth
                      repetition factor (lr_scale = 1/R) is applied by the trainer on top.
    lr_d:             D learning-rate override (None: same as lr unless an earlier phase set it).
    lambda_ot, lambda_gp, lambda_cp, augment_p: Schedules or numbers.
    ema_reload_every: copy EMA weights into G every N steps of this phase (at start + k*N, k >= 1);
                      0 disables. The paper reloads once per epoch: pass steps_per_epoch.
    d_reload_from:    NOT inherited; one-shot at phase entry: restore D from a tagged checkpoint
                      ("<earlier phase>_end" or any tag the platform saved) or from a global step
                      (int, < start).
    guidance:         classifier guidance on/off; when off the resolved lambda_cg is 0.
    lambda_cg:        guidance weight (used when guidance is on).
    cg_t_range:       (lo, hi) for the guidance time t' (see afm.AFMConfig.cg_t_mode).
    """

    name: str
    start: int
    lr: Schedule | float | None = None
    lr_d: Schedule | float | None = None
    lambda_ot: Schedule | float | None = None
    lambda_gp: Schedule | float | None = None
    lambda_cp: Schedule | float | None = None
    ema_reload_every: int | None = None
    d_reload_from: str | int | None = None
    guidance: bool | None = None
    lambda_cg: float | None = None
    cg_t_range: tuple[float, float] | None = None
    augment_p: Schedule | float | None = None

    def __post_init__(self) -> None:
        where = f"phase {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"phase name must be a non-empty string, got {self.name!r}")
        _count(f"{where}: start", self.start)
        for f in _SCHEDULE_FIELDS:
            v = getattr(self, f)
            if v is not None:
                object.__setattr__(self, f, Schedule.coerce(v, f"{where}: {f}"))
        for f in ("lr", "lr_d"):
            v = getattr(self, f)
            if v is not None and v.bounds()[1] <= 0:
                raise ValueError(f"{where}: {f} must be > 0")
            if v is not None and v.bounds()[0] < 0:
                raise ValueError(f"{where}: {f} must not go negative")
        for f in ("lambda_ot", "lambda_gp", "lambda_cp"):
            v = getattr(self, f)
            if v is not None and v.bounds()[0] < 0:
                raise ValueError(f"{where}: {f} must be >= 0")
        if self.augment_p is not None:
            lo, hi = self.augment_p.bounds()
            if lo < 0 or hi > 1:
                raise ValueError(f"{where}: augment_p is a probability, keep it in [0, 1]")
        if self.ema_reload_every is not None:
            _count(f"{where}: ema_reload_every", self.ema_reload_every)
        if self.guidance is not None and not isinstance(self.guidance, bool):
            raise ValueError(f"{where}: guidance must be true or false, got {self.guidance!r}")
        if self.lambda_cg is not None and _finite(f"{where}: lambda_cg", self.lambda_cg) < 0:
            raise ValueError(f"{where}: lambda_cg must be >= 0")
        if self.cg_t_range is not None:
            r = tuple(self.cg_t_range)
            if len(r) != 2:
                raise ValueError(f"{where}: cg_t_range must be a pair [lo, hi]")
            lo, hi = (_finite(f"{where}: cg_t_range", x) for x in r)
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"{where}: cg_t_range must satisfy 0 <= lo <= hi <= 1, got {r}")
            object.__setattr__(self, "cg_t_range", (lo, hi))
        d = self.d_reload_from
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, (str, int)) or (isinstance(d, str) and not d.strip()):
                raise ValueError(f"{where}: d_reload_from must be a checkpoint tag or a step, got {d!r}")
            if isinstance(d, int) and not 0 <= d < self.start:
                raise ValueError(
                    f"{where}: d_reload_from={d} must be an earlier step (0 <= step < start={self.start})"
                )

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "start": self.start}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("name", "start") or v is None:
                continue
            if isinstance(v, Schedule):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


@dataclass(frozen=True)
class PhaseParams:
    """Hyperparameters resolved for one global step (what the trainer reads each step)."""

    phase_index: int
    phase_name: str
    phase_start: int
    lr: float
    lr_d: float
    lambda_ot: float
    lambda_gp: float
    lambda_cp: float
    ema_reload_every: int
    guidance: bool
    lambda_cg: float  # 0.0 whenever guidance is off
    cg_t_range: tuple[float, float]
    augment_p: float


@dataclass(frozen=True)
class Event:
    """A one-shot action to run BEFORE the training step it is reported for.

    kind: "save_tag"   save a checkpoint tagged `tag` (state at the end of the previous phase);
          "phase_enter" a phase begins (`phase_index`, `tag` = phase name);
          "d_reload"    restore D from `source` (a tag or a global step);
          "ema_reload"  copy the EMA weights into G.
    events(step) returns them in that order; perform them in order.
    """

    kind: str
    phase_index: int
    tag: str | None = None
    source: str | int | None = None


@dataclass(frozen=True)
class PhasePlan:
    """Ordered phases; see the module docstring for inheritance and step-counting rules."""

    phases: tuple[Phase, ...]
    _resolved: tuple = field(init=False, repr=False, compare=False)
    _starts: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        phases = tuple(self.phases)
        object.__setattr__(self, "phases", phases)
        if not phases:
            raise ValueError("phases must list at least one phase (starting at step 0)")
        if phases[0].start != 0:
            raise ValueError(f"phases: the first phase must start at step 0, got {phases[0].start}")
        for a, b in zip(phases, phases[1:]):
            if b.start <= a.start:
                raise ValueError(
                    f"phases must be sorted with increasing start steps: {b.name!r} starts at "
                    f"{b.start}, not after {a.name!r} at {a.start}"
                )
        names = [p.name for p in phases]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"phase names must be unique; repeated: {sorted(dup)}")
        for f in ("lr", "lambda_ot"):
            if getattr(phases[0], f) is None:
                raise ValueError(f"phase {phases[0].name!r}: the first phase must set {f}")
        for i, p in enumerate(phases):
            d = p.d_reload_from
            if isinstance(d, str) and d.endswith("_end") and d[: -len("_end")] in names:
                j = names.index(d[: -len("_end")])
                if j >= i:
                    raise ValueError(
                        f"phase {p.name!r}: d_reload_from={d!r} names a phase that has not ended "
                        "yet; use an earlier phase's tag"
                    )
        # Resolve inheritance once: per phase, field -> (value, origin start step).
        resolved = []
        cur = {k: (v, 0) for k, v in _INHERITED_DEFAULTS.items()}
        for p in phases:
            cur = dict(cur)
            for k in _INHERITED_DEFAULTS:
                v = getattr(p, k)
                if v is not None:
                    cur[k] = (v, p.start)
            resolved.append(cur)
        object.__setattr__(self, "_resolved", tuple(resolved))
        object.__setattr__(self, "_starts", tuple(p.start for p in phases))

    def phase_index(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return bisect.bisect_right(self._starts, step) - 1

    def at(self, step: int) -> PhaseParams:
        """Resolved hyperparameters for global step `step`."""
        i = self.phase_index(step)
        r = self._resolved[i]

        def val(k: str) -> float:
            sched, origin = r[k]
            return Schedule.coerce(sched).value(step - origin)

        lr = val("lr")
        guidance = bool(r["guidance"][0])
        return PhaseParams(
            phase_index=i,
            phase_name=self.phases[i].name,
            phase_start=self.phases[i].start,
            lr=lr,
            lr_d=val("lr_d") if r["lr_d"][0] is not None else lr,
            lambda_ot=val("lambda_ot"),
            lambda_gp=val("lambda_gp"),
            lambda_cp=val("lambda_cp"),
            ema_reload_every=int(r["ema_reload_every"][0]),
            guidance=guidance,
            lambda_cg=float(r["lambda_cg"][0]) if guidance else 0.0,
            cg_t_range=tuple(r["cg_t_range"][0]),
            augment_p=val("augment_p"),
        )

    def events(self, step: int) -> list[Event]:
        """One-shot actions to perform before running global step `step` (in list order)."""
        i = self.phase_index(step)
        p = self.phases[i]
        out: list[Event] = []
        if step == p.start:
            if i > 0:
                out.append(Event("save_tag", i - 1, tag=f"{self.phases[i - 1].name}_end"))
            out.append(Event("phase_enter", i, tag=p.name))
            if p.d_reload_from is not None:
                out.append(Event("d_reload", i, source=p.d_reload_from))
        every = int(self._resolved[i]["ema_reload_every"][0])
        if every and step > p.start and (step - p.start) % every == 0:
            out.append(Event("ema_reload", i))
        return out

    def to_dict(self) -> dict:
        return {"phases": [p.to_dict() for p in self.phases]}

    @classmethod
    def from_dict(cls, d: Mapping | list) -> "PhasePlan":
        """Build from YAML data: {"phases": [ {name?, start, lr, ...}, ... ]} or the bare list.
        A phase without a name gets "phase<k>" (1-based), so tags read "phase2_end"."""
        if isinstance(d, Mapping):
            extra = set(d) - {"phases"}
            if extra:
                raise ValueError(f"phase plan: unknown keys {sorted(extra)}; expected only 'phases'")
            if "phases" not in d:
                raise ValueError("phase plan: missing 'phases' (a list of phases)")
            d = d["phases"]
        if not isinstance(d, list):
            raise ValueError("phase plan: 'phases' must be a list of mappings")
        allowed = {f.name for f in dataclasses.fields(Phase)}
        phases = []
        for k, item in enumerate(d):
            if not isinstance(item, Mapping):
                raise ValueError(f"phase plan: phase #{k + 1} must be a mapping, got {item!r}")
            unknown = set(item) - allowed
            if unknown:
                raise ValueError(
                    f"phase plan: phase #{k + 1} has unknown keys {sorted(unknown)}; valid: {sorted(allowed)}"
                )
            if "start" not in item:
                raise ValueError(f"phase plan: phase #{k + 1} is missing 'start' (its first global step)")
            kw = dict(item)
            kw.setdefault("name", f"phase{k + 1}")
            if isinstance(kw.get("cg_t_range"), list):
                kw["cg_t_range"] = tuple(kw["cg_t_range"])
            phases.append(Phase(**kw))
        return cls(tuple(phases))

    @classmethod
    def from_spec(cls, phases: list[Mapping], base: Mapping) -> "PhasePlan":
        """The plan of a run config: `phases` as listed, the first inheriting whatever it leaves out
        from `base` (the top-level settings, e.g. {lr, lambda_ot, lambda_gp, lambda_cp}); an empty
        list is one phase named "main" from step 0 built from `base` alone."""
        items = [dict(p) for p in phases] or [{"name": "main", "start": 0}]
        items[0] = {**base, **items[0]}
        return cls.from_dict(items)


# ----------------------------------------------------------------------------- automatic phases


@dataclass(frozen=True)
class Transition:
    """One automatic phase change: the phase `to_index` starts at global step `step`."""

    step: int
    from_name: str
    to_name: str
    to_index: int
    reason: str

    def to_dict(self) -> dict:
        return {"step": self.step, "from": self.from_name, "to": self.to_name, "to_index": self.to_index,
                "reason": self.reason}


class AutoPhases:
    """Table 11's phases placed by a plateau rule instead of by hand.

    `templates` are phases without `start` (the first is the phase training starts in). At each
    evaluation the trainer calls `observe(step, value)` with the metric (lower is better for mode
    `min`). A value counts as an improvement when it beats the best so far by more than `min_delta`
    (relative: 0.02 = 2 %). After `patience` evaluations in a row without improvement, and once the
    current phase has run `min_phase_steps`, the next template starts at `step` (the step the
    trainer runs next). The last template runs to the end. The best value and its step are kept
    across phases (a D reload `from: best` restores D as it was at `best_step`).

    Decisions depend only on the observed values, so every rank that observes the same values makes
    the same decisions, and `state_dict`/`load_state_dict` make them survive a restart.
    """

    def __init__(self, templates: list[Mapping], *, patience: int, min_delta: float, min_phase_steps: int,
                 mode: str = "min"):
        if not templates:
            raise ValueError("auto phases: templates must list at least one phase")
        if patience < 1 or min_phase_steps < 0 or min_delta < 0:
            raise ValueError("auto phases: need patience >= 1, min_phase_steps >= 0, min_delta >= 0")
        if mode not in ("min", "max"):
            raise ValueError(f"auto phases: mode {mode!r} is not min or max")
        for k, t in enumerate(templates):
            if "start" in t:
                raise ValueError(f"auto phases: template #{k + 1} ({t.get('name', '?')}) sets `start`; the "
                                 "automatic schedule decides the starts, remove it")
        self.templates = [dict(t, name=t.get("name", f"phase{k + 1}")) for k, t in enumerate(templates)]
        self.patience, self.min_delta, self.min_phase_steps, self.mode = patience, min_delta, min_phase_steps, mode
        self.starts: list[int] = [0]
        self.best: float | None = None
        self.best_step: int | None = None
        self.stale = 0
        self.transitions: list[Transition] = []
        PhasePlan.from_dict([dict(t, start=k) for k, t in enumerate(self.templates)])  # validate them all now

    @classmethod
    def from_spec(cls, templates: list[Mapping], base: Mapping, *, patience: int, min_delta: float,
                  min_phase_steps: int, mode: str = "min") -> "AutoPhases":
        """The controller of a run config: the first template inherits whatever it leaves out from
        `base` (the top-level settings, as in `PhasePlan.from_spec`)."""
        templates = [dict(t) for t in templates]
        if templates:
            templates[0] = {**base, **templates[0]}
        return cls(templates, patience=patience, min_delta=min_delta, min_phase_steps=min_phase_steps, mode=mode)

    @property
    def index(self) -> int:
        return len(self.starts) - 1

    def plan(self) -> PhasePlan:
        """The phases entered so far (the current one runs until a transition adds the next)."""
        return PhasePlan.from_dict([dict(t, start=s) for t, s in zip(self.templates, self.starts)])

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best * (1 - self.min_delta)
        return value > self.best * (1 + self.min_delta)

    def observe(self, step: int, value: float) -> Transition | None:
        """Feed the evaluation at `step`; returns the transition it decides, if any."""
        if value is None or not math.isfinite(value):
            return None
        if self._improved(value):
            self.best, self.best_step, self.stale = float(value), int(step), 0
            return None
        if self.mode == "min" and self.best is not None and value < self.best:
            self.best, self.best_step = float(value), int(step)  # a new best, but within min_delta
        elif self.mode == "max" and self.best is not None and value > self.best:
            self.best, self.best_step = float(value), int(step)
        self.stale += 1
        ran = step - self.starts[-1]
        if self.stale < self.patience or ran < self.min_phase_steps or self.index + 1 >= len(self.templates):
            return None
        cur, nxt = self.templates[self.index], self.templates[self.index + 1]
        reason = (f"eval plateau: no {self.min_delta:.0%} improvement on best {self.best:.4g} (step "
                  f"{self.best_step}) in {self.stale} evaluations; phase {cur['name']!r} ran {ran} steps")
        self.starts.append(int(step))
        self.stale = 0
        tr = Transition(int(step), cur["name"], nxt["name"], self.index, reason)
        self.transitions.append(tr)
        return tr

    def state_dict(self) -> dict[str, Any]:
        return {"starts": list(self.starts), "best": self.best, "best_step": self.best_step, "stale": self.stale,
                "transitions": [t.to_dict() for t in self.transitions]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        starts = [int(s) for s in state["starts"]]
        if len(starts) > len(self.templates):
            raise ValueError(f"auto phases: the checkpoint entered {len(starts)} phases, the config has only "
                             f"{len(self.templates)} templates; resume with the config it was written with")
        self.starts, self.best, self.best_step = starts, state["best"], state["best_step"]
        self.stale = int(state["stale"])
        self.transitions = [Transition(t["step"], t["from"], t["to"], t["to_index"], t["reason"])
                            for t in state["transitions"]]
