"""PostgreSQL instead of SQLite (issue "deploy to a real Ray cluster", item 4), against a real
PostgreSQL server on 127.0.0.1 (`advflow.infra.local.postgres`, the `postgres` fixture):

- the server itself: loopback only, password required, not run as root, errors that name the fix;
- an Optuna study on it, and which URL forms work;
- an MLflow tracking server on it (artifacts on the moto S3 endpoint) serving runs, metrics,
  artifacts and the registry, with the rows read back from PostgreSQL (so SQLite cannot pass);
- a tracked 2-worker job with registered versions whose weights load from the registry.

The sweep whose driver is killed and resumed with its study on PostgreSQL is tests/test_sweep.py's
end-to-end test.
"""

from __future__ import annotations

import json
import secrets
import socket
from contextlib import closing
from pathlib import Path

import pytest

from conftest import BUCKET, FAKE_ENV

pytestmark = pytest.mark.integration  # a PostgreSQL server (and MLflow on it)

MODEL = "afm-pg-" + secrets.token_hex(3)
ARTIFACT_PREFIX = "mlflow-pg"


def rows(postgres, sql: str, *args) -> list[tuple]:
    """What MLflow wrote, read from PostgreSQL itself (not through MLflow)."""
    with closing(postgres.connect("mlflow")) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


@pytest.fixture(scope="module")
def mlflow_pg(postgres, moto_endpoint, tmp_path_factory):
    """An MLflow tracking server with its backend store on PostgreSQL, artifacts proxied to the moto
    endpoint under s3://advflow-test/mlflow-pg."""
    from advflow.infra.local import services

    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAKE_ENV.items():  # the server process writes the artifacts
            mp.setenv(key, value)
        s3 = services.external_s3(moto_endpoint)
        handle = services.start_mlflow(tmp_path_factory.mktemp("mlflow-pg"), s3=s3, bucket=BUCKET,
                                       prefix=ARTIFACT_PREFIX, backend_store_uri=postgres.url("mlflow"))
    yield handle
    handle.stop()


@pytest.fixture
def pg_env(mlflow_pg, s3_env, monkeypatch):
    import mlflow

    for key, value in mlflow_pg.env.items():  # the URI and the admin credential (basic auth)
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(mlflow_pg.url)
    yield mlflow_pg.url
    if mlflow.active_run():
        mlflow.end_run()


# ----------------------------------------------------------------------------------------- the server


def test_postgres_listens_on_loopback_only_needs_the_password_and_is_not_root(postgres):
    import os

    import psutil
    import psycopg2

    proc = psutil.Process(postgres.pid)
    listening = [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert [(c.laddr.ip, c.laddr.port) for c in listening] == [("127.0.0.1", postgres.port)]
    if os.geteuid() == 0:  # PostgreSQL refuses root; the module drops to an unprivileged user
        assert proc.username() == postgres.run_as and proc.uids().real != 0
    # the unix socket is inside the data directory, not /var/run/postgresql
    assert (postgres.data_dir / f".s.PGSQL.{postgres.port}").exists()

    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=postgres.port, user=postgres.user, password="wrong",
                         dbname="postgres", connect_timeout=5).close()
    with closing(postgres.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database")
        assert {"mlflow", "optuna"} <= {r[0] for r in cur.fetchall()}
    assert postgres.password not in postgres.log_path.read_text()
    assert postgres.password not in repr(postgres) and ":***@" in postgres.redacted("mlflow")


def test_missing_binaries_and_a_taken_port_name_the_fix(monkeypatch, tmp_path):
    from advflow.infra.local import postgres as pg
    from advflow.infra.local.proc import PortInUseError, ServiceError

    monkeypatch.setenv(pg.BINDIR_ENV, str(tmp_path))
    with pytest.raises(ServiceError, match=rf"{pg.BINDIR_ENV}={tmp_path}: no executable initdb"):
        pg.find_bindir()
    monkeypatch.delenv(pg.BINDIR_ENV)
    monkeypatch.setattr(pg.shutil, "which", lambda name: None)
    monkeypatch.setattr(pg.glob, "glob", lambda pattern: [])
    with pytest.raises(ServiceError, match=r"install Debian's `postgresql` package .* ADVFLOW_PG_BINDIR"):
        pg.start_postgres(tmp_path / "none")
    assert not (tmp_path / "none" / "pg").exists()  # nothing was created before the check
    monkeypatch.undo()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} .* PostgreSQL"):
            pg.start_postgres(tmp_path / "taken", port=port)


