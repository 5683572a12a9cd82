"""Checks before launch: what the driver can know is checked on the driver, before the job's MLflow
run is opened or changed and before any worker starts.

Why: the same mistakes found by the workers cost a cluster start, 1-3 minutes, a hundred lines of
worker tracebacks, a FAILED run and a failures file; here they cost a second and one line. Each
check is a small function that returns (or a finding) or raises `Refused`, whose message is one
line naming the value(s) and the fix; `jobs/train.py` prints it as `[advflow] refused: <line>`,
records the refusal on the job's existing run (`tracking.runs.record_refusal`: an attempt, the
run's status untouched) and exits 2.

- the dataset (`check_dataset`): the bucket exists, the manifest exists and parses, every shard it
  lists exists with its listed size (one listing of the prefix, no request per shard);
- the run's storage (`check_storage`): a probe object written and deleted under run.storage_path;
- a resume (`find_resume`, `check_resume`): the checkpoint the workers would restore (Ray Train:
  the latest in its checkpoint manager's snapshot; --no-ray: local_launch's latest complete one),
  its files (the planted-file rule of `checkpoint.check_listing`, named by their storage URI), and
  the settings a resume cannot change (`LOCKED`: the network, the global batch, the dataset by its
  manifest's sha256) against its trainer.json "config" or, before any checkpoint, the job's
  existing MLflow run;
- the start of a post-training method (`check_init`, model.init of method cafm): the registered model
  exists and is a flow-matching model (method tag fm, kind multistep) of the run's size, data shape
  and classes (`tracking.init_source`); when the registry cannot be reached the workers' same check
  decides at build;
- the cluster (Ray only, `check_cluster`): a worker group the cluster can never place and no
  autoscaler could make room for (`cluster_can_grow`).

The workers keep their own checks (the reader's, `Checkpointer.load`'s) as the last line of defence:
storage can change between here and there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from advflow.platform.config import RunSpec, auto_partitions, flatten
from advflow.platform.data.shards import MANIFEST_NAME, Manifest, ManifestError
from advflow.platform.data.storage import Storage, StorageError


class Refused(ValueError):
    """A submission refused before launch; the message is one line naming the value(s) and the fix."""


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of a run's checkpoints (its resume)
META_NAME = "trainer.json"  # checkpoint.META_NAME (not imported: preflight stays free of torch)
AUTOSCALER_ENV = "ADVFLOW_RAY_AUTOSCALER"
"""Overrides the autoscaler detection: 1 (the cluster can add nodes), 0 (it cannot)."""


@dataclass
class ResumePoint:
    """The checkpoint a submission would resume from."""

    uri: str
    """Its storage URI: s3://bucket/runs/<name>/checkpoint_000200 or a local path."""
    name: str
    step: int
    config: dict[str, Any]
    """trainer.json's "config": the spec dict of the run that wrote it."""


@dataclass
class Findings:
    """What preflight learnt, for the driver: the dataset's tags for the MLflow run, the resume."""

    data_tags: dict[str, str]
    resume: ResumePoint | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    """Time per check (what preflight costs)."""

    def resume_line(self, attempt: int | None) -> str | None:
        """"resuming from checkpoint_000200 (step 200, attempt 2)", or None for a fresh start."""
        if self.resume is None:
            return None
        return (f"resuming from {self.resume.name} (step {self.resume.step}"
                f"{f', attempt {attempt}' if attempt else ''}) at {self.resume.uri}")


def run_preflight(spec: RunSpec, *, ray: bool, previous_run=None, cluster: dict | None = None) -> Findings:
    """Every check for `spec`, cheapest and most common mistakes first; raises `Refused`.

    ray: the job runs on Ray Train (else local processes, --no-ray). previous_run: the job's
    existing MLflow run (`tracking.runs.find_run`), None if there is none or tracking is off.
    cluster: {"nodes": ray.nodes(), "can_grow": bool} on the Ray path (None: not checked)."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    data_tags = check_dataset(spec.data.prefix)
    seconds["dataset"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    check_storage(spec)
    seconds["storage"] = time.perf_counter() - t0
    if spec.model.init:
        t0 = time.perf_counter()
        check_init(spec)
        seconds["init"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    point = find_resume(spec, ray=ray)
    check_resume(spec, point, data_tags, previous_run)
    seconds["resume"] = time.perf_counter() - t0
    if cluster is not None:
        t0 = time.perf_counter()
        check_cluster(spec, cluster["nodes"], cluster["can_grow"])
        seconds["cluster"] = time.perf_counter() - t0
    return Findings(data_tags=data_tags, resume=point, seconds=seconds)


def _line(err: BaseException) -> str:
    return " ".join(str(err).split())


# ----------------------------------------------------------------------------------------- dataset


def _bucket_missing(storage: Storage) -> str | None:
    """The bucket's name when `storage` is on S3 and its bucket does not exist, else None."""
    if not storage.is_remote:
        return None
    bucket = storage.root.split("/", 1)[0]
    try:
        exists = storage.call("stat", "", lambda: storage.fs.exists(bucket))
    except FileNotFoundError:
        exists = False
    return None if exists else bucket


