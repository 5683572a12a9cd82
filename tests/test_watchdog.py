"""The divergence watchdog (issue 12, item 4).

Pure: which rows and evaluations trigger, the bound, and that its state survives a checkpoint.
End to end (2 gloo workers, tracked, registering at every checkpoint): a NaN injected into G's loss
once is rolled back and the run finishes; injected at every attempt, the run fails after the bound
with a message naming trigger, step and checkpoint; in neither case is a model registered from the
bad steps."""

from __future__ import annotations

import json
import math

import pytest

from advflow.trainers.watchdog import Watchdog, WatchdogParams


def rows(*values: dict, start: int = 1) -> list[dict]:
    return [{"step": start + i, **v} for i, v in enumerate(values)]


@pytest.mark.parametrize("key", ["d_loss", "g_loss", "fm_loss", "d_grad_norm", "g_grad_norm"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_or_norm_triggers_at_its_step(key, bad):
    wd = Watchdog()
    wd.mark_good(10, "checkpoint_000010")
    trig = wd.check_rows(rows({key: 1.0}, {key: bad}, start=11))
    assert trig and trig.kind == "nonfinite" and trig.step == 12 and key in trig.reason
    assert (trig.good_step, trig.good_name, trig.exhausted) == (10, "checkpoint_000010", False)


def test_healthy_rows_do_not_trigger():
    wd = Watchdog()
    assert wd.check_rows(rows(*({"d_loss": 0.5, "g_loss": 1.0, "d_logit_real": 3.0, "cp": 9.0,
                                 "g_grad_norm": 1.0 + 0.01 * i} for i in range(200)))) is None


@pytest.mark.parametrize("row, trips", [
    ({"d_logit_real": 101.0}, True), ({"d_logit_fake": -101.0}, True), ({"g_logit_fake": 99.0}, False),
    ({"cp": 100.0 ** 2 + 1}, True), ({"cp": 100.0 ** 2 - 1}, False)])
def test_exploding_logits_trigger_beyond_the_bound(row, trips):
    wd = Watchdog(WatchdogParams(logit_bound=100.0))
    trig = wd.check_rows(rows(row))
    assert (trig is not None) == trips
    if trips:
        assert trig.kind == "logits"


def test_a_gradient_spike_needs_a_full_window_and_the_factor():
    p = WatchdogParams(grad_spike=10.0, grad_window=5)
    wd = Watchdog(p)
    # Before the window is full nothing is compared, however large.
    assert wd.check_rows(rows({"d_grad_norm": 1.0}, {"d_grad_norm": 1000.0})) is None
    wd = Watchdog(p)
    assert wd.check_rows(rows(*({"d_grad_norm": 1.0 + 0.1 * i} for i in range(5)))) is None  # median 1.2
    assert wd.check_rows(rows({"d_grad_norm": 11.9}, start=6)) is None  # < 10 x median
    trig = wd.check_rows(rows({"d_grad_norm": 100.0}, start=7))
    assert trig and trig.kind == "grad_spike" and trig.step == 7


def test_a_sustained_rise_of_the_metric_triggers_and_one_bad_evaluation_does_not():
    wd = Watchdog(WatchdogParams(rise_patience=2, rise_tolerance=0.5))
    assert wd.check_eval(100, 40.0) is None
    assert wd.check_eval(200, 30.0) is None and wd.best == 30.0
    assert wd.check_eval(300, 50.0) is None and wd.rising == 1  # 50 > 1.5 x 30
    assert wd.check_eval(400, 44.0) is None and wd.rising == 0  # within 50 %: the streak ends
    assert wd.check_eval(500, 46.0) is None and wd.rising == 1
    trig = wd.check_eval(600, 47.0)
    assert trig and trig.kind == "metric_rise" and trig.step == 600
    assert wd.check_eval(700, float("nan")) is None  # no evaluation at that checkpoint
    assert wd.check_eval(800, float("inf")).kind == "nonfinite"


def test_the_bound_makes_the_next_trigger_exhausted_and_state_round_trips():
    wd = Watchdog(WatchdogParams(max_rollbacks=2))
    for i in range(2):
        trig = wd.check_rows(rows({"g_loss": float("nan")}, start=5 + i))
        assert not trig.exhausted
        wd.rolled_back(trig)
    assert wd.check_rows(rows({"g_loss": float("nan")}, start=9)).exhausted
    wd.mark_good(8, "checkpoint_000008_r2")
    again = Watchdog(WatchdogParams(max_rollbacks=2))
    again.load_state_dict(json.loads(json.dumps(wd.state_dict())))  # as trainer.json stores it
    assert again.state_dict() == wd.state_dict()
    assert [e["step"] for e in again.events] == [5, 6] and again.good_name == "checkpoint_000008_r2"
    assert again.check_rows(rows({"g_loss": float("nan")}, start=9)).exhausted


# ----------------------------------------------------------------------------- end to end


STEPS, EVERY = 24, 6


def nan_spec(prefix: str, storage: str, model: str, **debug):
    from advflow.platform.config import RunSpec

    return RunSpec.from_dict({
        "run": {"name": "wd", "storage_path": storage, "keep_checkpoints": 2},
        "data": {"prefix": prefix, "shuffle_buffer": 128, "prefetch": 2},
        "model": {"size": "tiny"},
        "optim": {"lr": 1e-3, "grad_clip": 1.0, "ema_decay": 0.9},
        "train": {"steps": STEPS, "global_batch": 16, "log_every": 3, "checkpoint_every": EVERY},
        "distributed": {"workers": 2},
        "tracking": {"register_name": model, "register_every": EVERY, "system_metrics": False},
        "watchdog": {"max_rollbacks": 2},
        "debug": debug,
    })


def _versions(client, model: str) -> list:
    return sorted(client.search_model_versions(f"name = '{model}'"), key=lambda v: int(v.version))


def _finite_weights(model_uri: str) -> bool:
    from advflow.platform.tracking.registry import load_generator

    g = load_generator(model_uri).generator
    return all(bool(p.isfinite().all()) for p in g.state_dict().values())


@pytest.mark.timeout(600)
@pytest.mark.integration
def test_a_nan_once_is_rolled_back_and_the_run_finishes_clean(digits, tmp_path, mlflow_env):
    import secrets

    from mlflow.tracking import MlflowClient

    from advflow.platform.tracking.runs import tracked_run
    from advflow.platform.train.checkpoint import read_meta
    from advflow.platform.train.local_launch import latest_checkpoint, run_local

    model = "wd-once-" + secrets.token_hex(3)
    # NaN at iteration 14 (0-based): seen when the window closing at step 15 is flushed; the last
    # good checkpoint is step 12.
    spec = nan_spec(digits, str(tmp_path), model, inject_nan_step=14, inject_nan_attempts=1)
    with tracked_run(spec) as run:
        history = run_local(spec, tmp_path / "wd", run_id=run.run_id)
        run.ok = True
    client = MlflowClient()
    # The run finished, and nothing non-finite is in what it kept.
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for r in history for k, v in r.items() if k.endswith("loss"))
    meta = read_meta(latest_checkpoint(tmp_path / "wd"))
    assert meta["step"] == STEPS and meta["watchdog"]["rollbacks"] == 1
    assert meta["watchdog"]["events"][0] | {"reason": None} == {"step": 15, "kind": "nonfinite", "good_step": 12,
                                                                "reason": None}
    assert latest_checkpoint(tmp_path / "wd").name == f"checkpoint_{STEPS:06d}_r1"
    # MLflow: the rollback as a tag and a metric at the trigger's step.
    data = client.get_run(run.run_id).data
    assert "nonfinite at step 15" in data.tags["watchdog.rollback.1"] and "step 12" in data.tags["watchdog.rollback.1"]
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "watchdog/rollbacks")] == [(15, 1.0)]
    # One version per checkpoint, none from the window that held the NaN, all finite.
    versions = _versions(client, model)
    assert [int(v.tags["step"]) for v in versions] == list(range(EVERY, STEPS + 1, EVERY))
    assert all(_finite_weights(f"models:/{model}/{v.version}") for v in versions)