def test_optuna_study_on_postgres_and_the_url_forms(postgres):
    """`postgresql+psycopg2://` (what the fixture's URLs say) works with the `postgres` extra. A bare
    `postgresql://` means SQLAlchemy's default driver (psycopg 3 since SQLAlchemy 2.1): it opens the
    same study when that driver is installed, else fails to import it."""
    import importlib.util

    import optuna
    from sqlalchemy.engine import make_url

    from advflow.platform.sweep.study import absolute_storage

    with_driver, bare = postgres.url("optuna"), postgres.url("optuna", driver=None)
    assert with_driver.startswith("postgresql+psycopg2://") and bare.startswith("postgresql://")
    assert absolute_storage(bare) == bare and absolute_storage(with_driver) == with_driver  # passed through
    name = "forms-" + secrets.token_hex(3)
    study = optuna.create_study(study_name=name, storage=with_driver)
    study.add_trial(optuna.trial.create_trial(params={"x": 1.0},
                                              distributions={"x": optuna.distributions.FloatDistribution(0, 2)},
                                              value=0.5))
    with closing(postgres.connect("optuna")) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM trials JOIN studies USING (study_id) WHERE study_name = %s", (name,))
        assert cur.fetchone()[0] == 1
    default_driver = make_url(bare).get_dialect().driver
    if importlib.util.find_spec(default_driver) is None:
        with pytest.raises(ImportError):
            optuna.load_study(study_name=name, storage=bare)
    else:
        again = optuna.load_study(study_name=name, storage=bare)
        assert [(t.params, t.value) for t in again.trials] == [({"x": 1.0}, 0.5)]


# ----------------------------------------------------------------------------------------- MLflow


@pytest.mark.timeout(300)
def test_mlflow_on_postgres_serves_runs_metrics_artifacts_and_the_registry(postgres, mlflow_pg, pg_env,
                                                                           moto_endpoint, tmp_path):
    import mlflow
    import psutil
    from mlflow.tracking import MlflowClient

    from advflow.infra.local.services import external_s3, s3_client

    # the password is in neither the server's argv, its log nor the handle's facts
    assert mlflow_pg.info["db"] == postgres.redacted("mlflow")
    assert not (Path(mlflow_pg.log_path).parent / "mlflow.db").exists()  # no SQLite beside it
    assert postgres.password not in Path(mlflow_pg.log_path).read_text()
    for proc in [psutil.Process(mlflow_pg.pid), *psutil.Process(mlflow_pg.pid).children(recursive=True)]:
        assert postgres.password not in " ".join(proc.cmdline())

    client = MlflowClient()
    exp_id = client.create_experiment("pg-tracking-" + secrets.token_hex(3))
    with mlflow.start_run(experiment_id=exp_id) as active:
        run_id = active.info.run_id
        mlflow.log_param("optim.lr", "0.0001")
        for step in (1, 2, 3):
            mlflow.log_metric("d_loss", 1.0 / step, step=step)
        mlflow.log_text("hello from postgres", "notes/hello.txt")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"optim.lr": "0.0001"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "d_loss")] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    local = client.download_artifacts(run_id, "notes/hello.txt", str(tmp_path))
    assert Path(local).read_text() == "hello from postgres"

    name = "pg-model-" + secrets.token_hex(3)
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/notes", run_id=run_id, tags={"step": "3"})
    client.set_registered_model_alias(name, "champion", version.version)
    assert client.get_model_version_by_alias(name, "champion").run_id == run_id

    # the lasting effect: the rows are in PostgreSQL, the artifact is on S3
    assert rows(postgres, "SELECT status, experiment_id FROM runs WHERE run_uuid = %s", run_id) \
        == [("FINISHED", int(exp_id))]
    assert sorted(rows(postgres, "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'd_loss'", run_id)) \
        == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert rows(postgres, "SELECT value FROM params WHERE run_uuid = %s AND key = 'optim.lr'", run_id) == [("0.0001",)]
    assert rows(postgres, "SELECT version, run_id FROM model_versions WHERE name = %s", name) == [(1, run_id)]
    assert rows(postgres, "SELECT alias, version FROM registered_model_aliases WHERE name = %s", name) \
        == [("champion", 1)]
    listing = s3_client(external_s3(moto_endpoint)).list_objects_v2(Bucket=BUCKET, Prefix=f"{ARTIFACT_PREFIX}/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/notes/hello.txt") for k in keys), keys