def _endpoint(storage: Storage) -> str:
    return f" at {storage.endpoint_url}" if storage.endpoint_url else ""


def check_dataset(prefix: str) -> dict[str, str]:
    """The dataset at `prefix` is complete as its manifest describes it; returns the provenance tags
    the run records ({'data.manifest_uri', 'data.manifest_sha256'}, as `shards.dataset_tags`).

    One read of the manifest and one listing of the prefix (the reader's up-front size check,
    done once here instead of on every worker); the contents are the workers' to verify."""
    try:
        storage = Storage(prefix)
    except ValueError as err:
        raise Refused(f"data.prefix={prefix}: {err}") from None
    where = storage.url(MANIFEST_NAME)
    try:
        raw = storage.read(MANIFEST_NAME)
    except FileNotFoundError:
        bucket = _bucket_missing(storage)
        if bucket:
            raise Refused(f"data.prefix={prefix}: the bucket {bucket!r} does not exist{_endpoint(storage)}; fix "
                          "data.prefix (or AWS_ENDPOINT_URL), or create the bucket and prepare the dataset there") from None
        raise Refused(f"data.prefix={prefix}: no {MANIFEST_NAME} there ({where}); the prefix is wrong or "
                      "jobs/prepare_latents.py has not finished (it writes the manifest last): fix data.prefix, or run "
                      f"`python jobs/prepare_latents.py ... --out {prefix}`") from None
    except StorageError as err:
        raise Refused(f"data.prefix={prefix}: {_line(err)}") from None
    try:
        manifest = Manifest.from_json(raw, where)
    except ManifestError as err:
        raise Refused(f"data.prefix={prefix}: {_line(err)}") from None
    try:
        listed = storage.list_sizes()
    except StorageError as err:
        raise Refused(f"data.prefix={prefix}: {_line(err)}") from None
    missing = [s.name for s in manifest.shards if s.name not in listed]
    fix = (f"restore the shard(s) or re-create the dataset (`python jobs/prepare_latents.py ... --out {prefix}`; "
           f"`--verify {prefix}` lists every problem), or fix data.prefix")
    if missing:
        more = f" (and {len(missing) - 1} more of {len(manifest.shards)})" if len(missing) > 1 else ""
        raise Refused(f"data.prefix={prefix}: {storage.url(missing[0])}{more} is listed in {MANIFEST_NAME} but "
                      f"missing: {fix}")
    for s in manifest.shards:
        size = listed[s.name]
        if size != s.bytes:
            kind = "truncated" if size < s.bytes else "longer than the manifest says"
            raise Refused(f"data.prefix={prefix}: {storage.url(s.name)} is {kind}: {size} bytes, {MANIFEST_NAME} "
                          f"says {s.bytes}: {fix}")
    return {"data.manifest_uri": where, "data.manifest_sha256": hashlib.sha256(raw).hexdigest()}


# ----------------------------------------------------------------------------------------- model.init


def check_init(spec: RunSpec) -> None:
    """model.init names a flow-matching model of this run's size, data shape and classes (the workers'
    check, `tracking.init_source.init_problem`, made before launch). A registry that does not answer is
    no refusal: logged, and the workers check when they load the model."""
    import logging

    from advflow.platform.tracking.init_source import init_problem, inspect_init

    ref = spec.model.init
    try:
        manifest = Manifest.from_json(Storage(spec.data.prefix).read(MANIFEST_NAME), spec.data.prefix)
    except (OSError, ValueError, ManifestError, StorageError) as err:  # check_dataset has refused already
        raise Refused(f"data.prefix={spec.data.prefix}: {_line(err)}") from None
    try:
        source = inspect_init(ref, client=_mlflow_client(spec) if ref.startswith("models:/") else None)
    except ValueError as err:  # a local folder that is no generator model
        raise Refused(_line(err)) from None
    except Exception as err:  # noqa: BLE001 - MLflow's errors: a missing model, or no server
        if getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise Refused(f"model.init={ref}: not in the model registry ({_line(err)[:200]}); register a flow-matching "
                          "model first (python jobs/train.py --set model.method=fm ... with tracking.register_name), or "
                          "fix the name, version or alias") from None
        logging.getLogger(__name__).warning("preflight: model.init=%s not checked here (%s); the workers check it "
                                            "when they load it", ref, _line(err)[:200])
        return
    problem = init_problem(source, size=spec.model.size, data_shape=tuple(manifest.shape),
                           num_classes=int(manifest.num_classes))
    if problem:
        raise Refused(problem)


