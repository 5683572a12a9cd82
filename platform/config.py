"""Typed run configuration: one YAML file plus `--set key=value` overrides, validated before launch.

Each section of the YAML is a pydantic model (`DataConfig`, `ModelConfig`, ...; `RunSpec` holds them
all). Pydantic replaced a hand-written dataclass coercion layer: its strict mode does the type checks
that layer did (an int field refuses strings, bools and floats, a bool field refuses 0/1, a str field
refuses numbers), `extra="forbid"` rejects unknown keys, enumerations are `Literal` types, and each
section's own value checks live in a validator on that section, next to its fields. Only the rules
that span sections (batch divisibility, the method's combinations, the phase plan) are on `RunSpec`.

One spec for every method (`model.method`): `afm` (generator + discriminator), `fm` (flow matching),
`meanflow` (MeanFlow, the consistency-family one-step baseline), `cafm` (continuous adversarial flow
models: a registered flow-matching model, `model.init`, post-trained against a discriminator) and
`classifier` (the time-conditioned classifier that classifier guidance loads). What a method
changes in the defaults is one table, `METHOD_DEFAULTS`, applied to the user's dict before validation.

This module validates and builds nothing: the phase plan and the automatic schedule are built from
the data it returns (`phase_dicts`, `phase_base`, `auto_templates`) by `trainers/schedules.py`
(`PhasePlan.from_spec`, `AutoPhases.from_spec`; `platform/train/phases.py` for a spec). It imports no
torch, no network code (the data reader) and no evaluator (tests/test_config.py checks), so the
driver can validate a config before it touches the cluster.

Every failure reaches the caller as one `ConfigError` `<dotted.field>: <problem>; <fix>`: `load_config`
is the one loader and `RunSpec.from_dict` turns pydantic's `ValidationError` into it (`_config_error`).
"""

from __future__ import annotations

import copy
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

# Both are plain data (tests/test_config.py checks that importing this module loads no evaluator,
# torch or network code): the evaluator table builds lazily, the size table is torch-free.
from advflow.platform.eval import EVALUATORS
from advflow.trainers.sizes import SIZES


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the field and the fix."""


def _fail(fieldname: str, problem: str, fix: str) -> typing.NoReturn:
    """Raise `<field>: <problem>; <fix>`. Inside a section's validator `fieldname` is relative to the
    section (`repeats`); `_config_error` prefixes the section's path (`model.repeats`)."""
    raise ConfigError(f"{fieldname}: {problem}; {fix}")


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; a float field takes any string that parses, except
    'nan' and 'inf' (float() reads them; no setting means them, and a NaN passes every `<`/`>` check
    of the section's validator). Non-finite YAML floats (`.nan`) are refused by `_check_finite`."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if not math.isfinite(number):
            raise ConfigError(f": {value} is not a finite number; set a finite value")
        return number
    return value


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # YAML has lists, not tuples


# A float field: ints and numeric strings are accepted (as floats), bools are not (strict mode).
Number = Annotated[float, BeforeValidator(_yaml_float)]
# A list of ints; one int is accepted as a one-element list.
IntList = Annotated[list[int], BeforeValidator(lambda v: [v] if isinstance(v, int) and not isinstance(v, bool) else v)]
# A fixed-length tuple given as a YAML list.
NumberPair = Annotated[tuple[Number, Number], BeforeValidator(_list_to_tuple)]


class _Section(BaseModel):
    # strict: no str->int, int->bool, number->str coercion. No validate_assignment: fields may be set
    # after construction (a sweep renames the run); `RunSpec.revalidate()` re-checks the whole spec.
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


def _one_of(options: list[str]) -> str:
    return ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]


# How a classifier for `guidance.classifier` is trained (a run of model.method classifier).
CLASSIFIER_COMMAND = "python jobs/train.py --config jobs/configs/digits_classifier.yaml"


AUTO_PARTITIONS_MAX = 64


def auto_partitions(draw_records: int, cap: int = AUTO_PARTITIONS_MAX) -> int:
    """`data.partitions: auto`: the largest divisor of the records one micro-step takes across the
    cluster, up to `cap` (a divisor, so every worker gets equal shares; 64 covers a 64-worker job)."""
    return max(v for v in range(1, min(cap, draw_records) + 1) if draw_records % v == 0)


def time_key(t: float) -> str:
    """The metric suffix of evaluation time t: 0.25 -> 't0.25' (`eval/acc_t0.25`, eval.kind accuracy)."""
    return f"t{float(t):.2f}"


# The enumerations. A value outside one is reported as `<field>: 'x' is unknown; use a, b or c`
# (`_config_error`, pydantic's literal_error).
Method = Literal["afm", "fm", "meanflow", "cafm", "classifier"]
METHODS: tuple[str, ...] = typing.get_args(Method)
GeneratorKind = Literal["1nfe", "multistep", "anystep"]
FmTimes = Literal["uniform", "logit_normal"]
MeanFlowVariant = Literal["meanflow", "imf"]
CAFMTimeDist = Literal["uniform", "logit_normal_jit"]
PairSource = Literal["same", "permute"]
Precision = Literal["auto", "fp32", "bf16"]
GuidanceTimeMode = Literal["auto", "uniform", "target"]
CheckpointUpload = Literal["async", "sync"]
# `none`, the sample-quality evaluators (their table, read once here) and the classifier's `accuracy`.
EvalKind = Literal[("none", *EVALUATORS, "accuracy")]  # type: ignore[valid-type]
EvalSplit = Literal["auto", "heldout", "train"]
AutoMode = Literal["min", "max"]


# ----------------------------------------------------------------------------- components


class DataConfig(_Section):
    """Where the latent shards live and how they are streamed."""

    prefix: str = ""
    """Dataset prefix holding the manifest: `s3://bucket/path` or a local directory (required)."""
    shuffle_buffer: int = 2048
    """Records held in the in-memory shuffle buffer of each stream."""
    prefetch: int = 4
    """Shards fetched ahead of the reader by the background thread."""
    partitions: int | Literal["auto"] = "auto"
    """V, the canonical partitions that define the record order (platform/data/DATA.md). Each worker
    reads only its V/workers partitions (1/workers of the data), and any number of workers that
    divides V replays the same global batches, so a run resumes exactly on such a number. V must
    divide the records one micro-step takes (train.global_batch / train.grad_accum). `auto`: the
    largest such divisor up to 64 (64 for global batches of 64, 128, 256, ...: enough for a
    64-worker job). A resume cannot change it."""

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        if isinstance(data, dict) and "order" in data:
            _fail("order", "was removed: the record order is now defined by canonical partitions, which read "
                  "1/workers of the data per worker and resume on any number of workers dividing them "
                  "(what `global` and `partitioned` each did half of)",
                  "delete data.order (set data.partitions to choose V; platform/data/DATA.md)")
        return data

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if isinstance(self.partitions, int) and self.partitions < 1:
            _fail("partitions", f"is {self.partitions}", "use a positive number, or auto")
        if not self.prefix:
            _fail("prefix", "is empty", "set it to the dataset prefix written by jobs/prepare_latents.py, "
                  "e.g. --set data.prefix=s3://advflow/digits")
        return self


