"""The PostgreSQL manifest's init script (infra/cluster/services.py INIT_SQL) run for real, as the
postgres image runs it on an empty server, then used the way the manifests use it: MLflow's and
Optuna's URLs carry only the role (postgresql+psycopg2://role@host/db) and the password comes from
PGPASSWORD, as the pods get it from the advflow-db Secret. Skipped where PostgreSQL's server
binaries are missing (infra/test.sh installs them)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from advflow.infra.cluster import services

pytestmark = pytest.mark.integration  # a PostgreSQL server


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory):
    from advflow.infra.local.postgres import start_postgres
    from advflow.infra.local.proc import ServiceError

    if shutil.which("psql") is None:
        pytest.skip("psql not found; install PostgreSQL's client (infra/test.sh does)")
    try:
        server = start_postgres(tmp_path_factory.mktemp("pg"), databases=())
    except ServiceError as err:
        pytest.skip(str(err))
    with server:
        # the postgres image's initdb hook: superuser env plus the two passwords from the Secret
        script = tmp_path_factory.mktemp("init") / "10-advflow-databases.sh"
        script.write_text(services.INIT_SQL)
        env = {"PATH": os.environ["PATH"], "POSTGRES_USER": server.user, "POSTGRES_DB": "postgres",
               "PGHOST": server.host, "PGPORT": str(server.port), "PGPASSWORD": server.password, **PASSWORDS}
        subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True, timeout=60)
        yield server


# quotes and SQL in them: psql's :'var' must pass them as literals
PASSWORDS = {"MLFLOW_DB_PASSWORD": "m'l; DROP ROLE x; --", "OPTUNA_DB_PASSWORD": "o p\"t"}


def test_init_script_creates_both_databases_and_the_urls_work_with_pgpassword(empty_server):
    import sqlalchemy

    s, passwords = empty_server, PASSWORDS

    for role, key in (("mlflow", "MLFLOW_DB_PASSWORD"), ("optuna", "OPTUNA_DB_PASSWORD")):
        url = services.db_url(role, "advflow").replace("advflow-postgres.advflow.svc:5432", f"{s.host}:{s.port}")
        assert ":" not in url.split("//")[1].split("@")[0]  # no password in the URL
        os.environ["PGPASSWORD"] = passwords[key]
        try:
            engine = sqlalchemy.create_engine(url)
            with engine.begin() as conn:  # the role owns its database: it can create tables
                conn.exec_driver_sql("CREATE TABLE t (x int)")
                assert conn.exec_driver_sql("SELECT current_user, current_database()").one() == (role, role)
            engine.dispose()
            os.environ["PGPASSWORD"] = "wrong"
            with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
                sqlalchemy.create_engine(url).connect()
        finally:
            os.environ.pop("PGPASSWORD", None)


def test_optuna_opens_a_study_on_the_configmaps_url(empty_server, monkeypatch):
    optuna = pytest.importorskip("optuna")
    s = empty_server
    url = services.db_url("optuna", "advflow").replace("advflow-postgres.advflow.svc:5432", f"{s.host}:{s.port}")
    monkeypatch.setenv("PGPASSWORD", PASSWORDS["OPTUNA_DB_PASSWORD"])
    study = optuna.create_study(study_name="t", storage=url, load_if_exists=True)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="t", storage=url).trials) == 2


def test_mlflow_auth_creates_its_admin_in_its_own_database_on_the_configmaps_url(empty_server, monkeypatch):
    """The MLflow pod's basic_auth.ini: MLflow's auth store migrates `mlflow_auth` (owned by role
    mlflow, password from PGPASSWORD) and creates the admin there, as on the server's first start."""
    import configparser

    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    s = empty_server
    ini = configparser.ConfigParser()
    ini.read_string(services.mlflow_auth_ini("advflow"))
    url = ini["mlflow"]["database_uri"].replace("advflow-postgres.advflow.svc:5432", f"{s.host}:{s.port}")
    assert url.endswith("/mlflow_auth") and ":" not in url.split("//")[1].split("@")[0]
    monkeypatch.setenv("PGPASSWORD", PASSWORDS["MLFLOW_DB_PASSWORD"])
    store = SqlAlchemyStore()
    store.init_db(url)
    store.create_user("admin", "a-generated-password-1234", is_admin=True)
    assert store.authenticate_user("admin", "a-generated-password-1234")
    assert ini["mlflow"]["default_permission"] == "READ" and "admin_password" not in ini["mlflow"]
