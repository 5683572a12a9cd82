"""Run-config validation: bad values are rejected before launch with the field and the fix."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from advflow.platform.config import ConfigError, RunSpec, flatten, load_config
from advflow.platform.train.phases import plan_of

REPO = Path(__file__).resolve().parents[1]
# Every run recipe, the classifier's (model.method: classifier) included.
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
CLASSIFIER_RECIPE = REPO / "jobs" / "configs" / "digits_classifier.yaml"
OK = {"data": {"prefix": "/data/x"}}
CLASSIFIER = {"method": "classifier", "size": "tiny"}


def spec(**sections) -> RunSpec:
    raw = {**OK}
    for k, v in sections.items():
        raw[k] = v
    return RunSpec.from_dict(raw)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    s = load_config(path)
    assert s.data.prefix and s.train.global_batch % (s.distributed.workers * s.train.grad_accum) == 0
    assert plan_of(s).at(0).lr > 0


def test_recipes_cover_the_paper():
    s = {p.stem: load_config(p) for p in CONFIGS}
    assert {s[f"imagenet_{n}_1nfe"].model.size for n in ("b2", "m2", "l2", "xl2")} == {"B/2", "M/2", "L/2", "XL/2"}
    assert (s["imagenet_xl2_2nfe"].model.nfe, s["imagenet_xl2_4nfe"].model.nfe) == (2, 4)
    assert (s["imagenet_xl2_56layer"].model.repeats, s["imagenet_xl2_112layer"].model.repeats) == (2, 4)
    plan = plan_of(s["imagenet_xl2_1nfe"])
    assert [p.name for p in plan.phases] == ["decay", "ema_reload", "d_reload", "guided"]
    assert plan.at(0).lambda_ot == pytest.approx(0.2) and plan.at(250_000).lambda_ot == pytest.approx(0.001)
    assert plan.at(280_000).lr == pytest.approx(3e-5) and plan.at(310_000).lr == pytest.approx(3e-5)


@pytest.mark.parametrize("section, values, field", [
    ("model", {"size": "XXL/2"}, "model.size"),
    ("model", {"repeats": 0}, "model.repeats"),
    ("model", {"nfe": 0, "kind": "multistep"}, "model.nfe"),
    ("model", {"kind": "multistep"}, "model.nfe"),
    ("adversarial", {"source": "shuffle"}, "adversarial.source"),
    ("guidance", {"t_mode": "late"}, "guidance.t_mode"),
    ("model", {"nfe": 2}, "model.nfe"),
    ("model", {"repeats": 2, "kind": "multistep", "nfe": 2}, "model.repeats"),
    ("eval", {"kind": "fid"}, "eval.inception_path"),
    ("eval", {"kind": "is"}, "eval.kind"),
    ("tracking", {"system_metrics_interval": 0}, "tracking.system_metrics_interval"),
    ("distributed", {"zero_stage_g": 5}, "distributed.zero_stage_g"),
    ("distributed", {"zero_stage_d": 3}, "distributed.zero_stage_d"),
    ("distributed", {"workers": 3}, "train.global_batch"),
    ("distributed", {"precision": "half"}, "distributed.precision"),
    ("adversarial", {"gp_fraction": 1.5}, "adversarial.gp_fraction"),
    ("train", {"grad_accum": 0}, "train.grad_accum"),
])
def test_impossible_values_name_the_field(section, values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        spec(**{section: values})


def test_missing_prefix_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match=r"data\.prefix.*prepare_latents"):
        RunSpec.from_dict({})
    with pytest.raises(ConfigError, match=r"unknown key.*'lr_g'"):
        spec(optim={"lr_g": 1.0})
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        spec(train={"steps": "many"})
    with pytest.raises(ConfigError, match=r"adversarial\.gradnorm: expected true/false"):
        spec(adversarial={"gradnorm": "yes"})


def test_overrides_parse_yaml_values_and_reach_nested_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {prefix: /d}\noptim: {lr: 1e-4}\n")
    s = load_config(path, ["adversarial.ot_scale=0.1", "train.steps=7", "optim.betas=[0.0, 0.99]",
                           "adversarial.ot_scale={kind: linear, start: 0.3, end: 0.1, steps: 10}"])
    assert s.optim.lr == 1e-4 and s.train.steps == 7 and s.optim.betas == (0.0, 0.99)
    assert plan_of(s).at(5).lambda_ot == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="no '='"):
        load_config(path, ["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_base_recipes_merge_and_cycles_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("data: {prefix: /d}\ntrain: {steps: 5, seed: 3}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {steps: 9}\n")
    s = load_config(tmp_path / "b.yaml")
    assert (s.train.steps, s.train.seed) == (9, 3)
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "c.yaml")


def test_phase_errors_are_config_errors():
    with pytest.raises(ConfigError, match=r"d_reload_from"):
        spec(phases=[{"name": "a", "start": 0}, {"name": "b", "start": 10, "d_reload_from": 5}])
    with pytest.raises(ConfigError, match=r"phases"):
        spec(phases=[{"name": "a", "start": 3}])


def test_flatten_for_tracking():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": 2}) == {"a.b": 1, "a.c.d": [1, 2], "e": 2}


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "steps", "12", r"train\.steps: expected an integer, got '12'"),
    ("train", "steps", True, r"train\.steps: expected an integer, got True"),
    ("train", "steps", 1.0, r"train\.steps: expected an integer, got 1\.0"),
    ("distributed", "use_gpu", 1, r"distributed\.use_gpu: expected true/false, got 1"),
    ("distributed", "use_gpu", 0, r"distributed\.use_gpu: expected true/false, got 0"),
    ("distributed", "use_gpu", "true", r"distributed\.use_gpu: expected true/false, got 'true'"),
    ("model", "size", 2, r"model\.size: expected a string, got 2"),
    ("model", "d_size", 2, r"model\.d_size: expected a string, got 2"),
    ("tracking", "uri", 1.5, r"tracking\.uri: expected a string, got 1\.5"),
    ("optim", "lr", True, r"optim\.lr: expected a number, got True"),
    ("optim", "lr", "fast", r"optim\.lr: expected a number, got 'fast'"),
    ("optim", "betas", [0.9], r"optim\.betas: expected a list of 2 numbers, got \[0\.9\]"),
    ("optim", "betas", [0.0, 0.9, 0.99], r"optim\.betas: expected a list of 2 numbers"),
    ("optim", "betas", [0.0, "x"], r"optim\.betas\[1\]: expected a number, got 'x'"),
])
def test_types_are_strict_and_errors_name_the_field(section, key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        spec(**{section: {key: value}})


def test_floats_take_ints_and_yaml_strings_optionals_take_none():
    s = spec(optim={"lr": "3e-4", "grad_clip": 1, "betas": [0, "0.99"]}, model={"d_size": None},
             tracking={"uri": None, "register_name": None},
             eval={"inception_path": None, "reference_stats": None}, adversarial={"ot_scale": 1})
    assert s.optim.lr == 3e-4 and type(s.optim.grad_clip) is float and s.optim.betas == (0.0, 0.99)
    assert type(s.optim.betas) is tuple and s.adversarial.ot_scale == 1 and s.model.d_size is None


def test_unknown_keys_and_non_mappings_name_the_section():
    with pytest.raises(ConfigError, match=r"^optim: unknown key\(s\) \['a', 'b'\]; valid keys are \['betas'"):
        spec(optim={"b": 1, "a": 2})
    with pytest.raises(ConfigError, match=r"^top level: unknown key\(s\) \['optimizer'\]; valid keys are"):
        spec(optimizer={})
    with pytest.raises(ConfigError, match=r"^train: expected a mapping, got int"):
        spec(train=5)
    with pytest.raises(ConfigError, match=r"^phases\[0\]: expected a mapping"):
        spec(phases=[3])


def test_wrong_types_are_reported_before_impossible_values():
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        RunSpec.from_dict({"train": {"steps": "x"}})  # data.prefix is also missing


def test_run_section_class_is_not_named_like_rays_run_config():
    from advflow.platform import config

    assert not hasattr(config, "RunConfig")
    assert type(spec().run) is config.RunStorageConfig and spec(run={"name": "n"}).run.name == "n"


def test_to_dict_round_trips_and_assignment_is_rechecked_by_revalidate():
    for path in CONFIGS:
        d = load_config(path).to_dict()
        assert RunSpec.from_dict(d).to_dict() == d and isinstance(d["optim"]["betas"], tuple)
    s = spec()
    s.run.name, s.tracking.register_name = "study-3", "afm"
    s.revalidate()
    assert (s.to_dict()["run"]["name"], s.to_dict()["tracking"]["register_name"]) == ("study-3", "afm")
    s.eval.kind = "fid"
    with pytest.raises(ConfigError, match=r"eval\.inception_path/reference_stats: kind fid needs both; set them"):
        s.revalidate()
    assert RunSpec().train.steps == 1000  # all defaults (unvalidated: data.prefix is empty)


def test_eval_kinds_come_from_the_evaluator_table(monkeypatch):
    """The kinds are `none`, the evaluator table's (read when the config is imported: a Literal) and
    the classifier's `accuracy`; what a kind requires is read from the table when validating."""
    from advflow.platform import eval as evaluators
    from advflow.platform.config import EvalConfig

    assert typing.get_args(EvalConfig.model_fields["kind"].annotation) == ("none", *evaluators.EVALUATORS, "accuracy")
    with pytest.raises(ConfigError, match=r"eval\.kind: 'x' is unknown; use none, digits, fid or accuracy$"):
        spec(eval={"kind": "x"})
    monkeypatch.setitem(evaluators.EVALUATORS, "digits",
                        evaluators.EvaluatorKind(required=("reference_stats",), build=lambda *a, **k: None))
    with pytest.raises(ConfigError, match=r"^eval\.reference_stats: kind digits needs it; set it to the reference"):
        spec(eval={"kind": "digits"})
    assert spec(eval={"kind": "digits", "reference_stats": "r.npz"}).eval.kind == "digits"
    monkeypatch.undo()
    assert spec(eval={"kind": "digits"}).eval.kind == "digits"


