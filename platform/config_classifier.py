"""Typed configuration of the classifier job (`jobs/train_classifier.py`): the time-conditioned DiT
classifier of the paper's phase 4 (classifier guidance), trained on flow-noised latents.

Same system as the AFM job's `config.RunSpec`: one YAML recipe plus `--set key=value` overrides,
one pydantic section per component validating itself next to its fields, every failure one
`ConfigError` `<dotted.field>: <problem>; <fix>`. The sections the two jobs share are reused as they
are (`data`, `train`, `run`, `tracking`) or extended (`distributed`: one engine, so one ZeRO stage);
the classifier adds `classifier` (size and the training time range), its own `optim` defaults (the
official classifier trainer's) and `eval` (accuracy of the EMA classifier at fixed times).

A step here is ONE optimizer update of the classifier on `train.global_batch` samples (not an AFM
iteration of a D and a G update); `train.steps` and every cadence count these steps.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from advflow.platform.config import (_EXPECTED, ConfigError, DataConfig, DistributedConfig, Number, NumberPair,
                                     RunStorageConfig, TrackingConfig, TrainConfig, _fail, _input_at, _path,
                                     _read_yaml, _Section, apply_override)
from advflow.trainers.models import SIZES

__all__ = ["ClassifierRunSpec", "ClassifierConfig", "ClassifierOptimConfig", "ClassifierDistributedConfig",
           "ClassifierEvalConfig", "load_classifier_config", "time_key", "ConfigError"]

DEFAULT_RUN_NAME = "classifier"  # not RunStorageConfig's "afm": the run key (storage/name) must differ


def time_key(t: float) -> str:
    """The metric suffix of evaluation time t: 0.25 -> 't0.25' (`eval/acc_t0.25`)."""
    return f"t{float(t):.2f}"


class ClassifierConfig(_Section):
    """The classifier network (`advflow.trainers.models.build_classifier`) and its training times."""

    size: str = "B/2"
    """DiT size from `advflow.trainers.models.SIZES` (the paper: B/2; `tiny` for CPU demos)."""
    t_range: NumberPair = (0.0, 1.0)
    """Flow times the classifier is trained on: t ~ U(t_range) per sample, x_t = (1 - t) x + t z."""

    @model_validator(mode="after")
    def _check(self) -> ClassifierConfig:
        if self.size not in SIZES:
            _fail("size", f"{self.size!r} is not a known size", f"use one of {sorted(SIZES)}")
        lo, hi = self.t_range
        if not (0.0 <= lo <= hi <= 1.0):
            _fail("t_range", f"{list(self.t_range)} is not an interval inside [0, 1]",
                  "use [lo, hi] with 0 <= lo <= hi <= 1, e.g. [0, 1]")
        return self


class ClassifierOptimConfig(_Section):
    """AdamW, clipping and EMA; the defaults are the official classifier trainer's."""

    lr: Number = 1e-4
    """Constant learning rate."""
    betas: NumberPair = (0.9, 0.95)
    weight_decay: Number = 0.01
    eps: Number = 1e-8
    grad_clip: Number = 50.0
    """Global gradient-norm clip; 0 disables clipping."""
    ema_decay: Number = 0.9995
    """EMA decay of the classifier's weights; the EMA is the evaluated, registered and shipped model."""
    ema_warmup: bool = False
    """Use decay min(ema_decay, (1 + k) / (10 + k)) at update k, so a short run's EMA is not dominated
    by the initial weights (the official trainer does not; the CPU demo does)."""

    @model_validator(mode="after")
    def _check(self) -> ClassifierOptimConfig:
        if self.lr <= 0:
            _fail("lr", "must be > 0", "use e.g. 1e-4")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            _fail("betas", f"{list(self.betas)} are not both in [0, 1)", "use e.g. [0.9, 0.95]")
        if self.weight_decay < 0:
            _fail("weight_decay", "is negative", "use a decay >= 0, e.g. 0.01")
        if self.eps <= 0:
            _fail("eps", "must be > 0", "use e.g. 1e-8")
        if self.grad_clip < 0:
            _fail("grad_clip", "is negative", "use 0 (no clipping) or a positive norm, e.g. 50")
        if not (0.0 <= self.ema_decay < 1.0):
            _fail("ema_decay", f"{self.ema_decay} is outside [0, 1)", "use e.g. 0.9995")
        return self


