"""Offline checks of the manifests (tests/test_cluster_*.py use them; so can you before `kubectl
apply`): the KubeRay CRD schemas (made strict the way the API server's field validation is), the
Kubernetes schemas of the core objects (kubernetes-validate), and the invariants a manifest must
keep (a GPU per worker, non-root pods, token auth, Secrets the README creates, metrics ports and the
PodMonitors that scrape them); and aws.yaml
through `ray up`'s own checks (`ray_up_checks`). Each check raises (AssertionError for an
invariant) with what is wrong. jsonschema and kubernetes-validate are in the `test` extra."""

from __future__ import annotations

import copy
import functools
import re

import yaml

from advflow.infra.cluster import names as n

KUBERAY = n.KUBERAY_DIR
# The CRDs the KubeRay operator installs (schemas only), kept beside the repo, not in it.
CRDS = n.REPO.parent / "shared" / "kuberay-crds"
# The Kubernetes version the core objects are validated against (kubernetes-validate ships schemas
# for 1.x releases up to 1.37). Nothing here needs a newer API than 1.33's: StatefulSet, Deployment,
# Service, ConfigMap are all stable v1.
K8S_VERSION = "1.33.0"
# What the README's `kubectl create secret generic` lines create: name -> keys.
SECRETS = {n.S3_SECRET: set(n.S3_KEYS), n.RAY_TOKEN_SECRET: {n.RAY_TOKEN_KEY}, n.DB_SECRET: set(n.DB_KEYS),
           n.MLFLOW_AUTH_SECRET: set(n.MLFLOW_AUTH_KEYS)}


def committed() -> dict[str, list[dict]]:
    return {p.stem: list(yaml.safe_load_all(p.read_text())) for p in sorted(KUBERAY.glob("*.yaml"))}


class CRDsMissing(FileNotFoundError):
    pass


@functools.cache  # the CRD files are 40k lines of YAML; parse each once
def crd_schema(kind: str) -> dict:
    """The v1 openAPIV3Schema of a KubeRay CRD, strict: unknown fields are errors (the API server's
    strict field validation; a bare jsonschema check would let a misspelled field through)."""
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        raise CRDsMissing(f"KubeRay CRD schemas not found in {CRDS} (the ../shared/kuberay-crds folder next to "
                          "the repo); the CRD check cannot run, the other checks still do")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _strict(node):
    if isinstance(node, dict):
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)
    return node


def validate_crd(obj: dict) -> None:
    import jsonschema

    jsonschema.validate(obj, crd_schema(obj["kind"]), cls=jsonschema.Draft7Validator)


def validate_core(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def ray_up_checks(config: dict) -> dict:
    """A `ray up` cluster config (aws.yaml) through Ray's own checks, as `ray up` runs them:
    prepare_config merges the provider's defaults, validate_config checks ray-schema.json and the
    node types. Returns the prepared config; raises on a config `ray up` would refuse. Ray's private
    API (ray.autoscaler._private.util): Ray offers no public way to check a config without launching."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ------------------------------------------------------------------------- invariants


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod an object starts."""
    spec = obj.get("spec", {})
    if obj["kind"] == "RayJob":
        return ([("submitter", spec["submitterPodTemplate"]["spec"])]
                + [(f"rayClusterSpec.{w}", p) for w, p in pod_specs({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})])
    if obj["kind"] == "RayCluster":
        return ([("head", spec["headGroupSpec"]["template"]["spec"])]
                + [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]])
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return [(obj["kind"], spec["template"]["spec"])]
    return []


def check_non_root(obj: dict) -> None:
    for where, pod in pod_specs(obj):
        sc = pod.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true"
        for c in pod["containers"] + pod.get("initContainers", []):
            uid = c.get("securityContext", {}).get("runAsUser", sc.get("runAsUser"))
            assert uid not in (None, 0), f"{where}/{c['name']}: runs as uid {uid}"
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"


