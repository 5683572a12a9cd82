"""Typed run configuration: one YAML file plus `--set key=value` overrides, validated before launch.

Each component has its own dataclass with docstrings; `RunSpec.from_dict` rejects unknown keys and
wrong types, and `validate()` rejects impossible values, always naming the field and the fix. Nothing
here imports Ray or DeepSpeed, so the driver can validate a config before it touches the cluster.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from advflow.trainers.models import SIZES


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the field and the fix."""


# ----------------------------------------------------------------------------- components


@dataclass
class DataConfig:
    """Where the latent shards live and how they are streamed."""

    prefix: str = ""
    """Dataset prefix holding the manifest: `s3://bucket/path` or a local directory (required)."""
    shuffle_buffer: int = 2048
    """Records held in the in-memory shuffle buffer of each stream."""
    prefetch: int = 4
    """Shards fetched ahead of the reader by the background thread."""


@dataclass
class ModelConfig:
    """Generator and discriminator architecture (sizes from `advflow.trainers.models.SIZES`)."""

    size: str = "tiny"
    """Generator size, e.g. `tiny`, `B/2`, `XL/2`."""
    d_size: str | None = None
    """Discriminator size; defaults to `size` (the paper keeps D at 28 layers for deep generators)."""
    kind: str = "1nfe"
    """Generator kind: `1nfe`, `multistep` (fixed K) or `anystep`."""
    nfe: int = 1
    """K, the number of generator evaluations at sampling time (1 for `1nfe`)."""
    repeats: int = 1
    """R, weight-tied depth repetition of the generator's blocks (1, 2 or 4 in the paper)."""


@dataclass
class OptimConfig:
    """AdamW for both networks (the paper uses equal learning rates)."""

    lr: float = 1e-4
    """Base learning rate; G's is multiplied by 1/R for depth-repeated generators."""
    betas: tuple[float, float] = (0.0, 0.9)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 0.0
    """Global gradient-norm clip per engine; 0 disables clipping."""
    ema_decay: float = 0.9999
    """EMA decay of the generator's weights (the sampled model)."""


@dataclass
class AdversarialConfig:
    """Loss weights (lambda in the paper). `ot_scale` is a number or a schedule mapping."""

    ot_scale: Any = 0.2
    """lambda_ot: a constant, or {kind: cosine|linear|constant, start, end, steps}."""
    gp_scale: float = 0.25
    """lambda_gp for the finite-difference R1 (real) and R2 (fake) penalties."""
    gp_fraction: float = 0.25
    """Fraction of each batch the penalties are computed on."""
    gp_eps: float = 0.01
    """Finite-difference step for R1/R2."""
    cp_scale: float = 0.01
    """lambda_cp, logit centering."""
    gradnorm: bool = True
    """Normalise the adversarial gradient reaching G (makes lambda_ot transfer across sizes)."""
    gradnorm_momentum: float = 0.9


@dataclass
class TrainConfig:
    """Loop lengths and cadences, counted in iterations (one D step plus one G step)."""

    steps: int = 1000
    global_batch: int = 256
    """Samples per optimizer step summed over workers and accumulation micro-steps."""
    grad_accum: int = 1
    log_every: int = 10
    sample_every: int = 0
    """Save a sample grid every N iterations (0: only at the end)."""
    checkpoint_every: int = 100
    seed: int = 0


@dataclass
class DistributedConfig:
    """Ray Train workers and the two DeepSpeed engines."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    zero_stage_g: int = 2
    zero_stage_d: int = 2
    precision: str = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `fp32` or `bf16`."""


@dataclass
class RunConfig:
    """Where a run stores checkpoints and how it survives failures."""

    name: str = "afm"
    storage_path: str = "runs"
    """Ray Train storage: a local directory or `s3://bucket/prefix`."""
    max_failures: int = 2
    """Worker-group restarts Ray Train attempts before the job fails."""
    keep_checkpoints: int = 2


@dataclass
class TrackingConfig:
    """MLflow tracking and model registry (only global rank 0 talks to MLflow).

    Tracking is on when a tracking server is known: `uri`, else the MLFLOW_TRACKING_URI environment
    variable (`advflow stack env` exports it). Without either the run is trained untracked, with a
    warning."""

    enabled: bool = True
    uri: str | None = None
    """Tracking URI; None = MLFLOW_TRACKING_URI from the environment."""
    experiment: str = "advflow"
    """MLflow experiment the run is logged under (created if missing)."""
    image_every: int = 0
    """Log a fixed-seed EMA sample grid every M iterations (0: at each checkpoint and the end)."""
    register_name: str | None = None
    """Registered-model name for the EMA generator (None: log nothing to the registry)."""
    register_every: int = 0
    """Also register every N iterations (0: only at the end), at the first checkpoint at or after
    each multiple of N (checkpoints are where every rank's state is consistent)."""
    system_metrics: bool = True
    """MLflow system metrics (CPU, memory, disk, network; GPU when pynvml is installed)."""
    system_metrics_interval: float = 10.0
    """Seconds between system-metric samples."""