def _mlflow_client(spec: RunSpec):
    from mlflow import MlflowClient

    from advflow.platform.tracking.runs import tracking_uri

    return MlflowClient(tracking_uri(spec) or os.environ.get("MLFLOW_TRACKING_URI") or None)


# ----------------------------------------------------------------------------------------- storage


def run_root(spec: RunSpec) -> str:
    """`<run.storage_path>/<run.name>` as the launchers resolve it (local paths made absolute)."""
    path = spec.run.storage_path
    root = path.rstrip("/") if path.startswith("s3://") else os.path.abspath(path)
    return f"{root}/{spec.run.name}"


def check_storage(spec: RunSpec) -> None:
    """run.storage_path takes a write (a probe object, deleted again): checkpoints go there."""
    path = spec.run.storage_path
    try:
        storage = Storage(path)
    except ValueError as err:
        raise Refused(f"run.storage_path={path}: {err}") from None
    probe = f".advflow-write-probe-{uuid.uuid4().hex[:12]}"
    try:
        storage.write_atomic(probe, b"advflow preflight: checkpoints can be written here\n")
        storage.remove(probe)
    except FileNotFoundError:
        bucket = _bucket_missing(storage)
        what = f"the bucket {bucket!r} does not exist{_endpoint(storage)}" if bucket else "the location does not exist"
        raise Refused(f"run.storage_path={path}: {what}; fix run.storage_path or create the bucket") from None
    except OSError as err:  # StorageError (auth, unreachable) and local permission errors
        raise Refused(f"run.storage_path={path}: checkpoints cannot be written there ({_line(err)}); fix its "
                      "permissions or credentials, or set run.storage_path to a writable place") from None


# ----------------------------------------------------------------------------------------- resume