class ClassifierDistributedConfig(DistributedConfig):
    """`DistributedConfig` (workers, use_gpu, cpus_per_worker, precision, with their checks) for ONE
    DeepSpeed engine: `zero_stage` replaces the AFM job's `zero_stage_g` / `zero_stage_d`."""

    zero_stage_g: int = Field(2, exclude=True)  # inherited, unused: refused when set, never dumped
    zero_stage_d: int = Field(2, exclude=True)
    zero_stage: int = 2
    """ZeRO stage of the classifier's engine: 0, 1 or 2."""

    @model_validator(mode="before")
    @classmethod
    def _one_engine(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in ("zero_stage_g", "zero_stage_d"):
                if name in data:
                    _fail(name, "the classifier job has one DeepSpeed engine", "set distributed.zero_stage instead")
            if data.get("min_workers"):
                _fail("min_workers", "the classifier job resumes only on the number of workers that wrote its "
                      "checkpoint (its noise is drawn per worker)", "remove it (a fixed distributed.workers)")
        return data

    @model_validator(mode="after")
    def _check_stage(self) -> ClassifierDistributedConfig:
        if self.zero_stage not in (0, 1, 2):
            why = ("ZeRO-3 is refused: it partitions the parameters that the EMA update reads and the "
                   "evaluation copies at every checkpoint" if self.zero_stage == 3 else
                   f"ZeRO stage {self.zero_stage} does not exist")
            _fail("zero_stage", why, "use 0, 1 or 2")
        return self


class ClassifierEvalConfig(_Section):
    """Accuracy (and cross-entropy) of the EMA classifier at fixed times, at checkpoints: on the
    dataset's held-out split when it has one (the digits hold-out recorded in the manifest), else on
    a fixed batch of the training records. Logged as `eval/acc_t0.00`, `eval/loss_t0.00`, ..."""

    every: int = 0
    """Evaluate at the first checkpoint at or after each multiple of N steps; 0: only at the end."""
    times: list[Number] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    """Flow times t of the evaluation (0 = clean inputs); the noise is fixed across evaluations."""
    split: str = "auto"
    """`auto` (held-out if the dataset has one, else a fixed training batch), `heldout` (fail without
    one) or `train` (a fixed batch of training records)."""
    num_samples: int = 1000
    """Records in the fixed training batch; the held-out split is used whole."""
    batch_size: int = 250

    @model_validator(mode="after")
    def _check(self) -> ClassifierEvalConfig:
        if self.every < 0:
            _fail("every", "is negative", "use 0 (end only) or a positive cadence")
        if not self.times:
            _fail("times", "is empty", "list at least one time, e.g. [0, 0.25, 0.5, 0.75]")
        bad = [t for t in self.times if not 0.0 <= t <= 1.0]
        if bad:
            _fail("times", f"{bad} outside [0, 1]", "use flow times in [0, 1] (0 = clean data, 1 = noise)")
        keys = [time_key(t) for t in self.times]
        if len(set(keys)) != len(keys):
            _fail("times", f"{self.times} name the same metric twice at two decimals", "use distinct times")
        if self.split not in ("auto", "heldout", "train"):
            _fail("split", f"{self.split!r} is unknown", "use auto, heldout or train")
        if self.num_samples < 1 or self.batch_size < 1:
            _fail("num_samples/batch_size", "too small", "use num_samples >= 1 and batch_size >= 1")
        return self


class ClassifierRunSpec(BaseModel):
    """A whole classifier-training run. Load with `load_classifier_config(path, overrides)`."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    data: DataConfig = Field(default_factory=DataConfig.model_construct)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    optim: ClassifierOptimConfig = Field(default_factory=ClassifierOptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: ClassifierDistributedConfig = Field(default_factory=ClassifierDistributedConfig)
    run: RunStorageConfig = Field(default_factory=lambda: RunStorageConfig(name=DEFAULT_RUN_NAME))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: ClassifierEvalConfig = Field(default_factory=ClassifierEvalConfig)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, raw: dict) -> ClassifierRunSpec:
        """Build and validate a spec from the YAML's nested dict; raises ConfigError."""
        raw = raw or {}
        if isinstance(raw, dict):
            raw = {**{name: {} for name in _SECTIONS}, **raw}  # validate omitted sections' defaults too
            if isinstance(raw["run"], dict) and "name" not in raw["run"]:
                raw["run"] = {**raw["run"], "name": DEFAULT_RUN_NAME}
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise _config_error(err, raw) from None

    def to_dict(self) -> dict:
        """The nested dict (`from_dict(spec.to_dict())` rebuilds the spec)."""
        return self.model_dump()

    def validate(self) -> None:  # shadows pydantic's deprecated BaseModel.validate classmethod
        """Re-run every check, e.g. after fields were assigned; raises ConfigError."""
        type(self).from_dict(self.to_dict())

    @model_validator(mode="after")
    def _check_across_sections(self) -> ClassifierRunSpec:
        t, d = self.train, self.distributed
        if t.global_batch % (d.workers * t.grad_accum):
            _fail("train.global_batch", f"{t.global_batch} is not divisible by workers x grad_accum = "
                  f"{d.workers} x {t.grad_accum}", "pick a global batch that is a multiple of their product")
        if t.sample_every:
            _fail("train.sample_every", "the classifier job draws no samples", "remove it (or set 0)")
        if self.tracking.image_every:
            _fail("tracking.image_every", "the classifier job logs no image grids", "remove it (or set 0)")
        return self

    # ------------------------------------------------------------------ derived

    @property
    def micro_batch(self) -> int:
        t, d = self.train, self.distributed
        return t.global_batch // (d.workers * t.grad_accum)

    @property
    def model(self) -> ClassifierConfig:
        """The network section under the name the shared tracking code reads (`model.size`)."""
        return self.classifier


_SECTIONS = [name for name, f in ClassifierRunSpec.model_fields.items()
             if isinstance(f.annotation, type) and issubclass(f.annotation, _Section)]


# ----------------------------------------------------------------------------- pydantic errors -> ConfigError
# The rules of `config._config_error`, rooted at ClassifierRunSpec (that function walks RunSpec's fields).


def _field_at(loc: tuple):
    model, info = ClassifierRunSpec, None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = info.annotation
    return info


def _visible_fields(model: type[BaseModel]) -> list[str]:
    return sorted(k for k, f in model.model_fields.items() if not f.exclude)


def _config_error(err: ValidationError, raw: Any) -> ConfigError:
    errors = err.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        parent = unknown[0]["loc"][:-1]
        keys = sorted(str(e["loc"][-1]) for e in unknown if e["loc"][:-1] == parent)
        info = _field_at(parent) if parent else None
        model = info.annotation if info is not None else ClassifierRunSpec
        return ConfigError(f"{_path(parent) or 'top level'}: unknown key(s) {keys}; "
                           f"valid keys are {_visible_fields(model)}")
    e = next((e for e in errors if e["type"] != "value_error"), errors[0])
    path, value = _path(e["loc"]), _input_at(raw, e["loc"], e.get("input"))
    if e["type"] == "value_error":  # raised by a validator: "<field relative to loc>: <problem>; <fix>"
        msg = e["msg"].removeprefix("Value error, ")
        return ConfigError(f"{path}{'' if msg.startswith('[') else '.'}{msg}" if path else msg)
    loc = e["loc"][:-1] if e["type"] == "missing" else e["loc"]
    info = _field_at(loc)
    if info is None and loc and isinstance(loc[-1], int):  # an item of a list field (eval.times[1])
        parent = _field_at(loc[:-1])
        if parent is not None and typing.get_origin(parent.annotation) is list:
            return ConfigError(f"{path}: expected a number, got {value!r}")
    if info is not None and typing.get_origin(info.annotation) is tuple:
        n = len(typing.get_args(info.annotation))
        return ConfigError(f"{_path(loc)}: expected a list of {n} numbers, got {_input_at(raw, loc, value)!r}")
    if e["type"] in ("model_type", "dict_type"):
        return ConfigError(f"{path or 'config'}: expected a mapping, got {type(value).__name__}")
    if e["type"] == "list_type":
        return ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
    if e["type"] in _EXPECTED:
        return ConfigError(f"{path}: expected {_EXPECTED[e['type']]}, got {value!r}")
    return ConfigError(f"{path or 'config'}: {e['msg']}, got {value!r}")


# ----------------------------------------------------------------------------- loading


def load_classifier_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ClassifierRunSpec:
    """Read a YAML recipe (`base:` chains allowed), apply `key.sub=value` overrides, validate."""
    raw: dict = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return ClassifierRunSpec.from_dict(raw)