@pytest.mark.timeout(600)
@pytest.mark.integration
def test_a_nan_at_every_attempt_fails_after_the_bound_naming_trigger_step_and_checkpoint(digits, tmp_path,
                                                                                          mlflow_env):
    import secrets

    from mlflow.tracking import MlflowClient

    from advflow.platform.tracking.runs import tracked_run
    from advflow.platform.train.local_launch import run_local

    model = "wd-always-" + secrets.token_hex(3)
    spec = nan_spec(digits, str(tmp_path), model, inject_nan_step=14, inject_nan_attempts=0)
    with pytest.raises(Exception) as err:
        with tracked_run(spec) as run:
            run_local(spec, tmp_path / "wd", run_id=run.run_id)
    text = str(err.value)
    assert "watchdog: nonfinite at step 15" in text and "2 rollback(s) used" in text
    assert "max_rollbacks is 2" in text and "checkpoint of step 12" in text
    client = MlflowClient()
    assert client.get_run(run.run_id).info.status == "FAILED"
    tags = client.get_run(run.run_id).data.tags
    assert {k for k in tags if k.startswith("watchdog.rollback.")} == {"watchdog.rollback.1", "watchdog.rollback.2"}
    # Only the good checkpoints before the NaN were registered.
    versions = _versions(client, model)
    assert [int(v.tags["step"]) for v in versions] == [6, 12]
    assert all(_finite_weights(f"models:/{model}/{v.version}") for v in versions)


