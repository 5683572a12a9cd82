"""The search space of a hyper-parameter sweep: `ParamSpec`, `SweepSpace` (YAML, define-by-run
suggestions for Optuna, the baseline point) and `apply_params` (a trial's RunSpec).

The sweep lives in three modules: this one (what is searched), `sweep.study` (the RDB-backed Optuna
study: storage URLs, open/recover, finding a trial, the sweep folder) and `sweep.tune` (the Ray Tune
side: the trial function, the Tuner, the wrap-up).

Ray Tune + Optuna (TPE) search AFM's loss weights, learning rate, depth repetition and NFE, with
ASHA early stopping and an RDB-backed, resumable Optuna study.

The search space is YAML (`SweepSpace.load`); each parameter names the config field it overrides
(`adversarial.gp_scale`, `model.repeats`, ...). Conditional structure is expressed define-by-run:
a parameter with `when:` is only suggested when an earlier one took one of the listed values, and
`high_from:` caps a range by an earlier draw (lambda_ot's end never exceeds its start). `model.nfe
> 1` switches the generator to `multistep`. Depth repetition R scales G's learning rate by 1/R in
the trainer (`Generator.lr_scale`), as in the paper; trials record the effective value.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from advflow.platform.config import ConfigError, RunSpec, apply_override


@dataclass
class ParamSpec:
    """One searched config field."""

    name: str
    """Dotted config field, e.g. `adversarial.gp_scale` or `adversarial.ot_scale.start`."""
    type: str
    """`float`, `int` or `categorical`."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    when: dict[str, list] = field(default_factory=dict)
    """Only suggest this parameter when each named earlier parameter took one of the values."""
    high_from: str | None = None
    """Cap `high` by the value an earlier parameter took (e.g. lambda_ot end <= start)."""

    def validate(self, where: str, earlier: list[str]) -> None:
        if self.type not in ("float", "int", "categorical"):
            raise ConfigError(f"{where}.type: {self.type!r} is unknown; use float, int or categorical")
        if self.type == "categorical":
            if not self.choices:
                raise ConfigError(f"{where}.choices: a categorical parameter needs a non-empty list of choices")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ConfigError(f"{where}: needs low < high (got low={self.low}, high={self.high})")
        elif self.log and self.low <= 0:
            raise ConfigError(f"{where}.low: a log-scaled range needs low > 0")
        for ref in [*self.when, *([self.high_from] if self.high_from else [])]:
            if ref not in earlier:
                raise ConfigError(f"{where}: refers to {ref!r}, which is not a parameter listed before it; "
                                  f"order the parameters so that {ref!r} comes first")


