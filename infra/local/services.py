"""Start, health-check and stop single local services: an S3 endpoint, MLflow, a Ray head.

Each ``start_*`` function launches one service detached (its own session, so it outlives the caller
and one signal stops its whole process tree), bound to 127.0.0.1, with its log and files in a given
directory, and returns a ``ServiceHandle``. Tests of other issues reuse these directly::

    from advflow.infra.local import services
    with services.start_moto(tmp_path / "s3") as s3:           # free port when port=None
        services.ensure_bucket(s3, "advflow")
        with services.start_mlflow(tmp_path / "mlflow", s3=s3, bucket="advflow") as mlflow_srv, \\
             services.start_ray_head(tmp_path / "ray",
                                     job_env=services.worker_env(s3, mlflow_srv)) as ray:
            env = {**s3.env, **mlflow_srv.env, **ray.env}         # what a client exports
            ...

The S3 servers started here answer only requests signed with the key they were given (a 0600
credentials file, ``<state_dir>/s3_credentials``); ``s3.env`` carries it for clients, and
``worker_env(s3)`` names the file instead, for a Ray head whose jobs must not hold the secret.
MLflow likewise refuses anonymous requests (MLflow's basic-auth app, ``mlflow_auth``): its
``env`` carries MLFLOW_TRACKING_USERNAME/PASSWORD, ``worker_env(s3, mlflow_srv)`` the path of its
0600 credentials file. ``to_record`` (what ``stack.json`` holds) never contains a secret:
``from_record`` reads them back from those files.

``advflow.infra.local.stack`` composes them into ``advflow stack up | down | status | env``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advflow.platform.atomic import write_text
from advflow.platform.tracking.credentials import CREDENTIALS_FILE_ENV, PASSWORD_ENV, USERNAME_ENV
from advflow.infra.local.proc import (
    LOCALHOST,
    ServiceError,
    free_port,
    free_ports,
    session_alive,
    http_get,
    spawn_detached,
    session_listening_ports,
    stop_session,
    tcp_listening,
    wait_healthy,
)

# The S3 endpoint's key (an AWS shared-credentials file, 0600), in the S3 service's directory.
S3_CREDENTIALS_FILE = "s3_credentials"
# AWS variables a Ray head must not inherit from the caller's shell when it is given the stack's
# credentials: a stale AWS_ACCESS_KEY_ID (an earlier `eval "$(advflow stack env)"`) would beat the
# credentials file, and a foreign AWS_PROFILE would name a profile the file does not have.
_AWS_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
)  # fmt: skip
# The same for MLflow: a stale exported password would beat the credentials file a head names.
_MLFLOW_CREDENTIAL_VARS = (USERNAME_ENV, PASSWORD_ENV, "MLFLOW_TRACKING_TOKEN")
# Never written to stack.json (or any state file other than the 0600 credential files): a handle's
# env keeps them in memory only, and ``from_record`` reads them back from the files ``info`` names.
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
               *_MLFLOW_CREDENTIAL_VARS)  # fmt: skip

# Ray puts AF_UNIX sockets under <temp-dir>/session_<date>_<pid>/sockets/plasma_store; Linux caps a
# socket path at 107 bytes, and the part after <temp-dir> takes about 63 of them.
_RAY_TEMP_DIR_MAX_LEN = 40

# Keeps Ray on the loopback interface, in the head and in every client that talks to it.
_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
METRICS_INTERVAL_ENV, METRICS_INTERVAL_MS = "RAY_metrics_report_interval_ms", "2000"


@dataclass
class ServiceHandle:
    """One running local service, or an external endpoint that is only health-checked.

    ``env`` holds the variables a client exports to use the service; ``info`` holds facts such as
    ports and file paths. ``to_record``/``from_record`` round-trip it through the stack's JSON
    state, so a later CLI call can check or stop what an earlier one started.
    """

    name: str  # "s3", "prometheus", "mlflow" or "ray"
    kind: str  # "moto", "moto-disk", "external-s3", "prometheus", "mlflow" or "ray-head"
    url: str
    pid: int | None  # session leader (the service's whole process tree); None for an external endpoint
    log_path: Path | None
    env: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @property
    def external(self) -> bool:
        return self.pid is None

    def alive(self) -> bool:
        """True while the process tree runs (an external endpoint counts as alive)."""
        return self.pid is None or session_alive(self.pid)

    def health(self, timeout_s: float = 3.0) -> str | None:
        """None when healthy, else a short reason."""
        if not self.alive():
            return "not running"
        return _PROBES[self.kind](self, timeout_s)

    def wait_healthy(self, timeout_s: float) -> ServiceHandle:
        """Block until healthy; on failure raise ServiceError with the log's tail."""
        wait_healthy(self.name, lambda: self.health(), timeout_s, self.log_path or Path("-"), self.pid)
        return self

    def stop(self, grace_s: float = 20.0) -> bool:
        """Stop the whole process tree (no-op for external endpoints). True if it was running."""
        if self.pid is None:
            return False
        # `ray start --block` tears its node down in order when it alone gets SIGTERM.
        leader_first = self.kind == "ray-head"
        was_running = stop_session(self.pid, grace_s, leader_first=leader_first)
        if self._popen is not None:
            self._popen.wait(timeout=5)  # reap our own child so no zombie stays behind
        return was_running

    def to_record(self) -> dict[str, Any]:
        """What ``stack.json`` keeps: no credentials (they stay in their 0600 files)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "url": self.url,
            "pid": self.pid,
            "log_path": str(self.log_path) if self.log_path else None,
            "env": _without_secrets(self.env),
            "info": self.info,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ServiceHandle:
        """The handle again, its credentials read from the files ``info`` names. A key that an older
        ``stack.json`` still carries is ignored: the file is what the service checks against."""
        info = dict(record.get("info", {}))
        return cls(
            name=record["name"],
            kind=record["kind"],
            url=record["url"],
            pid=record["pid"],
            log_path=Path(record["log_path"]) if record.get("log_path") else None,
            env={**_without_secrets(record.get("env", {})), **_credentials_of(record["kind"], info)},
            info=info,
        )

    def __enter__(self) -> ServiceHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in _SECRET_ENV}


def _credentials_of(kind: str, info: Mapping[str, Any]) -> dict[str, str]:
    """The client variables in the credentials file of a recorded service ({} when it is gone)."""
    path = info.get("credentials_file")
    if not path:
        return {}
    if kind == "mlflow":
        from advflow.infra.local.mlflow_auth import client_env

        return client_env(Path(path))
    from advflow.infra.local.s3_auth import read_credentials

    try:
        return read_credentials(Path(path))
    except ValueError:  # deleted: the probe then fails, and `up` restarts the service with a new key
        return {}


# ----------------------------------------------------------------------------------------- S3


def s3_client(s3: ServiceHandle, timeout_s: float = 5.0):
    """A boto3 S3 client for the endpoint; credentials from the handle, else the environment."""
    import boto3
    from botocore.config import Config

    env = {**os.environ, **s3.env}
    return boto3.client(
        "s3",
        endpoint_url=s3.url,
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=env.get("AWS_SESSION_TOKEN"),
        region_name=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
        config=Config(
            connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 1}
        ),
    )


def _probe_s3(s3: ServiceHandle, timeout_s: float) -> str | None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client(s3, timeout_s).list_buckets()
    except (BotoCoreError, ClientError) as exc:
        return f"S3 list_buckets at {s3.url} failed: {exc}"
    return None


def ensure_bucket(s3: ServiceHandle, bucket: str) -> None:
    """Create ``bucket`` on the endpoint unless it exists already (ours or not)."""
    from botocore.exceptions import ClientError

    client = s3_client(s3)
    region = client.meta.region_name
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region and region != "us-east-1":  # S3 rejects a LocationConstraint of us-east-1
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in (
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        ):
            raise ServiceError(f"cannot create bucket {bucket!r} at {s3.url}: {exc}") from exc


def start_moto(
    state_dir: Path,
    port: int | None = None,
    *,
    timeout_s: float = 60.0,
    wait: bool = True,
    store_id: str | None = None,
    credentials_file: Path | None = None,
) -> ServiceHandle:
    """Start an in-memory moto S3 server on 127.0.0.1 (``port=None``: a free port).

    Data lives only as long as the process: stopping it drops every bucket. ``info["store"]`` is
    ``store_id`` or a fresh "memory:<hex>": a database bound to it never matches a later start.
    ``start_persistent_s3`` is the variant that keeps its buckets on disk. Like it, this server
    answers only requests signed with the key in ``credentials_file`` (default
    ``<state_dir>/s3_credentials``, created when missing); ``handle.env`` carries that key.
    """
    state_dir = _service_dir(state_dir)
    port = port or free_port()
    url = f"http://{LOCALHOST}:{port}"
    creds_path, creds = _s3_credentials(state_dir, credentials_file)
    argv = [
        sys.executable, "-m", "advflow.infra.local.s3_store", "--memory",
        "--credentials-file", str(creds_path), "--host", LOCALHOST, "--port", str(port),
    ]  # fmt: skip
    return _launch(
        "s3", "moto", url, argv, state_dir, os.environ,
        client_env={"AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url, **creds},
        info={"port": port, "store": store_id or f"memory:{secrets.token_hex(8)}",
              "credentials_file": str(creds_path)},  # fmt: skip
        timeout_s=timeout_s,
        wait=wait,
    )  # fmt: skip


def start_persistent_s3(
    state_dir: Path,
    data_dir: Path,
    port: int | None = None,
    *,
    timeout_s: float = 120.0,
    wait: bool = True,
    credentials_file: Path | None = None,
) -> ServiceHandle:
    """Start moto's S3 server with every bucket kept in ``data_dir`` (``advflow.infra.local.s3_store``).

    Each change is on disk before the client gets its answer, so stopping or killing the server
    (or the machine) loses nothing; the next start loads ``data_dir`` back before the port opens.
    ``info["store"]`` is the store's id, which the stack binds MLflow's database to. Only requests
    signed with the key in ``credentials_file`` (default ``<state_dir>/s3_credentials``, created
    when missing, kept when present) are answered; ``handle.env`` carries that key.
    """
    from advflow.infra.local.s3_store import ensure_store

    state_dir = _service_dir(state_dir)
    data_dir = Path(data_dir).resolve()
    store = ensure_store(data_dir)
    port = port or free_port()
    url = f"http://{LOCALHOST}:{port}"
    creds_path, creds = _s3_credentials(state_dir, credentials_file)
    argv = [
        sys.executable, "-m", "advflow.infra.local.s3_store", "--data-dir", str(data_dir),
        "--credentials-file", str(creds_path), "--host", LOCALHOST, "--port", str(port),
    ]  # fmt: skip
    return _launch(
        "s3", "moto-disk", url, argv, state_dir, os.environ,
        client_env={"AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url, **creds},
        info={"port": port, "data_dir": str(data_dir), "store": f"disk:{store}",
              "credentials_file": str(creds_path)},  # fmt: skip
        timeout_s=timeout_s,
        wait=wait,
    )  # fmt: skip


def _s3_credentials(state_dir: Path, credentials_file: Path | None) -> tuple[Path, dict[str, str]]:
    from advflow.infra.local.s3_auth import ensure_credentials

    path = Path(credentials_file).resolve() if credentials_file else state_dir / S3_CREDENTIALS_FILE
    return path, ensure_credentials(path)


def worker_env(s3: ServiceHandle, mlflow: ServiceHandle | None = None) -> dict[str, str]:
    """What a Ray head's jobs need to reach ``s3`` (and ``mlflow``), with credentials as files.

    A Ray job's runtime_env is shown in plain text by Ray's state API (actors, tasks, jobs); the
    head's own environment is not. Even there only the files' paths go: boto3, aiobotocore
    (s3fs) and pyarrow's AWS SDK read AWS_SHARED_CREDENTIALS_FILE + AWS_PROFILE themselves, and
    advflow's MLflow code reads ADVFLOW_MLFLOW_CREDENTIALS_FILE
    (``advflow.platform.tracking.credentials``). For an external S3 endpoint (no file of ours) the
    S3 part is ``s3.env``: credentials stay the caller's.
    """
    from advflow.infra.local.s3_auth import profile_env

    env = mlflow_worker_env(mlflow) if mlflow is not None else {}
    path = s3.info.get("credentials_file")
    if not path:
        return {**s3.env, **env}
    endpoints = {k: v for k, v in s3.env.items() if k in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")}
    return {**endpoints, **profile_env(Path(path)), **env}


def mlflow_worker_env(mlflow: ServiceHandle) -> dict[str, str]:
    env = {"MLFLOW_TRACKING_URI": mlflow.url}
    if mlflow.info.get("credentials_file"):
        env[CREDENTIALS_FILE_ENV] = str(mlflow.info["credentials_file"])
    return env


def external_s3(url: str, *, timeout_s: float = 30.0) -> ServiceHandle:
    """Handle for an S3/MinIO endpoint someone else runs; credentials stay in the environment."""
    handle = ServiceHandle(
        name="s3",
        kind="external-s3",
        url=url.rstrip("/"),
        pid=None,
        log_path=None,
        env={"AWS_ENDPOINT_URL": url.rstrip("/"), "MLFLOW_S3_ENDPOINT_URL": url.rstrip("/")},
        info={"store": f"external:{url.rstrip('/')}"},
    )
    deadline = time.monotonic() + timeout_s
    while (reason := handle.health()) and time.monotonic() < deadline:
        time.sleep(1.0)
    if reason:
        raise ServiceError(
            f"the S3 endpoint from AWS_ENDPOINT_URL ({url}) is not usable: {reason}. Check the "
            "endpoint and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or unset AWS_ENDPOINT_URL to "
            "let the stack start its own moto server."
        )
    return handle


# ------------------------------------------------------------------------------------- MLflow


def _probe_mlflow(handle: ServiceHandle, timeout_s: float) -> str | None:
    status, body = http_get(f"{handle.url}/health", timeout=timeout_s)
    if status != 200:
        return f"GET {handle.url}/health -> {status or body}"
    username, password = handle.env.get(USERNAME_ENV), handle.env.get(PASSWORD_ENV)
    if not (username and password):
        where = handle.info.get("credentials_file") or "the record (started before MLflow had authentication)"
        return f"no MLflow credentials in {where}"
    # Authentication must stay on: an anonymous request has to be refused, the admin's accepted.
    probe = f"{handle.url}/api/2.0/mlflow/experiments/search?max_results=1"
    status, _ = http_get(probe, timeout=timeout_s)
    if status != 401:
        return f"authentication is NOT enforced: an anonymous request got HTTP {status}"
    status, body = http_get(probe, {"Authorization": basic_auth(username, password)}, timeout=timeout_s)
    if status != 200:
        return f"the admin credential from {handle.info.get('credentials_file')} -> HTTP {status}: {body[:200]}"
    return None


def basic_auth(username: str, password: str) -> str:
    """An HTTP Basic ``Authorization`` header value."""
    import base64

    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def start_mlflow(
    state_dir: Path,
    port: int | None = None,
    *,
    s3: ServiceHandle,
    bucket: str,
    prefix: str = "mlflow",
    workers: int = 1,
    timeout_s: float = 120.0,
    wait: bool = True,
    backend_store_uri: str | None = None,
) -> ServiceHandle:
    """Start an MLflow tracking server: SQLite in ``state_dir``, artifacts proxied to S3,
    anonymous requests refused (MLflow's basic-auth app, see ``advflow.infra.local.mlflow_auth``).

    Clients log artifacts through the server (``mlflow-artifacts:/``), which writes them to
    ``s3://<bucket>/<prefix>`` on ``s3``'s endpoint, so clients need no S3 credentials.
    The bucket must exist (``ensure_bucket``) before the first artifact is logged.
    ``backend_store_uri`` replaces the SQLite file with another database, e.g.
    ``postgresql://user:password@host:5432/mlflow`` (``advflow.infra.local.postgres``; needs the
    ``postgres`` extra); ``info["db"]`` then shows it without the password.
    The admin credential is ``<state_dir>/mlflow_credentials`` (0600; kept when present, so a
    restart keeps what clients have); ``handle.env`` carries it as MLFLOW_TRACKING_USERNAME/PASSWORD,
    ``worker_env(s3, handle)`` names the file instead. Users and permissions are in
    ``<state_dir>/mlflow_auth.db``.
    """
    from urllib.parse import urlsplit

    from advflow.infra.local import mlflow_auth

    state_dir = _service_dir(state_dir)
    port = port or free_port()
    url = f"http://{LOCALHOST}:{port}"
    db_path = state_dir / "mlflow.db"
    creds_path = state_dir / mlflow_auth.CREDENTIALS_FILE
    creds = mlflow_auth.ensure_credentials(creds_path)
    auth_db = state_dir / mlflow_auth.AUTH_DB
    auth_config = mlflow_auth.write_auth_config(state_dir / mlflow_auth.AUTH_CONFIG, f"sqlite:///{auth_db}")
    # Through mlflow_auth's main: it makes the auth db's admin password the file's, then runs `mlflow`.
    argv = [
        sys.executable, "-m", "advflow.infra.local.mlflow_auth", str(creds_path), "server",
        "--app-name", "basic-auth",
        "--host", LOCALHOST,
        "--port", str(port),
        "--artifacts-destination", f"s3://{bucket}/{prefix}",
        "--workers", str(workers),
    ]  # fmt: skip
    db = str(db_path)
    if backend_store_uri is None:
        argv += ["--backend-store-uri", f"sqlite:///{db_path}"]
    # The server process writes the artifacts, so it needs the endpoint and credentials (ours
    # replace any from the caller's shell, which could be stale or name a foreign profile).
    env = dict(os.environ)
    if s3.info.get("credentials_file"):
        for name in _AWS_CREDENTIAL_VARS:
            env.pop(name, None)
    env.update(worker_env(s3))  # our S3 key as its file's path: no secret in the server's environment
    # The ini names the admin; the caller's MLFLOW_AUTH_ADMIN_* would override it. The Flask key only
    # signs the sign-up form's CSRF token: a new one per start costs nothing.
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", *_MLFLOW_CREDENTIAL_VARS):
        env.pop(name, None)
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
    if backend_store_uri is not None:
        # In MLflow's own variable, not argv: a database URL carries its password, and argv is
        # world-readable (`ps`) and written to the service's log.
        env["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri
        url_parts = urlsplit(backend_store_uri)
        db = backend_store_uri if url_parts.password is None else backend_store_uri.replace(
            f":{url_parts.password}@", ":***@", 1)
    return _launch(
        "mlflow", "mlflow", url, argv, state_dir, env,
        client_env={"MLFLOW_TRACKING_URI": url, **creds},
        info={"port": port, "db": db, "artifacts": f"s3://{bucket}/{prefix}", "credentials_file": str(creds_path),
              "auth_db": str(auth_db)},
        timeout_s=timeout_s,
        wait=wait,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- Ray


def write_token_file(path: Path) -> str:
    """Write a fresh 256-bit hex token to ``path`` (mode 0600, atomically) and return it."""
    token = secrets.token_hex(32)
    write_text(path, token, mode=0o600)  # the temp file is 0600 from creation too
    return token


def ray_temp_dir(state_dir: Path) -> Path:
    """Ray's --temp-dir: inside ``state_dir`` when short enough for AF_UNIX sockets, else /tmp."""
    inside = state_dir / "ray"
    if len(str(inside)) <= _RAY_TEMP_DIR_MAX_LEN:
        return inside
    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
    return Path("/tmp") / f"advflow-ray-{digest}"


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise ServiceError("the `ray` command was not found; install advflow's dependencies")
    return found


