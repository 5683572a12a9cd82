"""The names every cluster object agrees on: Secrets and their keys, the ConfigMap, Services, ports,
the image's user and paths. One place, so the manifests, the README's `kubectl create secret` lines
and the tests cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

CLUSTER_DIR = Path(__file__).resolve().parent
REPO = CLUSTER_DIR.parent.parent
LOCK = CLUSTER_DIR / "requirements.lock"
KUBERAY_DIR = CLUSTER_DIR / "kuberay"

# The image (infra/cluster/Dockerfile): the repo is copied to WORKDIR and installed; the user is
# fixed so that pod securityContexts can name it (runAsUser) and files it writes have a known owner.
WORKDIR = "/opt/advflow"
UID = 10001
DEFAULT_IMAGE = "advflow:0.1.0"

# Secrets (created by the user with `kubectl create secret generic`, never committed).
S3_SECRET = "advflow-s3"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
RAY_TOKEN_SECRET = "advflow-ray-token"
RAY_TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName expects
DB_SECRET = "advflow-db"
DB_KEYS = ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "OPTUNA_DB_PASSWORD")
# MLflow's admin (basic auth): the server creates it on first start; Ray pods log in with it. The
# Flask key signs the auth app's CSRF tokens and must be the same in every MLflow worker.
MLFLOW_AUTH_SECRET = "advflow-mlflow-auth"
MLFLOW_AUTH_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")

# Non-secret settings every pod reads (envFrom).
CONFIGMAP = "advflow-config"

POSTGRES = "advflow-postgres"
POSTGRES_PORT = 5432
POSTGRES_IMAGE = "postgres:17.6"
MLFLOW = "advflow-mlflow"
MLFLOW_PORT = 5000
MLFLOW_DB = "mlflow"  # database and role name
MLFLOW_AUTH_DB = "mlflow_auth"  # MLflow's users and permissions: a database of its own, owned by role mlflow
MLFLOW_AUTH_CONFIG = "advflow-mlflow-auth"  # the ConfigMap with MLflow's basic_auth.ini
MLFLOW_AUTH_DIR = "/etc/advflow/mlflow-auth"  # where the MLflow pod mounts it
OPTUNA_DB = "optuna"  # database and role name

LABELS = {"app.kubernetes.io/part-of": "advflow"}

# Ray's metrics ports (infra/cluster/monitoring.py): every Ray node's metrics export (Ray's node
# metrics and the ray.util.metrics series of its processes: advflow's live metrics), and the head's
# dashboard's own. Named as KubeRay's docs name them: the PodMonitors scrape the ports by name.
METRICS_PORT, METRICS_PORT_NAME = 8080, "metrics"
DASHBOARD_METRICS_PORT, DASHBOARD_METRICS_PORT_NAME = 44227, "dash-metrics"


def locked_version(name: str) -> str:
    """The exact version requirements.lock pins for `name` (the image installs exactly that)."""
    for line in LOCK.read_text().splitlines():
        match = re.fullmatch(rf"{re.escape(name)}==(\S+)", line.strip(), flags=re.IGNORECASE)
        if match:
            return match.group(1)
    raise ValueError(f"{LOCK}: no pin for {name}; regenerate it with `python -m advflow.infra.cluster.lock`")


def service_host(name: str, namespace: str) -> str:
    """A Service's in-cluster DNS name (namespace-qualified: pods of any namespace can use it)."""
    return f"{name}.{namespace}.svc"
