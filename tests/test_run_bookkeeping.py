"""Run bookkeeping after a killed driver (issue 15, finding 5): the death of a driver is recorded
(KILLED, with the time) by the next driver of the run or by jobs/stale_runs.py, and every Ray
submission id that drove a run is kept."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from advflow.platform.config import RunSpec
from advflow.platform.tracking import runs as tracking

pytestmark = pytest.mark.integration  # the MLflow server, or a job script as a process

REPO = Path(__file__).resolve().parents[1]


def _spec(storage: str) -> RunSpec:
    return RunSpec.from_dict({"run": {"name": "bookkeeping", "storage_path": storage},
                              "data": {"prefix": "/nowhere"}, "model": {"size": "tiny"},
                              "tracking": {"experiment": "test-bookkeeping"}})


def _as_submission(monkeypatch, sub: str) -> None:
    """What `ray job submit` gives its driver: the submission id in Ray's job config."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": sub}}))


def _stale_runs():
    spec = importlib.util.spec_from_file_location("stale_runs_job", REPO / "jobs" / "stale_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resubmission_records_the_killed_attempt_and_keeps_every_submission_id(tmp_path, mlflow_env, monkeypatch):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    _as_submission(monkeypatch, "raysubmit_first")
    first = tracking.open_run(_spec(str(tmp_path)))
    tags = client.get_run(first).data.tags
    assert tags["advflow.attempt"] == "1" and json.loads(tags["advflow.driver"])["pid"] > 0
    # The first driver is SIGKILLed here: it never calls close_run, the run stays RUNNING.
    _as_submission(monkeypatch, "raysubmit_second")
    again = tracking.open_run(_spec(str(tmp_path)))
    assert again == first
    run = client.get_run(first)
    tags = run.data.tags
    assert tags["advflow.attempt.1.ended"].startswith("KILLED at 20"), tags
    assert tags["advflow.attempt"] == "2"
    assert json.loads(tags["ray.submission_ids"]) == ["raysubmit_first", "raysubmit_second"]
    assert tags["ray.submission_id"] == "raysubmit_second"
    assert run.info.status == "RUNNING"  # continued by the second attempt

    # The second attempt fails and closes the run; a third records how the second ended.
    tracking.close_run(_spec(str(tmp_path)), first, ok=False)
    _as_submission(monkeypatch, "raysubmit_second")  # the same submission retried: not listed twice
    tracking.open_run(_spec(str(tmp_path)))
    tags = client.get_run(first).data.tags
    assert tags["advflow.attempt.2.ended"].startswith("FAILED at 20")
    assert tags["advflow.attempt.1.ended"].startswith("KILLED")  # kept
    assert json.loads(tags["ray.submission_ids"]) == ["raysubmit_first", "raysubmit_second"]


def test_stale_runs_marks_a_dead_drivers_run_killed_and_leaves_live_ones(tmp_path, mlflow_env, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    dead = tracking.open_run(_spec(str(tmp_path / "dead")))
    alive = tracking.open_run(_spec(str(tmp_path / "alive")))  # this process: its driver lives
    driver = json.loads(client.get_run(dead).data.tags["advflow.driver"])
    client.set_tag(dead, "advflow.driver", json.dumps({**driver, "pid": _gone_pid(), "started": None}))

    job = _stale_runs()
    assert job.main(["--dry-run", "--experiment", "test-bookkeeping"]) == 0
    out = capsys.readouterr().out
    assert f"would mark KILLED: run {dead}" in out and f"alive: run {alive}" in out
    assert client.get_run(dead).info.status == "RUNNING"  # a dry run changes nothing

    assert job.main(["--experiment", "test-bookkeeping"]) == 0
    captured = capsys.readouterr()
    assert f"KILLED: run {dead}" in captured.out and "is gone" in captured.out
    assert "marked KILLED" in captured.out  # the summary line
    run = client.get_run(dead)
    assert run.info.status == "KILLED" and run.info.end_time
    assert run.data.tags["advflow.attempt.1.ended"].startswith("KILLED at 20")
    assert client.get_run(alive).info.status == "RUNNING"

    # A resubmission of the swept run does not overwrite what the sweep recorded.
    tracking.open_run(_spec(str(tmp_path / "dead")))
    tags = client.get_run(dead).data.tags
    assert "jobs/stale_runs.py" in tags["advflow.attempt.1.ended"] and tags["advflow.attempt"] == "2"


def test_stale_runs_asks_ray_about_the_submission(tmp_path, mlflow_env, monkeypatch):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    ids = {}
    for state in ("STOPPED", "RUNNING"):
        _as_submission(monkeypatch, f"raysubmit_{state.lower()}")
        ids[state] = tracking.open_run(_spec(str(tmp_path / state)))
    states = {"raysubmit_stopped": "STOPPED", "raysubmit_running": "RUNNING"}
    found = {r.run_id: r for r in tracking.sweep_stale_runs(client, states.get, experiments=["test-bookkeeping"])}
    assert found[ids["STOPPED"]].verdict == "dead" and "STOPPED" in found[ids["STOPPED"]].reason
    # Ray says the job runs: alive, although this process (the recorded driver) would also say so.
    assert found[ids["RUNNING"]].verdict == "alive" and "raysubmit_running" in found[ids["RUNNING"]].reason
    assert client.get_run(ids["STOPPED"]).info.status == "KILLED"
    assert client.get_run(ids["RUNNING"]).info.status == "RUNNING"


def test_stale_runs_without_a_tracking_uri_says_which_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "stale_runs.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[advflow] ") and "MLFLOW_TRACKING_URI" in lines[0], lines
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