class ModelConfig(_Section):
    """The networks trained and their architecture (sizes from `advflow.trainers.sizes.SIZES`)."""

    method: Method = "afm"
    """`afm` (adversarial flow model: generator + discriminator, two engines), `fm` (the
    flow-matching baseline: the same DiT trained as a velocity field with the flow-matching loss,
    one engine, sampled with `nfe` Euler steps; its kind is `multistep`), `meanflow` (MeanFlow: the
    any-step DiT trained on the average velocity, one engine, sampled with `nfe` steps of
    `trainers.flow.generate`, 1 by default; settings in the `meanflow` section), `cafm` (continuous
    adversarial flow models, arXiv 2604.11521: the flow-matching velocity model of `model.init`
    post-trained against a discriminator built from its own trunk, two engines, one optimizer update
    of D or G per iteration; sampled with `nfe` Euler steps, kind `multistep`; settings in the `cafm`
    section) or `classifier` (the
    time-conditioned DiT classifier that classifier guidance loads, `guidance.classifier`: one
    engine, trained with cross-entropy on flow-noised data, `classifier.t_range`; evaluated with
    eval.kind `accuracy`). Each method's defaults: `METHOD_DEFAULTS`."""
    fm_times: FmTimes = "uniform"
    """method `fm`: training-time distribution, `uniform` or `logit_normal` (SD3's, mean 0, std 1)."""
    size: str = "tiny"
    """Generator size, e.g. `tiny`, `B/2`, `XL/2`; under method `classifier` the classifier's size (the
    paper: B/2)."""
    d_size: str | None = None
    """Discriminator size; defaults to `size` (the paper keeps D at 28 layers for deep generators)."""
    kind: GeneratorKind = "1nfe"
    """Generator kind: `1nfe`, `multistep` (fixed K) or `anystep`."""
    nfe: int | None = None
    """K, generator evaluations at sampling time. Default per kind: 1 for `1nfe`, 8 for `anystep`
    (the official any-step sampler); `multistep` must set it (its training grid has K steps)."""
    repeats: int = 1
    """R, weight-tied depth repetition of the generator's blocks (1, 2 or 4 in the paper)."""
    init: str | None = None
    """Where the method's generator starts: a registered generator, `models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, `runs:/RUN_ID/generator` or a local model folder (anything
    `tracking.registry.load_generator` takes). Method cafm only, and required there: a flow-matching
    (method fm, kind multistep) model of this run's size, data shape and classes, checked before launch
    (`train/preflight.py`) and again when the workers load it."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        for name in ("size", "d_size"):
            value = getattr(self, name)
            if value is not None and value not in SIZES:
                _fail(name, f"{value!r} is not a known size", f"use one of {sorted(SIZES)}")
        if self.method == "classifier":  # one DiT of `size`: the generator's options do not apply
            for name, default, why in (("d_size", None, "has no discriminator"),
                                       ("kind", "1nfe", "is not a generator"),
                                       ("nfe", 1, "samples nothing"),
                                       ("repeats", 1, "has no depth repetition")):
                value = getattr(self, name)
                if value is not None and value != default:
                    _fail(name, f"{value!r} with method classifier, which {why}",
                          f"remove model.{name} (the classifier is one DiT of model.size)")
        if self.method == "fm":  # kind multistep is its default (METHOD_DEFAULTS)
            if self.kind != "multistep":
                _fail("kind", f"{self.kind!r} with method fm", "flow matching trains a velocity field: set "
                      "model.kind=multistep (or leave it unset)")
            if self.nfe is None:
                _fail("nfe", "is not set for method fm", "set model.nfe=K, the Euler steps the registered model "
                      "samples with (evaluate more K with eval.nfe: [1, 2, 4, ...])")
        if self.method == "cafm":
            if self.kind != "multistep":  # multistep is its default (METHOD_DEFAULTS)
                _fail("kind", f"{self.kind!r} with method cafm", "CAFM post-trains a flow-matching velocity model, "
                      "sampled with K Euler steps: set model.kind=multistep (or leave it unset)")
            if self.nfe is None:
                _fail("nfe", "is not set for method cafm", "set model.nfe=K, the Euler steps the registered model "
                      "samples with")
            if not self.init:
                _fail("init", "is not set for method cafm, which post-trains a flow-matching model", CAFM_INIT_FIX)
            if self.d_size is not None and self.d_size != self.size:
                _fail("d_size", f"{self.d_size!r} with method cafm, whose D is built from G's own trunk",
                      "remove model.d_size")
        elif self.init is not None:
            _fail("init", f"is set with method {self.method}; only method cafm starts from a registered model",
                  "remove model.init (or set model.method=cafm)")
        if self.method == "meanflow" and self.kind != "anystep":  # anystep is its default (METHOD_DEFAULTS)
            _fail("kind", f"{self.kind!r} with method meanflow", "MeanFlow's network embeds two times (the "
                  "average velocity from r to t): set model.kind=anystep (or leave it unset)")
        if self.repeats < 1:
            _fail("repeats", f"R={self.repeats} < 1", "use R >= 1 (1 = no depth repetition)")
        if self.repeats > 1 and self.kind != "1nfe":
            _fail("repeats", f"R={self.repeats} with kind {self.kind}", "depth repetition is for 1NFE generators "
                  "(the paper's 56/112-layer models): use model.kind=1nfe with R > 1, or R=1")
        if self.nfe is None:
            if self.kind == "multistep":
                _fail("nfe", "is not set for kind multistep", "set model.nfe=K, the number of steps (2 or 4 in "
                      "the paper)")
            self.nfe = 8 if self.kind == "anystep" else 1
        if self.nfe < 1:
            _fail("nfe", f"K={self.nfe} < 1", "use K >= 1")
        if self.kind == "1nfe" and self.nfe != 1:
            _fail("nfe", f"K={self.nfe} with kind 1nfe", "set model.kind=multistep for K > 1, or nfe=1")
        return self


class OptimConfig(_Section):
    """AdamW for every engine (AFM: G and D with equal learning rates, as the paper; fm: the velocity
    field; classifier: the classifier), and the EMA of the trained network. Method classifier has
    the official classifier trainer's defaults (`METHOD_DEFAULTS`)."""

    lr: Number = 1e-4
    """Base learning rate; G's is multiplied by 1/R for depth-repeated generators."""
    betas: NumberPair = (0.0, 0.9)
    weight_decay: Number = 0.01
    eps: Number = 1e-8
    grad_clip: Number = 0.0
    """Global gradient-norm clip per engine; 0 disables clipping."""
    ema_decay: Number = 0.9999
    """EMA decay of the generator's weights (the sampled model), or the classifier's under method
    classifier (the evaluated, registered and shipped classifier)."""
    ema_warmup: bool = False
    """Use decay min(ema_decay, (1 + k) / (10 + k)) at update k (`advflow.trainers.ema.EMA`), so a
    short run's EMA is not dominated by the initial weights (the official trainers do not; the CPU
    classifier demo does)."""

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.lr <= 0:
            _fail("lr", "must be > 0", "use e.g. 1e-4")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            _fail("betas", f"{list(self.betas)} are not both in [0, 1)", "use e.g. [0.0, 0.9] (AFM) or "
                  "[0.9, 0.95] (classifier)")
        if self.weight_decay < 0:
            _fail("weight_decay", "is negative", "use a decay >= 0, e.g. 0.01")
        if self.eps <= 0:
            _fail("eps", "must be > 0", "use e.g. 1e-8")
        if self.grad_clip < 0:
            _fail("grad_clip", "is negative", "use 0 (no clipping) or a positive norm, e.g. 50")
        if not (0 <= self.ema_decay < 1):
            _fail("ema_decay", f"{self.ema_decay} is outside [0, 1)", "use e.g. 0.9999 (AFM) or 0.9995 (classifier)")
        return self


class AdversarialConfig(_Section):
    """Loss weights (lambda in the paper). `ot_scale` is a number or a schedule mapping."""

    ot_scale: Any = 0.2
    """lambda_ot: a constant, or {kind: cosine|linear|constant, start, end, steps}."""
    gp_scale: Number = 0.25
    """lambda_gp for the finite-difference R1 (real) and R2 (fake) penalties."""
    gp_fraction: Number = 0.25
    """Fraction of each batch the penalties are computed on."""
    gp_eps: Number = 0.01
    """Finite-difference step for R1/R2."""
    cp_scale: Number = 0.01
    """lambda_cp, logit centering."""
    gradnorm: bool = True
    """Normalise the adversarial gradient reaching G (makes lambda_ot transfer across sizes)."""
    gradnorm_momentum: Number = 0.9
    source: PairSource = "same"
    """Multi-step/any-step pairing: `same` (official) builds G's source x_s and D's real target x_t
    from the same image and label with independent noises; `permute` pairs each real with another
    image of the batch (and that image's label). 1NFE ignores it (its source is the noise)."""

    # ot_scale (number or schedule) is checked with the phase plan, see `RunSpec._check_across_sections`.
    @model_validator(mode="after")
    def _check(self) -> AdversarialConfig:
        if not (0 < self.gp_fraction <= 1):
            _fail("gp_fraction", f"{self.gp_fraction} is outside (0, 1]", "use e.g. 0.25")
        if self.gp_eps <= 0:
            _fail("gp_eps", "must be > 0", "use e.g. 0.01")
        for name in ("gp_scale", "cp_scale"):
            if getattr(self, name) < 0:
                _fail(name, "is negative", "use a weight >= 0")
        return self


