"""Honest connection (issue 13 §6): a configured Ray address that does not answer fails within a
bounded time with the address and the fix; a private local Ray starts only when no address is
configured, and the job says so."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advflow.platform.config import ConfigError
from advflow.platform.train import connect

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        self.now += dt


@pytest.mark.parametrize("address, target", [
    ("10.0.0.5:6379", ("10.0.0.5", 6379)),
    ("ray://head.svc:10001", ("head.svc", 10001)),
    ("http://127.0.0.1:8265", ("127.0.0.1", 8265)),
    ("auto", None),
    ("local", None),
])
def test_probe_targets(address, target):
    assert connect.probe_target(address) == target


def test_an_address_without_a_port_is_refused_with_the_forms_that_work():
    with pytest.raises(ConfigError, match="not a Ray address .*host:port"):
        connect.probe_target("head-node")


def test_unreachable_address_fails_after_the_timeout_naming_address_source_and_fix():
    clock, tries = FakeClock(), []

    def refuse(target, timeout):
        tries.append((target, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(connect.RayUnreachable) as err:
        connect.wait_reachable("10.1.2.3:6379", "RAY_ADDRESS", 5.0, connect=refuse, clock=clock, sleep=clock.sleep)
    text = str(err.value)
    assert text.startswith("RAY_ADDRESS=10.1.2.3:6379: no Ray cluster answers at 10.1.2.3:6379 after 5 s")
    assert "Connection refused" in text and "unset RAY_ADDRESS" in text and connect.CONNECT_TIMEOUT_ENV in text
    assert clock.now >= 5.0 and len(tries) == 6  # kept trying once a second until the deadline
    assert all(target == ("10.1.2.3", 6379) for target, _ in tries)


def test_a_cluster_that_comes_up_within_the_timeout_is_waited_for():
    clock, calls = FakeClock(), []

    class Conn:
        def close(self):
            calls.append("closed")

    def up_on_third(target, timeout):
        calls.append(target)
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return Conn()

    connect.wait_reachable("127.0.0.1:6379", "--ray-address", 30.0, connect=up_on_third, clock=clock,
                           sleep=clock.sleep)
    assert calls[-1] == "closed" and clock.now == 2.0


def test_no_address_starts_a_private_local_ray_and_says_so(monkeypatch, capsys):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    connect.ensure_ray(None)
    assert calls and calls[0]["address"] == "local"
    out = capsys.readouterr().out
    assert "no Ray address is configured" in out and "private local Ray" in out


@pytest.mark.integration
def test_a_configured_address_never_falls_back_to_a_local_ray(monkeypatch):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    monkeypatch.setenv(connect.CONNECT_TIMEOUT_ENV, "1")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    with pytest.raises(connect.RayUnreachable, match="RAY_ADDRESS=127.0.0.1"):
        connect.ensure_ray(None)
    assert calls == []


@pytest.mark.parametrize("script, extra", [
    ("train.py", ["--config", "jobs/configs/digits_tiny.yaml"]),
    ("sweep.py", ["--config", "jobs/configs/digits_tiny.yaml", "--space", "jobs/configs/sweeps/digits_space.yaml",
                  "--trials", "1", "--storage", "sqlite:///STUDY"]),
])
@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.integration
def test_jobs_fail_fast_on_an_unreachable_cluster_and_leave_nothing_behind(script, extra, how, tmp_path):
    """The real entrypoints: rc 2 and one `[advflow]` line within the bounded time (3 s here plus the
    job's start-up), no local Ray started, no study, no MLflow run (none configured: no ./mlruns)."""
    address = f"127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env[connect.CONNECT_TIMEOUT_ENV] = "3"
    args = [str(REPO / a) if a.startswith("jobs/") else a.replace("STUDY", str(tmp_path / "study.db")) for a in extra]
    args += ["--set", f"data.prefix={tmp_path / 'none'}", "--set", f"run.storage_path={tmp_path / 'runs'}"]
    if how == "flag":
        args += ["--ray-address", address]
    else:
        env["RAY_ADDRESS"] = address
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    wall = time.monotonic() - t0
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    lines = [line for line in text.splitlines() if line.startswith("[advflow] ") and address in line]
    source = "--ray-address" if how == "flag" else "RAY_ADDRESS"
    assert len(lines) == 1 and f"{source}={address}" in lines[0] and "after 3 s" in lines[0], text
    assert "Traceback" not in text and "starting a private local Ray" not in text
    assert wall < 120, f"took {wall:.0f} s"
    assert not (tmp_path / "study.db").exists() and not (tmp_path / "mlruns").exists() and not (tmp_path / "runs").exists()
