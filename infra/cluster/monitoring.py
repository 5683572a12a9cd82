"""Metrics on the cluster: what Prometheus scrapes from the Ray pods, and where Ray's dashboard
finds Prometheus and Grafana.

Every Ray node serves its metrics (Ray's own node metrics and advflow's `ray_advflow_*` series,
platform/tracking/live.py) on its metrics-export port, `metrics` (8080) on every Ray container;
the head's dashboard serves its own on `dash-metrics` (44227). Two PodMonitors (the Prometheus
operator's resource, as KubeRay documents it: `ray-head-monitor`, `ray-workers-monitor`) select the
pods by the labels the KubeRay operator puts on them (`ray.io/is-ray-node: "yes"`,
`ray.io/node-type: head|worker`) and copy the pod's `ray.io/cluster` label into each series as
`ray_io_cluster` (Ray's Grafana panels filter on it). No autoscaler runs (the worker groups have a
fixed size), so its port (44217) is not scraped.

The head's dashboard reads RAY_PROMETHEUS_HOST (its Metrics view queries Prometheus from the
pod), RAY_GRAFANA_HOST (its health check of Grafana, from the pod), RAY_GRAFANA_IFRAME_HOST (the
Grafana address your browser loads the embedded panels from: the port-forward of
infra/cluster/README.md) and RAY_PROMETHEUS_NAME (the Grafana data source of Ray's panels). The
defaults are the Services of the kube-prometheus-stack Helm chart installed as release
`prometheus` in namespace `prometheus-system` (the README's command); `advflow cluster manifest
--prometheus-url/--grafana-url/--grafana-iframe-url/--prometheus-release` change them.
"""

from __future__ import annotations

from dataclasses import dataclass

from advflow.infra.cluster import names as n

API_VERSION = "monitoring.coreos.com/v1"
# The labels the KubeRay operator puts on every pod of a RayCluster (besides the pod template's own).
KUBERAY_NODE_LABELS = ("ray.io/is-ray-node", "ray.io/node-type", "ray.io/cluster", "ray.io/group")


@dataclass(frozen=True)
class Monitoring:
    prometheus_url: str = "http://prometheus-kube-prometheus-prometheus.prometheus-system.svc:9090"
    grafana_url: str = "http://prometheus-grafana.prometheus-system.svc:80"
    grafana_iframe_url: str = "http://127.0.0.1:3000"
    # kube-prometheus-stack's Prometheus picks up the PodMonitors labelled release=<its Helm release>
    release: str = "prometheus"
    # the name of the Prometheus data source in that Grafana (the chart's default)
    prometheus_name: str = "Prometheus"

    def head_env(self) -> list[dict]:
        return [{"name": "RAY_PROMETHEUS_HOST", "value": self.prometheus_url},
                {"name": "RAY_PROMETHEUS_NAME", "value": self.prometheus_name},
                {"name": "RAY_GRAFANA_HOST", "value": self.grafana_url},
                {"name": "RAY_GRAFANA_IFRAME_HOST", "value": self.grafana_iframe_url}]


def head_ports() -> list[dict]:
    return [{"containerPort": n.METRICS_PORT, "name": n.METRICS_PORT_NAME},
            {"containerPort": n.DASHBOARD_METRICS_PORT, "name": n.DASHBOARD_METRICS_PORT_NAME}]


def worker_ports() -> list[dict]:
    return [{"containerPort": n.METRICS_PORT, "name": n.METRICS_PORT_NAME}]


def _endpoint(port: str) -> dict:
    return {"port": port, "path": "/metrics", "relabelings": [
        {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
         "targetLabel": "ray_io_cluster"}]}


def pod_monitors(namespace: str, monitoring: Monitoring) -> list[dict]:
    """ray-head-monitor and ray-workers-monitor, in the Ray pods' namespace (a PodMonitor selects
    pods of its own namespace)."""
    def monitor(name: str, node_type: str, ports: list[str]) -> dict:
        return {"apiVersion": API_VERSION, "kind": "PodMonitor",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {**n.LABELS, "release": monitoring.release}},
                "spec": {"selector": {"matchLabels": {"ray.io/is-ray-node": "yes", "ray.io/node-type": node_type}},
                         "podMetricsEndpoints": [_endpoint(p) for p in ports]}}

    return [monitor("ray-head-monitor", "head", [n.METRICS_PORT_NAME, n.DASHBOARD_METRICS_PORT_NAME]),
            monitor("ray-workers-monitor", "worker", [n.METRICS_PORT_NAME])]
