"""Run the worker loop without Ray: N processes on this machine, gloo, checkpoints in a local folder.

For debugging on a laptop and for tests that compare ZeRO stages (the Ray path adds nothing to the
numerics; `ray_launch` runs the same `loop.run_worker`, whatever the method). The checkpoint protocol mirrors
Ray Train's: every rank stages its files, they are merged into `checkpoint_{step:06d}/`, and the
checkpoint counts only once rank 0 has written `COMPLETE` after a barrier.

Every method runs on the one loop (`loop.run_worker`, `model.method` picks the step object); rank 0
writes the per-step rows into the run's metrics log (`ctx.run_storage()`, metrics_log.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from advflow.platform.net import free_port
from advflow.platform.config import RunSpec
from advflow.platform.tracking.live import connect_for_metrics
from advflow.platform.tracking.runs import tracking_uri
from advflow.platform.train.metrics_log import MetricsLog
from advflow.platform.train.rendezvous import init_process_group
from advflow.platform.train.loop import run_worker

COMPLETE = "COMPLETE"


def completed(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints, oldest report first (after a watchdog rollback a replayed step is
    reported again under a new name, later than the abandoned ones it replaces)."""
    done = [p for p in Path(run_dir).glob("checkpoint_*") if (p / COMPLETE).is_file()]
    return sorted(done, key=lambda p: ((p / COMPLETE).stat().st_mtime_ns, p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = completed(run_dir)
    return done[-1] if done else None


class LocalContext:
    """The loop's WorkerContext for plain processes: checkpoints copied synchronously into run_dir."""

    takes_staging_dir = False

    def __init__(self, rank: int, world_size: int, run_dir: Path, keep: int):
        self.rank, self.world_size, self.run_dir, self.keep = rank, world_size, run_dir, keep
        self.restore_uri: str | None = None

    def drain(self) -> None:
        pass  # nothing in flight: report copies synchronously

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str | None = None) -> None:
        if checkpoint_dir is None:
            return
        dest = self.run_dir / (name or f"checkpoint_{int(metrics['step']):06d}")
        shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
        self._barrier()  # every rank's files are in place
        if self.rank == 0:
            (dest / COMPLETE).write_text(json.dumps({"step": metrics["step"]}))
            for old in completed(self.run_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def restore_dir(self) -> str | None:
        latest = latest_checkpoint(self.run_dir)
        self.restore_uri = str(latest) if latest else None  # read in place: the copy is the stored one
        return self.restore_uri

    def run_storage(self) -> str:
        return str(self.run_dir)

    def fetch_checkpoint(self, name: str) -> str:
        path = self.run_dir / name
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"{path}: the checkpoint to roll back to is gone; raise run.keep_checkpoints")
        return str(path)


def _worker(rank: int, world_size: int, port: int, config: dict, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    d = config["spec"]["distributed"]
    init_process_group("gloo", rank, world_size, "127.0.0.1", port,  # every socket on loopback
                       timeout_s=d.get("timeout_s", 1800.0), env=d.get("nccl"))
    if config["spec"]["tracking"].get("live_metrics", True):
        # Where a Ray cluster is named (RAY_ADDRESS, e.g. `advflow stack env`), the live metrics of
        # a run without Ray Train reach its Prometheus endpoint too (tracking/live.py).
        connect_for_metrics()
    try:
        ctx = LocalContext(rank, world_size, Path(run_dir), config["spec"]["run"]["keep_checkpoints"])
        run_worker(config, ctx)
    finally:
        dist.destroy_process_group()


def run_local(spec: RunSpec, run_dir: str | Path, run_id: str | None = None) -> list[dict]:
    """Train with `spec.distributed.workers` local processes; returns the per-step metric rows of
    the whole run (its metrics log, including steps of earlier attempts that this one resumed).
    `run_id`: the MLflow run rank 0 logs to (`tracking.open_run`), None for untracked."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    world = spec.distributed.workers
    config = {"spec": spec.to_dict(), "mlflow_run_id": run_id, "mlflow_uri": tracking_uri(spec) if run_id else None}
    mp.start_processes(_worker, args=(world, free_port(), config, str(run_dir)),
                       nprocs=world, join=True, start_method="spawn")
    return MetricsLog(str(run_dir)).read()
