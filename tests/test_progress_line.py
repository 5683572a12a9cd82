"""The progress line (platform/train/callbacks.py `ProgressMeter`, issue 24): no `nan` and no
`0.0 samples/s` when the rate is not yet known, and a rate measured only from this attempt's own
moments (a resumed attempt's first report at step > 0 is no rate from step 0). A fake clock: every
call passes `now`."""

from __future__ import annotations

import re

from advflow.platform.train.callbacks import ProgressMeter

UNKNOWN = "— samples/s"


def _meter(total: int = 1000, batch: int = 64) -> ProgressMeter:
    return ProgressMeter(total, batch, summary=lambda m: f"D {m['d']:.4f}" if "d" in m else "")


def _assert_unknown(line: str) -> None:
    assert "nan" not in line.lower(), line
    assert "0.0 samples/s" not in line, line
    assert UNKNOWN in line and line.split("| ETA ")[1].startswith("—"), line


def test_the_drivers_first_line_says_the_rate_is_not_known_yet():
    m = _meter()
    # The driver's callback never calls start: its first report has nothing to measure from.
    line = m.line(100, {"d": 0.5, "time/data_wait_frac": 0.02}, now=50.0)
    _assert_unknown(line)
    assert line.startswith("step 100/1000 | — samples/s | D 0.5000 | data wait 2.0% | ETA —"), line
    # The second report measures from the first: 100 steps in 10 s, 64 samples a step.
    line = m.line(200, {"d": 0.4}, now=60.0)
    assert "640.0 samples/s" in line and line.endswith("ETA 80s"), line


def test_a_resumed_attempt_measures_from_its_own_reports_not_from_step_0():
    m = _meter()
    # A new driver resuming a run: the first report is at step 600, 3 s after the driver started.
    # Measured from step 0 it would claim 600 steps in 3 s; it must say it does not know yet.
    _assert_unknown(m.line(600, {}, now=3.0))
    line = m.line(700, {}, now=23.0)  # 100 steps in 20 s of this attempt
    assert "320.0 samples/s" in line and line.endswith("ETA 60s"), line


def test_a_restart_within_one_driver_forgets_the_previous_attempts_mark():
    m = _meter()
    m.line(100, {}, now=0.0)
    m.line(200, {}, now=10.0)
    # Workers failed; Ray restarts them from the step-200 checkpoint. The restart took 100 s: the
    # next report (step 300) must not fold those 100 s into the rate.
    m.new_attempt()
    _assert_unknown(m.line(300, {}, now=120.0))
    assert "640.0 samples/s" in m.line(400, {}, now=130.0)


def test_the_workers_line_measures_from_the_attempts_start():
    m = _meter()
    m.start(500, now=1000.0)  # the loop resumed at step 500 (state restored)
    line = m.line(510, {"d": 0.1}, now=1002.0)  # 10 steps in 2 s
    assert "320.0 samples/s" in line and re.search(r"ETA 98s$", line), line


def test_a_rollback_or_no_elapsed_time_gives_no_rate_rather_than_nan_or_zero():
    m = _meter()
    m.start(0, now=0.0)
    m.line(50, {}, now=5.0)
    _assert_unknown(m.line(40, {}, now=6.0))  # the watchdog rolled back to step 40
    _assert_unknown(m.line(40, {}, now=7.0))  # no step since
    _assert_unknown(m.line(45, {}, now=7.0))  # no time since (a coarse clock)
    assert "nan" not in m.line(1000, {}, now=8.0).lower()  # the end: ETA 0s


def test_the_ray_drivers_callback_starts_a_new_attempt_when_workers_fail(monkeypatch):
    # Ray Train's UserCallback has no "attempt started" hook: after_exception is the moment before
    # the worker group restarts, so the first line after the restart must not count the restart.
    from advflow.platform.train import ray_launch

    m = _meter()
    callback = ray_launch.ProgressCallback(m)
    clock = iter([10.0, 20.0, 500.0])
    monkeypatch.setattr(ray_launch.time, "time", lambda: next(clock))
    lines = []
    monkeypatch.setattr(ray_launch.log, "info", lambda text, *a: lines.append(text % a if a else text))
    callback.after_report(None, [{"step": 100}], None)
    callback.after_report(None, [{"step": 200}], None)
    assert "640.0 samples/s" in lines[-1], lines
    callback.after_exception(None, {0: RuntimeError("worker died")})
    callback.after_report(None, [{"step": 300}], None)  # 480 s later, the restart included
    _assert_unknown(lines[-1])
