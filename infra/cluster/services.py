"""Core Kubernetes objects beside the Ray cluster: the shared ConfigMap, PostgreSQL (one server, a
database each for MLflow, MLflow's users and Optuna) and the MLflow tracking server (runs in
PostgreSQL, artifacts on S3, MLflow's basic-auth app: anonymous requests get 401). Passwords never
appear here: pods read them from the advflow-db and advflow-mlflow-auth Secrets, and URLs carry
only the role name (libpq takes the password from PGPASSWORD)."""

from __future__ import annotations

from advflow.infra.cluster import names as n
from advflow.infra.cluster.kuberay import container_security, pod_security

# Runs once, on an empty data directory (the postgres image's /docker-entrypoint-initdb.d hook).
# psql's :'var' quotes the passwords as SQL literals, so no password text is ever parsed as SQL.
INIT_SQL = f"""#!/bin/bash
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \\
  -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v optuna_pw="$OPTUNA_DB_PASSWORD" <<'SQL'
CREATE ROLE {n.MLFLOW_DB} LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE {n.MLFLOW_DB} OWNER {n.MLFLOW_DB};
CREATE DATABASE {n.MLFLOW_AUTH_DB} OWNER {n.MLFLOW_DB};
CREATE ROLE {n.OPTUNA_DB} LOGIN PASSWORD :'optuna_pw';
CREATE DATABASE {n.OPTUNA_DB} OWNER {n.OPTUNA_DB};
SQL
"""
POSTGRES_UID = 999  # the `postgres` user of the official image


def _meta(name: str, namespace: str) -> dict:
    return {"name": name, "namespace": namespace, "labels": {**n.LABELS, "app.kubernetes.io/name": name}}


def _secret_env(name: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": n.DB_SECRET, "key": key}}}


def _service(name: str, namespace: str, port: int) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace),
            "spec": {"selector": {"app.kubernetes.io/name": name},
                     "ports": [{"name": "main", "port": port, "targetPort": port}]}}


def db_url(role: str, namespace: str, database: str | None = None) -> str:
    # +psycopg2: a bare postgresql:// means psycopg 3 since SQLAlchemy 2.1; the image has psycopg2.
    return (f"postgresql+psycopg2://{role}@{n.service_host(n.POSTGRES, namespace)}:{n.POSTGRES_PORT}/"
            f"{database or role}")


def mlflow_auth_ini(namespace: str) -> str:
    """MLflow's basic-auth config (MLFLOW_AUTH_CONFIG_PATH). No password in it: the admin's comes
    from the Secret (MLFLOW_AUTH_ADMIN_PASSWORD, used once, to create the admin on the first start),
    the database's from PGPASSWORD. default_permission READ: a user an admin adds reads every
    experiment and model, and changes only what they create or are granted."""
    return ("[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {db_url(n.MLFLOW_DB, namespace, n.MLFLOW_AUTH_DB)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")


def s3_bucket(storage_path: str) -> str:
    """The bucket of `run.storage_path` (MLflow's artifacts and the FID files sit beside the runs)."""
    if not storage_path.startswith("s3://"):
        raise ValueError(f"run.storage_path: {storage_path!r} is not on S3, and cluster pods share no disk; "
                         "set --set run.storage_path=s3://BUCKET/runs")
    return storage_path[len("s3://"):].split("/", 1)[0]


def configmap(namespace: str, region: str) -> dict:
    data = {
        "MLFLOW_TRACKING_URI": f"http://{n.service_host(n.MLFLOW, namespace)}:{n.MLFLOW_PORT}",
        "OPTUNA_STORAGE_URL": db_url(n.OPTUNA_DB, namespace),
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        # A finishing worker keeps serving its last live metrics for one scrape (kube-prometheus-stack
        # scrapes every 30 s), so a run's final values reach Prometheus (platform/tracking/live.py).
        "ADVFLOW_LIVE_LINGER_S": "30",
    }
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(n.CONFIGMAP, namespace), "data": data}