@dataclass
class SweepSpace:
    """A sweep: metric, search space, sampler, ASHA, study storage and resources (YAML)."""

    metric: str = "eval/fd"
    """Reported metric to optimise (the trials' quality metric, see config `eval`)."""
    mode: str = "min"
    params: list[ParamSpec] = field(default_factory=list)
    seed: int = 0
    """TPE sampler seed."""
    n_startup_trials: int = 4
    """Random trials before TPE models the space."""
    study_name: str = "afm-sweep"
    storage: str = "sqlite:///sweeps/afm-sweep.db"
    """Optuna RDB storage URL (SQLite by default; a shared Postgres/MySQL URL on a cluster)."""
    max_concurrent_trials: int = 2
    trial_cpus: float = 0.0
    """CPUs reserved for each trial's driver function (the Train workers reserve their own)."""
    asha: dict = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    """ASHA over `step`: grace_period and the rung spacing are in evaluations (eval.every steps)."""
    overrides: dict = field(default_factory=dict)
    """Config overrides applied to every trial (e.g. fewer workers per trial)."""
    register_name: str | None = None
    """Registered-model name for trial generators; the best trial's version gets alias `candidate`."""
    report: str | None = None
    """Where to write the HTML sweep report (default: next to the study, `<study>.html`)."""
    baseline: bool = True
    """Make the first trial of a new study the base config's own values (the reference the sweep
    has to beat); values outside the space's ranges are left to the sampler."""

    @classmethod
    def load(cls, path: str | Path) -> "SweepSpace":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"search space {path} does not exist; pass --space with a YAML file "
                              "(example: jobs/configs/sweeps/digits_space.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"search space {path} is not valid YAML: {err}") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "space") -> "SweepSpace":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        params_raw = raw.get("params") or {}
        if not isinstance(params_raw, dict) or not params_raw:
            raise ConfigError(f"{where}.params: give a mapping of config field -> distribution")
        params, earlier = [], []
        for name, p in params_raw.items():
            if not isinstance(p, dict):
                raise ConfigError(f"{where}.params.{name}: expected a mapping like {{type: float, low: .., high: ..}}")
            bad = [k for k in p if k not in ParamSpec.__dataclass_fields__ or k == "name"]
            if bad:
                raise ConfigError(f"{where}.params.{name}: unknown key(s) {bad}")
            spec = ParamSpec(name=name, **{k: (float(v) if k in ("low", "high", "step") and v is not None else v)
                                           for k, v in p.items()})
            spec.validate(f"{where}.params.{name}", earlier)
            params.append(spec)
            earlier.append(name)
        out = cls(**{**{k: v for k, v in raw.items() if k != "params"}, "params": params})
        if out.mode not in ("min", "max"):
            raise ConfigError(f"{where}.mode: {out.mode!r}; use min or max")
        if out.max_concurrent_trials < 1:
            raise ConfigError(f"{where}.max_concurrent_trials: must be >= 1")
        return out

    # ------------------------------------------------------------------ define-by-run

    def suggest(self, trial) -> dict[str, Any]:
        """Optuna define-by-run: suggest every parameter whose `when` holds; returns the draws."""
        got: dict[str, Any] = {}
        for p in self.params:
            if any(got.get(ref, _MISSING) not in values for ref, values in p.when.items()):
                continue
            if p.type == "categorical":
                got[p.name] = trial.suggest_categorical(p.name, p.choices)
                continue
            high = p.high
            if p.high_from is not None:
                high = min(high, got[p.high_from])
            low = min(p.low, high)
            if p.type == "int":
                got[p.name] = trial.suggest_int(p.name, int(low), int(high), log=p.log, step=int(p.step or 1))
            else:
                got[p.name] = trial.suggest_float(p.name, low, high, log=p.log, step=p.step)
        return got


    def check_against(self, base: dict) -> None:
        """Refuse a space that names a config field the schema does not have, or whose values the
        schema rejects, before anything is launched: otherwise the first trial fails inside a Ray
        traceback after the study and the MLflow parent run already exist. Each parameter is applied
        alone at its bounds (or each choice) on top of `base` and the space's overrides."""
        try:
            apply_params(base, {}, self.overrides)
        except ConfigError as err:
            raise ConfigError(f"space overrides: {err}") from None
        for p in self.params:
            values = p.choices if p.type == "categorical" else [p.low, p.high]
            for value in values:
                value = int(value) if p.type == "int" else value
                try:
                    apply_params(base, {p.name: value}, self.overrides)
                except ConfigError as err:
                    raise ConfigError(f"space parameter {p.name!r} (value {value!r}): {err}; fix or remove "
                                      f"params.{p.name} in the space YAML") from None

    def baseline_point(self, base: dict) -> dict[str, Any]:
        """The base config's values of the searched parameters (those inside the space)."""
        point: dict[str, Any] = {}
        for p in self.params:
            value = _get(base, p.name)
            parent = _get(base, p.name.rsplit(".", 1)[0]) if "." in p.name else None
            if value is None and isinstance(parent, (int, float)) and not isinstance(parent, bool):
                value = parent  # a constant lambda_ot is both the start and the end of its schedule
            if value is None or any(point.get(ref, _MISSING) not in vals for ref, vals in p.when.items()):
                continue
            if p.type == "categorical":
                if value in p.choices:
                    point[p.name] = value
                continue
            high = min(p.high, point[p.high_from]) if p.high_from and p.high_from in point else p.high
            if p.low <= value <= high:
                point[p.name] = value
        return point


_MISSING = object()


def apply_params(base: dict, params: dict[str, Any], overrides: dict | None = None) -> RunSpec:
    """The trial's RunSpec: base config dict + sweep overrides + drawn params (validated)."""
    raw = copy.deepcopy(base)
    for key, value in {**(overrides or {}), **params}.items():
        # A schedule field (e.g. adversarial.ot_scale.start) needs the schedule as a mapping.
        parent = key.rsplit(".", 1)[0]
        if parent != key and _get(raw, parent) is not None and not isinstance(_get(raw, parent), dict):
            steps = _get(raw, "train.steps") or RunSpec().train.steps
            _set(raw, parent, {"kind": "cosine", "start": _get(raw, parent), "end": _get(raw, parent), "steps": steps})
        apply_override(raw, f"{key}={json.dumps(value)}")
    if int(_get(raw, "model.nfe") or 1) > 1 and (_get(raw, "model.kind") or "1nfe") == "1nfe":
        _set(raw, "model.kind", "multistep")  # K > 1 needs the multi-step generator
    return RunSpec.from_dict(raw)


def _get(raw: dict, dotted: str):
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(raw: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