def test_guided_phase_needs_a_classifier_and_kind_defaults():
    phases = [{"name": "a", "start": 0, "lr": 1e-4, "lambda_ot": 0.1},
              {"name": "g", "start": 10, "guidance": True, "lambda_cg": 0.003}]
    with pytest.raises(ConfigError, match=r"guidance\.classifier: phase\(s\) \['g'\].*python jobs/train\.py "
                                          r"--config jobs/configs/digits_classifier\.yaml"):
        spec(phases=phases)
    s = spec(phases=phases, guidance={"classifier": "models:/cls/1"})
    assert s.cg_t_mode == "uniform" and s.adversarial.source == "same"
    assert spec(model={"kind": "anystep"}).model.nfe == 8
    assert spec(model={"kind": "anystep"}, guidance={"t_mode": "auto"}).cg_t_mode == "target"
    assert spec(model={"kind": "multistep", "nfe": 2}, guidance={"t_mode": "uniform"}).cg_t_mode == "uniform"


def test_elastic_worker_range_is_validated_where_it_is_defined(tmp_path):
    """distributed.min_workers: a range Ray may pick any count from; every count must keep the
    global batch and divide data.partitions (each worker owns whole partitions)."""
    from advflow.platform.train.ray_launch import workers

    base = {"data": {"prefix": str(tmp_path)}, "train": {"global_batch": 24}}
    spec = RunSpec.from_dict({**base, "distributed": {"workers": 4, "min_workers": 2}})
    assert workers(spec) == (2, 4) and spec.micro_batch_for(3) == 8 and spec.micro_batch == 6
    assert workers(RunSpec.from_dict({**base, "distributed": {"workers": 4}})) == 4
    with pytest.raises(ConfigError, match=r"distributed.min_workers.*not divisible by \[5\] workers"):
        RunSpec.from_dict({**base, "distributed": {"workers": 6, "min_workers": 4}})
    with pytest.raises(ConfigError, match="min_workers.*not in \\[1, workers - 1 = 3\\]"):
        RunSpec.from_dict({**base, "distributed": {"workers": 4, "min_workers": 4}})
    with pytest.raises(ConfigError, match=r"distributed.min_workers: \[3\] worker\(s\) do not divide data.partitions 8.*"
                                          r"in \[1, 2, 4, 8\]"):
        RunSpec.from_dict({**base, "data": {"prefix": str(tmp_path), "partitions": 8},
                           "distributed": {"workers": 4, "min_workers": 2}})