class MeanFlowConfig(_Section):
    """method `meanflow` (Geng et al., arXiv 2505.13447): the loss's settings, those of
    `advflow.trainers.meanflow.MeanFlowConfig` (the pure loss's; tests/test_meanflow_platform.py checks
    the defaults agree), with the official ImageNet defaults (Gsunshine/meanflow `configs/default.py`)
    except CFG, off by default (AFM uses none). Times are in MeanFlow's own notation:
    the network predicts the average velocity u(z_t, r, t) from r to t <= 1 (noise at 1)."""

    time_mean: Number = -0.4
    """Logit-normal mean of the (r, t) draws."""
    time_std: Number = 1.0
    """Logit-normal standard deviation of the (r, t) draws."""
    ratio_r_neq_t: Number = 0.25
    """Share of samples with r != t (the rest train the instantaneous velocity, r = t: flow matching)."""
    power: Number = 1.0
    """Adaptive loss weight 1 / (||delta||^2 + eps)^power; 0 = the plain squared error."""
    eps: Number = 0.01
    """The adaptive weight's constant c."""
    cfg_omega: Number = 1.0
    """CFG scale omega of the training target (the paper's class-conditional setting); 1 = no guidance."""
    cfg_kappa: Number = 0.0
    """kappa of the paper's CFG mixing (its appendix); 0 = the plain CFG target."""
    class_drop: Number = 0.0
    """Share of labels replaced by the null label (the generator gets a null-label row); needed by CFG."""
    variant: MeanFlowVariant = "meanflow"
    """`meanflow` (the paper) or `imf` (Improved MeanFlow, arXiv 2512.02012; see trainers/meanflow.py)."""

    @model_validator(mode="after")
    def _check(self) -> MeanFlowConfig:
        if self.time_std <= 0:
            _fail("time_std", "must be > 0", "use e.g. 1.0")
        for name in ("ratio_r_neq_t", "class_drop"):
            if not (0 <= getattr(self, name) <= 1):
                _fail(name, f"{getattr(self, name)} is outside [0, 1]", "use a share, e.g. 0.25 (ratio) or 0.1 (drop)")
        if self.class_drop == 1:
            _fail("class_drop", "1 drops every label", "use e.g. 0.1")
        if self.power < 0:
            _fail("power", "is negative", "use 1.0 (the paper) or 0 (plain squared error)")
        if self.eps <= 0:
            _fail("eps", "must be > 0", "use e.g. 1e-3")
        if self.guided and self.class_drop == 0:
            _fail("class_drop", f"is 0 with cfg_omega {self.cfg_omega} / cfg_kappa {self.cfg_kappa}: guidance needs "
                  "an unconditional velocity, which only trains on dropped labels", "set e.g. class_drop=0.1, or "
                  "cfg_omega=1 and cfg_kappa=0")
        return self

    @property
    def guided(self) -> bool:
        return self.cfg_omega != 1 or self.cfg_kappa != 0

    def loss_config(self):
        """The pure loss's settings (`advflow.trainers.meanflow.MeanFlowConfig`; imports torch)."""
        from advflow.trainers.meanflow import MeanFlowConfig as LossConfig

        return LossConfig(**self.model_dump())


CAFM_INIT_FIX = ("register a flow-matching model first: python jobs/train.py --config ... --set model.method=fm "
                 "... with tracking.register_name, then set model.init=models:/NAME@ALIAS (or models:/NAME/VERSION, "
                 "runs:/RUN_ID/generator, a local model folder)")


class CAFMSection(_Section):
    """method `cafm` (continuous adversarial flow models, arXiv 2604.11521): the schedule and loss
    settings of `advflow.trainers.cafm.CAFMConfig` (tests/test_cafm_platform.py checks the defaults
    agree), with the official SiT-XL/2 defaults. The optimizer settings are `optim`'s (the method's
    defaults, `METHOD_DEFAULTS`, are the official lr 1e-5 for G and D, betas [0, 0.95], weight decay
    0, EMA 0.99 after each G step, grad clip 10000). Steps count optimizer updates: each iteration
    is ONE update, of D or of G (`trainers.cafm.step_kind`)."""

    warmup: int = 10000
    """D-only warm-up: iterations 0..warmup update D only (official 10000; JiT 5000)."""
    d_steps: int = 16
    """D updates per G update after the warm-up (a cycle of d_steps + 1 iterations, counted from 0)."""
    cp_scale: Number = 0.001
    """Weight of D's centering term mean(D(x_t, t)^2)."""
    ot_scale: Number = 0.0
    """Weight of G's mean(velocity^2) term."""
    class_drop: Number = 0.1
    """Probability of replacing a label by the null label, for G and D alike (G gets a null row)."""
    time_dist: CAFMTimeDist = "uniform"
    """Law of t: `uniform` (official SiT) or `logit_normal_jit` (official JiT: sigmoid(0.8 N(0, 1) + 0.8))."""

    @model_validator(mode="after")
    def _check(self) -> CAFMSection:
        if self.warmup < 0:
            _fail("warmup", f"{self.warmup} is negative", "use 0 (no D-only warm-up) or more, e.g. 10000")
        if self.d_steps < 1:
            _fail("d_steps", f"{self.d_steps} < 1", "use at least 1 D update per G update, e.g. 16")
        for name in ("cp_scale", "ot_scale"):
            if getattr(self, name) < 0:
                _fail(name, "is negative", "use a weight >= 0")
        if not (0 <= self.class_drop <= 1):
            _fail("class_drop", f"{self.class_drop} is outside [0, 1]", "use a probability, e.g. 0.1")
        return self

    def loss_config(self):
        """The pure algorithm's settings (`advflow.trainers.cafm.CAFMConfig`; imports torch). Its
        optimizer fields keep their defaults there: the engines take `optim`'s."""
        from advflow.trainers.cafm import CAFMConfig

        return CAFMConfig(**self.model_dump())


class ClassifierConfig(_Section):
    """method `classifier`: how the classifier is trained (its network is `model.size`)."""

    t_range: NumberPair = (0.0, 1.0)
    """Flow times the classifier is trained on: t ~ U(t_range) per sample, x_t = (1 - t) x + t z."""

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "size" in data:
            _fail("size", "moved", f"set model.size={data['size']} (with model.method=classifier) and remove "
                  "classifier.size")
        return data

    @model_validator(mode="after")
    def _check(self) -> ClassifierConfig:
        lo, hi = self.t_range
        if not (0.0 <= lo <= hi <= 1.0):
            _fail("t_range", f"{list(self.t_range)} is not an interval inside [0, 1]",
                  "use [lo, hi] with 0 <= lo <= hi <= 1, e.g. [0, 1]")
        return self


UNITS = ("train.steps, every *_every cadence, phase `start`s, `ema_reload_every` and schedule `steps` count "
         "ITERATIONS: one D update then one G update, each on its own batch of train.global_batch samples "
         "(2 x global_batch samples per iteration). The official AFM trainer counts one step per optimizer "
         "update (D or G), so official step S = iteration S/2: its lambda_ot cosine over 1M steps is 500k "
         "iterations here, and an ImageNet epoch (5005 official steps at batch 256) is 2502.5 iterations. "
         "Methods fm, meanflow and classifier train one network: their iteration (and train.steps) is ONE "
         "optimizer update on train.global_batch samples, as the official FM and classifier trainers count a "
         "step. Method cafm trains two, but its iteration is also ONE optimizer update, of D or of G "
         "(cafm.warmup D-only iterations, then cafm.d_steps D updates per G update), as the official CAFM "
         "trainer counts a step.")


class TrainConfig(_Section):
    """Loop lengths and cadences, counted in iterations: one D update then one G update, each on its
    own batch (see `UNITS`; an official "step" is half an iteration). Methods fm, meanflow, cafm (D or
    G) and classifier: one optimizer update per iteration."""

    steps: int = 1000
    """Iterations to train (AFM: one D update + one G update each; fm, meanflow, classifier: one update
    each; cafm: one update each, of D or of G)."""
    global_batch: int = 256
    """Samples per optimizer step summed over workers and accumulation micro-steps."""
    grad_accum: int = 1
    log_every: int = 10
    sample_every: int = 0
    """Save the EMA sample grid (samples.png) into the checkpoint at the first checkpoint at or after
    each multiple of N (0: only at the end; it is also saved whenever an MLflow grid is drawn at a
    checkpoint). Method classifier draws no samples: 0 only."""
    checkpoint_every: int = 100
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for name in ("steps", "global_batch", "grad_accum", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                _fail(name, f"must be >= 1, got {getattr(self, name)}", "use a positive integer")
        if self.sample_every < 0:
            _fail("sample_every", "is negative", "use 0 (end only) or a positive cadence")
        return self


# An environment variable's value: numbers are written as YAML gives them (NCCL_IB_DISABLE: 1).
EnvValue = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)]

