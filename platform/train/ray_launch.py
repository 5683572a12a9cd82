"""Ray at the edges: the TorchTrainer (Ray Train V2) around the training loop (`loop.run_worker`).

Everything Ray-specific lives here: the worker function `train_fn_per_worker(config)`, the `RayContext` that
turns the loop's report/restore calls into `ray.train.report` / `ray.train.get_checkpoint`, storage
on a local path or S3 (any endpoint via AWS_ENDPOINT_URL), and the driver-side progress callback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse

import ray
import ray.train
import torch
from ray.train import (Checkpoint, CheckpointConfig, CheckpointConsistencyMode, CheckpointUploadMode, FailureConfig,
                       RunConfig, ScalingConfig, UserCallback)
from ray.train._internal.utils import get_address_and_port
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from advflow.platform.config import RunSpec
from advflow.platform.log import get_logger
from advflow.platform.tracking.runs import tracking_uri
from advflow.platform.train.callbacks import ProgressMeter
from advflow.platform.train.failures import DeterministicFailure, is_deterministic, one_line
from advflow.platform.train.loop import run_worker

log = get_logger(__name__)

# Environment a worker needs to reach S3/MLflow; copied from the driver into the workers' runtime
# env when set. URLs and the region only: Ray's state API (actors, tasks, jobs) shows a runtime_env
# in plain text, so no credential may enter it. Workers take S3 credentials from their node: the
# stack's Ray head names its credentials file (AWS_SHARED_CREDENTIALS_FILE + AWS_PROFILE), a
# cluster gives its nodes a profile or role; boto3, s3fs and pyarrow all read that chain. (The
# driver's profile name is not passed either: it would override the node's.)
PASS_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")


class RayContext:
    """The loop's view of Ray Train: rank, report, and the checkpoint to resume from."""

    def __init__(self, spec: dict | None = None):
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.spec = spec  # the run's spec dict: where its checkpoints are stored (fetch_checkpoint)
        # run.checkpoint_upload async: Ray uploads the staged directory in a background thread and
        # deletes it afterwards, so the worker must not delete it when report returns.
        self.upload_async = (spec or {}).get("run", {}).get("checkpoint_upload", "sync") == "async"
        self.takes_staging_dir = self.upload_async
        self._restore_tmp: tempfile.TemporaryDirectory | None = None
        self.restore_uri: str | None = None
        """Where the restored checkpoint is stored (s3://... or a path): messages name it, not the temp copy."""
        self._fetch_tmp: tempfile.TemporaryDirectory | None = None

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str | None = None) -> None:
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # Only rank 0's metrics are read by the driver; every rank must still call report. Named
        # checkpoints land at <storage_path>/<run.name>/<name>, where fetch_checkpoint finds them.
        # Asynchronously, Ray registers the checkpoint only after every rank's upload finished.
        mode = CheckpointUploadMode.ASYNC if self.upload_async and checkpoint else CheckpointUploadMode.SYNC
        t0 = time.perf_counter()
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None,
                         checkpoint_upload_mode=mode)
        if checkpoint and self.rank == 0:
            log.debug("checkpoint %s: report returned after %.3f s (%s upload)", name,
                      time.perf_counter() - t0, mode.value.lower())

    def drain(self) -> None:
        """Wait until every checkpoint reported so far is uploaded and registered (a rollback reads
        one back from storage; the end of the run must not leave uploads behind)."""
        if self.upload_async:
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    def fetch_checkpoint(self, name: str) -> str:
        """Download this run's checkpoint `name` from its storage (the watchdog's rollback)."""
        self.drain()  # the rollback target may be the checkpoint still uploading
        spec = RunSpec.from_dict(self.spec)
        root, fs = storage(spec)
        path = f"{root.rstrip('/')}/{spec.run.name}/{name}"
        if self._fetch_tmp is not None:
            self._fetch_tmp.cleanup()
        self._fetch_tmp = tempfile.TemporaryDirectory(prefix="advflow-rollback-")
        try:
            return Checkpoint(path=path, filesystem=fs).to_directory(self._fetch_tmp.name)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for a missing path
            raise FileNotFoundError(f"{path}: the checkpoint to roll back to cannot be read ({err}); "
                                    "raise run.keep_checkpoints") from err

    def run_storage(self) -> str:
        """`<run.storage_path>/<run.name>`: where Ray Train keeps this run's checkpoints."""
        run = self.spec["run"]  # the AFM or the classifier job's spec: both have `run`
        path = run["storage_path"]
        root = path.rstrip("/") if path.startswith("s3://") else os.path.abspath(path)
        return f"{root}/{run['name']}"

    def restore_dir(self) -> str | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self.restore_uri = stored_uri(str((self.spec or {}).get("run", {}).get("storage_path", "")),
                                      str(checkpoint.path))
        self._restore_tmp = tempfile.TemporaryDirectory(prefix="advflow-restore-")
        return checkpoint.to_directory(self._restore_tmp.name)


