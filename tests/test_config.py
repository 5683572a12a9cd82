"""Run-config validation: bad values are rejected before launch with the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from advflow.platform.config import ConfigError, RunSpec, flatten, load_config

# Run recipes; the guidance-classifier recipes (*classifier*.yaml) are tests/test_train_classifier.py's.
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml")
                 if "classifier" not in p.name)
OK = {"data": {"prefix": "/data/x"}}


def spec(**sections) -> RunSpec:
    raw = {**OK}
    for k, v in sections.items():
        raw[k] = v
    return RunSpec.from_dict(raw)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    s = load_config(path)
    assert s.data.prefix and s.train.global_batch % (s.distributed.workers * s.train.grad_accum) == 0
    assert s.phase_plan().at(0).lr > 0


def test_recipes_cover_the_paper():
    s = {p.stem: load_config(p) for p in CONFIGS}
    assert {s[f"imagenet_{n}_1nfe"].model.size for n in ("b2", "m2", "l2", "xl2")} == {"B/2", "M/2", "L/2", "XL/2"}
    assert (s["imagenet_xl2_2nfe"].model.nfe, s["imagenet_xl2_4nfe"].model.nfe) == (2, 4)
    assert (s["imagenet_xl2_56layer"].model.repeats, s["imagenet_xl2_112layer"].model.repeats) == (2, 4)
    plan = s["imagenet_xl2_1nfe"].phase_plan()
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
    assert s.phase_plan().at(5).lambda_ot == pytest.approx(0.2)
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


def test_to_dict_round_trips_and_assignment_is_rechecked_by_validate():
    for path in CONFIGS:
        d = load_config(path).to_dict()
        assert RunSpec.from_dict(d).to_dict() == d and isinstance(d["optim"]["betas"], tuple)
    s = spec()
    s.run.name, s.tracking.register_name = "study-3", "afm"
    s.validate()
    assert (s.to_dict()["run"]["name"], s.to_dict()["tracking"]["register_name"]) == ("study-3", "afm")
    s.eval.kind = "fid"
    with pytest.raises(ConfigError, match=r"eval\.inception_path/reference_stats: kind fid needs both; set them"):
        s.validate()
    assert RunSpec().train.steps == 1000  # all defaults (unvalidated: data.prefix is empty)


def test_eval_kinds_come_from_the_evaluator_table(monkeypatch):
    from advflow.platform import eval as evaluators

    with pytest.raises(ConfigError, match=r"eval\.kind: 'x' is unknown; use none, digits or fid"):
        spec(eval={"kind": "x"})
    monkeypatch.setitem(evaluators.EVALUATORS, "ref_only",
                        evaluators.EvaluatorKind(required=("reference_stats",), build=lambda *a, **k: None))
    with pytest.raises(ConfigError, match=r"^eval\.reference_stats: kind ref_only needs it; set it to the reference"):
        spec(eval={"kind": "ref_only"})
    with pytest.raises(ConfigError, match=r"use none, digits, fid or ref_only"):
        spec(eval={"kind": "x"})
    assert spec(eval={"kind": "ref_only", "reference_stats": "r.npz"}).eval.kind == "ref_only"
    assert spec(eval={"kind": "digits"}).eval.kind == "digits"


def test_guided_phase_needs_a_classifier_and_kind_defaults():
    phases = [{"name": "a", "start": 0, "lr": 1e-4, "lambda_ot": 0.1},
              {"name": "g", "start": 10, "guidance": True, "lambda_cg": 0.003}]
    with pytest.raises(ConfigError, match=r"guidance\.classifier: phase\(s\) \['g'\].*jobs/train_classifier\.py"):
        spec(phases=phases)
    s = spec(phases=phases, guidance={"classifier": "models:/cls/1"})
    assert s.cg_t_mode == "uniform" and s.adversarial.source == "same"
    assert spec(model={"kind": "anystep"}).model.nfe == 8
    assert spec(model={"kind": "anystep"}, guidance={"t_mode": "auto"}).cg_t_mode == "target"
    assert spec(model={"kind": "multistep", "nfe": 2}, guidance={"t_mode": "uniform"}).cg_t_mode == "uniform"


def test_elastic_worker_range_is_validated_where_it_is_defined(tmp_path):
    """distributed.min_workers: a range Ray may pick any count from; every count must keep the
    global batch, and the data order must be the one that resumes on any count."""
    from advflow.platform.train.ray_launch import workers

    base = {"data": {"prefix": str(tmp_path)}, "train": {"global_batch": 24}}
    spec = RunSpec.from_dict({**base, "distributed": {"workers": 4, "min_workers": 2}})
    assert workers(spec) == (2, 4) and spec.micro_batch_for(3) == 8 and spec.micro_batch == 6
    assert workers(RunSpec.from_dict({**base, "distributed": {"workers": 4}})) == 4
    with pytest.raises(ConfigError, match=r"distributed.min_workers.*not divisible by \[5\] workers"):
        RunSpec.from_dict({**base, "distributed": {"workers": 6, "min_workers": 4}})
    with pytest.raises(ConfigError, match="min_workers.*not in \\[1, workers - 1 = 3\\]"):
        RunSpec.from_dict({**base, "distributed": {"workers": 4, "min_workers": 4}})
    with pytest.raises(ConfigError, match="needs data.order global"):
        RunSpec.from_dict({**base, "data": {"prefix": str(tmp_path), "order": "partitioned"},
                           "distributed": {"workers": 4, "min_workers": 2}})
    with pytest.raises(ConfigError, match="data.order.*'sorted' is unknown"):
        RunSpec.from_dict({**base, "data": {"prefix": str(tmp_path), "order": "sorted"}})
