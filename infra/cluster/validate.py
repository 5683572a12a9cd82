"""Offline checks of the manifests (tests/test_cluster_*.py use them; so can you before `kubectl
apply`): the KubeRay CRD schemas (made strict the way the API server's field validation is), the
Kubernetes schemas of the core objects (kubernetes-validate), and the invariants a manifest must
keep (a GPU per worker, non-root pods, token auth, Secrets the README creates); and aws.yaml
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
