"""Search-space YAML: parsing, validation errors, define-by-run conditionals, trial configs."""

from __future__ import annotations

import optuna
import pytest

from advflow.platform.config import ConfigError, RunSpec
from advflow.platform.sweep.space import SweepSpace, apply_params
from advflow.platform.sweep.study import open_study, recover_study

BASE = RunSpec.from_dict({"data": {"prefix": "/tmp/x"},
                          "adversarial": {"ot_scale": {"kind": "cosine", "start": 0.05, "end": 0.001, "steps": 100}},
                          "train": {"steps": 100, "global_batch": 32}}).to_dict()


def space(**params) -> SweepSpace:
    return SweepSpace.from_dict({"params": params})


def test_repo_space_file_parses_and_covers_the_issue_parameters():
    sp = SweepSpace.load("jobs/configs/sweeps/digits_space.yaml")
    names = {p.name for p in sp.params}
    for need in ("adversarial.ot_scale.start", "adversarial.ot_scale.end", "adversarial.gp_scale",
                 "adversarial.gp_fraction", "adversarial.cp_scale", "optim.lr", "model.repeats", "model.nfe"):
        assert need in names


def test_the_meanflow_space_makes_valid_meanflow_trials():
    """Every trial config the MeanFlow space can draw validates as a MeanFlow run (the overrides switch the
    demo's AFM config to it), and it searches MeanFlow's own weights."""
    sp = SweepSpace.load("jobs/configs/sweeps/digits_meanflow_space.yaml")
    assert {"optim.lr", "optim.ema_decay", "meanflow.ratio_r_neq_t", "meanflow.power"} <= {p.name for p in sp.params}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        spec = apply_params(BASE, sp.suggest(trial), sp.overrides)
        assert spec.model.method == "meanflow" and spec.model.kind == "anystep"
        assert 0.1 <= spec.meanflow.ratio_r_neq_t <= 0.75


@pytest.mark.parametrize("params, words", [
    ({"optim.lr": {"type": "float", "low": 1.0, "high": 0.1}}, ["optim.lr", "low < high"]),
    ({"optim.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, ["optim.lr.low", "log"]),
    ({"model.repeats": {"type": "categorical"}}, ["model.repeats.choices"]),
    ({"optim.lr": {"type": "gaussian", "low": 0, "high": 1}}, ["optim.lr.type", "float, int or categorical"]),
    ({"a.b": {"type": "float", "low": 0, "high": 1, "when": {"c.d": [1]}}}, ["a.b", "'c.d'", "comes first"]),
    ({"a.b": {"type": "float", "low": 0, "high": 1, "bogus": 1}}, ["a.b", "bogus"]),
])
def test_bad_space_names_the_field_and_fix(params, words):
    with pytest.raises(ConfigError) as err:
        space(**params)
    for w in words:
        assert w in str(err.value)


def test_missing_space_file_says_what_to_pass(tmp_path):
    with pytest.raises(ConfigError, match="--space"):
        SweepSpace.load(tmp_path / "nope.yaml")


def test_define_by_run_conditionals_and_caps():
    sp = space(**{
        "adversarial.ot_scale.start": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
        "adversarial.ot_scale.end": {"type": "float", "low": 0.001, "high": 0.4, "log": True,
                                     "high_from": "adversarial.ot_scale.start"},
        "model.nfe": {"type": "categorical", "choices": [1, 2, 4]},
        "adversarial.gp_fraction": {"type": "categorical", "choices": [0.25, 0.5], "when": {"model.nfe": [2, 4]}},
    })
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen_nfe = set()
    for _ in range(40):
        trial = study.ask()
        got = sp.suggest(trial)
        study.tell(trial, 0.0)
        assert got["adversarial.ot_scale.end"] <= got["adversarial.ot_scale.start"]
        seen_nfe.add(got["model.nfe"])
        # the conditional parameter exists exactly when its condition holds
        assert ("adversarial.gp_fraction" in got) == (got["model.nfe"] in (2, 4))
        assert set(trial.params) == set(got)
    assert seen_nfe == {1, 2, 4}


def test_trial_config_applies_params_and_switches_multistep():
    spec = apply_params(BASE, {"adversarial.ot_scale.start": 0.2, "adversarial.ot_scale.end": 0.01,
                               "model.nfe": 2, "optim.lr": 3e-4},
                        {"distributed.workers": 1})
    assert spec.adversarial.ot_scale == {"kind": "cosine", "start": 0.2, "end": 0.01, "steps": 100}
    assert (spec.model.repeats, spec.model.nfe, spec.model.kind) == (1, 2, "multistep")
    deep = apply_params(BASE, {"model.repeats": 4, "model.nfe": 1}, {})
    assert (deep.model.repeats, deep.model.kind) == (4, "1nfe")
    with pytest.raises(ConfigError, match="model.repeats"):  # depth repetition is 1NFE-only
        apply_params(BASE, {"model.repeats": 2, "model.nfe": 2}, {})
    assert spec.optim.lr == 3e-4 and spec.distributed.workers == 1
    assert BASE["model"]["kind"] == "1nfe"  # the base is not mutated
    # a constant lambda_ot becomes a schedule when start/end are searched
    base = {**BASE, "adversarial": {**BASE["adversarial"], "ot_scale": 0.1}}
    spec = apply_params(base, {"adversarial.ot_scale.start": 0.3}, {})
    assert spec.adversarial.ot_scale["start"] == 0.3


def test_invalid_trial_config_is_a_config_error():
    with pytest.raises(ConfigError, match="gp_fraction"):
        apply_params(BASE, {"adversarial.gp_fraction": 1.5}, {})


@pytest.mark.integration  # end-to-end: an Optuna study on a database (seconds)
def test_study_recovery_marks_abandoned_trials_failed(tmp_path):
    sp = SweepSpace.from_dict({"params": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-3}},
                               "storage": f"sqlite:///{tmp_path}/s/study.db", "study_name": "rec"})
    study, _, _ = open_study(sp)
    done = study.ask()
    study.tell(done, 1.0)
    study.ask()  # left RUNNING: its driver "died"
    again, storage, _ = open_study(sp)
    counts = recover_study(again, storage)
    assert counts == {"COMPLETE": 1, "FAIL": 1}
    assert again.trials[0].params == done.params and again.trials[0].value == 1.0
    assert again.trials[1].user_attrs["failed_reason"].startswith("sweep driver died")
    with pytest.raises(ConfigError, match="mode"):
        open_study(SweepSpace.from_dict({**{"params": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}},
                                         "storage": sp.storage, "study_name": "rec", "mode": "max"}))