def test_data_partitions_resolve_and_are_checked_before_launch(tmp_path):
    """auto: the largest divisor of one micro-step's records up to 64; an explicit V must divide
    that and be divisible by the workers; the removed data.order names its replacement."""
    from advflow.platform.config import auto_partitions

    def parts(**kw) -> int:
        return RunSpec.from_dict({"data": {"prefix": str(tmp_path), **kw.pop("data", {})}, **kw}).partitions

    assert [auto_partitions(n) for n in (1, 24, 64, 96, 256, 120, 97)] == [1, 24, 64, 48, 64, 60, 1]
    assert parts(train={"global_batch": 256}) == 64
    assert parts(train={"global_batch": 256, "grad_accum": 8}) == 32  # 32 records per micro-step
    assert parts(data={"partitions": 16}, train={"global_batch": 256}, distributed={"workers": 4}) == 16
    with pytest.raises(ConfigError, match=r"^data.partitions: 48 does not divide the 64 records of one micro-step"):
        parts(data={"partitions": 48}, train={"global_batch": 64})
    with pytest.raises(ConfigError, match=r"^distributed.workers: \[3\] worker\(s\) do not divide data.partitions 64"):
        parts(train={"global_batch": 192}, data={"partitions": 64}, distributed={"workers": 3})
    with pytest.raises(ConfigError, match=r"^data.partitions: is 0"):
        parts(data={"partitions": 0})
    with pytest.raises(ConfigError, match=r"^data.order: was removed.*delete data.order"):
        parts(data={"order": "global"})