# NCCL and PyTorch-NCCL variables a GPU cluster commonly sets (NCCL's "Environment Variables" page,
# PyTorch's ProcessGroupNCCL docs). Not a whitelist: any NCCL_*/TORCH_NCCL_* name passes, except a
# near miss of one of these, which is a typo that NCCL would silently ignore.
KNOWN_NCCL = (
    "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_IB_HCA",
    "NCCL_IB_GID_INDEX", "NCCL_IB_TIMEOUT", "NCCL_NET_GDR_LEVEL", "NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL",
    "NCCL_SHM_DISABLE", "NCCL_ALGO", "NCCL_PROTO", "NCCL_NSOCKS_PERTHREAD", "NCCL_SOCKET_NTHREADS",
    "NCCL_BUFFSIZE", "NCCL_CROSS_NIC", "NCCL_NVLS_ENABLE", "NCCL_CUMEM_ENABLE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT", "TORCH_NCCL_DUMP_ON_TIMEOUT",
    "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "TORCH_NCCL_ENABLE_MONITORING",
)
_NCCL_NAME = re.compile(r"(TORCH_)?NCCL_[A-Z0-9_]+")


def check_nccl_name(name: str) -> None:
    """Refuse a `distributed.nccl` key that is not an NCCL variable name or is a near miss of one."""
    import difflib

    field = f"nccl.{name}"
    if not _NCCL_NAME.fullmatch(name):
        _fail(field, "is not an NCCL variable name", "use NCCL_* or TORCH_NCCL_* in upper case, e.g. NCCL_DEBUG")
    if name not in KNOWN_NCCL and (near := difflib.get_close_matches(name, KNOWN_NCCL, n=1, cutoff=0.85)):
        _fail(field, f"looks like a misspelling of {near[0]} (NCCL ignores unknown names without a word)",
              f"write {near[0]}")


class DistributedConfig(_Section):
    """Ray Train workers and the DeepSpeed engines (AFM: G and D; fm and classifier: one, G's slot)."""

    workers: int = 1
    min_workers: int = 0
    """Elastic training under Ray Train: with 1 <= min_workers < workers, Ray runs the job on any
    number of workers in [min_workers, workers] that the cluster can place, and resizes the group
    (from the latest checkpoint) when nodes come or go (every method: its noise is drawn by the
    sample's row in the global batch). 0: exactly `workers`. Needs
    every count to divide `data.partitions`, and `train.global_batch` divisible by every count x grad_accum, so the
    global batch (and the run's numbers) stay the same whatever the count."""
    use_gpu: bool = False
    cpus_per_worker: int = 1
    zero_stage_g: int = 2
    """ZeRO stage (0, 1 or 2) of G's engine, or the classifier's under method classifier (fm: the
    velocity field's)."""
    zero_stage_d: int = 2
    """ZeRO stage (0, 1 or 2) of D's engine (method afm only)."""
    precision: Precision = "auto"
    """`auto` (bf16 on GPU, fp32 on CPU), `fp32` or `bf16`. Under bf16 the networks compute in bf16
    and DeepSpeed keeps an fp32 master of every weight (reloads write both, engines.write_weights);
    losses and their inputs stay fp32. bf16 also runs on CPU workers (slow without bf16 instructions;
    the tests use it to exercise the master-weight path)."""

    timeout_s: Number = 1800.0
    """The process group's timeout: a collective (all-reduce, barrier) that waits longer fails the step,
    so Ray Train restarts the group from the last checkpoint instead of the job hanging on a dead or
    wedged peer. Keep it above the longest gap between two collectives (a checkpoint load from S3, an
    evaluation on rank 0)."""
    nccl: dict[str, EnvValue] = Field(default_factory=dict)
    """NCCL / PyTorch-NCCL environment for the workers, set before the process group starts, e.g.
    `{NCCL_DEBUG: WARN, NCCL_SOCKET_IFNAME: eth0, NCCL_IB_DISABLE: "1",
    TORCH_NCCL_ASYNC_ERROR_HANDLING: "1"}` (infra/cluster/README.md lists the ones that matter on
    a GPU cluster). Names must be NCCL_* or TORCH_NCCL_*; a near miss of a known name is refused.
    On CPU workers (gloo) they are set but have no effect."""

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "zero_stage" in data:  # the old classifier recipes' one stage
            _fail("zero_stage", "moved", f"set distributed.zero_stage_g={data['zero_stage']} (G's engine, or the "
                  "classifier's under model.method classifier) and remove distributed.zero_stage")
        return data

    @model_validator(mode="after")
    def _check(self) -> DistributedConfig:
        if not self.timeout_s > 0:
            _fail("timeout_s", f"must be > 0 seconds, got {self.timeout_s}", "use e.g. 1800 (30 min)")
        for name in self.nccl:
            check_nccl_name(name)
        if self.workers < 1:
            _fail("workers", f"must be >= 1, got {self.workers}", "use at least one worker")
        if self.min_workers and not 1 <= self.min_workers < self.workers:
            _fail("min_workers", f"{self.min_workers} is not in [1, workers - 1 = {self.workers - 1}]",
                  "set it below distributed.workers for an elastic range, or 0 for a fixed size")
        for name in ("zero_stage_g", "zero_stage_d"):
            stage = getattr(self, name)
            if stage not in (0, 1, 2, 3):
                _fail(name, f"ZeRO stage {stage} does not exist", "use 0, 1 or 2")
            if stage == 3:
                _fail(name, "ZeRO-3 is refused: it partitions the parameters that the EMA update and the "
                      "evaluation read, and under AFM D runs inside G's step and G inside D's, so each engine's "
                      "parameters would be gathered by the other engine's hooks (DeepSpeed issues 4923/5639; "
                      "the equivalence test does not pass for it)", "use 0, 1 or 2")
        return self


class GuidanceConfig(_Section):
    """Classifier guidance (the paper's phase 4): the frozen time-conditioned classifier trained by
    a run of model.method classifier (`python jobs/train.py --config jobs/configs/digits_classifier.yaml`).
    Phases switch it on with `guidance: true` (and set lambda_cg, cg_t_range, augment_p)."""

    classifier: str | None = None
    """The classifier: `models:/NAME/VERSION`, `models:/NAME@alias`, `runs:/...`, or a local
    registered-model folder or classifier checkpoint folder (loaded pickle-free)."""
    t_mode: GuidanceTimeMode = "auto"
    """How t' is chosen: `uniform` (t' ~ U(cg_t_range), G's output re-noised to t': the paper's 1NFE
    guidance), `target` (t' = t for t in cg_t_range, G's output x_t fed as it is: multi-step), or
    `auto` (uniform for 1nfe, target for multistep/anystep)."""

    @model_validator(mode="after")
    def _check(self) -> GuidanceConfig:
        if self.classifier is not None and not self.classifier.strip():
            _fail("classifier", "is empty", "give a registry URI (models:/NAME/VERSION) or a folder, or remove it")
        return self


class RunStorageConfig(_Section):
    """The `run:` section: where a run stores checkpoints and how it survives failures.

    (Not `RunConfig`, which would read as `ray.train.RunConfig`; `ray_launch` builds that from this.)"""

    name: str = "afm"
    """The run's name under storage_path (with it, the run key); method classifier's default is
    `classifier` (`METHOD_DEFAULTS`), so its runs do not resume an AFM run's checkpoints."""
    storage_path: str = "runs"
    """Ray Train storage: a local directory or `s3://bucket/prefix`."""
    max_failures: int = 2
    """Worker-group restarts Ray Train attempts before the job fails."""
    keep_checkpoints: int = 2
    checkpoint_upload: CheckpointUpload = "async"
    """Under Ray Train: `async` uploads a checkpoint in a background thread while training goes on
    (Ray registers it only once every rank's upload finished, so a restart never sees half of one;
    a rollback first waits for uploads in flight), `sync` blocks every rank until the upload is
    done. The local launcher always copies synchronously."""

    @model_validator(mode="after")
    def _check(self) -> RunStorageConfig:
        if self.max_failures < 0 or self.keep_checkpoints < 1:
            _fail("max_failures/keep_checkpoints", "out of range", "use max_failures >= 0, keep >= 1")
        return self


