"""The training stall at a checkpoint, synchronous vs asynchronous upload (a benchmark, not a test).

    python jobs/bench/bench_checkpoint_upload.py                  # S/2 G and D, 5 checkpoints to S3
    python jobs/bench/bench_checkpoint_upload.py --size tiny --steps 40 --every 8

The same Ray Train run twice on this machine, with checkpoints on a local moto S3 endpoint:
`run.checkpoint_upload: sync` (every rank waits until its files are uploaded) and `async` (Ray
uploads in a background thread; it registers the checkpoint only once every upload finished). It
prints the stall at a checkpoint (how long the loop waited in `ray.train.report`, the metric
`time/previous_report`), each run's wall time and the bytes of one checkpoint. One run each on the
same machine. On a small CPU host the upload thread (and the local S3 server) compete with training
for the same cores, so the wall-time difference is noise there; the report stall is what async
removes, and on GPU nodes the upload no longer shares the compute. Both runs must end on identical losses (the upload mode changes
nothing of the training).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="S/2", help="model.size (S/2: ~0.8 GB per checkpoint with moments)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=8, help="train.checkpoint_every")
    args = ap.parse_args(argv)

    import ray

    from advflow.infra.local.services import ensure_bucket, s3_client, start_moto, worker_env
    from advflow.platform.config import RunSpec
    from advflow.platform.data.prepare import PrepareConfig, prepare
    from advflow.platform.train.metrics_log import MetricsLog
    from advflow.platform.train.ray_launch import build_torch_trainer

    root = Path(tempfile.mkdtemp(prefix="advflow-upload-bench-"))
    data = root / "digits"
    prepare(PrepareConfig(source="digits", out=str(data), encoder="pixel", shard_records=512))
    with start_moto(root / "s3") as s3:
        ensure_bucket(s3, "bench")
        os.environ.update(s3.env)  # the driver's pyarrow filesystem (ray_launch.storage) and the log reader
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {**worker_env(s3), "OMP_NUM_THREADS": "1"}})  # no secret in runtime_env
        results = {}
        try:
            for mode in ("sync", "async"):
                spec = RunSpec.from_dict({
                    "run": {"name": mode, "storage_path": "s3://bench/runs", "checkpoint_upload": mode,
                            "keep_checkpoints": 2},
                    "data": {"prefix": str(data), "shuffle_buffer": 256},
                    "model": {"size": args.size},
                    "train": {"steps": args.steps, "global_batch": 16, "log_every": args.every,
                              "checkpoint_every": args.every, "sample_every": args.steps},
                    "eval": {"kind": "none"},
                    "distributed": {"workers": 1, "cpus_per_worker": 2},
                })
                t0 = time.perf_counter()
                result = build_torch_trainer(spec, progress=False).fit()
                wall = time.perf_counter() - t0
                if result.error is not None:
                    print(f"{mode}: the run failed: {result.error}", file=sys.stderr)
                    return 1
                rows = MetricsLog(f"s3://bench/runs/{mode}").read()
                objects = s3_client(s3).list_objects_v2(Bucket="bench", Prefix=f"runs/{mode}/checkpoint_{args.steps:06d}/")  # the last one is kept
                size = sum(o["Size"] for o in objects.get("Contents", []))
                stall = result.metrics.get("time/previous_report", float("nan"))
                results[mode] = (wall, rows, size, stall)
                print(f"{mode:>5}: {wall:7.1f} s for {args.steps} steps and {args.steps // args.every} checkpoints "
                      f"of {size / 2**20:.0f} MiB; the loop waited {stall:.2f} s in the last full report")
        finally:
            ray.shutdown()
    (ws, rs, size, ss), (wa, ra, _, sa) = results["sync"], results["async"]
    same = [r["d_loss"] for r in rs] == [r["d_loss"] for r in ra]
    n = args.steps // args.every
    print(f"stall at a checkpoint (report call): sync {ss:.2f} s, async {sa:.2f} s; wall time async / sync "
          f"{wa / ws:.2f} ({(ws - wa) / n:+.2f} s per checkpoint; {size / 2**20:.0f} MiB each); identical losses: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
