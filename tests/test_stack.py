"""`advflow stack up | down | status | env` and the single-service helpers behind it.

The end-to-end tests drive the real console script against real services (moto, MLflow, a Ray head
with token auth) on free ports in a temporary state dir, so a developer's running stack is never
touched. They run in file order on one module-scoped stack: up -> status -> env -> S3 -> MLflow ->
Ray jobs (with and without the token) -> up again -> seed what a restart must keep -> down -> up
(everything is back) -> SIGKILL every process, as a machine restart would -> up (everything is
back again). The fixture takes the stack down at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from advflow.infra.local import services
from advflow.infra.local.proc import ServiceError, free_port, free_ports, http_get, port_in_use, session_alive
from advflow.infra.local import stack as stack_mod
from advflow.infra.local.stack import PORT_OPTIONS, StackConfig, StackState, format_exports

BIN = Path(sys.executable).parent
# Prefer the installed console script (what users run); fall back to the module.
ADVFLOW = (
    [str(BIN / "advflow")]
    if (BIN / "advflow").exists()
    else [sys.executable, "-m", "advflow.infra.local.cli"]
)
RAY = str(BIN / "ray")
PROBE = Path(__file__).resolve().parent / "stack_probe.py"

# Keep a developer's shell (an earlier `eval "$(advflow stack env)"`, own Ray token) out of the tests.
_LEAKY_PREFIXES = ("RAY_", "AWS_", "MLFLOW_", "ADVFLOW_")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_PREFIXES)}
    env.update(extra)
    return env


def _advflow(*args: str, cwd: Path, timeout: float = 400, env: dict | None = None):
    return subprocess.run(
        [*ADVFLOW, *args],
        cwd=cwd,
        env=env or _clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _port_flags(ports: list[int]) -> list[str]:
    flags = []
    for option, port in zip(PORT_OPTIONS, ports, strict=True):
        flags += [option.flag, str(port)]
    return flags


# --------------------------------------------------------------------------- fast unit tests


def test_config_precedence_flag_over_env_over_default(tmp_path):
    environ = {"ADVFLOW_MLFLOW_PORT": "25100", "ADVFLOW_S3_PORT": "25200", "ADVFLOW_BUCKET": "envbucket"}
    config = StackConfig.resolve({"state_dir": tmp_path, "s3_port": 25300}, environ)
    assert config.s3_port == 25300  # flag beats env
    assert config.mlflow_port == 25100  # env beats default
    assert config.ray_dashboard_port == StackConfig.ray_dashboard_port  # default
    assert config.bucket == "envbucket"
    assert config.s3_endpoint is None
    assert config.state_dir == tmp_path.resolve()


def test_up_restarts_a_ray_head_whose_jobs_lack_a_variable_the_stack_gives_now(tmp_path):
    # After an upgrade: a healthy head started before MLflow had authentication hands its jobs no
    # credentials file, and they would get 401. `up` restarts it; a current head is kept.
    config = StackConfig.resolve({"state_dir": tmp_path}, {})
    stopped = []

    def head(job_env):
        return services.ServiceHandle(name="ray", kind="ray-head", url="http://127.0.0.1:1", pid=None, log_path=None,
                                      env={}, info={"job_env": job_env})

    old = head(sorted(set(stack_mod._job_env(config)) - {services.CREDENTIALS_FILE_ENV}))
    old.stop = lambda *a, **k: stopped.append("old")
    healthy, lines = {"ray": old, "s3": object()}, []
    stack_mod._restart_outdated_ray(healthy, config, lines.append)
    assert stopped == ["old"] and "ray" not in healthy and "s3" in healthy
    assert services.CREDENTIALS_FILE_ENV in lines[0] and "restarting it" in lines[0]

    current = head(sorted(stack_mod._job_env(config)))
    current.stop = lambda *a, **k: stopped.append("current")
    healthy = {"ray": current}
    stack_mod._restart_outdated_ray(healthy, config, lines.append)
    assert healthy == {"ray": current} and stopped == ["old"]


def test_config_external_s3_unless_it_is_our_own_moto(tmp_path):
    external = StackConfig.resolve({"state_dir": tmp_path}, {"AWS_ENDPOINT_URL": "http://minio:9000/"})
    assert external.s3_endpoint == "http://minio:9000"
    # An `eval "$(advflow stack env)"` leaves our moto URL behind; `up` must not treat it as external.
    ours = StackConfig.resolve(
        {"state_dir": tmp_path}, {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{StackConfig.s3_port}"}
    )
    assert ours.s3_endpoint is None


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"mlflow_port": 80}, ["mlflow_port", "--mlflow-port", "ADVFLOW_MLFLOW_PORT"]),
        ({"mlflow_port": 26000, "s3_port": 26000}, ["mlflow_port", "s3_port", "26000"]),
        ({"bucket": "Bad_Bucket"}, ["bucket", "--bucket"]),
        ({"num_cpus": 0}, ["num_cpus", "--num-cpus"]),
    ],
)
def test_config_validation_names_field_and_fix(tmp_path, overrides, words):
    with pytest.raises(ValueError) as info:
        StackConfig.resolve({"state_dir": tmp_path, **overrides}, {})
    for word in words:
        assert word in str(info.value)


def test_config_bad_env_port_names_the_variable(tmp_path):
    with pytest.raises(ValueError, match="ADVFLOW_S3_PORT"):
        StackConfig.resolve({"state_dir": tmp_path}, {"ADVFLOW_S3_PORT": "nine"})


@pytest.mark.integration
def test_format_exports_survives_the_shell(tmp_path):
    values = {"A_PLAIN": "x", "A_SPACE": "a b", "A_QUOTE": "it's $HOME"}
    script = format_exports(values) + 'printf "%s|%s|%s" "$A_PLAIN" "$A_SPACE" "$A_QUOTE"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out == "x|a b|it's $HOME"


def test_ray_temp_dir_stays_short_enough_for_unix_sockets(tmp_path):
    short = Path("/p/.advflow/stack")
    assert services.ray_temp_dir(short) == short / "ray"
    deep = tmp_path / ("d" * 60)
    chosen = services.ray_temp_dir(deep)
    assert len(str(chosen)) <= 40
    assert chosen == services.ray_temp_dir(deep)  # stable: the same state dir, the same temp dir


@pytest.mark.integration
def test_port_taken_error_names_port_service_and_flag(tmp_path):
    ports = free_ports(len(PORT_OPTIONS))
    mlflow_port = ports[[o.field for o in PORT_OPTIONS].index("mlflow_port")]
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", mlflow_port))
        blocker.listen()
        result = _advflow(
            "stack", "up", "--state-dir", str(tmp_path / "st"), *_port_flags(ports),
            cwd=tmp_path, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert str(mlflow_port) in result.stderr
    assert "MLflow" in result.stderr and "--mlflow-port" in result.stderr
    assert "ADVFLOW_MLFLOW_PORT" in result.stderr
    # Ports are checked before anything starts: nothing was launched, nothing recorded.
    assert not (tmp_path / "st" / "stack.json").exists()
    assert not port_in_use(ports[0]) and not port_in_use(ports[1])


@pytest.mark.integration
def test_start_moto_handle_serves_s3_and_stops(tmp_path):
    port = free_port()
    with services.start_moto(tmp_path / "moto", port) as s3:
        assert s3.url == f"http://127.0.0.1:{port}"
        services.ensure_bucket(s3, "unit-bucket")
        services.ensure_bucket(s3, "unit-bucket")  # idempotent
        names = [b["Name"] for b in services.s3_client(s3).list_buckets()["Buckets"]]
        assert names == ["unit-bucket"]
        pid = s3.pid
    assert not session_alive(pid)
    assert not port_in_use(port)
    assert s3.health() == "not running"


@pytest.mark.integration
def test_in_memory_moto_requires_its_generated_credentials(tmp_path):
    import boto3
    from botocore.exceptions import ClientError

    with services.start_moto(tmp_path / "moto") as s3:
        services.ensure_bucket(s3, "mem-bucket")  # with the key in s3.env
        services.s3_client(s3).put_object(Bucket="mem-bucket", Key="k", Body=b"v")
        assert s3.info["credentials_file"] == str(tmp_path / "moto" / services.S3_CREDENTIALS_FILE)
        wrong = boto3.session.Session().client(
            "s3", endpoint_url=s3.url, region_name="us-east-1",
            aws_access_key_id=s3.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key="testing",
        )  # fmt: skip
        for call in (lambda: wrong.get_object(Bucket="mem-bucket", Key="k"),
                     lambda: wrong.put_object(Bucket="mem-bucket", Key="k", Body=b"planted"),
                     lambda: wrong.list_objects_v2(Bucket="mem-bucket")):  # fmt: skip
            with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
                call()
        assert services.s3_client(s3).get_object(Bucket="mem-bucket", Key="k")["Body"].read() == b"v"
        # A Ray head's jobs get the file's path, never the secret itself.
        worker = services.worker_env(s3)
        assert worker["AWS_SHARED_CREDENTIALS_FILE"] == s3.info["credentials_file"]
        assert s3.env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(worker)


@pytest.mark.integration
def test_external_s3_is_checked_and_used_as_is(tmp_path):
    with services.start_moto(tmp_path / "moto") as s3, pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            mp.setenv(key, s3.env[key])
        external = services.external_s3(s3.url + "/", timeout_s=10)
        assert external.external and external.url == s3.url and external.pid is None
        assert "AWS_ACCESS_KEY_ID" not in external.env  # credentials stay the user's own
        services.ensure_bucket(external, "ext-bucket")
        assert "ext-bucket" in [b["Name"] for b in services.s3_client(s3).list_buckets()["Buckets"]]
        assert external.stop() is False and s3.alive()  # never stops what it did not start
    with pytest.raises(ServiceError, match="AWS_ENDPOINT_URL"):
        services.external_s3(f"http://127.0.0.1:{free_port()}", timeout_s=1)


# ------------------------------------------------------------------------ the whole stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A stack started with the CLI on free ports; always taken down at the end."""
    root = tmp_path_factory.mktemp("stack")
    state_dir = root / "state"
    ports = dict(zip([o.field for o in PORT_OPTIONS], free_ports(len(PORT_OPTIONS)), strict=True))
    started = time.monotonic()
    result = _advflow(
        "stack", "up", "--state-dir", str(state_dir), *_port_flags(list(ports.values())),
        "--num-cpus", "1", "--object-store-mb", "100", "--bucket", "advflow-test",
        cwd=root,
    )  # fmt: skip
    up_seconds = time.monotonic() - started
    info = {"root": root, "state_dir": state_dir, "ports": ports, "up": result, "up_seconds": up_seconds}
    try:
        assert result.returncode == 0, f"stack up failed:\n{result.stdout}\n{result.stderr}"
        print(f"\n`advflow stack up` took {up_seconds:.1f}s")
        yield info
    finally:
        _advflow("stack", "down", "--state-dir", str(state_dir), cwd=root, timeout=120)
        temp_dir = services.ray_temp_dir(state_dir.resolve())
        if temp_dir.parent != state_dir.resolve():
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack_env(stack):
    """The variables a shell gets from `eval "$(advflow stack env)"`, read back from a real bash."""
    command = (
        f'eval "$({" ".join(ADVFLOW)} stack env --state-dir {stack["state_dir"]})" && '
        f'{sys.executable} -c "import json, os; print(json.dumps(dict(os.environ)))"'
    )
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=stack["root"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_up_starts_all_services_healthy(stack):
    out = stack["up"].stdout
    for name in ("s3", "prometheus", "ray", "mlflow"):
        assert f"{name:<6} healthy after" in out
    status = _advflow(
        "stack", "status", "--state-dir", str(stack["state_dir"]), cwd=stack["root"], timeout=60
    )
    assert status.returncode == 0, status.stdout + status.stderr
    lines = [line.split() for line in status.stdout.splitlines()[1:]]
    assert [(cols[0], cols[1]) for cols in lines] == [
        ("s3", "healthy"),
        ("prometheus", "healthy"),
        ("ray", "healthy"),
        ("mlflow", "healthy"),
    ]
    ports = stack["ports"]
    assert f"http://127.0.0.1:{ports['prometheus_port']}" in status.stdout  # its URL, as the issue asks
    assert f"http://127.0.0.1:{ports['ray_dashboard_port']}" in status.stdout
    assert f"http://127.0.0.1:{ports['mlflow_port']}" in status.stdout


@pytest.mark.slow
def test_env_exports_point_at_the_stack(stack, stack_env):
    ports = stack["ports"]
    assert stack_env["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{ports['ray_dashboard_port']}"
    assert stack_env["RAY_ADDRESS"] == f"127.0.0.1:{ports['ray_gcs_port']}"
    assert stack_env["RAY_AUTH_MODE"] == "token"
    assert stack_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert stack_env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{ports['s3_port']}"
    assert stack_env["MLFLOW_S3_ENDPOINT_URL"] == stack_env["AWS_ENDPOINT_URL"]
    assert stack_env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow_port']}"
    assert stack_env["ADVFLOW_BUCKET"] == "advflow-test"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        assert stack_env[key]
    # The S3 key is the one `up` generated into the 0600 file, not a well-known default.
    creds_file = stack["state_dir"] / services.S3_CREDENTIALS_FILE
    assert stat.S_IMODE(creds_file.stat().st_mode) == 0o600
    assert stack_env["AWS_ACCESS_KEY_ID"] in creds_file.read_text()
    assert stack_env["AWS_SECRET_ACCESS_KEY"] in creds_file.read_text()
    assert stack_env["AWS_SECRET_ACCESS_KEY"] != "testing"
    # MLflow's admin credential, as MLflow's client reads it, from the 0600 file `up` generated.
    mlflow_file = stack["state_dir"] / "mlflow_credentials"
    assert stat.S_IMODE(mlflow_file.stat().st_mode) == 0o600
    assert stack_env["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert f"mlflow_tracking_password = {stack_env['MLFLOW_TRACKING_PASSWORD']}" in mlflow_file.read_text()
    token_file = Path(stack_env["RAY_AUTH_TOKEN_PATH"])
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # a secret: owner-only
    assert len(token_file.read_text().strip()) == 64


@pytest.mark.slow
def test_s3_endpoint_from_env_creates_and_lists_buckets(stack_env, monkeypatch):
    import boto3

    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, stack_env[key])
    client = boto3.client("s3")  # endpoint and credentials from the exported variables only
    client.create_bucket(Bucket="probe-bucket")
    client.put_object(Bucket="probe-bucket", Key="k.txt", Body=b"payload")
    names = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert {"advflow-test", "probe-bucket"} <= names  # `up` created the stack's bucket
    assert client.get_object(Bucket="probe-bucket", Key="k.txt")["Body"].read() == b"payload"


@pytest.mark.slow
def test_the_stack_s3_refuses_other_credentials(stack_env):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    def client(**kw):
        return boto3.session.Session().client(
            "s3", endpoint_url=stack_env["AWS_ENDPOINT_URL"], region_name="us-east-1", **kw
        )

    right = client(aws_access_key_id=stack_env["AWS_ACCESS_KEY_ID"],
                   aws_secret_access_key=stack_env["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    right.put_object(Bucket="advflow-test", Key="auth/right", Body=b"ok")
    for bad in (
        client(aws_access_key_id="testing", aws_secret_access_key="testing"),  # the old default
        client(aws_access_key_id=stack_env["AWS_ACCESS_KEY_ID"], aws_secret_access_key="wrong"),
        client(config=Config(signature_version=UNSIGNED)),
    ):
        for call in (lambda: bad.get_object(Bucket="advflow-test", Key="auth/right"),
                     lambda: bad.put_object(Bucket="advflow-test", Key="auth/planted", Body=b"x"),
                     lambda: bad.list_objects_v2(Bucket="advflow-test")):  # fmt: skip
            with pytest.raises(ClientError) as info:
                call()
            assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    listed = right.list_objects_v2(Bucket="advflow-test", Prefix="auth/")["Contents"]
    assert [o["Key"] for o in listed] == ["auth/right"]


@pytest.mark.slow
def test_mlflow_artifact_lands_in_the_s3_bucket(stack_env, tmp_path, monkeypatch):
    import boto3
    from mlflow.tracking import MlflowClient

    for key, value in stack_env.items():
        if key.startswith(("AWS_", "MLFLOW_")):
            monkeypatch.setenv(key, value)
    client = MlflowClient(tracking_uri=stack_env["MLFLOW_TRACKING_URI"])
    experiment_id = client.create_experiment(f"stack-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    artifact = tmp_path / "note.txt"
    artifact.write_text("artifact body")
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)

    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket="advflow-test", Prefix="mlflow/")
    keys = [obj["Key"] for obj in listed.get("Contents", [])]
    matching = [key for key in keys if run.info.run_id in key and key.endswith("note.txt")]
    assert matching, f"artifact not in s3://advflow-test/mlflow/: {keys}"
    assert s3.get_object(Bucket="advflow-test", Key=matching[0])["Body"].read() == b"artifact body"


def _submit(env: dict[str, str], workdir: Path, *entrypoint: str):
    return subprocess.run(
        [RAY, "job", "submit", "--working-dir", str(workdir), "--", *entrypoint],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture()
def job_dir(tmp_path):
    workdir = tmp_path / "job"
    workdir.mkdir()
    # The job prints what it inherited from the head: the stack's S3 endpoint and bucket.
    (workdir / "probe.py").write_text(
        "import os\nprint('PROBE', os.environ.get('AWS_ENDPOINT_URL'), os.environ.get('ADVFLOW_BUCKET'))\n"
    )
    return workdir


@pytest.mark.slow
def test_ray_job_submit_with_the_token_succeeds(stack_env, job_dir, tmp_path):
    env = {**stack_env, "HOME": str(tmp_path)}  # HOME: no ~/.ray/auth_token to fall back on
    result = _submit(env, job_dir, "python", "probe.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"PROBE {stack_env['AWS_ENDPOINT_URL']} advflow-test" in result.stdout
    assert "succeeded" in result.stdout + result.stderr


@pytest.mark.slow
def test_ray_job_submit_without_the_token_is_rejected(stack_env, job_dir, tmp_path):
    # No auth variables and an empty HOME: the client sends no token at all.
    no_token = _clean_env(HOME=str(tmp_path), RAY_API_SERVER_ADDRESS=stack_env["RAY_API_SERVER_ADDRESS"])
    result = _submit(no_token, job_dir, "python", "probe.py")
    assert result.returncode != 0
    rejected = "Unauthorized" in result.stderr or "Authentication required" in result.stderr
    assert rejected, result.stderr[-2000:]
    assert "PROBE" not in result.stdout

    # A wrong token is refused as well.
    wrong = _clean_env(
        HOME=str(tmp_path),
        RAY_API_SERVER_ADDRESS=stack_env["RAY_API_SERVER_ADDRESS"],
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN="0" * 64,
    )
    result = _submit(wrong, job_dir, "python", "probe.py")
    assert result.returncode != 0
    refused = "Forbidden" in result.stderr or "Authentication failed" in result.stderr
    assert refused, result.stderr[-2000:]
    assert "PROBE" not in result.stdout


@pytest.mark.slow
def test_plain_ray_init_from_the_exported_shell_connects(stack_env, tmp_path):
    # Scripts run directly (not through `ray job submit`) call ray.init() with no address.
    script = (
        "import os, ray\n"
        "ray.init()\n"
        "print('TASK', ray.get(ray.remote(lambda: os.environ.get('ADVFLOW_BUCKET')).remote()))\n"
    )
    env = {**stack_env, "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TASK advflow-test" in result.stdout


# A job as advflow runs one: ensure_ray() (the driver's runtime_env), then a task and an actor that
# write, read and list S3 with each client advflow uses, taking credentials only from their process.
# While the actor is alive the driver dumps what Ray's state API shows of the job.
_SECRET_PROBE = """
import json, os, sys, types, uuid
import ray
from advflow.platform.train.ray_launch import ensure_ray, storage

SECRET = os.environ.get("PROBE_SECRET_HASH")  # only a hash of it travels; the job never prints it
PREFIX = "secret-probe/" + uuid.uuid4().hex[:8]

def use_s3(where):
    import hashlib, boto3, pyarrow.fs
    from advflow.platform.data.storage import Storage
    bucket = os.environ["ADVFLOW_BUCKET"]
    boto3.session.Session().client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).put_object(
        Bucket=bucket, Key=f"{PREFIX}/{where}/boto3", Body=b"boto3")
    st = Storage(f"s3://{bucket}/{PREFIX}/{where}")
    st.write_atomic("s3fs", b"s3fs")
    path, fs = storage(types.SimpleNamespace(run=types.SimpleNamespace(storage_path=f"s3://{bucket}/{PREFIX}")))
    with fs.open_output_stream(f"{path}/{where}/pyarrow") as out:
        out.write(b"pyarrow")
    listed = sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/{where}")))
    seen = {k for k, v in os.environ.items() if hashlib.sha256(v.encode()).hexdigest() == SECRET}
    return {"listed": listed, "read": st.read("s3fs").decode(), "secret_in_env": sorted(seen),
            "mlflow": use_mlflow()}

def use_mlflow():
    # The worker has only the head's ADVFLOW_MLFLOW_CREDENTIALS_FILE: importing advflow's tracking
    # package turns it into the credential, so this authenticated call succeeds (else 401).
    import advflow.platform.tracking
    from mlflow.tracking import MlflowClient
    return len(MlflowClient().search_experiments(max_results=1)) >= 0

@ray.remote(num_cpus=0)
def task():
    return use_s3("task")

@ray.remote(num_cpus=0)
class Actor:
    def run(self):
        return use_s3("actor")

ensure_ray()
actor = Actor.remote()
result = {"task": ray.get(task.remote()), "actor": ray.get(actor.run.remote())}
from ray.util.state import list_actors, list_jobs, list_tasks
state = [list_actors(detail=True, limit=1000), list_tasks(detail=True, limit=10000), list_jobs(detail=True)]
with open(sys.argv[1], "w") as fh:
    fh.write(repr(state))
print("PROBE " + json.dumps(result, sort_keys=True))
"""


def _probe_result(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


@pytest.mark.slow
def test_no_s3_secret_in_rays_apis_while_jobs_use_s3(stack, stack_env, tmp_path):
    import hashlib
    import urllib.request

    secret = stack_env["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) >= 40 and secret in (stack["state_dir"] / services.S3_CREDENTIALS_FILE).read_text()
    script = tmp_path / "job" / "secret_probe.py"
    script.parent.mkdir()
    script.write_text(_SECRET_PROBE)
    env = {**stack_env, "HOME": str(tmp_path), "PROBE_SECRET_HASH": hashlib.sha256(secret.encode()).hexdigest()}
    want = {"listed": ["boto3", "pyarrow", "s3fs"], "read": "s3fs", "secret_in_env": [], "mlflow": True}

    # 1. A driver run from the shell that holds the secret (`eval "$(advflow stack env)"`).
    direct = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "state_direct.txt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert direct.returncode == 0, direct.stdout[-3000:] + direct.stderr[-3000:]
    assert _probe_result(direct.stdout) == {"actor": want, "task": want}  # S3 works, no secret in env

    # 2. The same job through `ray job submit`: its driver gets the head's environment.
    submitted = _submit(env, script.parent, "python", "secret_probe.py", str(tmp_path / "state_job.txt"))
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert _probe_result(submitted.stdout) == {"actor": want, "task": want}
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout).group(0)
    logs = subprocess.run([RAY, "job", "logs", job_id], env=env, capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0 and "PROBE " in logs.stdout, logs.stderr[-2000:]

    # What Ray shows, during each job (dumped by the driver) and after (HTTP API, with the token).
    token = Path(stack_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    shown = {"during the direct job": (tmp_path / "state_direct.txt").read_text(),
             "during the submitted job": (tmp_path / "state_job.txt").read_text(),
             "ray job logs": logs.stdout + logs.stderr, "ray job submit": submitted.stdout + submitted.stderr}
    for path in ("/api/v0/actors?detail=1&limit=1000", "/api/v0/tasks?detail=1&limit=10000",
                 "/api/v0/jobs?detail=1", "/api/jobs/"):  # fmt: skip
        request = urllib.request.Request(stack_env["RAY_API_SERVER_ADDRESS"] + path,
                                         headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as answer:
            shown[path] = answer.read().decode()
    assert "Actor.run" in shown["/api/v0/tasks?detail=1&limit=10000"]  # the jobs' tasks are listed
    assert stack_env["AWS_ENDPOINT_URL"] in shown["during the direct job"]  # its runtime_env is shown
    leaks = [where for where, text in shown.items() if secret in text]
    assert not leaks, f"the S3 secret is visible in: {leaks}"
    leaks = [where for where, text in shown.items() if stack_env["MLFLOW_TRACKING_PASSWORD"] in text]
    assert not leaks, f"the MLflow password is visible in: {leaks}"


_LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def _listening_addresses(pids: list[int]) -> set[str]:
    """Hex local addresses of the TCP sockets in LISTEN state that ``pids`` hold (from /proc)."""
    inodes = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        inodes.update(link[8:-1] for link in links if link.startswith("socket:["))
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                addresses.add(cols[1])
    return addresses


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_every_service_listens_on_loopback_only(stack):
    from advflow.infra.local.proc import session_members

    records = json.loads((stack["state_dir"] / "stack.json").read_text())["services"]
    pids = [pid for rec in records.values() for pid in session_members(rec["pid"])]
    addresses = _listening_addresses(pids)
    assert addresses, "found no listening sockets at all"
    exposed = sorted(a for a in addresses if a.split(":")[0] not in _LOOPBACK_HEX)
    assert not exposed, f"sockets bound beyond 127.0.0.1: {exposed}"


@pytest.mark.slow
def test_up_again_is_a_no_op(stack):
    state_file = stack["state_dir"] / "stack.json"
    pids_before = {k: v["pid"] for k, v in json.loads(state_file.read_text())["services"].items()}
    result = _advflow(
        "stack", "up", "--state-dir", str(stack["state_dir"]), *_port_flags(list(stack["ports"].values())),
        cwd=stack["root"], timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stdout
    assert "starting" not in result.stdout
    pids_after = {k: v["pid"] for k, v in json.loads(state_file.read_text())["services"].items()}
    assert pids_after == pids_before


def _exported_env(stack) -> dict[str, str]:
    """`advflow stack env` of the running stack, on top of a clean environment."""
    result = _advflow("stack", "env", "--state-dir", str(stack["state_dir"]), cwd=stack["root"], timeout=60)
    assert result.returncode == 0, result.stderr
    exports = dict(line[len("export "):].split("=", 1) for line in result.stdout.splitlines())
    return _clean_env(**{k: v.strip("'") for k, v in exports.items()}, OMP_NUM_THREADS="1")


def _probe(stack, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(PROBE), *args], cwd=stack["root"], env=_exported_env(stack),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.slow
def test_seed_what_a_restart_must_keep(stack):
    # A dataset, a checkpoint (one multipart object), an MLflow run with an artifact, a registered
    # generator with the alias `champion`, and the images `jobs/generate.py` makes from it.
    stack["probe_dir"] = stack["root"] / "probe"
    result = _probe(stack, "seed", str(stack["probe_dir"]))
    assert "SEEDED" in result.stdout
    assert (stack["probe_dir"] / "reference.npz").exists()


CREDENTIAL_FILES = {services.S3_CREDENTIALS_FILE, "mlflow_credentials"}


def _files_holding(root: Path, secrets_: list[str]) -> dict[Path, list[str]]:
    """{file: the secrets in it} for every regular file under ``root`` (Ray's temp dir, a link, too)."""
    found = {}
    for folder, _, names in os.walk(root, followlinks=True):
        for name in names:
            path = Path(folder) / name
            try:
                if not stat.S_ISREG(path.lstat().st_mode):
                    continue
                data = path.read_bytes()
            except OSError:
                continue  # a socket, or a file Ray just removed
            held = [s for s in secrets_ if s.encode() in data]
            if held:
                found[path] = held
    return found


@pytest.mark.slow
def test_secrets_are_only_in_the_0600_credential_files(stack, stack_env):
    """After up, jobs, MLflow runs, a registration and generate.py: every file of the state dir
    (stack.json, logs, Ray's session logs, the dbs) is scanned for the S3 secret and the MLflow
    password; only the two named credential files may hold them, and they are 0600."""
    state_dir = stack["state_dir"]
    secrets_ = [stack_env["AWS_SECRET_ACCESS_KEY"], stack_env["MLFLOW_TRACKING_PASSWORD"]]
    assert all(len(s) >= 40 for s in secrets_) and stack_env["MLFLOW_TRACKING_USERNAME"] == "admin"
    found = _files_holding(state_dir, secrets_)
    assert {p.name for p in found} == CREDENTIAL_FILES, f"secrets outside the credential files: {found}"
    for path in found:
        assert path.parent == state_dir and stat.S_IMODE(path.stat().st_mode) == 0o600, path
    record = json.loads((state_dir / "stack.json").read_text())["services"]
    assert record["mlflow"]["env"] == {"MLFLOW_TRACKING_URI": stack_env["MLFLOW_TRACKING_URI"]}
    assert record["s3"]["info"]["credentials_file"] == str(state_dir.resolve() / services.S3_CREDENTIALS_FILE)
    assert stat.S_IMODE((state_dir / "mlflow_auth.db").stat().st_mode) == 0o600  # password hashes


@pytest.mark.slow
def test_down_stops_everything_and_is_idempotent(stack):
    state_dir, root = stack["state_dir"], stack["root"]
    stack["admin_before_down"] = _exported_env(stack)["MLFLOW_TRACKING_PASSWORD"]
    pids = [v["pid"] for v in json.loads((state_dir / "stack.json").read_text())["services"].values()]
    result = _advflow("stack", "down", "--state-dir", str(state_dir), cwd=root, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("mlflow", "ray", "s3"):
        assert f"{name:<6} stopped" in result.stdout
    assert "WARNING" not in result.stdout  # the on-disk store drops nothing
    assert f"in {stack['state_dir'].resolve() / 's3'} and mlflow.db" in result.stdout  # what is kept, where
    assert not any(session_alive(pid) for pid in pids)
    assert not any(port_in_use(port) for port in stack["ports"].values())

    status = _advflow("stack", "status", "--state-dir", str(state_dir), cwd=root, timeout=60)
    assert status.returncode == 1
    assert "healthy" not in status.stdout and status.stdout.count("down") == 4

    again = _advflow("stack", "down", "--state-dir", str(state_dir), cwd=root, timeout=60)
    assert again.returncode == 0 and "not running" in again.stdout

    env = _advflow("stack", "env", "--state-dir", str(state_dir), cwd=root, timeout=60)
    assert env.returncode == 1 and env.stdout == ""
    assert "advflow stack up" in env.stderr


def _up_again(stack) -> subprocess.CompletedProcess:
    result = _advflow(
        "stack", "up", "--state-dir", str(stack["state_dir"]), *_port_flags(list(stack["ports"].values())),
        "--num-cpus", "1", "--object-store-mb", "100", "--bucket", "advflow-test",
        cwd=stack["root"],
    )  # fmt: skip
    assert result.returncode == 0, f"stack up failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_up_after_down_serves_everything_again(stack):
    if "probe_dir" not in stack:
        pytest.skip("needs test_seed_what_a_restart_must_keep")
    result = _up_again(stack)
    assert "restoring" in result.stdout and "objects" in result.stdout
    assert "orphaned" not in result.stdout  # mlflow.db stays: its artifacts are all there
    assert "ALL KEPT" in _probe(stack, "check", str(stack["probe_dir"]), "down-up").stdout
    # A new MLflow admin password (the old one is refused), as with the S3 key and the Ray token.
    env = _exported_env(stack)
    old = stack.get("admin_before_down")
    assert old and env["MLFLOW_TRACKING_PASSWORD"] != old
    probe = env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_get(probe, {"Authorization": services.basic_auth("admin", old)})[0] == 401
    assert http_get(probe, {"Authorization": services.basic_auth("admin", env["MLFLOW_TRACKING_PASSWORD"])})[0] == 200


@pytest.mark.slow
def test_a_killed_stack_comes_back_with_everything(stack):
    """A machine restart: every process dies at once, nothing runs `down`, then `up` again."""
    import boto3

    if "probe_dir" not in stack:
        pytest.skip("needs test_seed_what_a_restart_must_keep")
    env = _exported_env(stack)
    client = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"],
    )  # fmt: skip
    client.put_object(Bucket="advflow-test", Key="last-write-before-the-crash", Body=b"acknowledged")
    from advflow.infra.local.proc import session_members

    records = json.loads((stack["state_dir"] / "stack.json").read_text())["services"]
    leaders = [rec["pid"] for rec in records.values()]
    for leader in leaders:
        for pid in [leader, *session_members(leader)]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 30
    while any(session_alive(pid) for pid in leaders) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(session_alive(pid) for pid in leaders)

    result = _up_again(stack)
    assert "starting s3" in result.stdout and "starting mlflow" in result.stdout
    assert "orphaned" not in result.stdout
    # A restarted MLflow keeps the admin password the shell already has.
    assert _exported_env(stack)["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_TRACKING_PASSWORD"]
    assert "ALL KEPT" in _probe(stack, "check", str(stack["probe_dir"]), "kill-up").stdout
    got = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"],
    ).get_object(Bucket="advflow-test", Key="last-write-before-the-crash")  # fmt: skip
    assert got["Body"].read() == b"acknowledged"


# ------------------------------------------------- what cannot be kept is said before it goes


@pytest.mark.integration
def test_down_of_an_in_memory_s3_warns_before_dropping_and_moves_the_db_aside(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    state_dir = tmp_path / "st"
    config = StackConfig.resolve({"state_dir": state_dir, "s3_memory": True}, {})
    s3 = services.start_moto(state_dir, store_id="memory:test")
    services.ensure_bucket(s3, config.bucket)
    stack_mod._write_binding(config, s3.info["store"])
    mlflow_srv = services.start_mlflow(state_dir, s3=s3, bucket=config.bucket)
    try:
        for key, value in mlflow_srv.env.items():  # MLflow refuses anonymous requests
            monkeypatch.setenv(key, value)
        client = MlflowClient(tracking_uri=mlflow_srv.url)
        run = client.create_run(client.create_experiment("memory-stack"))
        (tmp_path / "a.txt").write_text("lost at down")
        client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
        stack_mod.save_state(StackState(config, {"s3": s3, "mlflow": mlflow_srv}))

        seen = []  # each line, with whether the data it talks about still existed at that moment
        db = state_dir / "mlflow.db"
        stack_mod.down(state_dir, echo=lambda line: seen.append((line, s3.alive(), db.exists())))
    finally:
        mlflow_srv.stop()
        s3.stop()
    lines = [line for line, _, _ in seen]
    warning = next(i for i, line in enumerate(lines) if line.startswith("WARNING"))
    assert "in memory" in lines[warning] and "--s3-memory" in lines[warning]
    assert "1 objects" in lines[warning] and "MLflow's artifacts" in lines[warning]
    assert seen[warning][1] and seen[warning][2]  # said while S3 and the db were still there
    assert warning < lines.index("s3     stopped")
    moved = next(line for line in lines if "orphaned-" in line)
    assert "mlflow.db" in moved and "no longer exist" in moved and "--s3-memory" in moved
    assert not db.exists() and len(list(state_dir.glob("mlflow.db.orphaned-*"))) == 1
    assert not (state_dir / stack_mod.MLFLOW_BINDING).exists()
    assert not any(line.startswith("kept:") for line in lines)


@pytest.mark.parametrize(
    "recorded, words",
    [
        ({"store": "memory:abc", "artifacts": "s3://advflow/mlflow"}, ["in-memory", "stopped"]),
        ({"store": "disk:0", "artifacts": "s3://advflow/mlflow"}, ["disk:0", "is gone"]),
        (None, ["no record"]),
    ],
)
def test_up_moves_a_db_whose_artifacts_are_gone_aside(tmp_path, recorded, words):
    from advflow.infra.local.s3_store import ensure_store

    config = StackConfig.resolve({"state_dir": tmp_path}, {})
    current = f"disk:{ensure_store(config.s3_data_dir)}"  # a new, empty store
    (tmp_path / "mlflow.db").write_bytes(b"runs")
    if recorded is not None:
        (tmp_path / stack_mod.MLFLOW_BINDING).write_text(json.dumps(recorded))
    lines: list[str] = []
    stack_mod._check_db_binding(config, current, {}, lines.append)
    assert not (tmp_path / "mlflow.db").exists()
    [aside] = tmp_path.glob("mlflow.db.orphaned-*")
    assert aside.read_bytes() == b"runs"  # kept for the user, not deleted
    assert len(lines) == 1 and aside.name in lines[0] and "no longer exist" in lines[0]
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(
    "recorded_store, recorded_bucket, flags, words",
    [
        ("disk", "advflow", {"s3_memory": True}, ["without --s3-memory", "--state-dir"]),
        ("disk", "other", {}, ["--bucket other", "s3://other/mlflow"]),
        ("external:http://minio:9000", "advflow", {}, ["--s3-endpoint http://minio:9000"]),
    ],
)
def test_up_refuses_to_hide_a_db_whose_artifacts_are_elsewhere(
    tmp_path, recorded_store, recorded_bucket, flags, words
):
    from advflow.infra.local.s3_store import ensure_store

    config = StackConfig.resolve({"state_dir": tmp_path, **flags}, {})
    disk = f"disk:{ensure_store(config.s3_data_dir)}"
    store = disk if recorded_store == "disk" else recorded_store
    (tmp_path / "mlflow.db").write_bytes(b"runs")
    (tmp_path / stack_mod.MLFLOW_BINDING).write_text(
        json.dumps({"store": store, "artifacts": f"s3://{recorded_bucket}/mlflow"})
    )
    current = "memory:new" if flags.get("s3_memory") else disk
    with pytest.raises(ServiceError) as info:
        stack_mod._check_db_binding(config, current, {}, lambda line: None)
    for word in words:
        assert word in str(info.value)
    assert (tmp_path / "mlflow.db").read_bytes() == b"runs"  # untouched


def test_up_keeps_a_db_whose_artifacts_are_in_the_store(tmp_path):
    config = StackConfig.resolve({"state_dir": tmp_path}, {})
    (tmp_path / "mlflow.db").write_bytes(b"runs")
    stack_mod._write_binding(config, "disk:1")
    lines: list[str] = []
    stack_mod._check_db_binding(config, "disk:1", {}, lines.append)
    assert (tmp_path / "mlflow.db").read_bytes() == b"runs" and lines == []


def test_memory_flag_and_an_external_endpoint_exclude_each_other(tmp_path):
    assert StackConfig.resolve({"state_dir": tmp_path}, {"ADVFLOW_S3_MEMORY": "1"}).s3_memory
    with pytest.raises(ValueError, match="--s3-memory"):
        StackConfig.resolve({"state_dir": tmp_path, "s3_memory": True}, {"AWS_ENDPOINT_URL": "http://minio:9000"})


@pytest.mark.integration
def test_pids_from_before_a_machine_restart_are_never_signalled(tmp_path):
    from advflow.infra.local.proc import spawn_detached

    # Stands for an unrelated process that got a recorded pid after the reboot.
    bystander = spawn_detached(["sleep", "60"], tmp_path / "sleep.log", os.environ, tmp_path)
    try:
        config = StackConfig.resolve({"state_dir": tmp_path / "st"}, {})
        handle = services.ServiceHandle("mlflow", "mlflow", "http://127.0.0.1:1", bystander.pid, None)
        stack_mod.save_state(StackState(config, {"mlflow": handle}))
        path = tmp_path / "st" / "stack.json"
        path.write_text(path.read_text().replace(stack_mod.boot_id(), "an-earlier-boot"))
        lines: list[str] = []
        stack_mod.down(tmp_path / "st", echo=lines.append)
        assert session_alive(bystander.pid)
        assert any("before the machine restarted" in line for line in lines)
        assert not any("stopped" in line for line in lines)
    finally:
        bystander.kill()
        bystander.wait()
