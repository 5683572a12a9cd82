"""A recipe's per-step metric rows, for checking that a refactor changes no number (not a test).

    python jobs/bench/demo_rows.py --config jobs/configs/digits_tiny.yaml --data /tmp/digits --out after.json
    python jobs/bench/demo_rows.py --compare before.json after.json

Trains the recipe untracked with `run_local` (`--workers`, default the recipe's) on a local dataset
(`python jobs/prepare_latents.py --source digits --encoder pixel --out /tmp/digits`) and writes the
rows of its metrics log without the timings (`time/*`, `samples_per_s`). `--compare` counts the
values that differ, exactly, and the largest relative difference. To get the "before" rows, run this
script from a worktree of the older commit (`git worktree add /tmp/old <rev>`), with the older
package first on the path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path


def rows(config: str, data: str, workers: int | None, sets: list[str]) -> list[dict]:
    from advflow.platform.config import load_config
    from advflow.platform.train.local_launch import run_local
    from advflow.platform.train.metrics_log import MetricsLog

    run_dir = Path(tempfile.mkdtemp(prefix="advflow-rows-")) / "run"
    overrides = [f"data.prefix={data}", f"run.storage_path={run_dir.parent}", f"run.name={run_dir.name}",
                 "tracking.enabled=false", *([f"distributed.workers={workers}"] if workers else []), *sets]
    try:
        run_local(load_config(config, overrides), run_dir)
        return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "samples_per_s"}
                for r in MetricsLog(str(run_dir)).read()]
    finally:
        shutil.rmtree(run_dir.parent, ignore_errors=True)


def compare(a: list[dict], b: list[dict]) -> str:
    differ, worst, values = 0, 0.0, 0
    for x, y in zip(a, b):
        for k in set(x) | set(y):
            values += 1
            if x.get(k) != y.get(k):
                differ += 1
                if k in x and k in y:
                    worst = max(worst, abs(x[k] - y[k]) / max(abs(x[k]), 1e-12))
    return (f"{len(a)} vs {len(b)} rows; {differ} of {values} values differ; largest relative difference "
            f"{worst:.3g}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--data", help="a local dataset prefix (jobs/prepare_latents.py --out)")
    p.add_argument("--workers", type=int)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="where the rows go (JSON)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two rows files and exit")
    args = p.parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        print(compare(a, b))
        return 0 if a == b else 1
    if not (args.config and args.data and args.out):
        p.error("--config, --data and --out are needed (or --compare A B)")
    from advflow.platform.outputs import OutputError, check_writable

    try:  # before the training run: the rows are written after it
        check_writable(args.out, "--out")
    except OutputError as err:
        p.error(str(err))
    out = rows(args.config, args.data, args.workers, args.sets)
    Path(args.out).write_text(json.dumps(out))
    print(f"{len(out)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
