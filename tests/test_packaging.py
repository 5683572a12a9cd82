"""What advflow needs at run time is in its dependencies or a named extra, not in `test`: a scratch
virtual environment with `advflow[stack]` and no test tools starts the local stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from advflow.infra.local.proc import free_ports
from advflow.infra.local.stack import PORT_OPTIONS

REPO = Path(__file__).resolve().parents[1]
TEST_ONLY = ("pytest", "xdist", "pytest_timeout", "torchmetrics", "kubernetes_validate", "diffusers")  # not jsonschema: ray brings it


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    # A developer's shell (`eval "$(advflow stack env)"`) must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "ADVFLOW_", "VIRTUAL_ENV"))}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration  # a pip install and a whole stack
@pytest.mark.timeout(1500)
def test_the_stack_extra_without_test_tools_installs_cleanly_and_starts_the_stack(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, advflow = str(venv / "bin" / "python"), str(venv / "bin" / "advflow")
    torch = os.environ.get("ADVFLOW_TORCH", "torch==2.13.0").split()  # as infra/venv.sh pins it
    install = _run([py, "-m", "pip", "install", "-q", *torch, "-e", f"{REPO}[stack]"], tmp_path, 1200)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    check = _run([py, "-m", "pip", "check"], tmp_path, 120)
    assert check.returncode == 0, check.stdout + check.stderr

    probe = ("import importlib.util as u, json; "
             f"print(json.dumps([m for m in {TEST_ONLY!r} if u.find_spec(m)])); import psutil, moto, werkzeug")
    found = _run([py, "-c", probe], tmp_path, 120)
    assert found.returncode == 0, found.stderr  # the run-time pieces are there
    assert found.stdout.strip() == "[]", f"test tools came with advflow[stack]: {found.stdout}"

    state = tmp_path / "state"
    flags = [arg for option, port in zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS)), strict=True)
             for arg in (option.flag, str(port))]
    try:
        up = _run([advflow, "stack", "up", "--state-dir", str(state), *flags, "--num-cpus", "1",
                   "--object-store-mb", "100", "--bucket", "advflow-pkg"], tmp_path, 400)
        assert up.returncode == 0, up.stdout + up.stderr
        status = _run([advflow, "stack", "status", "--state-dir", str(state)], tmp_path, 60)
        assert status.returncode == 0, status.stdout + status.stderr
        rows = dict(line.split()[:2] for line in status.stdout.splitlines()[1:] if line.strip())
        assert rows == {"s3": "healthy", "prometheus": "healthy", "ray": "healthy", "mlflow": "healthy"}, status.stdout
    finally:
        _run([advflow, "stack", "down", "--state-dir", str(state)], tmp_path, 180)


def test_the_stack_without_moto_says_which_extra_to_install(tmp_path, monkeypatch):
    """`advflow stack up` in an install without the extra: one line naming it, before anything starts."""
    from advflow.infra.local import stack

    monkeypatch.setattr(stack, "find_spec", lambda name: None if name == "moto" else object())
    with pytest.raises(ValueError, match=r"moto's server, which is not installed: pip install 'advflow\[stack\]'"):
        stack.StackConfig.resolve({"state_dir": tmp_path}, {})
    # an external endpoint needs no moto
    assert stack.StackConfig.resolve({"state_dir": tmp_path}, {"AWS_ENDPOINT_URL": "http://minio:9000/"}).validate()