def check_secret_refs(obj: dict) -> None:
    """Every secretKeyRef names a Secret and key the README creates; no literal secret values."""
    for where, pod in pod_specs(obj):
        for c in pod["containers"] + pod.get("initContainers", []):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in SECRETS.get(ref["name"], set()), f"{where}/{c['name']}: {ref}"
                else:
                    assert not any(w in env["name"] for w in ("SECRET", "TOKEN", "PASSWORD")), \
                        f"{where}/{c['name']}: {env['name']} is set literally, not from a Secret"


# A URL with a password (scheme://user:password@host) or an INI/env line that sets one to a value
# (not to a shell variable: the init script passes "$MLFLOW_DB_PASSWORD" from the Secret).
_LITERAL_SECRET = re.compile(r"://[^/@\s:]+:[^/@\s]+@|\b\w*password\s*=\s*[^\s$\"']", re.IGNORECASE)


def check_no_literal_secrets(obj: dict) -> None:
    """No string anywhere in the object (commands, ConfigMap data, env values) carries a password."""
    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")
        elif isinstance(node, str):
            assert not _LITERAL_SECRET.search(node), f"{obj['kind']} {where}: a literal password in {node!r}"

    walk(obj, obj["metadata"]["name"])


def check_mlflow_auth(deployment: dict, config_maps: list[dict]) -> None:
    """MLflow runs its basic-auth app: admin and Flask key from the Secret, users in PostgreSQL."""
    (pod,) = [p for _, p in pod_specs(deployment)]
    (c,) = pod["containers"]
    command = c["command"]
    assert command[:2] == ["mlflow", "server"] and "--app-name" in command, "MLflow runs without authentication"
    assert command[command.index("--app-name") + 1] == "basic-auth", "MLflow's app is not basic-auth"
    env = {e["name"]: e for e in c["env"]}
    for name, key in (("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_FLASK_SERVER_SECRET_KEY")):
        ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref == {"name": n.MLFLOW_AUTH_SECRET, "key": key}, f"MLflow's {name} is not from the Secret"
    path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v.get("configMap", {}).get("name") for v in pod["volumes"]}
    (volume,) = [v for v, mount in mounts.items() if path.startswith(mount + "/")]
    (ini,) = [cm["data"][path.rsplit("/", 1)[1]] for cm in config_maps if cm["metadata"]["name"] == volumes[volume]]
    assert "default_permission = READ" in ini, ini
    assert f"database_uri = postgresql+psycopg2://{n.MLFLOW_DB}@" in ini and f"/{n.MLFLOW_AUTH_DB}\n" in ini, ini


