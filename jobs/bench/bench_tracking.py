"""What MLflow tracking costs the training loop (a benchmark, not a test).

    python jobs/bench/bench_tracking.py                     # 200 steps, 1 worker, 1 warm-up + 3 repetitions each way
    python jobs/bench/bench_tracking.py --steps 400 --reps 3 --log-every 5

Starts its own moto S3 endpoint and MLflow server (SQLite, artifacts on S3) on 127.0.0.1, prepares
the digits, and trains the same tiny job with tracking off and on, interleaved (off, on, off, on,
...) so machine load hits both alike. "on" logs what production logs: metrics every --log-every
steps, a sample grid per checkpoint, system metrics, and the final registration of the EMA
generator. Reports the median wall time of each and their ratio (goal: <= 1.05 at log_every 10),
plus the registration time from the loop's own log line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (DeepSpeed op build, caches)")
    args = p.parse_args(argv)

    import os

    from advflow.infra.local import services
    from advflow.platform.data.shards import dataset_tags
    from advflow.platform.tracking import runs as tracking
    from advflow.platform.config import RunSpec
    from advflow.platform.train.local_launch import run_local
    from advflow.platform.data.prepare import PrepareConfig, prepare

    root = Path(tempfile.mkdtemp(prefix="advflow-bench-tracking-"))
    data = root / "digits"
    prepare(PrepareConfig(source="digits", out=str(data), encoder="pixel", shard_records=512, progress=False))
    with services.start_moto(root / "s3") as s3:
        services.ensure_bucket(s3, "advflow")
        with services.start_mlflow(root / "mlflow", s3=s3, bucket="advflow") as srv:
            os.environ.update({**s3.env, **srv.env})

            def spec(i: int, on: bool) -> RunSpec:
                return RunSpec.from_dict({
                    "run": {"name": f"bench-{'on' if on else 'off'}-{i}", "storage_path": str(root / "runs")},
                    "data": {"prefix": str(data), "shuffle_buffer": 256, "prefetch": 2},
                    "model": {"size": "tiny"},
                    "optim": {"lr": 1e-3, "grad_clip": 1.0, "ema_decay": 0.99},
                    "adversarial": {"ot_scale": 0.01},
                    "train": {"steps": args.steps, "global_batch": 64, "log_every": args.log_every,
                              "checkpoint_every": args.checkpoint_every},
                    "distributed": {"workers": 1},
                    "tracking": {"enabled": on, "experiment": "bench-tracking",
                                 "register_name": "bench-tracking" if on else None},
                })

            for i in range(args.warmup):
                s = spec(100 + i, False)
                run_local(s, root / "runs" / s.run.name)
            walls: dict[bool, list[float]] = {False: [], True: []}
            for i in range(args.reps):
                for on in (False, True):
                    s = spec(i, on)
                    run_id = tracking.open_run(s, data_tags=dataset_tags(s.data.prefix)) if on else None
                    t0 = time.perf_counter()
                    run_local(s, root / "runs" / s.run.name, run_id=run_id)
                    walls[on].append(time.perf_counter() - t0)
                    tracking.close_run(s, run_id, ok=True)
                    print(f"[bench] rep {i} tracking {'on ' if on else 'off'}: {walls[on][-1]:.1f} s", file=sys.stderr)
    off, on = statistics.median(walls[False]), statistics.median(walls[True])
    print(f"tracking off: median {off:.1f} s  {walls[False]}")
    print(f"tracking on:  median {on:.1f} s  {walls[True]}")
    print(f"ratio on/off: {on / off:.3f}, tracking adds {on - off:+.1f} s per job  ({args.steps} steps, log_every {args.log_every}, "
          f"checkpoint_every {args.checkpoint_every}, 1 worker; includes start-up and the final registration)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