def postgres(namespace: str, storage_gi: int = 50) -> list[dict]:
    init = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{n.POSTGRES}-init", namespace),
            "data": {"10-advflow-databases.sh": INIT_SQL}}
    container = {
        "name": "postgres", "image": n.POSTGRES_IMAGE,
        "env": [_secret_env(key, key) for key in n.DB_KEYS]
        # a subdirectory: the volume's root may hold lost+found, which initdb refuses
        + [{"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}],
        "ports": [{"containerPort": n.POSTGRES_PORT, "name": "postgres"}],
        "readinessProbe": {"exec": {"command": ["pg_isready", "-U", "postgres"]}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"},
                         {"name": "init", "mountPath": "/docker-entrypoint-initdb.d", "readOnly": True}],
    }
    uid = POSTGRES_UID
    stateful = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(n.POSTGRES, namespace),
        "spec": {
            "serviceName": n.POSTGRES, "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": n.POSTGRES}},
            "template": {
                "metadata": {"labels": {**n.LABELS, "app.kubernetes.io/name": n.POSTGRES}},
                "spec": {"securityContext": {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid, "runAsNonRoot": True},
                         "containers": [container],
                         "volumes": [{"name": "init", "configMap": {"name": f"{n.POSTGRES}-init", "defaultMode": 0o555}}]},
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": f"{storage_gi}Gi"}}}}],
        },
    }
    return [init, _service(n.POSTGRES, namespace, n.POSTGRES_PORT), stateful]


def mlflow(namespace: str, image: str, bucket: str) -> list[dict]:
    host = n.service_host(n.MLFLOW, namespace)
    # MLflow refuses Host headers it does not know (DNS-rebinding guard): the Service's names, and
    # localhost for `kubectl port-forward`.
    allowed = [f"{h}:{n.MLFLOW_PORT}" for h in (n.MLFLOW, host, f"{host}.cluster.local", "localhost", "127.0.0.1")]
    command = ["mlflow", "server", "--app-name", "basic-auth", "--host", "0.0.0.0", "--port", str(n.MLFLOW_PORT),
               "--backend-store-uri", db_url(n.MLFLOW_DB, namespace),
               # artifacts go through the server (--serve-artifacts): clients need no S3 access for them
               "--artifacts-destination", f"s3://{bucket}/mlflow-artifacts", "--serve-artifacts",
               "--allowed-hosts", ",".join(allowed), "--workers", "4"]
    container = {
        "name": "mlflow", "image": image, "command": command,
        "env": [_secret_env("PGPASSWORD", "MLFLOW_DB_PASSWORD")]
        + [{"name": key, "valueFrom": {"secretKeyRef": {"name": n.S3_SECRET, "key": key}}} for key in n.S3_KEYS]
        + _auth_env(),
        "envFrom": [{"configMapRef": {"name": n.CONFIGMAP}}],
        "volumeMounts": [{"name": "auth", "mountPath": n.MLFLOW_AUTH_DIR, "readOnly": True}],
        "ports": [{"containerPort": n.MLFLOW_PORT, "name": "http"}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": n.MLFLOW_PORT,
                                       "httpHeaders": [{"name": "Host", "value": f"localhost:{n.MLFLOW_PORT}"}]},
                           "periodSeconds": 10},
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": container_security(),
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(n.MLFLOW, namespace),
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": n.MLFLOW}},
                 "template": {"metadata": {"labels": {**n.LABELS, "app.kubernetes.io/name": n.MLFLOW}},
                              "spec": {"securityContext": pod_security(), "containers": [container],
                                       "volumes": [{"name": "auth", "configMap": {"name": n.MLFLOW_AUTH_CONFIG}}]}}},
    }
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(n.MLFLOW_AUTH_CONFIG, namespace),
              "data": {"basic_auth.ini": mlflow_auth_ini(namespace)}}
    return [config, deployment, _service(n.MLFLOW, namespace, n.MLFLOW_PORT)]


def _auth_env() -> list[dict]:
    """The basic-auth app's settings: its config file, the admin from the Secret, the Flask key."""
    def secret(name: str, key: str) -> dict:
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": n.MLFLOW_AUTH_SECRET, "key": key}}}

    return [{"name": "MLFLOW_AUTH_CONFIG_PATH", "value": f"{n.MLFLOW_AUTH_DIR}/basic_auth.ini"},
            secret("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
            secret("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"),
            secret("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_FLASK_SERVER_SECRET_KEY")]