@dataclasses.dataclass
class BoundRendezvousConfig(TorchConfig):
    """TorchConfig whose process group listens only on rank 0's node address (rendezvous.py):
    on the local stack's loopback-only Ray that is 127.0.0.1, where Ray's own torch backend would
    leave the rendezvous store listening on every interface. `env` (distributed.nccl) is set on
    every worker before its process group starts; `timeout_s` is distributed.timeout_s."""

    env: dict = dataclasses.field(default_factory=dict)

    @property
    def backend_cls(self):
        return _BoundRendezvousBackend


class _BoundRendezvousBackend(_TorchBackend):
    """Ray's torch backend with the process group set up by rendezvous.init_process_group (Ray's
    private class: ray is pinned to a range where its on_start contract holds; tested on Ray)."""

    def on_start(self, worker_group, backend_config):
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_torch_distributed_env_vars)  # RANK, LOCAL_RANK, ... as torchrun sets them
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(i, _join_rendezvous, backend_config.backend or "gloo", i, n,
                                                   addr, port, backend_config.timeout_s, backend_config.env)
                 for i in range(n)])


def _join_rendezvous(backend: str, rank: int, world_size: int, addr: str, port: int, timeout_s: float,
                     env: dict) -> None:
    from advflow.platform.train.rendezvous import init_process_group

    init_process_group(backend, rank, world_size, addr, port, timeout_s, env)


def torch_config(spec) -> BoundRendezvousConfig:
    """The process group of `spec`'s workers: NCCL on GPUs, gloo on CPUs; its timeout and NCCL env."""
    d = spec.distributed
    return BoundRendezvousConfig(backend="nccl" if d.use_gpu else "gloo", timeout_s=d.timeout_s,
                                 env=dict(getattr(d, "nccl", {})))


def train_fn_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: the one training loop with Ray Train's context."""
    use_gpu = config["spec"]["distributed"]["use_gpu"]
    device = torch.device("cuda", ray.train.torch.get_device().index or 0) if use_gpu else torch.device("cpu")
    run_worker(config, RayContext(config["spec"]), device=device)


class FailFast(UserCallback):
    """Stop the run at the first deterministic worker error instead of restarting it.

    Ray Train retries every worker-group failure up to run.max_failures. This callback runs in
    Ray's controller when a worker raised; if any error is one a restart cannot fix
    (`failures.is_deterministic`: a corrupt shard, a rejected config or checkpoint, the watchdog out
    of rollbacks, a bug), it raises `DeterministicFailure` there. Ray treats an error raised in
    its controller as not retryable, so the run fails at once, with that line as its error.
    Killed workers, lost nodes and storage outages stay retryable."""

    def after_exception(self, run_context, worker_exceptions):
        for rank, error in sorted(worker_exceptions.items()):
            if is_deterministic(error):
                raise DeterministicFailure(f"rank {rank}: {one_line(error)}")


class ProgressCallback(UserCallback):
    """Driver-side progress line at each checkpoint report (runs in Ray's controller)."""

    def __init__(self, meter: ProgressMeter):
        self.meter = meter

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0] if metrics else {}
        suffix = f" checkpoint={checkpoint.path}" if checkpoint else ""
        log.info(self.meter.line(int(m.get("step", 0)), m, now=time.time(), suffix=suffix))

    def after_exception(self, run_context, worker_exceptions):
        # Ray restarts the worker group after this: the restart's time is not training time, so
        # the next line's rate is measured within the new attempt only.
        self.meter.new_attempt()


