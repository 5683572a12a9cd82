"""KubeRay objects (RayCluster, RayJob) built from a run config's `distributed` section.

Every pod runs the advflow image as its fixed non-root user. Ray pods read the shared settings
from the ConfigMap (MLflow and Optuna URIs, region), the S3 keys, the Optuna database password and
MLflow's credential (MLFLOW_TRACKING_USERNAME/PASSWORD) from Secrets, and run with Ray token authentication: `authOptions` makes the KubeRay operator
inject the token of the Secret it names into every Ray container, and RAY_AUTH_MODE=token is also
set on the containers themselves, so an operator that ignored authOptions would leave pods that
refuse to start without a token rather than a cluster that accepts anyone. Every Ray container
declares its metrics port for Prometheus' PodMonitors, and the head's dashboard is told where
Prometheus and Grafana are (monitoring.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from advflow.infra.cluster import names as n
from advflow.infra.cluster.monitoring import Monitoring, head_ports, worker_ports

GI = 1024**3
# Host memory per CPU of a GPU worker: rank-local copies of G and D, the gathered full-precision
# checkpoint tensors (weights + AdamW moments) and the data prefetch fit in 8 GiB per CPU for XL/2
# (64 GiB at the recipes' 8 CPUs; an 8-GPU node with 1-2 TiB holds 8 such workers).
MEMORY_PER_CPU_GI = 8
# /dev/shm is a memory-backed emptyDir because a container's default is 64 MiB: Ray's object store
# lives there, NCCL's intra-node transport (DeepSpeed's all-reduce between GPUs of one node)
# allocates its buffers there and fails with "unhandled system error" when it is too small, and
# DataLoader workers pass batches through it. Size: the object store plus NCCL headroom. Pages in
# it count against the container's memory limit, so the limit is process memory + /dev/shm.
OBJECT_STORE_GI = 8
NCCL_SHM_HEADROOM_GI = 4
HEAD_CPUS, HEAD_MEMORY_GI, HEAD_OBJECT_STORE_GI = 4, 16, 2
HEAD_SHM_GI = HEAD_OBJECT_STORE_GI + 2  # no NCCL on the head: a smaller margin
FID_DIR = "/fid"


@dataclass(frozen=True)
class Workers:
    """One GPU worker group: `replicas` pods of one Ray Train worker each."""

    replicas: int
    min_replicas: int
    cpus: int

    @property
    def shm_gi(self) -> int:
        return OBJECT_STORE_GI + NCCL_SHM_HEADROOM_GI

    @property
    def memory_gi(self) -> int:
        return MEMORY_PER_CPU_GI * self.cpus + self.shm_gi


def _ray_env(extra: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
    """(env, envFrom) of every Ray container."""
    env = [{"name": "RAY_AUTH_MODE", "value": "token"}]
    env += [_secret_env(key, n.S3_SECRET, key) for key in n.S3_KEYS]
    # libpq reads PGPASSWORD when the URL has none: OPTUNA_STORAGE_URL stays secret-free, and so do
    # the job entrypoints, which Ray's job API shows in plain text.
    env.append(_secret_env("PGPASSWORD", n.DB_SECRET, "OPTUNA_DB_PASSWORD"))
    # MLflow refuses anonymous requests: drivers, Train workers and trials log in with the Secret's
    # credential, read by MLflow's client from the pod's environment (never a job's runtime_env).
    env += [_secret_env(key, n.MLFLOW_AUTH_SECRET, key) for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")]
    return env + (extra or []), [{"configMapRef": {"name": n.CONFIGMAP}}]


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def pod_security() -> dict:
    return {"runAsUser": n.UID, "runAsGroup": n.UID, "fsGroup": n.UID, "runAsNonRoot": True}


def container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod(container: dict, shm_gi: int, *, gpu: bool, init: list[dict] | None = None,
         volumes: list[dict] | None = None) -> dict:
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}, *container.get("volumeMounts", [])]
    spec: dict = {
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gi}Gi"}}, *(volumes or [])],
    }
    if init:
        spec["initContainers"] = init
    if gpu:  # GPU node groups are usually tainted so that only GPU pods land there
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def _resources(cpus: int, memory_gi: int, gpus: int = 0) -> dict:
    # requests == limits: the Guaranteed QoS class, so a busy node does not evict a training pod.
    res = {"cpu": str(cpus), "memory": f"{memory_gi}Gi"}
    if gpus:
        res["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(res), "limits": dict(res)}


def _fid_fetch(image: str, prefix: str) -> dict:
    """Init container copying the FID Inception weights and reference statistics from `prefix` (S3)
    into /fid: FID evaluation reads local files on every worker."""
    script = ("import sys, fsspec; "
              "fsspec.filesystem('s3').get(sys.argv[1].rstrip('/') + '/', sys.argv[2] + '/', recursive=True)")
    env = [_secret_env(key, n.S3_SECRET, key) for key in n.S3_KEYS]
    return {"name": "fetch-fid", "image": image, "command": ["python", "-c", script, prefix, FID_DIR],
            "env": env, "envFrom": [{"configMapRef": {"name": n.CONFIGMAP}}], "securityContext": container_security(),
            "volumeMounts": [{"name": "fid", "mountPath": FID_DIR}],
            "resources": _resources(1, 2)}


def cluster_spec(workers: Workers, image: str, *, fid_prefix: str | None = None,
                 monitoring: Monitoring = Monitoring()) -> dict:
    """spec of a RayCluster (also a RayJob's rayClusterSpec). Every Ray container declares its
    metrics port(s) by name for the PodMonitors (monitoring.py); the head's dashboard is pointed at
    Prometheus and Grafana."""
    env, env_from = _ray_env()
    head = {
        "name": "ray-head", "image": image, "env": env + monitoring.head_env(), "envFrom": env_from,
        "securityContext": container_security(),
        "resources": _resources(HEAD_CPUS, HEAD_MEMORY_GI + HEAD_SHM_GI),
        "ports": [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}, *head_ports()],
    }
    worker = {"name": "ray-worker", "image": image, "env": list(env), "envFrom": env_from,
              "securityContext": container_security(),
              "resources": _resources(workers.cpus, workers.memory_gi, gpus=1), "ports": worker_ports()}
    init, volumes = None, None
    if fid_prefix:
        worker["volumeMounts"] = [{"name": "fid", "mountPath": FID_DIR, "readOnly": True}]
        init, volumes = [_fid_fetch(image, fid_prefix)], [{"name": "fid", "emptyDir": {}}]
    return {
        "rayVersion": n.locked_version("ray"),  # the version the image installs (requirements.lock)
        "authOptions": {"mode": "token", "secretName": n.RAY_TOKEN_SECRET},
        "headGroupSpec": {
            # num-cpus 0: no training task lands on the head; it runs GCS, the dashboard and drivers.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                               "object-store-memory": str(HEAD_OBJECT_STORE_GI * GI),
                               "metrics-export-port": str(n.METRICS_PORT)},
            "template": _pod(head, HEAD_SHM_GI, gpu=False),
        },
        "workerGroupSpecs": [{
            "groupName": "gpu",
            "replicas": workers.replicas, "minReplicas": workers.min_replicas, "maxReplicas": workers.replicas,
            "rayStartParams": {"object-store-memory": str(OBJECT_STORE_GI * GI),
                               "metrics-export-port": str(n.METRICS_PORT)},
            "template": _pod(worker, workers.shm_gi, gpu=True, init=init, volumes=volumes),
        }],
    }


def raycluster(name: str, namespace: str, spec: dict) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(n.LABELS)}, "spec": spec}


def submitter(image: str) -> dict:
    """The pod that runs `ray job submit` for a RayJob (KubeRay fills in its command). Given
    explicitly so that it runs non-root and holds the Ray token whatever the operator version."""
    env = [{"name": "RAY_AUTH_MODE", "value": "token"},
           _secret_env("RAY_AUTH_TOKEN", n.RAY_TOKEN_SECRET, n.RAY_TOKEN_KEY)]
    container = {"name": "ray-job-submitter", "image": image, "env": env,
                 "securityContext": container_security(), "resources": _resources(1, 1)}
    # restartPolicy Never: the submitter runs in a Kubernetes Job, which refuses Always.
    return {"spec": {"restartPolicy": "Never", "securityContext": pod_security(), "containers": [container]}}


def rayjob(name: str, namespace: str, entrypoint: str, spec: dict, image: str) -> dict:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(n.LABELS)},
        "spec": {
            "entrypoint": entrypoint,
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": submitter(image),
            "rayClusterSpec": spec,
            # Ray Train restarts the worker group itself (run.max_failures); a RayJob that still fails
            # has a deterministic cause or spent its restarts, so it is not retried blindly. Re-apply
            # it after the fix: the same run.name resumes from its last checkpoint on S3.
            "backoffLimit": 0,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,  # keeps the finished cluster 10 min for `kubectl logs`
        },
    }