# ----------------------------------------------------------------------------------------- a tracked job


@pytest.fixture(scope="module")
def tracked_pg_job(digits, tmp_path_factory, mlflow_pg, moto_endpoint):
    """test_tracking's tiny tracked job (2 workers, 12 steps, registration at steps 6 and 12),
    tracked by the MLflow server on PostgreSQL."""
    from test_tracking import run_tracked_job

    return run_tracked_job(digits, tmp_path_factory.mktemp("tracked-pg"), mlflow_pg.url, moto_endpoint,
                           env=mlflow_pg.env, experiment="test-tracking-pg", model=MODEL)


@pytest.mark.timeout(600)
def test_tracked_2_worker_job_on_postgres_registers_versions_that_load(tracked_pg_job, postgres, pg_env, tmp_path):
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from advflow.platform.tracking.registry import load_generator
    from test_tracking import STEPS

    spec, run_id, history, run_dir = tracked_pg_job
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    d_loss = client.get_metric_history(run_id, "d_loss")
    assert sorted(m.step for m in d_loss) == list(range(1, STEPS + 1))
    by_step = {m.step: m.value for m in d_loss}
    for row in history:
        assert by_step[row["step"]] == pytest.approx(row["d_loss"], rel=1e-6)
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config", "final_metrics.json", "samples"} <= arts, arts
    final = client.download_artifacts(run_id, "final_metrics.json", str(tmp_path))
    assert json.loads(Path(final).read_text())["step"] == STEPS

    versions = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert [(v.version, v.tags["step"], v.run_id) for v in versions] == [("1", "6", run_id), ("2", "12", run_id)]

    # the registered step-12 generator loads from the registry and holds the checkpoint's EMA weights
    model = load_generator(f"models:/{MODEL}/2", device="cpu")
    ema = load_file(str(run_dir / f"checkpoint_{STEPS:06d}" / "ema.safetensors"))
    params = dict(model.generator.named_parameters())
    assert params and set(params) <= set(ema)
    for key, value in params.items():
        assert torch.equal(value.detach().cpu(), ema[key]), key
    images = model.generate([0, 7], [1, 2])
    assert images.shape == (2, 8, 8, 1) and images.dtype.name == "uint8"

    # ... and all of it is in PostgreSQL
    assert rows(postgres, "SELECT status FROM runs WHERE run_uuid = %s", run_id) == [("FINISHED",)]
    assert rows(postgres, "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'd_loss'", run_id) == [(STEPS,)]
    assert rows(postgres, "SELECT count(*) FROM params WHERE run_uuid = %s", run_id) == [(len(run.data.params),)]
    assert rows(postgres, "SELECT version, run_id FROM model_versions WHERE name = %s ORDER BY version", MODEL) \
        == [(1, run_id), (2, run_id)]
    assert rows(postgres, "SELECT value FROM model_version_tags WHERE name = %s AND version = 2 AND key = 'step'",
                MODEL) == [("12",)]