def storage(spec: RunSpec) -> tuple[str, object | None]:
    """(storage_path, filesystem) for RunConfig; S3 goes through pyarrow with the endpoint override."""
    path = spec.run.storage_path
    if not path.startswith("s3://"):
        return os.path.abspath(path), None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    kw: dict = {"region": os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1"))}
    if endpoint:
        u = urlparse(endpoint)
        kw.update(endpoint_override=u.netloc, scheme=u.scheme or "https")
    # No access_key/secret_key: the filesystem is pickled into the trainer's arguments, and pyarrow's
    # default chain (AWS_ACCESS_KEY_ID..., else AWS_SHARED_CREDENTIALS_FILE/AWS_PROFILE, else a role)
    # finds the same credentials again in whichever process unpickles it.
    return path[len("s3://"):], pyarrow.fs.S3FileSystem(**kw)


def warn_node_local_storage(spec, nodes: list[dict]) -> bool:
    """Warn (and return True) when `run.storage_path` is a local path but the cluster's nodes sit
    on several hosts: a checkpoint written on one host cannot be restored on another unless every
    node mounts that path (NFS). Nodes on one host (the simulated cluster) share its filesystem."""
    if spec.run.storage_path.startswith("s3://"):
        return False
    hosts = {n.get("NodeManagerAddress") for n in nodes if n.get("Alive")}
    if len(hosts) <= 1:
        return False
    log.warning(f"run.storage_path={spec.run.storage_path} is a local path, and the Ray cluster's nodes are on "
                f"{len(hosts)} hosts: a restart on another node will not find the checkpoints unless every node "
                "mounts this path (NFS); set run.storage_path=s3://BUCKET/PREFIX")
    return True


def workers(spec) -> int | tuple[int, int]:
    """Ray Train's num_workers: the fixed count, or the elastic range (min_workers, workers). The
    elastic range is safe because a checkpoint resumes exactly on any count that divides
    data.partitions (the config checks every count of the range), with the engines re-partitioned
    on load and per-sample noise: Ray restarts the group from the latest checkpoint whenever it
    resizes it."""
    d = spec.distributed
    return (d.min_workers, d.workers) if getattr(d, "min_workers", 0) else d.workers


def build_torch_trainer(spec: RunSpec, callbacks: list | None = None, run_id: str | None = None,
                        progress: bool = True) -> TorchTrainer:
    """The TorchTrainer for `spec` (any `model.method`: every one runs on the same loop); `run_id`
    is the MLflow run rank 0 logs to (`tracking.open_run`). `progress`: the driver prints the
    method's progress line at each checkpoint."""
    from advflow.platform.train.methods import METHODS

    d = spec.distributed
    storage_path, fs = storage(spec)
    if ray.is_initialized():
        warn_node_local_storage(spec, ray.nodes())
    resources = {"CPU": d.cpus_per_worker}
    loop_config = {"spec": spec.to_dict(), "mlflow_run_id": run_id, "mlflow_uri": tracking_uri(spec) if run_id else None}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        torch_config=torch_config(spec),
        scaling_config=ScalingConfig(num_workers=workers(spec), use_gpu=d.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=spec.run.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=spec.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.run.keep_checkpoints),
            callbacks=[FailFast(),
                       *([ProgressCallback(ProgressMeter(spec.train.steps, spec.train.global_batch,
                                                         METHODS[spec.model.method].names.line))]
                         if progress else []),
                       *(callbacks or [])],
        ),
    )


def ensure_ray(address: str | None = None) -> None:
    """Connect to the configured cluster (--ray-address, RAY_ADDRESS; `ray job submit` sets the
    latter) or, when none is configured, start a private local Ray and say so (`connect.ensure_ray`).
    The job's runtime env carries the S3/MLflow endpoints and the controller's start timeout."""
    from advflow.platform.train import connect

    env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    env.update(controller_env())
    connect.ensure_ray(address, runtime_env={"env_vars": env} if env else None)


def connect_driver(address: str | None = None) -> bool:
    """`ensure_ray` for a job's main: False, after one line naming the address and the fix, when the
    configured cluster cannot be reached (so the job exits before opening its MLflow run)."""
    from advflow.platform.config import ConfigError

    try:
        ensure_ray(address)
    except ConfigError as err:
        print(f"[advflow] {err}", file=sys.stderr)
        return False
    return True


# Ray Train's controller gives up waiting for a worker group after 60 s, logs the timeout with its
# traceback and tries again: a queued job printed a traceback every minute although nothing was
# wrong. advflow waits as long as it takes and says so in one line instead (QueueNotice).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
QUEUE_WAIT_S = 7 * 24 * 3600.0


def controller_env() -> dict[str, str]:
    """Environment for Ray Train's controller (no secrets): the start timeout, unless the user set one."""
    return {START_TIMEOUT_ENV: os.environ.get(START_TIMEOUT_ENV, str(QUEUE_WAIT_S))}