class TrackingConfig(_Section):
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
    """Log a fixed-seed EMA sample grid every M iterations (0: at each checkpoint and the end). Method
    classifier logs no grids: 0 only."""
    register_name: str | None = None
    """Registered-model name for the EMA generator, or the EMA classifier under method classifier
    (None: log nothing to the registry)."""
    register_every: int = 0
    """Also register every N iterations (0: only at the end), at the first checkpoint at or after
    each multiple of N (checkpoints are where every rank's state is consistent)."""
    system_metrics: bool = True
    """MLflow system metrics (CPU, memory, disk, network; GPU when pynvml is installed)."""
    system_metrics_interval: Number = 10.0
    """Seconds between system-metric samples."""
    live_metrics: bool = True
    """Export the loop's numbers live through Ray's Prometheus endpoint (`ray.util.metrics`; names in
    platform/tracking/live.py), for Ray's Metrics view and the Grafana dashboards in dashboards/grafana/.
    A no-op where the process is not connected to Ray."""

    @model_validator(mode="after")
    def _check(self) -> TrackingConfig:
        if self.image_every < 0 or self.register_every < 0:
            _fail("image_every/register_every", "is negative", "use 0 or a positive cadence")
        if self.system_metrics_interval <= 0:
            _fail("system_metrics_interval", "must be > 0", "use e.g. 10 (seconds)")
        return self


class EvalConfig(_Section):
    """Periodic sample quality, reported with checkpoints (the metric sweeps and ASHA use).

    kind `digits`: Fréchet distance in the feature space of the project's digit classifier against
    the held-out digits (plus its floor and class-conditional accuracy). kind `fid`: FID with Inception
    weights and reference statistics the user provides by path. kind `accuracy` (method classifier
    only): accuracy and cross-entropy of the EMA classifier at the fixed flow times `times`, on
    `split`, logged as `eval/acc_t0.00`, `eval/loss_t0.00`, ... (`time_key`)."""

    kind: EvalKind = "none"
    """`none`, a sample-quality evaluator of `advflow.platform.eval.EVALUATORS` (`digits`, `fid`;
    methods afm and fm) or `accuracy` (method classifier)."""
    every: int = 0
    """Evaluate every N iterations, at the first checkpoint at or after each multiple of N (metrics
    reach Ray/Tune with checkpoints); 0: only at the end."""
    num_samples: int = 1000
    """Generated samples per evaluation (class-balanced, fixed seeds); kind accuracy: records in the
    fixed training batch (split train; the held-out split is used whole)."""
    batch_size: int = 250
    inception_path: str | None = None
    """kind `fid`: path to the FID Inception weights (pt_inception-2015-12-05 state dict)."""
    reference_stats: str | None = None
    """kind `fid`: .npz with `mu` and `sigma` of the reference set."""
    pr_k: int = 3
    """kinds `digits` and `fid`: k of improved precision and recall (Kynkaanniemi et al. 2019: each
    reference or generated feature's ball reaches its k-th nearest neighbour; the paper's k = 3)."""
    nfe: IntList | None = None
    """Sampling steps K to evaluate at, each reported as `<metric>@K` (e.g. `eval/fd@4`); the
    unsuffixed metrics are always those at the model's own K (`model.nfe`). Several K need a model
    that can sample with any K: method `fm` (Euler) or kind `anystep`. None: the model's K only."""
    times: list[Number] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    """kind accuracy: the flow times t evaluated at (0 = clean inputs); the noise is fixed across
    evaluations."""
    split: EvalSplit = "auto"
    """kind accuracy: `auto` (the dataset's held-out split if it has one, else a fixed training
    batch), `heldout` (fail without one) or `train` (a fixed batch of `num_samples` training records)."""

    # What to set a field to, for the error when a kind requires it (`EVALUATORS[kind].required`).
    _SET_TO: typing.ClassVar[dict[str, str]] = {
        "inception_path": "the Inception weights (.pth/.safetensors)",
        "reference_stats": "the reference .npz (mu, sigma)",
    }

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.every < 0:
            _fail("every", "is negative", "use 0 (end only) or a positive cadence")
        if self.nfe is not None and (not self.nfe or min(self.nfe) < 1 or len(set(self.nfe)) != len(self.nfe)):
            _fail("nfe", f"{self.nfe!r} is not a list of distinct K >= 1", "use e.g. [1, 2, 4, 8]")
        if self.num_samples < 2 or self.batch_size < 1:
            _fail("num_samples/batch_size", "too small", "use num_samples >= 2 and batch_size >= 1")
        if self.pr_k < 1:
            _fail("pr_k", f"{self.pr_k} < 1", "use k >= 1 (the paper's 3)")
        if self.kind in EVALUATORS and self.pr_k >= self.num_samples:
            _fail("pr_k", f"{self.pr_k} >= num_samples {self.num_samples}: no sample has k neighbours",
                  "use a k well below num_samples, e.g. 3")
        if not self.times:
            _fail("times", "is empty", "list at least one time, e.g. [0, 0.25, 0.5, 0.75]")
        bad = [t for t in self.times if not 0.0 <= t <= 1.0]
        if bad:
            _fail("times", f"{bad} outside [0, 1]", "use flow times in [0, 1] (0 = clean data, 1 = noise)")
        keys = [time_key(t) for t in self.times]
        if len(set(keys)) != len(keys):
            _fail("times", f"{self.times} name the same metric twice at two decimals", "use distinct times")
        required = EVALUATORS[self.kind].required if self.kind in EVALUATORS else ()
        if not all(getattr(self, name) for name in required):
            needs = "it" if len(required) == 1 else "both" if len(required) == 2 else f"all {len(required)}"
            to = " and ".join(self._SET_TO.get(name, f"a {name}") for name in required)
            _fail("/".join(required), f"kind {self.kind} needs {needs}",
                  f"set {'it' if len(required) == 1 else 'them'} to {to}")
        return self


class WatchdogConfig(_Section):
    """Divergence watchdog (`advflow.trainers.watchdog`): on non-finite losses or gradients,
    exploding D logits, a gradient-norm spike or a sustained rise of the evaluation metric, every
    rank rolls back to the last checkpoint that passed every check, skips `skip_batches` batches of
    each data stream (a new data order from there on), reseeds its noise, optionally scales the
    learning rate by `lr_factor`, and goes on. After `max_rollbacks` the next trigger fails the run
    with a message naming the trigger, the step and the checkpoint. Checked at every metric window
    (`train.log_every`) and evaluation; a checkpoint is only written, reported or registered after
    its window passed."""

    enabled: bool = True
    max_rollbacks: int = 3
    logit_bound: Number = 1e4
    """|mean D logit| above this (or the logit-centering term above its square) is divergence."""
    grad_spike: Number = 0.0
    """A gradient norm above this many times the median of the last `grad_window` norms (0: off,
    the default: AFM's D gradient norm moves over orders of magnitude in healthy runs, e.g. a digits
    R=4 run at 330x its recent median with no divergence; clipping bounds the step anyway)."""
    grad_window: int = 50
    rise_patience: int = 0
    """Evaluations in a row worse than the best by more than `rise_tolerance` that trigger (0: off,
    the default: on digits, the planned end of the lambda_ot decay raised eval/fd 2-3x for 2
    evaluations, and R=2 runs rose and failed to recover). The best is reset when a phase starts.
    The rollback goes to the checkpoint before the rise, so keep enough (`run.keep_checkpoints` >
    rise_patience x checkpoints per evaluation); a target no longer kept fails the run with that fix."""
    rise_tolerance: Number = 0.5
    skip_batches: int = 7
    """Batches of each data stream skipped after each rollback (changes the data order; resumable)."""
    lr_factor: Number = 1.0
    """Learning rate multiplier applied per rollback (1: unchanged; e.g. 0.5 halves it each time)."""

    @model_validator(mode="after")
    def _check(self) -> WatchdogConfig:
        if self.max_rollbacks < 0 or self.grad_window < 1 or self.rise_patience < 0 or self.skip_batches < 0:
            _fail("max_rollbacks/grad_window/rise_patience/skip_batches", "out of range",
                  "use max_rollbacks >= 0, grad_window >= 1, rise_patience >= 0, skip_batches >= 0")
        if self.logit_bound <= 0 or self.grad_spike < 0 or self.rise_tolerance < 0:
            _fail("logit_bound/grad_spike/rise_tolerance", "out of range", "use logit_bound > 0, grad_spike >= 0 "
                  "(0: off), rise_tolerance >= 0")
        if not 0 < self.lr_factor <= 1:
            _fail("lr_factor", f"{self.lr_factor} is outside (0, 1]", "use 1 (keep the lr) or e.g. 0.5")
        return self


