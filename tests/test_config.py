"""Run-config validation: bad values are rejected before launch with the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from advflow.platform.config import ConfigError, RunSpec, flatten, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))
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
    assert [p.name for p in plan.phases] == ["decay", "ema_reload", "d_reload"]
    assert plan.at(0).lambda_ot == pytest.approx(0.2) and plan.at(500_000).lambda_ot == pytest.approx(0.001)
    assert plan.at(560_000).lr == pytest.approx(3e-5)


@pytest.mark.parametrize("section, values, field", [
    ("model", {"size": "XXL/2"}, "model.size"),
    ("model", {"repeats": 0}, "model.repeats"),
    ("model", {"nfe": 0, "kind": "multistep"}, "model.nfe"),
    ("model", {"nfe": 2}, "model.nfe"),
    ("model", {"repeats": 2, "kind": "multistep", "nfe": 2}, "model.repeats"),
    ("eval", {"kind": "fid"}, "eval.inception_path"),
    ("eval", {"kind": "is"}, "eval.kind"),
    ("tracking", {"system_metrics_interval": 0}, "tracking.system_metrics_interval"),
    ("distributed", {"zero_stage_g": 5}, "distributed.zero_stage_g"),
    ("distributed", {"zero_stage_d": 3}, "distributed.zero_stage_d"),
    ("distributed", {"workers": 3}, "train.global_batch"),
    ("distributed", {"precision": "bf16"}, "distributed.precision"),
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