def ray_cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def check_ray_cluster(obj: dict, workers: int, cpus: int) -> None:
    """GPU workers as the config's `distributed` asks, token auth, /dev/shm, the image's Ray."""
    spec = ray_cluster_spec(obj)
    assert spec["rayVersion"] == n.locked_version("ray"), "rayVersion differs from the image's ray"
    assert spec.get("authOptions", {}).get("mode") == "token", "token authentication is off"
    assert spec["authOptions"].get("secretName") == n.RAY_TOKEN_SECRET
    (group,) = spec["workerGroupSpecs"]
    assert group["replicas"] == group["maxReplicas"] == workers, f"worker replicas {group['replicas']} != {workers}"
    for where, pod in pod_specs({"kind": "RayCluster", "spec": spec}):
        (ray,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in ray["env"], f"{where}: RAY_AUTH_MODE is not token"
        assert {"configMapRef": {"name": n.CONFIGMAP}} in ray["envFrom"], f"{where}: no ConfigMap"
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # MLflow refuses anonymous requests
            ref = {"name": key, "valueFrom": {"secretKeyRef": {"name": n.MLFLOW_AUTH_SECRET, "key": key}}}
            assert ref in ray["env"], f"{where}: no {key} from the {n.MLFLOW_AUTH_SECRET} Secret"
        shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"].get("medium") == "Memory", f"{where}: /dev/shm is not memory-backed"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in ray["volumeMounts"], f"{where}: /dev/shm not mounted"
        limits = ray["resources"]["limits"]
        assert ray["resources"]["requests"] == limits, f"{where}: requests != limits"
        if where == "head":
            assert "nvidia.com/gpu" not in limits
            continue
        assert limits.get("nvidia.com/gpu") == "1", f"{where}: GPU limit {limits.get('nvidia.com/gpu')} != 1"
        assert limits.get("cpu") == str(cpus), f"{where}: cpu {limits.get('cpu')} != {cpus}"
        shm_gi = int(shm[0]["emptyDir"]["sizeLimit"].removesuffix("Gi"))
        assert int(limits["memory"].removesuffix("Gi")) > shm_gi >= 8, f"{where}: /dev/shm {shm_gi}Gi"
    check_ray_metrics(obj)


# The head's dashboard's settings for its Metrics view (ray/dashboard/modules/metrics/metrics_head.py).
RAY_DASHBOARD_URLS = ("RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST")


def check_ray_metrics(obj: dict) -> None:
    """Every Ray container declares its metrics-export port by the name the PodMonitors scrape
    (and Ray listens where the port says); the head's dashboard knows Prometheus and Grafana."""
    spec = ray_cluster_spec(obj)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for where, group in groups:
        (ray,) = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
        ports = {p.get("name"): p["containerPort"] for p in ray.get("ports", [])}
        listens = int(group.get("rayStartParams", {}).get("metrics-export-port", n.METRICS_PORT))
        assert ports.get(n.METRICS_PORT_NAME) == listens, \
            f"{where}: no port {n.METRICS_PORT_NAME!r} = {listens} (Ray's metrics-export-port) to scrape; ports {ports}"
        if where != "head":
            continue
        assert ports.get(n.DASHBOARD_METRICS_PORT_NAME) == n.DASHBOARD_METRICS_PORT, f"head: no {n.DASHBOARD_METRICS_PORT_NAME} port"
        env = {e["name"]: e.get("value") for e in ray["env"]}
        for name in RAY_DASHBOARD_URLS:
            assert re.fullmatch(r"https?://[^\s/]+(/\S*)?", env.get(name) or ""), \
                f"head: {name} is {env.get(name)!r}, not a URL (Ray's Metrics view needs it)"


# ------------------------------------------------------------------------- PodMonitors
# No CRD file of the Prometheus operator is kept beside the repo: a structural check of the fields
# advflow uses (monitoring.coreos.com/v1 PodMonitor), strict about unknown ones, and a check that
# what a PodMonitor selects are Ray pods of the manifests that declare the ports it scrapes.

_PODMONITOR_SPEC = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels",
                    "sampleLimit", "targetLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
                    "attachMetadata", "scrapeProtocols", "scrapeClass"}
_ENDPOINT = {"port", "portNumber", "path", "scheme", "params", "interval", "scrapeTimeout", "honorLabels",
             "honorTimestamps", "trackTimestampsStaleness", "metricRelabelings", "relabelings", "proxyUrl",
             "followRedirects", "enableHttp2", "filterRunning", "tlsConfig", "basicAuth", "authorization", "oauth2",
             "bearerTokenSecret"}
