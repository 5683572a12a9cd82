"""MLflow behind authentication (issue 24): anonymous registry writes are refused, the generated
admin credential works, read-only users read but cannot move an alias; the credential reaches
processes through a 0600 file (`ADVFLOW_MLFLOW_CREDENTIALS_FILE`), never through stack.json.

The integration tests run against conftest's session MLflow server, started by
`services.start_mlflow` exactly as `advflow stack up` starts the stack's.
"""

from __future__ import annotations

import json
import secrets
import stat
import urllib.error
import urllib.request

import pytest

from advflow.platform.tracking import credentials as creds


def _rest(url: str, path: str, body: dict, method: str = "POST", auth: tuple[str, str] | None = None):
    """(status, text) of one plain REST call, without MLflow's client (so without its credentials)."""
    from advflow.infra.local.services import basic_auth

    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = basic_auth(*auth)
    data = None if method == "GET" else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


MOVE_ALIAS = "/api/2.0/mlflow/registered-models/alias"
DELETE_VERSION = "/api/2.0/mlflow/model-versions/delete"


@pytest.fixture
def champion(mlflow_env):
    """A registered model with two versions and `champion` on version 1, made with the admin credential."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = "auth-" + secrets.token_hex(4)
    run = client.create_run(client.create_experiment(name))
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", "1")
    return client, name


@pytest.mark.integration
def test_anonymous_alias_move_and_version_delete_get_401_and_change_nothing(mlflow_server, champion):
    client, name = champion
    moved = _rest(mlflow_server.url, MOVE_ALIAS, {"name": name, "alias": "champion", "version": "2"})
    deleted = _rest(mlflow_server.url, DELETE_VERSION, {"name": name, "version": "1"}, method="DELETE")
    read = _rest(mlflow_server.url, f"/api/2.0/mlflow/registered-models/get?name={name}", {}, method="GET")
    for status, text in (moved, deleted, read):
        assert status == 401 and "You are not authenticated" in text, (status, text)
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert sorted(v.version for v in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]
    wrong = (mlflow_server.env[creds.USERNAME_ENV], "not-the-password")
    assert _rest(mlflow_server.url, MOVE_ALIAS, {"name": name, "alias": "champion", "version": "2"}, auth=wrong)[0] == 401


@pytest.mark.integration
def test_the_generated_admin_credential_moves_the_alias_and_deletes_the_version(mlflow_server, champion):
    client, name = champion
    admin = (mlflow_server.env[creds.USERNAME_ENV], mlflow_server.env[creds.PASSWORD_ENV])
    assert _rest(mlflow_server.url, MOVE_ALIAS, {"name": name, "alias": "champion", "version": "2"}, auth=admin)[0] == 200
    assert _rest(mlflow_server.url, DELETE_VERSION, {"name": name, "version": "1"}, method="DELETE", auth=admin)[0] == 200
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["2"]


@pytest.mark.integration
def test_a_read_only_user_reads_but_cannot_move_the_alias(mlflow_server, champion):
    """What the READMEs tell a team: create the user as admin; default_permission READ does the rest."""
    from mlflow.server.auth.client import AuthServiceClient

    _, name = champion
    user, password = "reader-" + secrets.token_hex(3), secrets.token_urlsafe(18)
    AuthServiceClient(mlflow_server.url).create_user(user, password)  # as the admin (mlflow_env)
    reader = (user, password)
    status, text = _rest(mlflow_server.url, f"/api/2.0/mlflow/registered-models/get?name={name}", {}, "GET", reader)
    assert status == 200 and name in text
    status, _ = _rest(mlflow_server.url, MOVE_ALIAS, {"name": name, "alias": "champion", "version": "2"}, auth=reader)
    assert status == 403


# ----------------------------------------------------------------------------- no server needed


def test_credentials_file_sets_the_client_variables_unless_they_are_exported(tmp_path):
    from advflow.infra.local import mlflow_auth

    path = tmp_path / "mlflow_credentials"
    written = mlflow_auth.write_credentials(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(written[creds.PASSWORD_ENV]) >= 40
    env = {creds.CREDENTIALS_FILE_ENV: str(path)}
    assert creds.ensure_mlflow_credentials(env) is True
    assert (env[creds.USERNAME_ENV], env[creds.PASSWORD_ENV]) == (written[creds.USERNAME_ENV], written[creds.PASSWORD_ENV])
    mine = {creds.CREDENTIALS_FILE_ENV: str(path), creds.USERNAME_ENV: "alice", creds.PASSWORD_ENV: "hers"}
    assert creds.ensure_mlflow_credentials(mine) is False and mine[creds.USERNAME_ENV] == "alice"
    assert creds.ensure_mlflow_credentials({}) is False
    assert mlflow_auth.ensure_credentials(path) == written  # kept while it is usable (a restart)
    assert mlflow_auth.write_credentials(path)[creds.PASSWORD_ENV] != written[creds.PASSWORD_ENV]  # a new `up`


def test_a_missing_credentials_file_names_the_file_the_variable_and_the_fix(tmp_path):
    with pytest.raises(creds.CredentialsError) as err:
        creds.ensure_mlflow_credentials({creds.CREDENTIALS_FILE_ENV: str(tmp_path / "gone")})
    assert str(tmp_path / "gone") in str(err.value) and creds.CREDENTIALS_FILE_ENV in str(err.value)
    assert "advflow stack up" in str(err.value)


def test_sync_admin_creates_keeps_and_rotates_the_admin_password_and_keeps_other_users(tmp_path):
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    from advflow.infra.local import mlflow_auth

    uri = f"sqlite:///{tmp_path / 'auth.db'}"
    first, second = secrets.token_urlsafe(30), secrets.token_urlsafe(30)
    assert mlflow_auth.sync_admin(uri, "admin", first) == "created"
    store = SqlAlchemyStore()
    store.init_db(uri)
    store.create_user("reader", secrets.token_urlsafe(18))
    assert mlflow_auth.sync_admin(uri, "admin", first) == "kept"
    assert mlflow_auth.sync_admin(uri, "admin", second) == "rotated"
    assert store.authenticate_user("admin", second) and not store.authenticate_user("admin", first)
    assert store.has_user("reader")


def test_stack_json_never_holds_a_secret_and_an_old_one_still_loads_with_its_key_ignored(tmp_path):
    from advflow.infra.local import mlflow_auth, s3_auth, services
    from advflow.infra.local.stack import StackConfig, StackState, load_state, save_state

    state_dir = tmp_path / "st"
    s3_file, mlflow_file = state_dir / services.S3_CREDENTIALS_FILE, state_dir / mlflow_auth.CREDENTIALS_FILE
    state_dir.mkdir()
    s3_key = s3_auth.write_credentials(s3_file)
    admin = mlflow_auth.write_credentials(mlflow_file)
    old = {"version": 1, "config": StackConfig(state_dir=state_dir).to_json(), "services": {
        "s3": {"name": "s3", "kind": "moto-disk", "url": "http://127.0.0.1:1", "pid": None, "log_path": None,
               "env": {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "OLDKEYID",
                       "AWS_SECRET_ACCESS_KEY": "old-secret-from-an-older-stack-json"},
               "info": {"credentials_file": str(s3_file)}},
        "mlflow": {"name": "mlflow", "kind": "mlflow", "url": "http://127.0.0.1:2", "pid": None, "log_path": None,
                   "env": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:2"}, "info": {"credentials_file": str(mlflow_file)}}}}
    (state_dir / "stack.json").write_text(json.dumps(old))
    state = load_state(state_dir)
    assert state.services["s3"].env["AWS_SECRET_ACCESS_KEY"] == s3_key["AWS_SECRET_ACCESS_KEY"]  # the file's
    assert state.services["mlflow"].env[creds.PASSWORD_ENV] == admin[creds.PASSWORD_ENV]
    save_state(StackState(state.config, state.services))
    text = (state_dir / "stack.json").read_text()
    for secret in (s3_key["AWS_SECRET_ACCESS_KEY"], admin[creds.PASSWORD_ENV], "old-secret-from-an-older-stack-json"):
        assert secret not in text
    assert "http://127.0.0.1:2" in text and str(mlflow_file) in text  # what it needs stays