def find_resume(spec: RunSpec, *, ray: bool) -> ResumePoint | None:
    """The checkpoint the workers of this submission would restore, or None for a fresh start.

    Ray Train restores the latest checkpoint of its manager's snapshot (`<run>/checkpoint_manager_
    snapshot.json`; none: a fresh start); local processes the latest complete one under the run's
    folder (`local_launch.latest_checkpoint`)."""
    root = run_root(spec)
    storage = Storage(root)
    try:
        if ray:
            try:
                snapshot = json.loads(storage.read(RAY_SNAPSHOT))
            except FileNotFoundError:
                return None
            except ValueError as err:
                raise Refused(f"{storage.url(RAY_SNAPSHOT)}: not valid JSON ({_line(err)}): Ray Train cannot resume "
                              "this run; use a new run.name, or restore the file") from None
            name = ((snapshot or {}).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
            if not name:
                return None
        else:
            if storage.is_remote:
                return None  # --no-ray keeps its checkpoints in a local folder only
            from advflow.platform.train.local_launch import latest_checkpoint

            latest = latest_checkpoint(root)
            if latest is None:
                return None
            name = latest.name
        uri = storage.url(name)
        try:
            raw = storage.read(f"{name}/{META_NAME}")
        except FileNotFoundError:
            raise Refused(f"{uri}: the checkpoint this run would resume from has no {META_NAME} (incomplete or not "
                          "advflow's); remove it to resume from an earlier one, or use a new run.name") from None
    except StorageError as err:
        raise Refused(f"run.storage_path={spec.run.storage_path}: {_line(err)}") from None
    from advflow.platform.train.checkpoint import ResumeError, parse_meta

    try:
        meta = parse_meta(raw, f"{uri}/{META_NAME}")
    except ResumeError as err:
        raise Refused(_line(err)) from None
    return ResumePoint(uri=uri, name=name, step=int(meta.get("step", 0)), config=dict(meta.get("config") or {}))


def check_checkpoint_files(point: ResumePoint) -> None:
    """The planted-file rule (`checkpoint.check_listing`) over the stored checkpoint: one listing,
    and the first two bytes of each file; the message names the file by its storage URI."""
    from advflow.platform.train.checkpoint import ResumeError, check_listing

    storage = Storage(point.uri)
    try:
        names = storage.list_tree()
    except StorageError as err:
        raise Refused(f"{point.uri}: {_line(err)}") from None
    try:
        check_listing(names, lambda name: storage.read(name, 0, 2), point.uri)
    except ResumeError as err:
        raise Refused(_line(err)) from None


LOCKED = ("model.method", "model.size", "model.d_size", "model.kind", "model.repeats", "model.nfe",
          "train.global_batch", "data.partitions")
"""What a resume cannot change: the networks' shapes (method, sizes, kind, depth repetition; K for
a `multistep` generator, whose training grid has K steps), and the global batch (the data streams'
positions, the draws keyed by the row in the global batch), and data.partitions (the record
order; `auto` resolved). The dataset is compared by its
manifest's sha256. Everything else may change on a resume: train.steps, a later phase's lr, the
evaluation and checkpoint cadences, the number of workers (any that divides data.partitions),
tracking."""


def locked_values(flat: dict[str, Any]) -> dict[str, str]:
    """The LOCKED settings of a flattened spec (checkpoint config or MLflow params), as strings,
    with the defaults resolved (d_size -> size; K only where it shapes the training)."""
    out = {k: str(flat[k]) for k in LOCKED if k in flat}
    if out.get("model.d_size") in ("None", "", None) and "model.size" in out:
        out["model.d_size"] = out["model.size"]
    if out.get("model.method") == "classifier":
        out.pop("model.d_size", None)
    if out.get("model.kind") != "multistep":
        out.pop("model.nfe", None)  # 1nfe: always 1; anystep: only the sampling count
    if out.get("data.partitions") == "auto":
        with contextlib.suppress(KeyError, ValueError):
            draw = int(flat["train.global_batch"]) // int(flat.get("train.grad_accum", 1))
            out["data.partitions"] = str(auto_partitions(draw))
    return out


def _manifest_sha(prefix: str) -> str | None:
    try:
        return hashlib.sha256(Storage(prefix).read(MANIFEST_NAME)).hexdigest()
    except Exception:  # noqa: BLE001 - gone, moved, unreachable: the caller says it cannot tell
        return None


def check_resume(spec: RunSpec, point: ResumePoint | None, data_tags: dict[str, str], previous_run=None) -> None:
    """A resubmission continues what it resumes: the same network, global batch and dataset.

    Compared with the checkpoint it would restore (trainer.json "config"), or, with no checkpoint
    yet, with the job's existing MLflow run (its params): a submission under the same run.name with
    another model or dataset would otherwise be merged into that run. The dataset is the same when
    its manifest's sha256 is (a dataset moved to another prefix is the same one)."""
    if point is not None:
        check_checkpoint_files(point)
        previous, source = flatten(point.config), f"{point.uri} (step {point.step})"
    elif previous_run is not None:
        previous = dict(previous_run.data.params)
        source = f"MLflow run {previous_run.info.run_id} of run.name={spec.run.name}"
    else:
        return
    if point is not None and "data.order" in previous:
        raise Refused(f"run.name={spec.run.name} would resume {source}, whose data streams used data.order="
                      f"{previous['data.order']}, an order this advflow no longer has (canonical partitions replaced "
                      "it), so the run cannot continue exactly: use a new run.name to train it from scratch, or "
                      "resume it with the advflow commit that started it")
    new = flatten(spec.to_dict())
    old_locked, new_locked = locked_values(previous), locked_values(new)
    changed = [k for k in LOCKED if k in old_locked and k in new_locked and old_locked[k] != new_locked[k]]
    fix_new = "use a new run.name to train it from scratch"
    if changed:
        was = ", ".join(f"{k}={old_locked[k]}" for k in changed)
        now = ", ".join(f"{k}={new_locked[k]}" for k in changed)
        raise Refused(f"run.name={spec.run.name} would resume {source}, trained with {was}; this submission has "
                      f"{now}, which that checkpoint cannot continue: {fix_new}, or set {was} to resume")
    recorded = previous_run.data.tags.get("data.manifest_sha256") if previous_run is not None else None
    old_prefix = str(previous.get("data.prefix") or "")
    new_sha = data_tags.get("data.manifest_sha256")
    if not old_prefix or not new_sha:
        return
    old_sha = recorded or (new_sha if old_prefix == spec.data.prefix else _manifest_sha(old_prefix))
    if old_sha == new_sha:
        return
    if old_sha is None:
        raise Refused(f"run.name={spec.run.name} would resume {source}, trained on data.prefix={old_prefix}, whose "
                      f"manifest can no longer be read to tell whether data.prefix={spec.data.prefix} holds the same "
                      f"dataset: {fix_new}, or set data.prefix={old_prefix}")
    raise Refused(f"run.name={spec.run.name} would resume {source}, trained on data.prefix={old_prefix} (manifest "
                  f"sha256 {old_sha[:12]}); data.prefix={spec.data.prefix} holds another dataset (sha256 "
                  f"{new_sha[:12]}): {fix_new}, or set data.prefix={old_prefix}")


# ----------------------------------------------------------------------------------------- cluster


def worker_ask(spec: RunSpec) -> dict[str, float]:
    """What one Ray Train worker of `spec` asks for (ray_launch.build_torch_trainer's ScalingConfig)."""
    d = spec.distributed
    ask = {"CPU": float(d.cpus_per_worker)}
    if d.use_gpu:
        ask["GPU"] = 1.0
    return {k: v for k, v in ask.items() if v > 0}


def check_cluster(spec: RunSpec, nodes: list[dict], can_grow: bool) -> None:
    """Refuse a worker group the cluster can never hold: fewer than the workers needed (the minimum
    of an elastic range) fit on its alive nodes, and no autoscaler can add nodes. Resources busy
    with other jobs do not count against it: those free up (QueueNotice says what it waits for)."""
    d = spec.distributed
    ask = worker_ask(spec)
    if not ask:
        return  # asks for nothing: fits anywhere
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    fits = sum(min((math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in ask.items()), default=0) for res in alive)
    need = d.min_workers or d.workers
    if fits >= need or can_grow:
        return
    total = {k: sum(res.get(k, 0.0) for res in alive) for k in ask}
    field_ = f"distributed.min_workers={d.min_workers}" if d.min_workers else f"distributed.workers={d.workers}"
    by_total = min(math.floor(total[k] / v + 1e-9) for k, v in ask.items())
    # A worker's bundle must fit on one node: say so when the total would hold more than the nodes do.
    per_node = " (a worker must fit on one node)" if by_total > fits else ""
    raise Refused(f"{field_} asks for {need} worker(s) x {_res(ask)} = {_res({k: v * need for k, v in ask.items()})}, "
                  f"but the Ray cluster has {_res(total)} in all on {len(alive)} node(s){per_node}, room for {fits}, and "
                  "no autoscaler to add nodes: lower distributed.workers (or distributed.cpus_per_worker), set "
                  "distributed.min_workers for an elastic range, or add nodes to the cluster")


def _res(r: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in r.items()) + "}"


_READONLY_TYPE = re.compile(r"node_[0-9a-f]+")  # ray.autoscaler._private.util.format_readonly_node_type


def cluster_can_grow() -> bool:
    """Whether an autoscaler could add nodes to the connected Ray cluster (needs ray connected).

    Ray's GCS says so: autoscaler v2 (KubeRay, `ray up` with v2) sets the GCS key
    `__autoscaler_v2_enabled` = 1 in the autoscaler namespace; the v1 monitor publishes its status
    under `__autoscaling_status`, whose report names the node types of its config. A cluster
    started by `ray start` / `ray.init` (the local stack) runs the monitor with Ray's read-only
    provider, whose node types are `node_<id>` and whose config allows no workers: it cannot grow.
    ADVFLOW_RAY_AUTOSCALER=1/0 overrides the detection (a cluster whose autoscaler is not visible)."""
    forced = os.environ.get(AUTOSCALER_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    import ray
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        if ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY and _internal_kv_get(
                ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY,
                namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE) == b"1":
            return True
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    except Exception:  # noqa: BLE001 - cannot tell: do not refuse on a guess
        return True
    if not status:
        return False  # no monitor has reported: nothing would add a node
    try:
        report = json.loads(status).get("autoscaler_report") or {}
    except ValueError:
        return True
    types: set[str] = set()
    for key in ("active_nodes", "idle_nodes", "pending_launches"):
        types.update((report.get(key) or {}).keys())
    types.update(str(n[1]) for n in report.get("pending_nodes") or [] if len(n) > 1)
    types.update((report.get("node_type_mapping") or {}).values())
    return any(not _READONLY_TYPE.fullmatch(t) for t in types)


def cluster_facts() -> dict:
    """{"nodes": ray.nodes(), "can_grow": cluster_can_grow()} of the connected cluster."""
    import ray

    return {"nodes": ray.nodes(), "can_grow": cluster_can_grow()}