# ----------------------------------------------------------------------------- what importing the config loads


@pytest.mark.integration
def test_importing_the_config_loads_no_torch_network_or_evaluator():
    """Validating a config (the driver, before it touches the cluster) needs no torch, no data reader
    (fsspec, S3) and no evaluator (Inception): a fresh interpreter imports the config alone."""
    banned = ["torch", "advflow.platform.eval.inception", "advflow.platform.eval.digits", "advflow.trainers.models",
              "advflow.platform.data.reader"]
    code = ("import sys, advflow.platform.config as c\n"
            "c.load_config(None, ['data.prefix=/x'])\n"  # validating a spec loads nothing either
            f"print(sorted(m for m in {banned!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_leaf_tables_are_the_ones_the_code_uses():
    """The config's copy of the sizes is the networks'."""
    from advflow.trainers import models, sizes

    assert models.SIZES is sizes.SIZES and models.DiTSize is sizes.DiTSize
    with pytest.raises(ConfigError, match=r"^model\.size: 'XXL/2' is not a known size; use one of \["):
        spec(model={"size": "XXL/2"})


# ----------------------------------------------------------------------------- enumerations


LITERALS = [  # field, a bad value, the options the message lists
    ("model.method", "gan", "afm, fm, meanflow, cafm or classifier"),
    ("model.kind", "twostep", "1nfe, multistep or anystep"),
    ("model.fm_times", "beta", "uniform or logit_normal"),
    ("adversarial.source", "shuffle", "same or permute"),
    ("distributed.precision", "half", "auto, fp32 or bf16"),
    ("guidance.t_mode", "late", "auto, uniform or target"),
    ("run.checkpoint_upload", "later", "async or sync"),
    ("eval.kind", "is", "none, digits, fid or accuracy"),
    ("eval.split", "val", "auto, heldout or train"),
    ("auto_phases.mode", "avg", "min or max"),
]


@pytest.mark.parametrize("field, value, options", LITERALS, ids=[f for f, _, _ in LITERALS])
def test_enumerations_are_literals_and_name_field_value_and_options(field, value, options):
    section, key = field.split(".")
    model = RunSpec.model_fields[section].annotation
    assert typing.get_origin(model.model_fields[key].annotation) is typing.Literal, field
    raw = {**OK, section: {**OK.get(section, {}), key: value}}
    with pytest.raises(ConfigError) as err:
        RunSpec.from_dict(raw)
    assert str(err.value) == f"{field}: {value!r} is unknown; use {options}"
    # A non-string is reported the same way (no "expected a string"), and a valid option passes.
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: 3 is unknown; use "):
        RunSpec.from_dict({**OK, section: {**OK.get(section, {}), key: 3}})
    assert " or ".join(", ".join(typing.get_args(model.model_fields[key].annotation)).rsplit(", ", 1)) == options


# ----------------------------------------------------------------------------- optimiser checks (every method)


@pytest.mark.parametrize("values, message", [
    ({"betas": [0.0, 1.0]}, "optim.betas: [0.0, 1.0] are not both in [0, 1); use e.g."),
    ({"betas": [-0.1, 0.9]}, "optim.betas: [-0.1, 0.9] are not both in [0, 1); use e.g."),
    ({"eps": 0}, "optim.eps: must be > 0; use e.g. 1e-8"),
    ({"weight_decay": -0.01}, "optim.weight_decay: is negative; use a decay >= 0"),
    ({"grad_clip": -1}, "optim.grad_clip: is negative; use 0 (no clipping) or a positive norm"),
    ({"ema_decay": 1.0}, "optim.ema_decay: 1.0 is outside [0, 1); use e.g. 0.9999"),
    ({"ema_warmup": 1}, "optim.ema_warmup: expected true/false, got 1"),
])
@pytest.mark.parametrize("method", ["afm", "classifier"])
def test_optim_checks_apply_to_every_method(values, message, method):
    with pytest.raises(ConfigError) as err:
        spec(model={"method": method}, optim=values)
    assert str(err.value).startswith(message), str(err.value)
    # The edge of each range is accepted.
    (key,) = values
    edge = {"betas": (0.0, 0.999), "eps": 1e-12, "weight_decay": 0.0, "grad_clip": 0.0, "ema_decay": 0.0,
            "ema_warmup": True}[key]
    assert getattr(spec(model={"method": method}, optim={key: edge}).optim, key) == edge


# ----------------------------------------------------------------------------- method defaults


def test_method_defaults_fill_only_what_the_user_left_out():
    from advflow.platform.config import METHOD_DEFAULTS

    afm, clf = spec(), spec(model=CLASSIFIER)
    # AFM keeps the sections' own defaults; the classifier gets the official classifier trainer's.
    assert (afm.optim.betas, afm.optim.grad_clip, afm.optim.ema_decay) == (
        RunSpec().optim.betas, RunSpec().optim.grad_clip, RunSpec().optim.ema_decay) == ((0.0, 0.9), 0.0, 0.9999)
    assert (afm.run.name, afm.eval.kind) == ("afm", "none")
    assert (clf.optim.betas, clf.optim.grad_clip, clf.optim.ema_decay) == ((0.9, 0.95), 50.0, 0.9995)
    assert (clf.run.name, clf.eval.kind, clf.optim.ema_warmup) == ("classifier", "accuracy", False)
    # Every entry of the table reaches the spec, and each user value wins over it.
    for method, sections in METHOD_DEFAULTS.items():
        model = {"method": method, **({"nfe": 4} if method in ("fm", "cafm") else {}),
                 **({"init": "models:/fm@champion"} if method == "cafm" else {})}
        extra = {"cafm": {"warmup": 10}} if method == "cafm" else {}  # a G update within the default train.steps
        got = spec(model=model, **extra).to_dict()
        for section, values in sections.items():
            for key, value in values.items():
                want = tuple(value) if isinstance(value, list) else value
                assert got[section][key] == want, (method, section, key)
    user = spec(model=CLASSIFIER, optim={"betas": [0.5, 0.6], "lr": 3e-4}, run={"name": "mine"},
                eval={"kind": "none"})
    assert (user.optim.betas, user.optim.lr, user.optim.grad_clip) == ((0.5, 0.6), 3e-4, 50.0)
    assert (user.run.name, user.eval.kind) == ("mine", "none")
    assert spec(model=CLASSIFIER, optim={"grad_clip": 0}).optim.grad_clip == 0.0
    # fm's kind default is in the same table; the recipe's own kind is still checked.
    assert spec(model={"method": "fm", "nfe": 4}).model.kind == "multistep"
    with pytest.raises(ConfigError, match=r"^model\.kind: '1nfe' with method fm"):
        spec(model={"method": "fm", "nfe": 4, "kind": "1nfe"})
    # The defaults are put into the dict, so a round trip keeps them and re-validation passes.
    assert RunSpec.from_dict(clf.to_dict()).to_dict() == clf.to_dict()
    clf.revalidate()


def test_revalidate_replaces_the_shadowed_validate():
    assert "validate" not in RunSpec.__dict__ and callable(RunSpec.revalidate)
    s = spec(model=CLASSIFIER)
    s.train.sample_every = 10
    with pytest.raises(ConfigError, match=r"^train\.sample_every: method classifier draws no samples"):
        s.revalidate()


# ----------------------------------------------------------------------------- method classifier


@pytest.mark.parametrize("sections, message", [
    ({"model": {**CLASSIFIER, "d_size": "S/2"}}, "model.d_size: 'S/2' with method classifier, which has no "
                                                 "discriminator; remove model.d_size"),
    ({"model": {**CLASSIFIER, "kind": "multistep", "nfe": 2}}, "model.kind: 'multistep' with method classifier, "
                                                               "which is not a generator; remove model.kind"),
    ({"model": {**CLASSIFIER, "nfe": 4}}, "model.nfe: 4 with method classifier, which samples nothing; "
                                          "remove model.nfe"),
    ({"model": {**CLASSIFIER, "repeats": 2}}, "model.repeats: 2 with method classifier, which has no depth "
                                              "repetition; remove model.repeats"),
    ({"phases": [{"name": "a", "start": 0, "lr": 1e-4}]}, "phases: a phase list with method classifier, which "
                                                          "trains in one phase at optim.lr; remove phases"),
    ({"phases": "auto", "eval": {"every": 10}}, "phases: auto with method classifier, which trains in one phase "
                                                "at optim.lr; remove phases"),
    ({"phases": [{"name": "g", "start": 0, "guidance": True}]}, "phases: phase(s) ['g'] turn guidance on under "
                                                                "method classifier"),
    ({"guidance": {"classifier": "models:/c/1"}}, "guidance.classifier: is set under method classifier, which "
                                                  "trains the classifier that guidance loads"),
    ({"train": {"sample_every": 10}}, "train.sample_every: method classifier draws no samples; remove it"),
    ({"tracking": {"image_every": 10}}, "tracking.image_every: method classifier logs no image grids; remove it"),
    ({"eval": {"kind": "digits"}}, "eval.kind: digits measures generated samples, and method classifier draws "
                                   "none; use accuracy (or none)"),
    ({"eval": {"kind": "fid", "inception_path": "w.pth", "reference_stats": "r.npz"}},
     "eval.kind: fid measures generated samples, and method classifier draws none; use accuracy"),
    ({"eval": {"nfe": [1]}}, "eval.nfe: method classifier samples nothing; remove it"),
    ({"distributed": {"zero_stage_d": 1}}, "distributed.zero_stage_d: method classifier has one DeepSpeed engine; "
                                           "set distributed.zero_stage_g instead"),
])
def test_classifier_refuses_what_it_has_no_use_for(sections, message):
    raw = {**OK, "model": CLASSIFIER, **sections}
    with pytest.raises(ConfigError) as err:
        RunSpec.from_dict(raw)
    assert str(err.value).startswith(message), str(err.value)
    # The same spec without the offending section is valid (the refusal is that section's).
    fine = {k: v for k, v in raw.items() if k not in sections or k == "model"}
    if "model" in sections:
        fine["model"] = CLASSIFIER
    assert RunSpec.from_dict(fine).model.method == "classifier"


def test_classifier_accepts_its_defaults_and_what_afm_refuses_it():
    """The defaults of what it refuses pass (nfe 1, kind 1nfe, ...), accuracy is its evaluation only,
    and it resumes elastically like the other methods (no more min_workers refusal)."""
    s = spec(model={**CLASSIFIER, "kind": "1nfe", "nfe": 1, "repeats": 1, "d_size": None}, eval={"kind": "none"},
             train={"sample_every": 0, "global_batch": 24}, tracking={"image_every": 0}, phases=[],
             distributed={"workers": 4, "min_workers": 2})
    assert (s.model.nfe, s.distributed.min_workers, s.micro_batch_for(3)) == (1, 2, 8)
    assert [p.name for p in plan_of(s).phases] == ["main"] and plan_of(s).at(0).lr == s.optim.lr
    with pytest.raises(ConfigError, match=r"^eval\.kind: accuracy with method afm; accuracy evaluates a classifier"):
        spec(eval={"kind": "accuracy"})
    with pytest.raises(ConfigError, match=r"^eval\.kind: accuracy with method fm"):
        spec(model={"method": "fm", "nfe": 4}, eval={"kind": "accuracy"})


@pytest.mark.parametrize("setting, message", [  # ported from the classifier job's own config
    ("model.size=Q/9", "model.size: 'Q/9' is not a known size; use one of"),
    ("classifier.size=B/2", "classifier.size: moved; set model.size=B/2"),
    ("classifier.t_range=[0.6, 0.2]", "classifier.t_range: [0.6, 0.2] is not an interval inside [0, 1]; use"),
    ("classifier.depth=3", "classifier: unknown key(s) ['depth']; valid keys are ['t_range']"),
    ("optim.ema_decay=1.0", "optim.ema_decay: 1.0 is outside [0, 1); use e.g. 0.9999 (AFM) or 0.9995 (classifier)"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 numbers, got [0.9]"),
    ("train.global_batch=63", "train.global_batch: 63 is not divisible by workers x grad_accum = 2 x 1; pick"),
    ("train.steps=many", "train.steps: expected an integer, got 'many'"),
    ("distributed.zero_stage_g=3", "distributed.zero_stage_g: ZeRO-3 is refused"),
    ("distributed.zero_stage=2", "distributed.zero_stage: moved; set distributed.zero_stage_g=2"),
    ("distributed.zero_stage_d=1", "distributed.zero_stage_d: method classifier has one DeepSpeed engine; set "
                                   "distributed.zero_stage_g instead"),
    ("eval.times=[0, 1.5]", "eval.times: [1.5] outside [0, 1]; use flow times in [0, 1]"),
    ("eval.times=[]", "eval.times: is empty; list at least one time"),
    ("eval.times=[0.25, 0.251]", "eval.times: [0.25, 0.251] name the same metric twice at two decimals; use"),
    ("eval.times=[0, x]", "eval.times[1]: expected a number, got 'x'"),
    ("eval.split=val", "eval.split: 'val' is unknown; use auto, heldout or train"),
    ("tracking.image_every=10", "tracking.image_every: method classifier logs no image grids; remove it"),
])
def test_classifier_recipe_errors_name_the_field_and_the_fix(setting, message):
    with pytest.raises(ConfigError) as err:
        load_config(CLASSIFIER_RECIPE, [setting])
    assert "\n" not in str(err.value) and str(err.value).startswith(message), str(err.value)


def test_classifier_recipes_and_official_defaults():
    b2 = load_config(REPO / "jobs" / "configs" / "imagenet_classifier_b2.yaml").to_dict()
    assert b2["model"]["method"] == "classifier" and b2["model"]["size"] == "B/2"
    assert b2["classifier"] == {"t_range": (0.0, 1.0)}
    assert b2["optim"] == {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.01, "eps": 1e-8, "grad_clip": 50.0,
                           "ema_decay": 0.9995, "ema_warmup": False}
    assert b2["train"]["global_batch"] == 256 and b2["distributed"]["workers"] == 8
    assert b2["distributed"]["use_gpu"] and b2["distributed"]["zero_stage_g"] == 2
    assert b2["data"]["prefix"] == "s3://advflow/datasets/imagenet256-sdvae"
    assert (b2["eval"]["kind"], b2["eval"]["split"], b2["eval"]["num_samples"]) == ("accuracy", "train", 10000)
    # The defaults without a recipe are the official classifier trainer's optimiser too.
    default = RunSpec.from_dict({"data": {"prefix": "x"}, "model": {"method": "classifier"}})
    assert default.optim.model_dump() == b2["optim"]
    assert default.train.global_batch == 256 and default.classifier.t_range == (0.0, 1.0)
    assert default.run.name == "classifier"  # not the AFM default run key
    digits = load_config(CLASSIFIER_RECIPE)
    assert digits.model.size == "tiny" and digits.distributed.workers == 2 and digits.optim.ema_warmup
    assert digits.tracking.register_name == "afm-digits-classifier" and digits.eval.split == "heldout"
    assert digits.eval.times == [0.0, 0.25, 0.5, 0.75] and digits.eval.kind == "accuracy"
    for path in (CLASSIFIER_RECIPE, REPO / "jobs" / "configs" / "imagenet_classifier_b2.yaml"):
        text = path.read_text()
        assert f"python jobs/train.py --config jobs/configs/{path.name}" in text and "train_classifier" not in text


def test_time_keys_and_the_accuracy_metric():
    from advflow.platform.config import time_key

    assert [time_key(t) for t in (0, 0.25, 0.5, 1)] == ["t0.00", "t0.25", "t0.50", "t1.00"]
    s = spec(model=CLASSIFIER, eval={"times": [0.5, 0.0]})
    assert s.auto_metric == "eval/loss_t0.50"
    assert spec(eval={"kind": "digits"}).auto_metric == "eval/fd"


def test_phase_data_helpers_are_what_the_plan_is_built_from():
    from advflow.trainers.schedules import PhasePlan

    s = spec(optim={"lr": 3e-4}, adversarial={"ot_scale": 0.3, "gp_scale": 0.5, "cp_scale": 0.02})
    assert s.phase_base() == {"lr": 3e-4, "lambda_ot": 0.3, "lambda_gp": 0.5, "lambda_cp": 0.02}
    assert s.phase_dicts() == [] and not hasattr(s, "phase_plan") and not hasattr(s, "auto_controller")
    p = plan_of(s).at(0)
    assert (p.phase_name, p.lr, p.lambda_ot, p.lambda_gp, p.lambda_cp) == ("main", 3e-4, 0.3, 0.5, 0.02)
    phases = [{"name": "a", "start": 0, "lambda_ot": 0.1}, {"name": "b", "start": 5, "lr": 1e-5}]
    s = spec(optim={"lr": 3e-4}, phases=phases)
    assert plan_of(s) == PhasePlan.from_spec(s.phase_dicts(), s.phase_base())
    assert (plan_of(s).at(0).lr, plan_of(s).at(0).lambda_ot, plan_of(s).at(5).lr) == (3e-4, 0.1, 1e-5)
    # The validation's prefix for a plan the schedules refuse is kept.
    with pytest.raises(ConfigError, match=r"^phases / adversarial\.ot_scale: .*first phase must start at step 0"):
        spec(phases=[{"name": "a", "start": 3}])