def _probe_ray(handle: ServiceHandle, timeout_s: float) -> str | None:
    url = handle.url
    status, body = http_get(f"{url}/api/gcs_healthz", timeout=timeout_s)
    if status != 200:
        return f"GET {url}/api/gcs_healthz -> {status or body}"
    try:
        token = Path(handle.info["token_path"]).read_text().strip()
    except OSError as exc:
        return f"cannot read the Ray token file: {exc}"
    status, body = http_get(
        f"{url}/api/jobs/", {"Authorization": f"Bearer {token}"}, timeout=timeout_s
    )
    if status != 200:
        return f"job API with the token -> {status}: {body[:200]}"
    # Token auth must stay on: a request without the token has to be refused.
    status, _ = http_get(f"{url}/api/jobs/", timeout=timeout_s)
    if status not in (401, 403):
        return f"token auth is NOT enforced: a request without a token got HTTP {status}"
    # The dashboard answers before every head process has bound its port; one that fails to bind
    # makes `ray start --block` stop the whole head a second later. Healthy = the head's own
    # processes listen on all of them (another process that took a port does not count).
    owned = session_listening_ports(handle.pid) if handle.pid else None
    for what in ("gcs_port", "client_port", "agent_port"):
        port = int(handle.info.get(what) or 0)
        if port and not (port in owned if owned is not None else tcp_listening(port, timeout=timeout_s)):
            return f"the head does not listen on its {what} {port} (yet)"
    return None


