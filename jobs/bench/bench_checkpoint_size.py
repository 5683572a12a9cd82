"""Checkpoint bytes and seconds over a long tiny run (a benchmark, not a test).

    python jobs/bench/bench_checkpoint_size.py                 # 10 checkpoints, every 300 steps
    python jobs/bench/bench_checkpoint_size.py --every 100 --checkpoints 10 --out /tmp/ckpt-bench

One local worker trains the tiny digits model with a metric row per step (log_every 1) and keeps
every checkpoint. For each checkpoint it prints the bytes on disk (all files, and trainer.json
alone) and the seconds `Checkpointer.save` took. A checkpoint whose size grows with the step (a
per-step history inside it) shows as a rising trainer.json column; flat columns are the goal.

It uses only APIs that exist before and after the metric history left trainer.json (the loop,
LocalContext, Checkpointer.save): the loop is `TrainLoop` (platform/train/loop.py), or on a checkout
from before the one loop its predecessor `Worker`, so the same script measures an older checkout for
comparison:
    git worktree add /tmp/old <rev> && cd /tmp/old && python /path/to/this/script.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--every", type=int, default=300, help="steps between checkpoints")
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = ap.parse_args(argv)
    try:  # a checkout from before platform/outputs.py (the older loop, above) has no check to run
        from advflow.platform.outputs import OutputError, check_writable
    except ImportError:
        pass
    else:
        try:  # before the data is prepared and the checkpoints are trained
            check_writable(args.out, "--out", folder=True)
        except OutputError as err:
            ap.error(str(err))

    import torch.distributed as dist

    from advflow.platform.config import RunSpec
    from advflow.platform.data.prepare import PrepareConfig, prepare
    from advflow.platform.train import checkpoint as ckpt_mod
    from advflow.platform.train.local_launch import LocalContext

    try:
        from advflow.platform.train.loop import TrainLoop as Loop
    except ImportError:  # a checkout from before the one loop (see the module docstring)
        from advflow.platform.train.worker import Worker as Loop

    root = Path(args.out or tempfile.mkdtemp(prefix="advflow-ckpt-bench-"))
    data = root / "digits"
    if not (data / "manifest.json").is_file():
        prepare(PrepareConfig(source="digits", out=str(data), encoder="pixel", shard_records=512))
    steps = args.every * args.checkpoints
    spec = RunSpec.from_dict({
        "run": {"keep_checkpoints": args.checkpoints},
        "data": {"prefix": str(data), "shuffle_buffer": 256},
        "model": {"size": "tiny"},
        "train": {"steps": steps, "global_batch": 16, "log_every": 1, "checkpoint_every": args.every,
                  "sample_every": steps},
        "eval": {"kind": "none"},
    })
    seconds: dict[int, float] = {}
    save = ckpt_mod.Checkpointer.save

    def timed(self, directory, step):  # the checkpointer's own work, staging included
        t0 = time.perf_counter()
        save(self, directory, step)
        seconds[step] = time.perf_counter() - t0

    ckpt_mod.Checkpointer.save = timed
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    run_dir = root / "run"
    t0 = time.perf_counter()
    Loop(spec, LocalContext(0, 1, run_dir, args.checkpoints)).train()
    wall = time.perf_counter() - t0
    dist.destroy_process_group()

    rows = []
    for d in sorted(run_dir.glob("checkpoint_*")):
        step = int(d.name.split("_")[1])
        total = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        rows.append({"step": step, "bytes": total, "trainer_json_bytes": (d / "trainer.json").stat().st_size,
                     "save_s": round(seconds.get(step, float("nan")), 4)})
    print(f"{'step':>6} {'bytes':>10} {'trainer.json':>13} {'save s':>8}")
    for r in rows:
        print(f"{r['step']:>6} {r['bytes']:>10} {r['trainer_json_bytes']:>13} {r['save_s']:>8.3f}")
    first, last = rows[0], rows[-1]
    print(f"last / first checkpoint: bytes x{last['bytes'] / first['bytes']:.2f}, "
          f"trainer.json x{last['trainer_json_bytes'] / first['trainer_json_bytes']:.2f}, "
          f"save time x{last['save_s'] / first['save_s']:.2f}  ({steps} steps in {wall:.0f} s)")
    (root / "bench_checkpoint_size.json").write_text(json.dumps(rows, indent=1))
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