_RELABEL = {"action", "sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement"}
_RELABEL_ACTIONS = {"replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
                    "uppercase", "keepequal", "dropequal"}
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_PORT_NAME = re.compile(r"(?=.{1,15}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # IANA_SVC_NAME, as a containerPort name
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def ray_pods(obj: dict) -> list[tuple[str, dict, dict]]:
    """(where, labels, pod spec) of each Ray pod group of a RayCluster/RayJob, with the labels the
    KubeRay operator gives its pods (ray.io/node-type, ray.io/is-ray-node, ray.io/cluster,
    ray.io/group) over the pod template's own."""
    spec = ray_cluster_spec(obj)
    cluster = obj["metadata"]["name"]  # a RayJob's cluster gets a generated name; no selector here uses it
    groups = [("head", "head", "headgroup", spec["headGroupSpec"])]
    groups += [(g["groupName"], "worker", g["groupName"], g) for g in spec["workerGroupSpecs"]]
    out = []
    for where, node_type, group_name, group in groups:
        template = group["template"]
        labels = {**template.get("metadata", {}).get("labels", {}), "ray.io/cluster": cluster,
                  "ray.io/node-type": node_type, "ray.io/group": group_name, "ray.io/is-ray-node": "yes"}
        out.append((f"{obj['kind']} {cluster} {where}", labels, template["spec"]))
    return out


def check_pod_monitor(monitor: dict, clusters: list[dict]) -> None:
    """A PodMonitor's structure, and that it selects Ray pods of `clusters` (RayCluster/RayJob
    objects of its namespace) each of which declares every port it scrapes."""
    name = monitor.get("metadata", {}).get("name", "")
    assert monitor.get("apiVersion") == "monitoring.coreos.com/v1", f"PodMonitor {name}: apiVersion {monitor.get('apiVersion')}"
    assert monitor.get("kind") == "PodMonitor", f"{name}: kind {monitor.get('kind')}"
    assert _DNS_SUBDOMAIN.fullmatch(name), f"PodMonitor: metadata.name {name!r} is not a Kubernetes name"
    namespace = monitor["metadata"].get("namespace")
    assert namespace, f"PodMonitor {name}: no metadata.namespace"
    spec = monitor.get("spec", {})
    assert set(spec) <= _PODMONITOR_SPEC, f"PodMonitor {name}: unknown field(s) {sorted(set(spec) - _PODMONITOR_SPEC)}"
    match = spec.get("selector", {}).get("matchLabels")
    assert isinstance(match, dict) and match and all(isinstance(k, str) and isinstance(v, str) for k, v in match.items()), \
        f"PodMonitor {name}: spec.selector.matchLabels must map label names to strings, got {match!r}"
    endpoints = spec.get("podMetricsEndpoints")
    assert isinstance(endpoints, list) and endpoints, f"PodMonitor {name}: no podMetricsEndpoints"
    for i, ep in enumerate(endpoints):
        where = f"PodMonitor {name} podMetricsEndpoints[{i}]"
        assert set(ep) <= _ENDPOINT, f"{where}: unknown field(s) {sorted(set(ep) - _ENDPOINT)}"
        assert isinstance(ep.get("port"), str) and _PORT_NAME.fullmatch(ep["port"]), \
            f"{where}: port {ep.get('port')!r} is not a port name"
        for rule in ep.get("relabelings", []) + ep.get("metricRelabelings", []):
            assert set(rule) <= _RELABEL, f"{where}: unknown relabeling field(s) {sorted(set(rule) - _RELABEL)}"
            assert rule.get("action", "replace") in _RELABEL_ACTIONS, f"{where}: relabeling action {rule.get('action')!r}"
            if rule.get("action", "replace") == "replace":
                assert _LABEL_NAME.fullmatch(rule.get("targetLabel", "")), f"{where}: targetLabel {rule.get('targetLabel')!r}"
    namespaces = spec.get("namespaceSelector", {})
    if namespaces.get("any"):
        scope = None
    else:
        scope = set(namespaces.get("matchNames") or [namespace])
    selected = [(where, pod) for obj in clusters if scope is None or obj["metadata"]["namespace"] in scope
                for where, labels, pod in ray_pods(obj) if match.items() <= labels.items()]
    assert selected, f"PodMonitor {name}: matchLabels {match} select no Ray pod of the manifests"
    for where, pod in selected:
        declared = {p.get("name") for c in pod["containers"] for p in c.get("ports", [])}
        for ep in endpoints:
            assert ep["port"] in declared, \
                f"PodMonitor {name}: port {ep['port']!r} is not declared on {where} (ports: {sorted(filter(None, declared))})"
