"""Put a secret from an AWS SSM SecureString parameter where its reader looks, mode 0600: the Ray
auth token (~/.ray/auth_token, read by `ray start`) and MLflow's password (an MLflow credentials
file, read by advflow through ADVFLOW_MLFLOW_CREDENTIALS_FILE). The cluster-launcher nodes
(infra/cluster/aws.yaml) get both through their instance profile, so neither is in the YAML, the
image, an environment variable or a Ray runtime_env.

    python -m advflow.infra.cluster.ray_token --parameter /advflow/ray-auth-token
    python -m advflow.infra.cluster.ray_token --parameter /advflow/mlflow-password --mlflow-user admin \\
        --out ~/.advflow/mlflow_credentials
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _secret(parameter: str, client, what: str) -> str:
    import boto3

    client = client or boto3.client("ssm")
    value = client.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"].strip()
    if not value:
        raise SystemExit(f"SSM parameter {parameter} is empty; store {what} in it")
    return value


def _write_private(out: Path, text: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    # created 0600 before the secret is written: no moment where another user could read it
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(out, 0o600)
    return out


def fetch(parameter: str, out: Path, client=None) -> Path:
    """The Ray auth token in ``parameter`` to ``out``."""
    return _write_private(out, _secret(parameter, client, "the token of `ray get-auth-token --generate`"))


def fetch_mlflow(parameter: str, out: Path, username: str, client=None) -> Path:
    """MLflow's password in ``parameter``, as ``username``'s credentials file at ``out``."""
    from advflow.platform.tracking.credentials import format_credentials

    password = _secret(parameter, client, f"the MLflow password of {username!r}")
    return _write_private(out, format_credentials(username, password))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parameter", required=True, help="SSM parameter name holding the secret")
    p.add_argument("--mlflow-user", metavar="USER",
                   help="the parameter holds USER's MLflow password: write an MLflow credentials file "
                        "(default --out ~/.advflow/mlflow_credentials) instead of the Ray token")
    p.add_argument("--out", help="default: ~/.ray/auth_token (the Ray token) or ~/.advflow/mlflow_credentials")
    args = p.parse_args(argv)
    if args.mlflow_user:
        fetch_mlflow(args.parameter, Path(args.out or Path.home() / ".advflow" / "mlflow_credentials"),
                     args.mlflow_user)
    else:
        fetch(args.parameter, Path(args.out or Path.home() / ".ray" / "auth_token"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