def test_baseline_point_is_the_base_config_inside_the_space():
    sp = SweepSpace.load("jobs/configs/sweeps/digits_space.yaml")
    point = sp.baseline_point(BASE)
    assert point["adversarial.ot_scale.start"] == 0.05 and point["adversarial.ot_scale.end"] == 0.001
    assert point["model.repeats"] == 1 and point["model.nfe"] == 1
    # R is conditional on K = 1 in the repo's space
    assert next(p for p in sp.params if p.name == "model.repeats").when == {"model.nfe": [1]}
    assert point["adversarial.gp_scale"] == BASE["adversarial"]["gp_scale"]
    # a value outside its range is left to the sampler
    base = {**BASE, "optim": {**BASE["optim"], "lr": 10.0}}
    assert "optim.lr" not in sp.baseline_point(base)


def test_relative_sqlite_storage_is_made_absolute(tmp_path, monkeypatch):
    from advflow.platform.sweep.study import absolute_storage

    monkeypatch.chdir(tmp_path)
    assert absolute_storage("sqlite:///sweeps/a.db") == f"sqlite:///{tmp_path}/sweeps/a.db"
    assert absolute_storage("sqlite:////abs/a.db") == "sqlite:////abs/a.db"
    assert absolute_storage("postgresql://u@h/db") == "postgresql://u@h/db"


def test_sweep_dir_is_beside_a_sqlite_study(tmp_path, monkeypatch):
    from advflow.platform.sweep.study import sweep_dir

    monkeypatch.chdir(tmp_path)
    assert sweep_dir(SweepSpace(storage=f"sqlite:///{tmp_path}/s/a.db")) == tmp_path / "s"
    assert sweep_dir(SweepSpace(storage="postgresql://u@h/db")) == tmp_path / "sweeps"


def test_each_sweep_module_holds_its_concern():
    from advflow.platform.sweep import space as space_mod, study, tune

    for mod in (space_mod, study, tune):
        assert mod.__doc__ and "sweep." in mod.__doc__
    assert not hasattr(space_mod, "open_study") and not hasattr(study, "ParamSpec")
    assert callable(tune.train_driver_fn) and not hasattr(tune, "trial_func")


def test_tune_trials_carry_their_optuna_trial_number_through_ray_optuna_search(tmp_path):
    """Tune trials are matched to Optuna trials by the number the define-by-run space records, not by
    parameter values: two trials with equal values still get their own numbers."""
    from ray.tune.search.optuna import OptunaSearch

    from advflow.platform.sweep.study import TRIAL_KEY, RecordTrialNumber, set_trial_attrs

    sp = SweepSpace.from_dict({"params": {"model.nfe": {"type": "categorical", "choices": [2]}},
                               "storage": f"sqlite:///{tmp_path}/s.db", "study_name": "num"})
    study, storage, sampler = open_study(sp)
    searcher = OptunaSearch(space=RecordTrialNumber(sp), metric="eval/fd", mode="min", sampler=sampler,
                            study_name=sp.study_name, storage=storage)
    configs = [searcher.suggest(f"tune-{i}") for i in range(3)]
    assert [c[TRIAL_KEY] for c in configs] == [0, 1, 2]
    assert all(c["model.nfe"] == 2 for c in configs)  # equal values: matching by value would be ambiguous
    set_trial_attrs(sp.storage, sp.study_name, 1, {"tune_trial_id": "tune-1"})
    attrs = [t.user_attrs for t in optuna.load_study(study_name="num", storage=sp.storage).trials]
    assert attrs == [{}, {"tune_trial_id": "tune-1"}, {}]


def test_tune_state_follows_an_s3_run_storage_and_stays_local_otherwise(tmp_path, monkeypatch):
    from advflow.platform.sweep.tune import tune_storage

    sp = SweepSpace.from_dict({"params": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-3}},
                               "storage": f"sqlite:///{tmp_path}/db/s.db", "study_name": "where"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    path, fs = tune_storage(RunSpec.from_dict({**BASE, "run": {"storage_path": "s3://bucket/runs"}}), sp)
    assert path == "bucket/runs/sweeps/where" and type(fs).__name__ == "S3FileSystem"
    path, fs = tune_storage(RunSpec.from_dict({**BASE, "run": {"storage_path": str(tmp_path / "runs")}}), sp)
    assert path == str(tmp_path / "db" / "tune") and fs is None
