"""Run the worker loop without Ray: N processes on this machine, gloo, checkpoints in a local folder.

For debugging on a laptop and for tests that compare ZeRO stages (the Ray path adds nothing to the
numerics; `ray_launch` runs the same `worker.run_worker`). The checkpoint protocol mirrors
Ray Train's: every rank stages its files, they are merged into `checkpoint_{step:06d}/`, and the
checkpoint counts only once rank 0 has written `COMPLETE` after a barrier.

The per-worker entry is `worker.run_worker` (the AFM loop) unless the launch names another one as
"module:function" (`entry=`; e.g. the classifier job's `advflow.platform.train.classifier:run_classifier_worker`);
`resolve_entry` is shared with `ray_launch`. Every entry is called as `entry(config, ctx, device=...)`;
rank 0 writes the per-step rows into the run's metrics log (`ctx.run_storage()`, metrics_log.py).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from advflow.infra.local.proc import free_port
from advflow.platform.config import RunSpec
from advflow.platform.tracking.runs import tracking_uri
from advflow.platform.train.metrics_log import MetricsLog
from advflow.platform.train.rendezvous import init_process_group
from advflow.platform.train.worker import run_worker

COMPLETE = "COMPLETE"


def resolve_entry(entry: str | None) -> Callable[..., Any]:
    """The per-worker entry named "module:function" (None: the AFM loop, `worker.run_worker`)."""
    if entry is None:
        return run_worker
    module, sep, name = entry.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"entry {entry!r}: expected 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"entry {entry!r}: cannot be imported ({err})") from err


def completed(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints, oldest report first (after a watchdog rollback a replayed step is
    reported again under a new name, later than the abandoned ones it replaces)."""
    done = [p for p in Path(run_dir).glob("checkpoint_*") if (p / COMPLETE).is_file()]
    return sorted(done, key=lambda p: ((p / COMPLETE).stat().st_mtime_ns, p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = completed(run_dir)
    return done[-1] if done else None


class LocalContext:
    def __init__(self, rank: int, world_size: int, run_dir: Path, keep: int):
        self.rank, self.world_size, self.run_dir, self.keep = rank, world_size, run_dir, keep

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
        return str(latest) if latest else None

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
    try:
        ctx = LocalContext(rank, world_size, Path(run_dir), config["spec"]["run"]["keep_checkpoints"])
        resolve_entry(config.get("entry"))(config, ctx)
    finally:
        dist.destroy_process_group()


def run_local(spec: RunSpec, run_dir: str | Path, run_id: str | None = None, entry: str | None = None) -> list[dict]:
    """Train with `spec.distributed.workers` local processes; returns the per-step metric rows of
    the whole run (its metrics log, including steps of earlier attempts that this one resumed).
    `run_id`: the MLflow run rank 0 logs to (`tracking.open_run`), None for untracked. `entry`: the
    per-worker entry as "module:function" (None: the AFM loop); `spec` is whatever spec it reads."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    world = spec.distributed.workers
    config = {"spec": spec.to_dict(), "mlflow_run_id": run_id, "mlflow_uri": tracking_uri(spec) if run_id else None}
    if entry is not None:
        resolve_entry(entry)  # fail here, not in every spawned process
        config["entry"] = entry
    mp.start_processes(_worker, args=(world, free_port(), config, str(run_dir)),
                       nprocs=world, join=True, start_method="spawn")
    return MetricsLog(str(run_dir)).read()