def start_ray_head(
    state_dir: Path,
    gcs_port: int | None = None,
    dashboard_port: int | None = None,
    client_port: int | None = None,
    agent_port: int | None = None,
    *,
    num_cpus: int = 2,
    object_store_mb: int = 512,
    job_env: dict[str, str] | None = None,
    timeout_s: float = 180.0,
    wait: bool = True,
) -> ServiceHandle:
    """Start a single-node Ray head with token authentication, bound to 127.0.0.1.

    A fresh token goes to ``<state_dir>/ray_auth_token`` (0600). The head runs with
    RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH pointing at that file; a client (``ray job
    submit``, ``ray.init``, the job SDK) must export the same two variables, which ``handle.env``
    holds together with RAY_API_SERVER_ADDRESS (dashboard URL, for job submission), RAY_ADDRESS
    (GCS address, for ray.init) and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (keeps Ray on loopback).
    ``job_env`` is added to the head's environment, so every job driver and worker inherits it
    (S3 endpoint, credentials, MLflow URI) without any of it entering a job's runtime_env, which
    Ray's state API shows. Give S3 credentials as a file (``worker_env(s3)``), so not even the
    head's environment holds the secret. Ports left None are picked free.
    """
    ports = (gcs_port, dashboard_port, client_port, agent_port)
    # Picked ports can still be lost to another explicit pick before Ray binds them (see
    # proc._PICK_FLOOR). Then the head exits during start-up saying so, and new picks get
    # another try; ports the caller chose are never swapped.
    attempts = 3 if None in ports and wait else 1
    log_path = _service_dir(state_dir) / "ray.log"
    for attempt in range(1, attempts + 1):
        picked = iter(free_ports(4))
        chosen = [port or next(picked) for port in ports]
        start = log_path.stat().st_size if log_path.exists() else 0  # the log is appended to
        try:
            return _start_ray_head_once(state_dir, *chosen, num_cpus=num_cpus, object_store_mb=object_store_mb,
                                        job_env=job_env, timeout_s=timeout_s, wait=wait)
        except ServiceError:
            lost = _bind_failures(log_path, start)
            caller_port_lost = any(re.search(rf":{p}\b", line) for p in ports if p for line in lost)
            if attempt == attempts or not lost or caller_port_lost:
                raise  # not a lost port, or one the caller chose: new picks would not help
    raise AssertionError("unreachable")  # the loop returns or raises


