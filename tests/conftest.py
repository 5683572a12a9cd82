"""Shared fixtures: a real S3 API endpoint (moto in server mode) on 127.0.0.1, and a storage root
parametrised over that endpoint and a local directory, so data tests run against both.

Platform code reaches the endpoint only through the standard AWS_ENDPOINT_URL override, exactly as
it would reach AWS S3 or MinIO.
"""

from __future__ import annotations

import uuid

import pytest

BUCKET = "advflow-test"
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def pytest_sessionstart(session):
    """moto's in-process mocks (mock_aws) reset moto's global backends when they exit, and the
    session's server below shares those backends: one such test would wipe the test bucket under
    every later S3 test. Tests reach moto through its server (the `s3_env` endpoint) instead."""
    try:
        import moto
    except ImportError:
        return

    def refuse(*args, **kwargs):
        raise RuntimeError("moto.mock_aws() would reset the shared moto server's state (the test "
                           "bucket included): use the s3_env fixture's endpoint_url instead")

    moto.mock_aws = refuse


@pytest.fixture(autouse=True)
def fresh_boto3_default_session(monkeypatch):
    """Each test starts without boto3's default session: `boto3.client(...)` keeps the credentials it
    first resolved in that process-wide session, so one test's (moto's fake keys) would otherwise be
    sent by every later test that relies on the environment (the stack's own keys)."""
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


@pytest.fixture(scope="session")
def moto_endpoint():
    """Start moto's S3-compatible server on a free loopback port; yield its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    """Point the standard AWS variables at the test endpoint with fake credentials."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)
    return moto_endpoint


@pytest.fixture
def s3_prefix(s3_env):
    """A fresh, empty s3:// prefix on the test endpoint."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """A fresh dataset prefix: a local directory, then an s3:// prefix on the test endpoint."""
    if request.param == "local":
        return str(tmp_path / "dataset")
    return request.getfixturevalue("s3_prefix")


@pytest.fixture(scope="session")
def mlflow_server(moto_endpoint, tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1: SQLite backend, artifacts proxied to the moto
    endpoint under s3://advflow-test/mlflow (the same endpoint the data tests use)."""
    import os

    from advflow.infra.local import services

    saved = {k: os.environ.get(k) for k in FAKE_ENV}
    os.environ.update(FAKE_ENV)  # the server process inherits the fake credentials
    try:
        s3 = services.external_s3(moto_endpoint)
        handle = services.start_mlflow(tmp_path_factory.mktemp("mlflow"), s3=s3, bucket=BUCKET)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield handle
    handle.stop()


@pytest.fixture
def mlflow_env(mlflow_server, s3_env, monkeypatch):
    """MLFLOW_TRACKING_URI pointing at the test server (and the S3 variables of `s3_env`)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    yield mlflow_server.url
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The digits train split as local pixel shards (read-only: tests train from it, never write)."""
    from advflow.platform.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("digits")
    prepare(PrepareConfig(source="digits", out=str(out), encoder="pixel", shard_records=512))
    return str(out)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A throw-away PostgreSQL server on 127.0.0.1 with the databases `mlflow` and `optuna`
    (advflow.infra.local.postgres: Debian's `postgresql` package, which infra/test.sh installs when
    missing). Its URLs carry a generated password: `postgres.url("optuna")`."""
    from advflow.infra.local.postgres import start_postgres

    with start_postgres(tmp_path_factory.mktemp("postgres"), databases=("mlflow", "optuna")) as server:
        yield server