def own_placement_groups() -> dict[str, dict]:
    """The placement groups of this driver's Ray job, as `ray.util.placement_group_table()` gives
    them: {id: {"state", "bundles", "stats", ...}}.

    Ray Train V2's worker group asks for its workers with an unnamed placement group created by its
    controller actor, which belongs to the driver's job; the GCS records that job as the group's
    `creator_job_id` (PlacementGroupTableData), which the public table leaves out. So the table is
    read from the GCS here and filtered by it: another job's pending group (a second run queued on
    the same cluster) is not this job's wait."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    out = {}
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        data = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if data.creator_job_id.hex() == job:
            info = state._gen_placement_group_info(data)
            out[info["placement_group_id"]] = info
    return out


class QueueNotice(threading.Thread):
    """Driver side, while `fit` runs: every `every` seconds that a worker group's placement group of
    this job (`own_placement_groups`) is pending, one line says what is asked for, what is free and how long the group has waited
    ("infeasible" when no node of the cluster could ever hold a worker).

    The wait is counted from when a pending group was first seen, and starts again after the
    workers got their resources: a job that lost a node at hour 5 says "waited 40 s", not 5 h."""

    def __init__(self, log, every: float | None = None, table=None, free=None, clock=time.monotonic):
        super().__init__(daemon=True, name="advflow-queue-notice")
        self.log, self.clock = log, clock
        self.every = every if every is not None else float(os.environ.get("ADVFLOW_QUEUE_NOTICE_S", "60"))
        self.table, self.free = table or own_placement_groups, free or ray.available_resources
        self.stop = threading.Event()
        self.lines = 0
        self.pending_since: float | None = None

    def poll(self) -> str | None:
        """The line for now (None: nothing pending); keeps the clock of the current wait."""
        pending = [pg for pg in self.table().values() if pg.get("state") == "PENDING"]
        if not pending:
            self.pending_since = None
            return None
        now = self.clock()
        if self.pending_since is None:
            self.pending_since = now
        pg = pending[0]
        bundles = list(pg.get("bundles", {}).values())
        ask = {k: v for k, v in (bundles[0] if bundles else {}).items() if not k.startswith("node:")}
        why = pg.get("stats", {}).get("scheduling_state", "")
        free = {k: v for k, v in self.free().items() if k in ask}
        hint = " (infeasible: no node can hold one; add a node with these resources or lower " \
               "distributed.cpus_per_worker / use_gpu)" if why == "INFEASIBLE" else ""
        return (f"waiting for resources: {len(bundles)} worker(s) x {ask}, free now {free}; "
                f"waited {now - self.pending_since:.0f} s{hint}")

    def run(self) -> None:
        # Look often (a wait's start is known to within `tick`), speak every `every` seconds of it.
        tick, spoke = min(self.every, 5.0), None
        while not self.stop.wait(tick):
            try:
                text = self.poll()
            except Exception:  # noqa: BLE001 - a notice must never break the job
                continue
            if text is None:
                spoke = None
                continue
            now = self.clock()
            if now - (spoke if spoke is not None else self.pending_since) >= self.every:
                spoke = now
                self.lines += 1
                self.log.info(text)


def fit(trainer: TorchTrainer, spec, log, causes: list[str] | None = None):
    """trainer.fit(), and on failure exactly one line for the user:
    `[advflow] training failed: <cause> (traceback: <file>)`, the cause naming the culprit (shard,
    field, step: advflow's messages do). The traceback goes to `<run storage>/failures/`, not to
    the terminal. Returns Ray's Result, or None when training failed (the cause appended to
    `causes` when given)."""
    from ray.train import TrainingFailedError

    notice = QueueNotice(log)
    notice.start()
    try:
        result = trainer.fit()
        error = result.error
    except TrainingFailedError as err:  # Ray Train V2 raises where V1 returned the error
        result, error = None, err
    finally:
        notice.stop.set()
    if error is None:
        return result
    cause = one_line(error)
    if causes is not None:
        causes.append(cause)
    log.error("training failed: %s%s", cause, _save_traceback(spec, error))
    return None


def _save_traceback(spec, error: BaseException) -> str:
    """Write the failure's traceback next to the run's checkpoints; ' (traceback: URI)' or ''."""
    import traceback

    from advflow.platform.data.storage import Storage

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    name = f"failures/{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.txt"
    from advflow.platform.train.preflight import run_root

    try:
        storage = Storage(run_root(spec))
        storage.write_atomic(name, text.encode())
        return f" (traceback: {storage.url(name)})"
    except Exception:  # noqa: BLE001 - the one line matters more than where the traceback went
        log.debug("could not store the traceback", exc_info=True)
        return ""


def checkpoint_uri(spec: RunSpec, checkpoint: Checkpoint | None) -> str | None:
    """Where a reported checkpoint lives, with its scheme (Ray gives the path inside its pyarrow S3
    filesystem, without `s3://`)."""
    return stored_uri(spec.run.storage_path, checkpoint.path) if checkpoint else None


def stored_uri(storage_path: str, path: str) -> str:
    """A Ray checkpoint's path with its scheme: Ray gives the path inside its pyarrow S3
    filesystem, without `s3://`, when run.storage_path is on S3."""
    return f"s3://{path}" if storage_path.startswith("s3://") and not path.startswith("s3://") else path