@dataclass
class EvalConfig:
    """Periodic sample quality, reported with checkpoints (the metric sweeps and ASHA use).

    kind `digits`: Fréchet distance in the feature space of the project's digit classifier against
    the held-out digits (plus its floor and class-conditional accuracy). kind `fid`: FID with Inception
    weights and reference statistics the user provides by path."""

    kind: str = "none"
    """`none`, `digits` or `fid`."""
    every: int = 0
    """Evaluate every N iterations, at the first checkpoint at or after each multiple of N (metrics
    reach Ray/Tune with checkpoints); 0: only at the end."""
    num_samples: int = 1000
    """Generated samples per evaluation (class-balanced, fixed seeds)."""
    batch_size: int = 250
    inception_path: str | None = None
    """kind `fid`: path to the FID Inception weights (pt_inception-2015-12-05 state dict)."""
    reference_stats: str | None = None
    """kind `fid`: .npz with `mu` and `sigma` of the reference set."""


@dataclass
class RunSpec:
    """A whole training run. Load with `load_config(path, overrides)`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    phases: list[dict] = field(default_factory=list)
    """Table-11-style phases (see `advflow.trainers.schedules.PhasePlan`); empty = one phase."""

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, raw: dict) -> "RunSpec":
        spec = _build(cls, raw or {}, "")
        spec.validate()
        return spec

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        m, t, d, a, o = self.model, self.train, self.distributed, self.adversarial, self.optim
        if not self.data.prefix:
            _fail("data.prefix", "is empty", "set it to the dataset prefix written by jobs/prepare_latents.py, "
                  "e.g. --set data.prefix=s3://advflow/digits")
        for name in ("size", "d_size"):
            value = getattr(m, name)
            if value is not None and value not in SIZES:
                _fail(f"model.{name}", f"{value!r} is not a known size", f"use one of {sorted(SIZES)}")
        if m.kind not in ("1nfe", "multistep", "anystep"):
            _fail("model.kind", f"{m.kind!r} is unknown", "use 1nfe, multistep or anystep")
        if m.repeats < 1:
            _fail("model.repeats", f"R={m.repeats} < 1", "use R >= 1 (1 = no depth repetition)")
        if m.repeats > 1 and m.kind != "1nfe":
            _fail("model.repeats", f"R={m.repeats} with kind {m.kind}", "depth repetition is for 1NFE generators "
                  "(the paper's 56/112-layer models): use model.kind=1nfe with R > 1, or R=1")
        if m.nfe < 1:
            _fail("model.nfe", f"K={m.nfe} < 1", "use K >= 1")
        if m.kind == "1nfe" and m.nfe != 1:
            _fail("model.nfe", f"K={m.nfe} with kind 1nfe", "set model.kind=multistep for K > 1, or nfe=1")
        for name in ("steps", "global_batch", "grad_accum", "log_every", "checkpoint_every"):
            if getattr(t, name) < 1:
                _fail(f"train.{name}", f"must be >= 1, got {getattr(t, name)}", "use a positive integer")
        if t.sample_every < 0:
            _fail("train.sample_every", "is negative", "use 0 (end only) or a positive cadence")
        if d.workers < 1:
            _fail("distributed.workers", f"must be >= 1, got {d.workers}", "use at least one worker")
        if t.global_batch % (d.workers * t.grad_accum):
            _fail("train.global_batch", f"{t.global_batch} is not divisible by workers x grad_accum = "
                  f"{d.workers} x {t.grad_accum}", "pick a global batch that is a multiple of their product")
        micro = t.global_batch // (d.workers * t.grad_accum)
        if micro * a.gp_fraction < 1:
            _fail("adversarial.gp_fraction", f"{a.gp_fraction} of a micro-batch of {micro} is < 1 sample",
                  "raise train.global_batch or gp_fraction")
        for name in ("zero_stage_g", "zero_stage_d"):
            stage = getattr(d, name)
            if stage not in (0, 1, 2, 3):
                _fail(f"distributed.{name}", f"ZeRO stage {stage} does not exist", "use 0, 1 or 2")
            if stage == 3:
                _fail(f"distributed.{name}", "ZeRO-3 is refused: D runs inside G's step and G inside D's, so "
                      "each engine's parameters would be gathered by the other engine's hooks (DeepSpeed "
                      "issues 4923/5639); the equivalence test does not pass for it", "use 0, 1 or 2")
        if d.precision not in ("auto", "fp32", "bf16"):
            _fail("distributed.precision", f"{d.precision!r} is unknown", "use auto, fp32 or bf16")
        if d.precision == "bf16" and not d.use_gpu:
            _fail("distributed.precision", "bf16 on CPU workers", "use fp32 (or auto) when use_gpu is false")
        if not (0 < a.gp_fraction <= 1):
            _fail("adversarial.gp_fraction", f"{a.gp_fraction} is outside (0, 1]", "use e.g. 0.25")
        if a.gp_eps <= 0:
            _fail("adversarial.gp_eps", "must be > 0", "use e.g. 0.01")
        for name in ("gp_scale", "cp_scale"):
            if getattr(a, name) < 0:
                _fail(f"adversarial.{name}", "is negative", "use a weight >= 0")
        if o.lr <= 0:
            _fail("optim.lr", "must be > 0", "use e.g. 1e-4")
        if not (0 <= o.ema_decay < 1):
            _fail("optim.ema_decay", f"{o.ema_decay} is outside [0, 1)", "use e.g. 0.9999")
        if self.run.max_failures < 0 or self.run.keep_checkpoints < 1:
            _fail("run.max_failures/keep_checkpoints", "out of range", "use max_failures >= 0, keep >= 1")
        tr, ev = self.tracking, self.eval
        if tr.image_every < 0 or tr.register_every < 0:
            _fail("tracking.image_every/register_every", "is negative", "use 0 or a positive cadence")
        if tr.system_metrics_interval <= 0:
            _fail("tracking.system_metrics_interval", "must be > 0", "use e.g. 10 (seconds)")
        if ev.kind not in ("none", "digits", "fid"):
            _fail("eval.kind", f"{ev.kind!r} is unknown", "use none, digits or fid")
        if ev.every < 0:
            _fail("eval.every", "is negative", "use 0 (end only) or a positive cadence")
        if ev.num_samples < 2 or ev.batch_size < 1:
            _fail("eval.num_samples/batch_size", "too small", "use num_samples >= 2 and batch_size >= 1")
        if ev.kind == "fid" and not (ev.inception_path and ev.reference_stats):
            _fail("eval.inception_path/reference_stats", "kind fid needs both",
                  "set them to the Inception weights (.pth/.safetensors) and the reference .npz (mu, sigma)")
        for i, phase in enumerate(self.phases):
            if isinstance(phase, dict) and isinstance(phase.get("d_reload_from"), int):
                _fail(f"phases[{i}].d_reload_from", "a step number is not supported",
                      "name a phase-end snapshot instead, e.g. d_reload_from: decay_end")
            if isinstance(phase, dict) and phase.get("guidance"):
                _fail(f"phases[{i}].guidance", "classifier guidance needs a trained flow classifier, which "
                      "the training job cannot load yet", "leave guidance off (see the recipe comments)")
        # Schedules and phases are validated by their own types; re-raise with the field path.
        try:
            self.phase_plan()
        except ValueError as err:
            raise ConfigError(f"phases / adversarial.ot_scale: {err}") from None

    # ------------------------------------------------------------------ derived

    @property
    def micro_batch(self) -> int:
        t, d = self.train, self.distributed
        return t.global_batch // (d.workers * t.grad_accum)

    def phase_plan(self):
        """The resolved phase plan; an empty `phases` list means one phase built from the top-level
        optimiser and loss settings."""
        from advflow.trainers.schedules import PhasePlan

        base = {"lr": self.optim.lr, "lambda_ot": self.adversarial.ot_scale,
                "lambda_gp": self.adversarial.gp_scale, "lambda_cp": self.adversarial.cp_scale}
        phases = [dict(p) for p in self.phases] or [{"name": "main", "start": 0}]
        # The first phase inherits whatever it leaves out from the top-level optim/adversarial keys.
        phases[0] = {**base, **phases[0]}
        return PhasePlan.from_dict(phases)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Read a YAML config, apply `key.sub=value` overrides (values parsed as YAML), validate."""
    raw: dict = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return RunSpec.from_dict(raw)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read one recipe; `base: other.yaml` (relative to this file) is read first and overlaid."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file "
                          f"(recipes live in jobs/configs/)")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: `base` chain loops back to itself; remove the cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), raw)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} has no '='; write it as key.sub=value, "
                          f"e.g. --set adversarial.ot_scale=0.1")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = yaml.safe_load(value)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as values (e.g. for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------- internals


def _fail(fieldname: str, problem: str, fix: str) -> typing.NoReturn:
    raise ConfigError(f"{fieldname}: {problem}; {fix}")


def _build(cls, raw: dict, path: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = path or "top level"
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}{name}")
    return cls(**kwargs)


def _coerce(tp, value, path: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        last: ConfigError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as err:
                last = err
        raise last or ConfigError(f"{path}: bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return list(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp} at {path}")