def _bind_failures(log_path: Path, start: int) -> list[str]:
    """The lines of the head's log, from byte ``start`` on, that say a port was taken."""
    try:
        with open(log_path, "rb") as log:
            log.seek(start)
            lines = log.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if "Address already in use" in line or "Failed to bind" in line]


def _start_ray_head_once(
    state_dir: Path,
    gcs_port: int,
    dashboard_port: int,
    client_port: int,
    agent_port: int,
    *,
    num_cpus: int,
    object_store_mb: int,
    job_env: dict[str, str] | None,
    timeout_s: float,
    wait: bool,
) -> ServiceHandle:
    state_dir = _service_dir(state_dir)
    token_path = state_dir / "ray_auth_token"
    write_token_file(token_path)
    temp_dir = ray_temp_dir(state_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    if temp_dir.parent != state_dir:  # keep Ray's logs findable from the state dir
        link = state_dir / "ray"
        if link.is_symlink() or not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(temp_dir, target_is_directory=True)
    argv = [
        _ray_executable(), "start", "--head", "--block",
        "--node-ip-address", LOCALHOST,
        "--port", str(gcs_port),
        "--dashboard-host", LOCALHOST,
        "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(client_port),
        "--dashboard-agent-listen-port", str(agent_port),
        "--num-cpus", str(num_cpus),
        "--object-store-memory", str(object_store_mb * 1024 * 1024),
        "--temp-dir", str(temp_dir),
        "--include-dashboard", "true",
        "--disable-usage-stats",
    ]  # fmt: skip
    env = _node_env(job_env)
    # RAY_AUTH_TOKEN would beat RAY_AUTH_TOKEN_PATH; RAY_ADDRESS (say, from an earlier
    # `eval "$(advflow stack env)"`) would point `ray start` and the jobs at another cluster.
    for stale in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(stale, None)
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    env.update(auth_env)
    # Job entrypoints say `python ...`: make that the interpreter the stack runs on (the venv's),
    # even when the user called the console script without activating the venv.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Processes push their metrics to the node's endpoint every 10 s by default; 2 s keeps live panels
    # current and lets a finishing worker hand over its last values quickly (tracking/live.py flush).
    env[METRICS_INTERVAL_ENV] = env.get(METRICS_INTERVAL_ENV) or METRICS_INTERVAL_MS
    # Ray swaps a --node-ip-address of 127.0.0.1 for the host's routable IP and then binds GCS and
    # raylet on every interface, unless it runs as a "local-only" cluster (its macOS/Windows mode).
    env.update(_LOOPBACK_ENV)
    # On SIGTERM `ray start --block` would first drain the node (meant for Serve replicas in
    # Kubernetes); a local single-node head has nothing to drain, so shut down at once.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    url = f"http://{LOCALHOST}:{dashboard_port}"
    return _launch(
        "ray",
        "ray-head",
        url,
        argv,
        state_dir,
        env,
        client_env={
            # `ray job submit` and the job SDK read RAY_API_SERVER_ADDRESS before RAY_ADDRESS;
            # ray.init() reads RAY_ADDRESS and rejects an http:// URL there. With both set, job
            # submission and a plain ray.init() from the same shell reach this head.
            "RAY_API_SERVER_ADDRESS": url,
            "RAY_ADDRESS": f"{LOCALHOST}:{gcs_port}",
            # Drivers (jobs/train.py, a sweep's Tune loop) report at the nodes' interval: the
            # node's endpoint drops a process's series when its reports come slower than its own.
            METRICS_INTERVAL_ENV: env[METRICS_INTERVAL_ENV],
            **auth_env,
            **_LOOPBACK_ENV,
        },
        info={
            "gcs_port": gcs_port,
            "dashboard_port": dashboard_port,
            "client_port": client_port,
            "agent_port": agent_port,
            "token_path": str(token_path),
            "temp_dir": str(temp_dir),
            "num_cpus": num_cpus,
            # The names only (the values are URLs and file paths): `up` restarts a head whose jobs
            # lack a variable the stack now gives them (a head from before MLflow had authentication).
            "job_env": sorted(job_env or {}),
        },
        timeout_s=timeout_s,
        wait=wait,
    )


def _node_env(job_env: Mapping[str, str] | None) -> dict[str, str]:
    """The caller's environment with ``job_env`` on top; credentials from the caller's shell (an
    earlier `eval "$(advflow stack env)"`, stale after a new `up`) must not beat the files job_env names."""
    env = dict(os.environ)
    job_env = dict(job_env or {})
    if any(name in job_env for name in _AWS_CREDENTIAL_VARS):
        for name in _AWS_CREDENTIAL_VARS:
            env.pop(name, None)
    if CREDENTIALS_FILE_ENV in job_env:
        for name in _MLFLOW_CREDENTIAL_VARS:  # also keeps the password out of every job's environment
            env.pop(name, None)
    env.update(job_env)
    return env


# `ray start --address` cannot add a node to this head: while Ray runs loopback-only
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, what keeps the head on 127.0.0.1) it refuses to start a
# non-head node, and with that mode off it swaps 127.0.0.1 for the host's routable IP, where the
# head does not listen. So the node is started as `ray start --address ... --block` starts one
# (Ray's Node), minus that refusal, and runs until SIGTERM; its node id goes to a file for the probe.
_RAY_WORKER_MAIN = """\
import json, signal, sys
from pathlib import Path
from ray._private.node import Node
from ray._private.parameter import RayParams
params = json.loads(sys.argv[1])
id_file = Path(params.pop("node_id_file"))
node = Node(RayParams(**params), head=False, shutdown_at_exit=True, spawn_reaper=True)
id_file.write_text(node.node_id)
# Instead of Ray's drain-first SIGTERM handler: a removed node goes at once; atexit stops its processes.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    signal.pause()
"""


