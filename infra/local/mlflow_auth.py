"""Authentication for the stack's MLflow server: its admin credential, auth config and auth database.

Without it anyone on the machine could create, move (the ``champion`` alias) and delete registered
models through MLflow's REST API. The server runs MLflow's own basic-auth app (``mlflow server
--app-name basic-auth``), configured by an INI file (MLFLOW_AUTH_CONFIG_PATH) in the state dir:

- ``mlflow_credentials`` (0600, written atomically): the admin's username and a random password, in
  the layout of MLflow's ``~/.mlflow/credentials`` (``advflow.platform.tracking.credentials``).
  Like the S3 key it is kept while the stack is up (a restarted MLflow keeps it) and deleted by
  ``advflow stack down``, so the next ``up`` writes a new one.
- ``mlflow_auth.db``: MLflow's users and permissions (SQLite, 0600: it holds password hashes).
  MLflow creates the admin from MLFLOW_AUTH_ADMIN_PASSWORD only when the user does not exist and
  never changes an existing admin's password, so the server is started through ``main`` below,
  which first makes the database's admin password the file's (created, or rotated after a new
  ``up``). Other users a team added stay; the password never enters an environment or argv.
- ``mlflow_auth.ini``: ``default_permission = READ``, so a user an admin creates can read every
  experiment and model but change only what they created or were granted; anonymous requests get
  401 whatever the default.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from advflow.platform.atomic import write_text
from advflow.platform.tracking.credentials import (
    PASSWORD_ENV,
    USERNAME_ENV,
    CredentialsError,
    format_credentials,
    read_credentials,
)

CREDENTIALS_FILE = "mlflow_credentials"
AUTH_DB = "mlflow_auth.db"
AUTH_CONFIG = "mlflow_auth.ini"
ADMIN_USERNAME = "admin"
DEFAULT_PERMISSION = "READ"  # authenticated users read everything; writes need a grant (or creating it)


def write_credentials(path: Path, username: str = ADMIN_USERNAME) -> dict[str, str]:
    """A new random admin password in ``path`` (0600, atomically); returns the client variables."""
    password = secrets.token_urlsafe(30)  # 40 characters, 240 random bits
    write_text(path, format_credentials(username, password), mode=0o600)
    return {USERNAME_ENV: username, PASSWORD_ENV: password}


def ensure_credentials(path: Path) -> dict[str, str]:
    """Keep a usable credentials file (a restarted MLflow keeps what clients have); else a new one."""
    try:
        username, password = read_credentials(path)
    except CredentialsError:
        return write_credentials(path)
    return {USERNAME_ENV: username, PASSWORD_ENV: password}


def client_env(path: Path) -> dict[str, str]:
    """MLFLOW_TRACKING_USERNAME/PASSWORD from ``path``, or {} when it is gone (the stack is down)."""
    try:
        username, password = read_credentials(path)
    except CredentialsError:
        return {}
    return {USERNAME_ENV: username, PASSWORD_ENV: password}


def write_auth_config(path: Path, database_uri: str, username: str = ADMIN_USERNAME) -> Path:
    """MLflow's basic-auth INI (no password in it: the admin is set up by ``main``)."""
    text = (
        "# advflow stack: MLflow basic-auth settings (MLFLOW_AUTH_CONFIG_PATH); written by `advflow stack up`\n"
        f"[mlflow]\ndefault_permission = {DEFAULT_PERMISSION}\ndatabase_uri = {database_uri}\n"
        f"admin_username = {username}\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return write_text(path, text, mode=0o600)


def sync_admin(database_uri: str, username: str, password: str) -> str:
    """Make ``username`` an admin with ``password`` in the auth database: "created", "rotated" or "kept"."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(database_uri)  # creates or migrates the tables
    if not store.has_user(username):
        store.create_user(username, password, is_admin=True)
        return "created"
    if store.authenticate_user(username, password) and store.get_user(username).is_admin:
        return "kept"
    store.update_user(username, password=password, is_admin=True)
    return "rotated"


def _private_sqlite(database_uri: str) -> None:
    """chmod 0600 a SQLite auth database: password hashes are nobody else's business."""
    prefix = "sqlite:///"
    if database_uri.startswith(prefix):
        db = Path(database_uri[len(prefix):])
        if db.exists():
            db.chmod(0o600)


def main(argv: list[str] | None = None) -> int:
    """``python -m advflow.infra.local.mlflow_auth CREDENTIALS_FILE mlflow-args...``: set up the
    admin from the file, then run ``mlflow`` with the rest of the arguments in this process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not os.environ.get("MLFLOW_AUTH_CONFIG_PATH"):
        print("usage: MLFLOW_AUTH_CONFIG_PATH=INI python -m advflow.infra.local.mlflow_auth CREDENTIALS_FILE "
              "server --app-name basic-auth ...", file=sys.stderr)
        return 2
    from mlflow.server.auth.config import read_auth_config

    config = read_auth_config()
    username, password = read_credentials(argv[0])
    done = sync_admin(config.database_uri, username, password)
    _private_sqlite(config.database_uri)
    print(f"[advflow] MLflow admin user {username!r}: {done} (password from {argv[0]})", flush=True)
    from mlflow.cli import cli

    return cli.main(args=argv[1:], prog_name="mlflow")


if __name__ == "__main__":
    sys.exit(main())