def test_a_new_phase_starts_a_new_comparison():
    wd = Watchdog(WatchdogParams(rise_patience=2, rise_tolerance=0.5))
    wd.check_eval(100, 10.0)
    assert wd.check_eval(200, 30.0) is None and wd.rising == 1
    wd.new_phase()  # e.g. lambda_ot fixed and EMA reloads from here: compared from its first evaluation on
    assert wd.check_eval(300, 31.0) is None and wd.best == 31.0 and wd.rising == 0
    assert Watchdog().params.rise_patience == 0  # off unless configured


@pytest.mark.parametrize("section, value, field", [
    ("watchdog", {"lr_factor": 0.0}, "watchdog.lr_factor"),
    ("watchdog", {"lr_factor": 2.0}, "watchdog.lr_factor"),
    ("watchdog", {"max_rollbacks": -1}, "watchdog.max_rollbacks"),
    ("watchdog", {"logit_bound": 0.0}, "watchdog.logit_bound"),
    ("debug", {"inject_nan_step": -1}, "debug.inject_nan_step"),
    ("debug", {"inject_nan_attempts": -1}, "debug.inject_nan_attempts"),
])
def test_bad_watchdog_and_debug_settings_name_the_field(section, value, field):
    from advflow.platform.config import ConfigError, RunSpec

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        RunSpec.from_dict({"data": {"prefix": "/x"}, section: value})


def test_a_rollback_target_no_longer_kept_is_named_with_the_fix(tmp_path):
    import os

    from advflow.platform.train.local_launch import COMPLETE, LocalContext, latest_checkpoint

    ctx = LocalContext(0, 1, tmp_path, keep=2)
    with pytest.raises(FileNotFoundError, match="checkpoint_000400.*raise run.keep_checkpoints"):
        ctx.fetch_checkpoint("checkpoint_000400")
    # After a rollback the replayed checkpoint is the latest, although an abandoned one has a later step.
    for name, when in (("checkpoint_000500", 100), ("checkpoint_000400_r1", 200)):
        (tmp_path / name).mkdir()
        (tmp_path / name / COMPLETE).write_text("{}")
        os.utime(tmp_path / name / COMPLETE, (when, when))
    assert latest_checkpoint(tmp_path).name == "checkpoint_000400_r1"
    assert ctx.fetch_checkpoint("checkpoint_000400_r1") == str(tmp_path / "checkpoint_000400_r1")