class AutoPhasesConfig(_Section):
    """`phases: auto`: Table 11's phases advanced by a plateau of the evaluation metric
    (`advflow.trainers.schedules.AutoPhases`), decided at evaluations (`eval.every`)."""

    metric: str | None = None
    """The metric to watch; None: the evaluator's primary (`eval/fd` on digits, `eval/fid`)."""
    mode: AutoMode = "min"
    """`min` (lower is better) or `max`."""
    patience: int = 3
    """Evaluations in a row without a `min_delta` improvement that end a phase."""
    min_delta: Number = 0.02
    """Relative improvement on the best value that counts (0.02 = 2 %)."""
    min_phase_steps: int = 0
    """No phase ends before it ran this many iterations."""
    ema_reload_every: int = 100
    """Default templates: the EMA-reload phase copies EMA(G) into G every N iterations (the paper:
    once per epoch)."""
    templates: list[dict] | None = None
    """The phases in order, without `start`. None: Table 11's order, from the top-level settings:
    `decay` (optim.lr, adversarial.ot_scale), `ema` (0.8 lr, lambda_ot fixed at the schedule's end,
    EMA reload), `low_lr` (0.3 lr, D reloaded from the best evaluation so far: d_reload_from best),
    and `guided` (classifier guidance, only when guidance.classifier is set)."""

    @model_validator(mode="after")
    def _check(self) -> AutoPhasesConfig:
        if self.patience < 1 or self.min_phase_steps < 0 or self.min_delta < 0 or self.ema_reload_every < 1:
            _fail("patience/min_phase_steps/min_delta/ema_reload_every", "out of range",
                  "use patience >= 1, min_phase_steps >= 0, min_delta >= 0, ema_reload_every >= 1")
        return self


class DebugConfig(_Section):
    """Fault injection for tests and debugging only (never set in a recipe)."""

    inject_nan_step: int | None = None
    """Make G's loss NaN at this iteration (the watchdog's test)."""
    inject_nan_attempts: int = 1
    """How many attempts at that iteration get the NaN: 1 = only the first (a rollback then gets
    past it); 0 = every attempt (the run must fail once the rollbacks are used up)."""

    @model_validator(mode="after")
    def _check(self) -> DebugConfig:
        if self.inject_nan_step is not None and self.inject_nan_step < 0:
            _fail("inject_nan_step", "is negative", "use an iteration >= 0 or remove it")
        if self.inject_nan_attempts < 0:
            _fail("inject_nan_attempts", "is negative", "use 1 (first attempt) or 0 (every attempt)")
        return self


# ----------------------------------------------------------------------------- method defaults

# What a method changes in the defaults: section -> field -> value, put into the user's dict before
# validation for every field the user did not give (`RunSpec.from_dict`). The classifier's are the
# official classifier trainer's settings; its run name keeps its run key apart from an AFM run's.
METHOD_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "afm": {},
    "fm": {"model": {"kind": "multistep"}},  # FM's network: one time embedding, stepped by Euler
    "meanflow": {"model": {"kind": "anystep", "nfe": 1}},  # u(z_t, r, t) embeds two times; one step
    "cafm": {  # the FM velocity model it post-trains; the official SiT config's optimizers (trainers/cafm.py)
        "model": {"kind": "multistep"},
        "optim": {"lr": 1e-5, "betas": [0.0, 0.95], "weight_decay": 0.0, "ema_decay": 0.99, "grad_clip": 10000.0},
    },
    "classifier": {  # the official classifier trainer's (the paper's classifier is a DiT-B/2)
        "model": {"size": "B/2"},
        "optim": {"betas": [0.9, 0.95], "grad_clip": 50.0, "ema_decay": 0.9995},
        "run": {"name": "classifier"},
        "eval": {"kind": "accuracy"},
    },
}


def _with_method_defaults(raw: dict) -> dict:
    """`raw` with `METHOD_DEFAULTS[model.method]` under every key it leaves out (a copy; a section that
    is not a mapping is left as it is, for validation to report)."""
    model = raw.get("model")
    method = model.get("method", "afm") if isinstance(model, dict) else None
    defaults = METHOD_DEFAULTS.get(method) if isinstance(method, str) else None
    if not defaults:
        return raw
    out = dict(raw)
    for section, values in defaults.items():
        given = out.get(section)
        if given is None:
            given = {}
        if isinstance(given, dict):
            out[section] = {**copy.deepcopy(values), **given}
    return out


