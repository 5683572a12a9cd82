"""Cluster deployment: the container image, KubeRay manifests generated from a run config, the AWS
cluster-launcher YAML and the PostgreSQL-backed MLflow/Optuna set-up. See infra/cluster/README.md."""
