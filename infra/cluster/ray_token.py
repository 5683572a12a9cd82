"""Put the Ray auth token where `ray start` reads it (~/.ray/auth_token, mode 0600), from an AWS SSM
SecureString parameter: the cluster-launcher nodes (infra/cluster/aws.yaml) get it through their
instance profile, so the token is in neither the YAML nor the image.

    python -m advflow.infra.cluster.ray_token --parameter /advflow/ray-auth-token
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def fetch(parameter: str, out: Path, client=None) -> Path:
    import boto3

    client = client or boto3.client("ssm")
    token = client.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"].strip()
    if not token:
        raise SystemExit(f"SSM parameter {parameter} is empty; store the token of `ray get-auth-token --generate` in it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # created 0600 before the token is written: no moment where another user could read it
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.chmod(out, 0o600)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parameter", required=True, help="SSM parameter name holding the token")
    p.add_argument("--out", default=str(Path.home() / ".ray" / "auth_token"), help="default: %(default)s")
    args = p.parse_args(argv)
    fetch(args.parameter, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