class RunSpec(BaseModel):
    """A whole run, of any `model.method`. Load with `load_config(path, overrides)`."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    # `RunSpec()` (all defaults, e.g. to read a default value) stays constructible although the default
    # data.prefix is empty: the default is built unvalidated. `from_dict` validates every section,
    # also those the YAML leaves out.
    data: DataConfig = Field(default_factory=DataConfig.model_construct)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    meanflow: MeanFlowConfig = Field(default_factory=MeanFlowConfig)
    cafm: CAFMSection = Field(default_factory=CAFMSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    run: RunStorageConfig = Field(default_factory=RunStorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    auto_phases: AutoPhasesConfig = Field(default_factory=AutoPhasesConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)
    phases: list[dict] | str = Field(default_factory=list)
    """Table-11-style phases (see `advflow.trainers.schedules.PhasePlan`); empty = one phase;
    `auto` = placed by the plateau rule of the `auto_phases` section."""

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, raw: dict) -> RunSpec:
        """Build and validate a spec from the YAML's nested dict (the method's defaults,
        `METHOD_DEFAULTS`, fill in what it leaves out); raises ConfigError."""
        raw = raw or {}
        if isinstance(raw, dict):
            _check_finite(raw)
            raw = {**{name: {} for name in _SECTIONS}, **raw}  # validate omitted sections' defaults too
            raw = _with_method_defaults(raw)
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise _config_error(err, raw) from None

    def to_dict(self) -> dict:
        """The nested dict (`from_dict(spec.to_dict())` rebuilds the spec; `betas` stays a tuple)."""
        return self.model_dump()

    def revalidate(self) -> None:
        """Re-run every check, e.g. after fields were assigned; raises ConfigError. (Not `validate`,
        which is pydantic's deprecated classmethod.)"""
        type(self).from_dict(self.to_dict())

    # ------------------------------------------------------------------ validation across sections

    @field_validator("phases")
    @classmethod
    def _check_phases(cls, phases: list[dict] | str) -> list[dict] | str:
        if isinstance(phases, str):
            if phases != "auto":
                raise ConfigError(f": {phases!r} is not a phase list; give a list of phases, or `auto`")
            return phases
        for i, phase in enumerate(phases):
            if isinstance(phase.get("d_reload_from"), int):
                _fail(f"[{i}].d_reload_from", "a step number is not supported",
                      "name a phase-end snapshot instead, e.g. d_reload_from: decay_end")
        return phases

    @model_validator(mode="after")
    def _check_across_sections(self) -> RunSpec:
        t, d = self.train, self.distributed
        if t.global_batch % (d.workers * t.grad_accum):
            _fail("train.global_batch", f"{t.global_batch} is not divisible by workers x grad_accum = "
                  f"{d.workers} x {t.grad_accum}", "pick a global batch that is a multiple of their product")
        if d.min_workers:
            odd = [w for w in range(d.min_workers, d.workers + 1) if t.global_batch % (w * t.grad_accum)]
            if odd:
                _fail("distributed.min_workers", f"train.global_batch {t.global_batch} is not divisible by "
                      f"{odd} workers x grad_accum {t.grad_accum}, and Ray may pick any count in "
                      f"[{d.min_workers}, {d.workers}]", "narrow the range or pick a global batch every "
                      "count divides (e.g. a multiple of their least common multiple)")
        self._check_partitions()
        self._check_method_and_eval()
        if self.phases == "auto":
            self._check_auto_phases()
        guided = [p.get("name", f"phase{i + 1}") for i, p in enumerate(self.phase_dicts()) if p.get("guidance")]
        if guided and not self.guidance.classifier:
            _fail("guidance.classifier", f"phase(s) {guided} turn guidance on but no classifier is set",
                  f"train one with {CLASSIFIER_COMMAND} and set guidance.classifier=models:/NAME/VERSION "
                  "(or a classifier folder)")
        # Schedules and phases are validated by their own types (built here and discarded; the
        # trainer builds its own from the same data); re-raise with the field path.
        from advflow.trainers.schedules import AutoPhases, PhasePlan

        try:
            if self.phases == "auto":
                a = self.auto_phases
                AutoPhases.from_spec(self.auto_templates(), self.phase_base(), patience=a.patience,
                                     min_delta=a.min_delta, min_phase_steps=a.min_phase_steps, mode=a.mode)
            else:
                PhasePlan.from_spec(self.phase_dicts(), self.phase_base())
        except ValueError as err:
            raise ConfigError(f"phases / adversarial.ot_scale: {err}") from None
        return self

    def _check_method_and_eval(self) -> None:
        m, ev = self.model, self.eval
        if m.method == "classifier":
            self._check_classifier()
        elif ev.kind == "accuracy":
            _fail("eval.kind", f"accuracy with method {m.method}", "accuracy evaluates a classifier "
                  "(model.method: classifier); evaluate a generator with " + _one_of(list(EVALUATORS)))
        if m.method == "cafm" and self.train.steps <= self.cafm.warmup + self.cafm.d_steps:
            _fail("cafm.warmup", f"{self.cafm.warmup} D-only iterations (then {self.cafm.d_steps} D updates per G "
                  f"update) leave no G update in train.steps {self.train.steps}, so the generator is never "
                  "post-trained", "lower cafm.warmup (the official 10000 is for ImageNet) or raise train.steps")
        if m.method in ("fm", "meanflow", "cafm") and self.phases == "auto":
            _fail("phases", "auto is for method afm (its templates fix lambda_ot and reload D)",
                  f"give {m.method} an explicit phase list, or none")
        if ev.nfe is not None and m.method == "afm" and m.kind != "anystep" and set(ev.nfe) != {m.nfe}:
            _fail("eval.nfe", f"{ev.nfe} for a {m.kind} AFM generator, which samples with exactly K={m.nfe}",
                  f"remove eval.nfe or set it to [{m.nfe}]; several K need method fm or kind anystep")
        if m.method in ("fm", "meanflow", "cafm"):
            bad = [p.get("name", f"phase{i + 1}") for i, p in enumerate(self.phase_dicts())
                   if p.get("guidance") or p.get("d_reload_from") is not None]
            if bad:
                why = "its D takes no snapshots and no guidance" if m.method == "cafm" else "no discriminator"
                _fail("phases", f"phase(s) {bad} use guidance or a D reload, which method {m.method} has no use "
                      f"for ({why})", "drop those keys; its phases may set lr and ema_reload_every")

    def _check_classifier(self) -> None:
        """What method classifier has no use for: it trains one network in one phase at optim.lr,
        is not guided, draws no samples and is evaluated by its accuracy."""
        if self.phases == "auto":
            _fail("phases", "auto with method classifier, which trains in one phase at optim.lr",
                  "remove phases (set optim.lr)")
        if self.phases:
            guided = [p.get("name", f"phase{i + 1}") for i, p in enumerate(self.phases) if p.get("guidance")]
            if guided:
                _fail("phases", f"phase(s) {guided} turn guidance on under method classifier (guidance uses a "
                      "trained classifier; the classifier itself is not guided)", "remove the phases")
            _fail("phases", "a phase list with method classifier, which trains in one phase at optim.lr",
                  "remove phases (set optim.lr)")
        if self.guidance.classifier:
            _fail("guidance.classifier", "is set under method classifier, which trains the classifier that "
                  "guidance loads (it is not guided itself)", "remove it (an AFM run loads the trained classifier "
                  "with guidance.classifier)")
        if self.train.sample_every:
            _fail("train.sample_every", "method classifier draws no samples", "remove it (or set 0)")
        if self.tracking.image_every:
            _fail("tracking.image_every", "method classifier logs no image grids", "remove it (or set 0)")
        if self.eval.kind not in ("none", "accuracy"):
            _fail("eval.kind", f"{self.eval.kind} measures generated samples, and method classifier draws none",
                  "use accuracy (or none)")
        if self.eval.nfe is not None:
            _fail("eval.nfe", "method classifier samples nothing", "remove it")
        if self.distributed.zero_stage_d != DistributedConfig.model_fields["zero_stage_d"].default:
            _fail("distributed.zero_stage_d", "method classifier has one DeepSpeed engine",
                  "set distributed.zero_stage_g instead")

    def _check_auto_phases(self) -> None:
        if self.eval.kind == "none":
            _fail("phases", "auto needs an evaluation metric, but eval.kind is none",
                  "set eval.kind (digits or fid) and eval.every (the decision cadence)")
        if self.eval.every < 1:
            _fail("eval.every", "is 0, so phases: auto would see one evaluation at the end only",
                  "set eval.every to the cadence the plateau rule decides at, e.g. 250")
        metric, primary = self.auto_phases.metric, self._primary_metric()
        if metric is not None and metric != primary and not metric.startswith("eval/"):
            _fail("auto_phases.metric", f"{metric!r} is not an evaluation metric", f"use {primary} (or leave it unset)")

    # ------------------------------------------------------------------ derived (data only; nothing is built here)

    def _primary_metric(self) -> str:
        """The evaluation's primary metric, lower is better: the evaluator's (`EVALUATORS[kind].primary`),
        for kind accuracy the cross-entropy at the first of `eval.times`, else `eval/fd`."""
        kind = self.eval.kind
        if kind in EVALUATORS:
            return EVALUATORS[kind].primary
        if kind == "accuracy":
            return f"eval/loss_{time_key(self.eval.times[0])}"
        return "eval/fd"

    @property
    def auto_metric(self) -> str:
        """The metric `phases: auto` and the watchdog's rise check watch (the evaluator's primary)."""
        return self.auto_phases.metric or self._primary_metric()

    def phase_base(self) -> dict:
        """The top-level settings the first phase (or the first auto template) inherits what it leaves
        out from: {lr, lambda_ot, lambda_gp, lambda_cp} from `optim` and `adversarial`."""
        return {"lr": self.optim.lr, "lambda_ot": self.adversarial.ot_scale,
                "lambda_gp": self.adversarial.gp_scale, "lambda_cp": self.adversarial.cp_scale}

    def auto_templates(self) -> list[dict]:
        """The phase templates of `phases: auto` (see AutoPhasesConfig.templates), without `phase_base`."""
        a = self.auto_phases
        if a.templates is not None:
            return [dict(t) for t in a.templates]
        from advflow.trainers.schedules import Schedule

        lr = self.optim.lr
        ot = Schedule.coerce(self.adversarial.ot_scale, "adversarial.ot_scale")
        out = [{"name": "decay"},
               {"name": "ema", "lr": 0.8 * lr, "lambda_ot": ot.end if ot.end is not None else ot.start,
                "ema_reload_every": a.ema_reload_every},
               {"name": "low_lr", "lr": 0.3 * lr, "d_reload_from": "best"}]
        if self.guidance.classifier:
            out.append({"name": "guided", "guidance": True, "lambda_cg": 0.003, "cg_t_range": [0.0, 0.1],
                        "augment_p": 0.4})
        return out

    def phase_dicts(self) -> list[dict]:
        """The explicit phases, or the auto templates (without starts); without `phase_base`."""
        return self.auto_templates() if self.phases == "auto" else [dict(p) for p in self.phases]

    @property
    def cg_t_mode(self) -> str:
        """The resolved guidance time mode (`guidance.t_mode`, `auto` by model kind)."""
        mode = self.guidance.t_mode
        return ("uniform" if self.model.kind == "1nfe" else "target") if mode == "auto" else mode

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_for(self.distributed.workers)

    def micro_batch_for(self, world_size: int) -> int:
        """Samples per worker and micro-step on `world_size` workers (elastic runs: the actual
        count; the global batch stays `train.global_batch`)."""
        t = self.train
        assert t.global_batch % (world_size * t.grad_accum) == 0, (t.global_batch, world_size, t.grad_accum)
        return t.global_batch // (world_size * t.grad_accum)

    @property
    def partitions(self) -> int:
        """V of the data order: `data.partitions`, with `auto` resolved (`auto_partitions`)."""
        v = self.data.partitions
        return auto_partitions(self.train.global_batch // self.train.grad_accum) if v == "auto" else v

    def _check_partitions(self) -> None:
        t, d, v = self.train, self.distributed, self.partitions
        draw = t.global_batch // t.grad_accum
        if draw % v:
            _fail("data.partitions", f"{v} does not divide the {draw} records of one micro-step (train.global_batch "
                  f"{t.global_batch} / grad_accum {t.grad_accum}), so the partitions cannot give out equal shares",
                  f"use a divisor of {draw}, e.g. {auto_partitions(draw)} (or auto)")
        counts = range(d.min_workers or d.workers, d.workers + 1)
        odd = [w for w in counts if v % w]
        if odd:
            fits = [w for w in range(1, v + 1) if v % w == 0]
            _fail("distributed.workers" if len(counts) == 1 else "distributed.min_workers",
                  f"{odd} worker(s) do not divide data.partitions {v}: each worker owns whole partitions",
                  f"use a number of workers in {fits}, or a data.partitions that the counts divide")


_SECTIONS = [name for name, f in RunSpec.model_fields.items()
             if isinstance(f.annotation, type) and issubclass(f.annotation, _Section)]


def _non_finite(node: Any, loc: tuple = ()):
    """(loc, value) of every NaN or infinite float in a nested dict/list, in document order."""
    if isinstance(node, float) and not math.isfinite(node):
        yield loc, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _non_finite(value, (*loc, key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _non_finite(value, (*loc, i))


def _check_finite(raw: dict) -> None:
    """Refuse a NaN or infinity (YAML `.nan`, `.inf`, `1.0e999`; `--set optim.lr=.nan`) at its own
    field, before any validator sees it: NaN compares false with everything, so a range check such
    as `lr <= 0` lets it through and a later, derived check (the phase plan) would take the blame.
    One walk over the user's dict covers every field, list element and schedule or phase value.
    A key the spec does not know is left to pydantic, which names it as unknown."""
    for loc, value in _non_finite(raw):
        if loc[0] in _SECTIONS:
            if len(loc) < 2 or loc[1] not in RunSpec.model_fields[loc[0]].annotation.model_fields:
                continue
        elif loc[0] not in RunSpec.model_fields:
            continue
        info = _field_at(loc)
        default = info.default if info is not None else None
        example = (f" (the default is {default})" if isinstance(default, (int, float)) and not isinstance(default, bool)
                   else "")
        raise ConfigError(f"{_path(loc)}: {value} is not a finite number; set a finite value{example}")


# ----------------------------------------------------------------------------- pydantic errors -> ConfigError

# pydantic error type -> what the field expected (the input is appended: "expected an integer, got 'abc'").
_EXPECTED = {"int_type": "an integer", "bool_type": "true/false", "float_type": "a number", "string_type": "a string"}


def _path(loc: tuple) -> str:
    """('optim', 'betas', 0) -> 'optim.betas[0]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _field_at(loc: tuple):
    """The pydantic FieldInfo at `loc` (sections and their fields), or None."""
    model, info = RunSpec, None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = info.annotation
    return info


def _input_at(raw: Any, loc: tuple, default: Any) -> Any:
    """The user's value at `loc` (pydantic reports it after before-validators, e.g. a list as a tuple)."""
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return default
    return raw


_UNION_MEMBER = re.compile(r"^(list|dict|str|int|float|bool|literal|function-[a-z]+)(\[.*\])?$")


def _config_error(err: ValidationError, raw: Any) -> ConfigError:
    """The first error (unknown keys and wrong types before impossible values, as a user fixes them)
    as a ConfigError `<dotted.field>: <problem>[; <fix>]`."""
    # A union field (`phases: list | str`) reports which member failed as an extra loc part
    # ('list[dict[any,any]]', 'str'); drop those, so paths read `phases[0]`.
    errors = [{**e, "loc": tuple(p for p in e["loc"] if not (isinstance(p, str) and _UNION_MEMBER.match(p)))}
              for e in err.errors()]
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        parent = unknown[0]["loc"][:-1]
        keys = sorted(str(e["loc"][-1]) for e in unknown if e["loc"][:-1] == parent)
        model = _field_at(parent).annotation if parent else RunSpec
        return ConfigError(f"{_path(parent) or 'top level'}: unknown key(s) {keys}; "
                           f"valid keys are {sorted(model.model_fields)}")
    e = next((e for e in errors if e["type"] != "value_error"), errors[0])
    path, value = _path(e["loc"]), _input_at(raw, e["loc"], e.get("input"))
    if e["type"] == "value_error":  # raised by a validator: "<field relative to loc>: <problem>; <fix>"
        msg = e["msg"].removeprefix("Value error, ")
        return ConfigError(f"{path}{'' if msg.startswith(('[', ':')) else '.'}{msg}" if path else msg.lstrip(": "))
    loc = e["loc"][:-1] if e["type"] == "missing" else e["loc"]  # too short a tuple: its last item is missing
    info = _field_at(loc)
    if info is not None and typing.get_origin(info.annotation) is tuple:
        n = len(typing.get_args(info.annotation))
        return ConfigError(f"{_path(loc)}: expected a list of {n} numbers, got {_input_at(raw, loc, value)!r}")
    if e["type"] in ("model_type", "dict_type"):
        return ConfigError(f"{path or 'config'}: expected a mapping, got {type(value).__name__}")
    if e["type"] == "list_type":
        return ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
    if e["type"] in _EXPECTED:
        return ConfigError(f"{path}: expected {_EXPECTED[e['type']]}, got {value!r}")
    if e["type"] == "literal_error":  # a value outside an enumeration (a Literal field)
        options = (typing.get_args(info.annotation) if info is not None and typing.get_origin(info.annotation)
                   is Literal else re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", ""))))
        return ConfigError(f"{path}: {value!r} is unknown; use {_one_of([str(o) for o in options])}")
    return ConfigError(f"{path or 'config'}: {e['msg']}, got {value!r}")


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Read a YAML config, apply `key.sub=value` overrides (values parsed as YAML), validate."""
    raw: dict = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return RunSpec.from_dict(raw)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read one recipe; `base: other.yaml` (relative to this file) is read first and overlaid.
    Every way a file can fail to be a recipe (missing, a folder, unreadable, binary, not UTF-8,
    empty, bad YAML) is one ConfigError line naming the file and the fix: the user passed the
    wrong path far more often than the file is damaged, so a decoder's traceback helps nobody."""
    what = f"config file {path}"
    if path.is_dir():
        raise ConfigError(f"{what} is a folder; pass a YAML file, e.g. {path / 'run.yaml'} "
                          "(recipes live in jobs/configs/)")
    if not path.is_file():
        raise ConfigError(f"{what} does not exist; pass an existing YAML file "
                          f"(recipes live in jobs/configs/)")
    if path.resolve() in seen:
        raise ConfigError(f"{what}: `base` chain loops back to itself; remove the cycle")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise ConfigError(f"{what} is not readable (permission denied); make it readable "
                          f"(chmod u+r {path}) or pass a copy you can read") from None
    except OSError as err:
        raise ConfigError(f"{what} cannot be read ({err.strerror or err}); pass a readable YAML file") from None
    text = _decode_text(data, what)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML{_yaml_where(err)}; fix the syntax there "
                          "(recipes in jobs/configs/ show the layout)") from None
    if raw is None:  # empty, blank or only comments: almost always the wrong file
        raise ConfigError(f"{what} is empty (no settings); write the run's sections in it (start from a "
                          "recipe in jobs/configs/) or pass the intended file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} must hold a mapping at the top level (section: settings), got a "
                          f"{type(raw).__name__}; start from a recipe in jobs/configs/")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{what}: base: {base!r} is not a file name; write base: other.yaml "
                          "(relative to this file)")
    return _merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), raw)


# Leading bytes of files passed by mistake for a config -> what they are (named in the error).
_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
          b"%PDF": "a PDF", b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip archive",
          b"\x7fELF": "an executable", b"\x93NUMPY": "a NumPy array"}


def _decode_text(data: bytes, what: str) -> str:
    """`data` as UTF-8 text, or a ConfigError saying what the file looks like instead."""
    kind = next((name for magic, name in _MAGIC.items() if data.startswith(magic)), None)
    if kind is None and b"\0" in data[:4096] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        kind = "a binary file"
    if kind is not None:
        raise ConfigError(f"{what} is {kind}, not a YAML config; pass the run's .yaml file "
                          "(recipes live in jobs/configs/)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{what} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                          "save it as UTF-8 (e.g. iconv -t UTF-8) and pass it again") from None


def _yaml_where(err: yaml.YAMLError) -> str:
    """' at line L, column C: <problem>' of a YAML error, on one line (PyYAML's own text spans several)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "") + f": {problem}"


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


