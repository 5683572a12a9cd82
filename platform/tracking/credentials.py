"""MLflow credentials from a 0600 file, for processes that must not carry the secret in their env.

The stack's MLflow server refuses anonymous requests (MLflow's basic-auth app). A user's shell gets
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from ``advflow stack env``, which MLflow's client
reads natively. Ray job drivers and workers do not run in that shell, and the secret must not travel
in a Ray runtime_env (Ray's state API shows it in plain text): the Ray head is started with
``ADVFLOW_MLFLOW_CREDENTIALS_FILE`` naming the file instead, and ``ensure_mlflow_credentials`` turns
it into the two variables inside the process that talks to MLflow.

Why here and not in an MLflow request-auth-provider plugin: a plugin needs a package entry point and
MLFLOW_TRACKING_AUTH on every node; this needs neither. ``advflow.platform.tracking`` calls it when
the package is imported, and every advflow module that opens an MlflowClient or a run lives in, or
imports from, that package, so it runs before the first request in drivers, Train workers and trials.

The file is an INI file in the layout of MLflow's own ``~/.mlflow/credentials``::

    [mlflow]
    mlflow_tracking_username = admin
    mlflow_tracking_password = ...
"""

from __future__ import annotations

import configparser
import os
from collections.abc import MutableMapping
from pathlib import Path

CREDENTIALS_FILE_ENV = "ADVFLOW_MLFLOW_CREDENTIALS_FILE"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
SECTION = "mlflow"


class CredentialsError(ValueError):
    """The credentials file named by ADVFLOW_MLFLOW_CREDENTIALS_FILE is missing or unusable."""


def read_credentials(path: str | os.PathLike) -> tuple[str, str]:
    """(username, password) from ``path``; CredentialsError naming the file and the fix."""
    parser = configparser.ConfigParser()
    try:
        parser.read_string(Path(path).read_text())
        section = parser[SECTION]
        username = section[USERNAME_ENV.lower()].strip()
        password = section[PASSWORD_ENV.lower()].strip()
    except (OSError, configparser.Error, KeyError) as exc:
        raise CredentialsError(
            f"the MLflow credentials file {path} (from {CREDENTIALS_FILE_ENV}) is missing or unreadable "
            f"({exc!r}); `advflow stack up` writes it, or export {USERNAME_ENV}/{PASSWORD_ENV} instead"
        ) from exc
    if not username or not password:
        raise CredentialsError(f"the MLflow credentials file {path} has an empty username or password; "
                               "`advflow stack down` and `advflow stack up` write a new one")
    return username, password


def format_credentials(username: str, password: str) -> str:
    """The file's text (the writer, ``advflow.infra.local.mlflow_auth``, keeps it 0600)."""
    return (
        "# advflow stack MLflow credentials: written by `advflow stack up`, removed by `advflow stack down`\n"
        f"[{SECTION}]\n{USERNAME_ENV.lower()} = {username}\n{PASSWORD_ENV.lower()} = {password}\n"
    )


def ensure_mlflow_credentials(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set MLFLOW_TRACKING_USERNAME/PASSWORD from ADVFLOW_MLFLOW_CREDENTIALS_FILE unless both are set.

    True when it set them. Credentials a user exported win (they may be a read-only user's). No
    variable, nothing to do: a server without authentication needs none.
    """
    env = os.environ if environ is None else environ
    if env.get(USERNAME_ENV) and env.get(PASSWORD_ENV):
        return False
    path = env.get(CREDENTIALS_FILE_ENV)
    if not path:
        return False
    env[USERNAME_ENV], env[PASSWORD_ENV] = read_credentials(path)
    return True