def _probe_ray_worker(handle: ServiceHandle, timeout_s: float) -> str | None:
    try:
        node_id = Path(handle.info["node_id_file"]).read_text().strip()
        token = Path(handle.info["token_path"]).read_text().strip()
    except OSError:
        return "the node has not registered yet"
    query = f"filter_keys=node_id&filter_predicates=%3D&filter_values={node_id}"
    status, body = http_get(f"{handle.url}/api/v0/nodes?{query}", {"Authorization": f"Bearer {token}"},
                            timeout=timeout_s)
    if status != 200:
        return f"the head's node list -> {status or body}"
    if '"ALIVE"' not in body:
        return f"node {node_id} is not ALIVE in the head's node list"
    handle.info["node_id"] = node_id
    return None


def start_ray_worker(
    head: ServiceHandle,
    state_dir: Path,
    *,
    num_cpus: int,
    resources: dict[str, float] | None = None,
    object_store_mb: int = 256,
    job_env: dict[str, str] | None = None,
    timeout_s: float = 180.0,
    wait: bool = True,
) -> ServiceHandle:
    """Start a worker node on this machine that joins ``head`` (from ``start_ray_head``), on 127.0.0.1.

    The node has ``num_cpus`` CPUs and the custom ``resources``, its own Ray temp dir in
    ``state_dir`` and the head's token auth. Its processes (the Train workers it hosts) inherit
    ``job_env``: give it the head's. ``info["node_id"]`` is the node's Ray id once healthy (the
    head lists it ALIVE). ``stop()`` removes the node: its whole process tree gets SIGTERM, then
    SIGKILL, and Ray sees the node die. Several nodes may run beside one head.
    """
    state_dir = _service_dir(state_dir)
    temp_dir = ray_temp_dir(state_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    node_id_file = state_dir / "node_id"
    node_id_file.unlink(missing_ok=True)  # a restart in the same directory must not see the old id
    params = {
        "gcs_address": head.env["RAY_ADDRESS"],
        "node_ip_address": LOCALHOST,
        "node_name": f"worker-{state_dir.name}",
        "num_cpus": num_cpus,
        "resources": resources or {},
        "object_store_memory": object_store_mb * 1024 * 1024,
        "temp_dir": str(temp_dir),
        # Ray's fixed default (52365) would clash between nodes on one machine.
        "dashboard_agent_listen_port": free_port(),
        "node_id_file": str(node_id_file),
    }
    # The head's environment rules: job_env's credentials win, no stale token or address, the venv's
    # interpreter first, loopback only.
    env = _node_env(job_env)
    for stale in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(stale, None)
    auth_env = {k: head.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env.update(auth_env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Processes push their metrics to the node's endpoint every 10 s by default; 2 s keeps live panels
    # current and lets a finishing worker hand over its last values quickly (tracking/live.py flush).
    env[METRICS_INTERVAL_ENV] = env.get(METRICS_INTERVAL_ENV) or METRICS_INTERVAL_MS
    env.update(_LOOPBACK_ENV)
    return _launch(
        "ray-worker",
        "ray-worker",
        head.url,
        [sys.executable, "-c", _RAY_WORKER_MAIN, json.dumps(params)],
        state_dir,
        env,
        client_env={},
        info={
            "node_id_file": str(node_id_file),
            "token_path": auth_env["RAY_AUTH_TOKEN_PATH"],
            "temp_dir": str(temp_dir),
            "num_cpus": num_cpus,
            "resources": resources or {},
        },
        timeout_s=timeout_s,
        wait=wait,
    )


# ----------------------------------------------------------------------------------- Prometheus

PROMETHEUS_ENV = "ADVFLOW_PROMETHEUS"  # the server binary, when it is not `prometheus` on PATH
PROMETHEUS_INSTALL_HINT = ("install Debian's `prometheus` package (`apt-get install prometheus`; infra/test.sh and "
                           f"infra/demo.sh do it when they can), or name the binary with {PROMETHEUS_ENV}=/path")
SCRAPE_INTERVAL_S = 5
"""How often the stack's Prometheus scrapes Ray (Ray's own template says 10 s; 5 s keeps a short
local run visible, at negligible cost on one node)."""


def prometheus_binary() -> str | None:
    """The Prometheus server to run: $ADVFLOW_PROMETHEUS, else `prometheus` on PATH; None if neither."""
    named = os.environ.get(PROMETHEUS_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("prometheus")


def ray_service_discovery_file(ray_temp_dir: Path) -> Path:
    """Where a Ray head started with --temp-dir writes the targets of every node's metrics endpoint
    (Ray keeps this top-level link pointing at the current session's file)."""
    return Path(ray_temp_dir) / "prom_metrics_service_discovery.json"


def prometheus_config(sd_files: list[Path], scrape_interval_s: int = SCRAPE_INTERVAL_S) -> str:
    """prometheus.yml: scrape every target listed in Ray's service-discovery file(s)."""
    files = ", ".join(json.dumps(str(f)) for f in sd_files)
    return (f"# Written by advflow (infra/local/services.py); rewritten at every start.\n"
            f"global:\n  scrape_interval: {scrape_interval_s}s\n  evaluation_interval: {scrape_interval_s}s\n"
            f"scrape_configs:\n  - job_name: ray\n    file_sd_configs:\n"
            f"      - files: [{files}]\n        refresh_interval: {scrape_interval_s}s\n")


def start_prometheus(
    state_dir: Path,
    port: int | None = None,
    *,
    sd_files: list[Path],
    timeout_s: float = 60.0,
    wait: bool = True,
) -> ServiceHandle:
    """Start Prometheus on 127.0.0.1 scraping the Ray nodes listed in ``sd_files`` (Ray's
    service-discovery files), its time series kept in ``<state_dir>/prometheus`` across restarts.

    Raises ServiceError naming the package when the binary is missing."""
    binary = prometheus_binary()
    if binary is None:
        raise ServiceError(f"the Prometheus server was not found; {PROMETHEUS_INSTALL_HINT}")
    state_dir = _service_dir(state_dir)
    port = port or free_port()
    data = state_dir / "prometheus"
    data.mkdir(parents=True, exist_ok=True)
    config = state_dir / "prometheus.yml"
    write_text(config, prometheus_config(sd_files))
    url = f"http://{LOCALHOST}:{port}"
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address={LOCALHOST}:{port}",
        "--storage.tsdb.retention.time=15d",
    ]
    # Debian's binary also looks for its console templates under /etc; none are needed here.
    return _launch("prometheus", "prometheus", url, argv, state_dir, dict(os.environ),
                   client_env={"ADVFLOW_PROMETHEUS_URL": url},
                   info={"port": port, "data_dir": str(data), "config": str(config),
                         "sd_files": [str(f) for f in sd_files]},
                   timeout_s=timeout_s, wait=wait)


def _probe_prometheus(handle: ServiceHandle, timeout_s: float) -> str | None:
    status, body = http_get(f"{handle.url}/-/ready", timeout=timeout_s)
    return None if status == 200 else f"GET {handle.url}/-/ready -> {status or body}"


# ------------------------------------------------------------------------------------- common

_PROBES = {
    "prometheus": _probe_prometheus,
    "moto": _probe_s3,
    "moto-disk": _probe_s3,
    "external-s3": _probe_s3,
    "mlflow": _probe_mlflow,
    "ray-head": _probe_ray,
    "ray-worker": _probe_ray_worker,
}


def _service_dir(state_dir: Path) -> Path:
    """``state_dir`` made absolute and created: a service's working directory and files."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    return state_dir


def _launch(
    name: str,
    kind: str,
    url: str,
    argv: list[str],
    state_dir: Path,
    env: Mapping[str, str],
    *,
    client_env: dict[str, str],
    info: dict[str, Any],
    timeout_s: float,
    wait: bool,
) -> ServiceHandle:
    """Spawn ``argv`` detached in ``state_dir`` (output to ``<name>.log`` there) and wrap it in a
    handle. With ``wait``, block until healthy; on failure stop what was started so nothing is left
    behind."""
    log_path = state_dir / f"{name}.log"
    popen = spawn_detached(argv, log_path, env, state_dir)
    handle = ServiceHandle(
        name=name,
        kind=kind,
        url=url,
        pid=popen.pid,
        log_path=log_path,
        env=client_env,
        info=info,
        _popen=popen,
    )
    if not wait:
        return handle
    try:
        return handle.wait_healthy(timeout_s)
    except BaseException:
        handle.stop(grace_s=5.0)
        raise
