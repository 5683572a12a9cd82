"""Ray at the edges: the TorchTrainer (Ray Train V2) around `AFMTrainer`.

Everything Ray-specific lives here: the worker function `train_func(config)`, the `RayContext` that
turns the loop's report/restore calls into `ray.train.report` / `ray.train.get_checkpoint`, storage
on a local path or S3 (any endpoint via AWS_ENDPOINT_URL), and the driver-side progress callback.
"""

from __future__ import annotations

import os
import tempfile
import time
from urllib.parse import urlparse

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from advflow.platform.config import RunSpec
from advflow.platform.tracking.runs import tracking_uri

# Environment a worker needs to reach S3/MLflow; copied from the driver into the workers' runtime
# env when set, so `ray job submit` works with the exports of `advflow stack env`.
PASS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")


class RayContext:
    """The loop's view of Ray Train: rank, report, and the checkpoint to resume from."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._restore_tmp: tempfile.TemporaryDirectory | None = None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # Only rank 0's metrics are read by the driver; every rank must still call report.
        ray.train.report(metrics, checkpoint=checkpoint)

    def restore_dir(self) -> str | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restore_tmp = tempfile.TemporaryDirectory(prefix="advflow-restore-")
        return checkpoint.to_directory(self._restore_tmp.name)


def train_func(config: dict) -> None:
    """Runs on every Ray Train worker."""
    from advflow.platform.train.worker import AFMTrainer

    spec = RunSpec.from_dict(config["spec"])
    torch.set_num_threads(max(1, spec.distributed.cpus_per_worker))
    device = torch.device("cuda", ray.train.torch.get_device().index or 0) if spec.distributed.use_gpu \
        else torch.device("cpu")
    if config.get("mlflow_uri"):  # resolved by the driver, so workers need no environment of their own
        os.environ["MLFLOW_TRACKING_URI"] = config["mlflow_uri"]
    AFMTrainer(spec, RayContext(), device=device, run_id=config.get("mlflow_run_id")).train()


class ProgressCallback(UserCallback):
    """Driver-side progress line: step, samples/s, D and G loss, ETA (runs in Ray's controller)."""

    def __init__(self, total_steps: int, global_batch: int):
        self.total, self.batch = total_steps, global_batch
        self._t0: float | None = None
        self._step0 = 0

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0] if metrics else {}
        step = int(m.get("step", 0))
        now = time.time()
        if self._t0 is None or step <= self._step0:
            self._t0, self._step0 = now, step
            rate = 0.0
        else:
            rate = (step - self._step0) / max(now - self._t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        ckpt = f" checkpoint={checkpoint.path}" if checkpoint else ""
        print(f"[advflow] step {step}/{self.total} | {rate * self.batch:.1f} samples/s | "
              f"D {m.get('d_loss', float('nan')):.4f} G {m.get('g_loss', float('nan')):.4f} | "
              f"data wait {100 * m.get('time/data_wait_frac', 0.0):.1f}% | ETA {eta:.0f}s{ckpt}", flush=True)


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
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kw.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                  session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return path[len("s3://"):], pyarrow.fs.S3FileSystem(**kw)


def build_trainer(spec: RunSpec, callbacks: list | None = None, run_id: str | None = None,
                  progress: bool = True) -> TorchTrainer:
    """The TorchTrainer for `spec`; `run_id` is the MLflow run rank 0 logs to (`tracking.open_run`)."""
    d = spec.distributed
    storage_path, fs = storage(spec)
    resources = {"CPU": d.cpus_per_worker}
    return TorchTrainer(
        train_func,
        train_loop_config={"spec": spec.to_dict(), "mlflow_run_id": run_id,
                           "mlflow_uri": tracking_uri(spec) if run_id else None},
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=d.workers, use_gpu=d.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=spec.run.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=spec.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.run.keep_checkpoints),
            callbacks=[*([ProgressCallback(spec.train.steps, spec.train.global_batch)] if progress else []),
                       *(callbacks or [])],
        ),
    )


def ensure_ray(address: str | None = None) -> None:
    """Connect to a running cluster (RAY_ADDRESS / `ray job submit`), else start a local one."""
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    runtime_env = {"env_vars": env} if env else None
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("http"):
        # RAY_ADDRESS in the stack exports is the dashboard URL (for `ray job submit`); a driver
        # started by the job server gets its GCS address itself, so "auto" finds the cluster.
        address = "auto"
    try:
        ray.init(address=address or "auto", runtime_env=runtime_env, log_to_driver=True)
    except ConnectionError:
        ray.init(runtime_env=runtime_env, include_dashboard=False, log_to_driver=True)
