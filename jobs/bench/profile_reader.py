"""Where the reader's client CPU goes: each stage of reading a chunk, per MB, in one run.

    # self-contained: a local S3-compatible server (moto) in its own process and a synthetic
    # SD-VAE-shaped dataset, as bench_reader.py --local-server makes them
    python jobs/bench/profile_reader.py --local-server
    # an existing dataset on any endpoint (AWS_ENDPOINT_URL / credentials from the environment)
    python jobs/bench/profile_reader.py --prefix s3://bucket/latents

Same objects, same endpoint; medians of --repeats interleaved runs. For each stage: client CPU ms
per MB (time.process_time: this process only; the server's CPU is not counted) and MB/s.
  raw GET              boto3 whole-object GETs, one at a time (bench_reader.py's baseline; its
                       client keeps botocore's default of validating each body's CRC32)
  read                 Storage.read of each chunk's byte range, one at a time
  read + sha256        the same plus hashlib over the returned bytes (the reader's old path)
  read_verified        Storage.read_verified of each chunk (bytes and sha256 in one pass)
  sha256               hashlib alone over one chunk in memory
  decode+check+copy    numpy decode, NaN/Inf and label checks, copy into a block (no I/O)
  reader               LatentStream, --epochs epochs, out_dtype "stored", end to end
Then a profile of that reader run: cProfile, one profiler per thread (the consumer, the reader's
background thread and its I/O threads; cProfile alone sees only the thread that enabled it), each
timed with time.thread_time so its figures are CPU, not waiting; merged, top --top by own time.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import importlib.util
import os
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from advflow.platform.data.reader import LatentStream
from advflow.platform.data.shards import Manifest
from advflow.platform.data.storage import Storage

try:
    from jobs.bench import bench_reader
except ImportError:  # run as a script: the repo root is not on sys.path
    _spec = importlib.util.spec_from_file_location("bench_reader", Path(__file__).with_name("bench_reader.py"))
    bench_reader = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(bench_reader)  # type: ignore[union-attr]

try:
    from advflow.platform.data.reader import _has_nonfinite
except ImportError:  # the reader no longer has it: that line is skipped
    _has_nonfinite = None

MB = 2**20
ROOT = Path(__file__).resolve().parents[2]


def _chunks(m: Manifest) -> list[tuple[str, int, int]]:
    """(shard name, start, end) of every chunk, in manifest order: the reader's range reads."""
    rb = m.record.record_bytes
    return [(s.name, a * rb, b * rb) for s in m.shards for a, b in m.chunk_bounds(s)]


def _timed(fn: Callable[[], int]) -> Callable[[], tuple[float, float]]:
    """fn() returns the bytes it handled; the result measures it: (client CPU ms per MB, MB/s)."""

    def run() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        n = fn()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return 1e3 * cpu / (n / MB), n / MB / dt

    return run


def stages(prefix: str, m: Manifest, st: Storage) -> dict[str, Callable[[], tuple[float, float]]]:
    """Each measured stage, by name: a callable that runs it once and gives (CPU ms/MB, MB/s)."""
    chunks = _chunks(m)
    sample = [st.read(*c) for c in chunks[:8]]  # chunks in memory for the CPU-only stages
    reps = 4  # over the sample, so those stages handle about as many bytes as a data pass

    def read() -> int:
        return sum(len(st.read(*c)) for c in chunks)

    def read_sha() -> int:
        n = 0
        for c in chunks:
            data = st.read(*c)
            hashlib.sha256(data).hexdigest()
            n += len(data)
        return n

    def read_verified() -> int:
        return sum(len(st.read_verified(*c)[0]) for c in chunks)

    def sha() -> int:
        for _ in range(reps):
            for data in sample:
                hashlib.sha256(data).hexdigest()
        return reps * sum(map(len, sample))

    def decode_check_copy() -> int:
        x0, _ = m.record.decode(sample[0])
        bx, by = np.empty((m.chunk_records, *x0.shape[1:]), x0.dtype), np.empty(m.chunk_records, np.int64)
        for _ in range(reps):
            for data in sample:
                x, y = m.record.decode(data)
                if _has_nonfinite(x) or ((y < 0) | (y >= m.num_classes)).any():
                    raise ValueError("the data has NaN/Inf or bad labels")
                bx[: len(x)] = x
                by[: len(y)] = y
        return reps * sum(map(len, sample))

    out = {
        "raw GET (boto3, whole objects)": lambda: bench_reader.raw_sequential(prefix, m)[::-1],
        "Storage.read (chunk ranges)": _timed(read),
        "Storage.read + sha256": _timed(read_sha),
        "Storage.read_verified": _timed(read_verified),
        "sha256 alone (in memory)": _timed(sha),
    }
    if _has_nonfinite is not None:
        out["decode + finite check + copy"] = _timed(decode_check_copy)
    return out


def _reader(prefix: str, m: Manifest, args: argparse.Namespace) -> tuple[LatentStream, int]:
    ds = LatentStream(prefix, args.batch_size, seed=0, prefetch=args.prefetch, shuffle_buffer=args.shuffle_buffer,
                      out_dtype="stored")
    return ds, int(m.num_records * args.epochs) // args.batch_size


def reader_run(prefix: str, m: Manifest, args: argparse.Namespace) -> tuple[float, float]:
    """(CPU ms/MB, MB/s of stored bytes) of LatentStream over --epochs epochs, from iter() on."""
    ds, batches = _reader(prefix, m, args)
    t0, c0 = time.perf_counter(), time.process_time()
    it = iter(ds)
    for _ in range(batches):
        next(it)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    ds.close()
    mb = batches * args.batch_size * m.record.record_bytes / MB
    return 1e3 * cpu / mb, mb / dt


def profile_reader(prefix: str, m: Manifest, args: argparse.Namespace) -> tuple[pstats.Stats, float]:
    """The merged per-thread CPU profile of one reader run, and the MB it read."""
    ds, batches = _reader(prefix, m, args)
    profiles: list[cProfile.Profile] = []

    def in_new_thread(*_: object) -> None:  # threading.setprofile's hook: hand the thread to cProfile
        p = cProfile.Profile(time.thread_time)
        profiles.append(p)
        p.enable()

    before = set(threading.enumerate())
    main = cProfile.Profile(time.thread_time)
    threading.setprofile(in_new_thread)
    main.enable()
    try:
        it = iter(ds)
        for _ in range(batches):
            next(it)
    finally:
        main.disable()
        threading.setprofile(None)
        ds.close()
    for t in set(threading.enumerate()) - before:  # their profilers are read only once they stop
        t.join(timeout=30)
    stats = pstats.Stats(main)
    for p in profiles:
        stats.add(p)
    return stats, batches * args.batch_size * m.record.record_bytes / MB


def print_profile(stats: pstats.Stats, mb: float, top: int) -> None:
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
    total = sum(v[2] for _, v in rows)
    print(f"\nprofile of the reader (cProfile per thread, thread CPU time; {total:.2f} s CPU over {mb:.0f} MB, "
          f"profiling overhead included): top {top} by own time")
    print(f"{'own ms/MB':>10} {'own %':>6} {'cum ms/MB':>10} {'calls':>9}  function")
    for (file, line, name), (_, ncalls, tt, ct, _) in rows[:top]:
        where = name if file == "~" else f"{name}  ({_short(file)}:{line})"
        print(f"{1e3 * tt / mb:10.3f} {100 * tt / total:6.1f} {1e3 * ct / mb:10.3f} {ncalls:9d}  {where}")


def _short(path: str) -> str:
    """A profiled file's path relative to site-packages or to the repo."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    return os.path.relpath(path, ROOT) if path.startswith(str(ROOT) + os.sep) else path


def main(argv: list[str] | None = None) -> int:
    p = bench_reader.data_parser(__doc__)
    p.add_argument("--epochs", type=float, default=2.0, help="reader epochs per reader run and for the profile")
    p.add_argument("--top", type=int, default=15, help="functions shown from the profile")
    args = p.parse_args(argv)
    if not args.prefix and not args.local_server:
        p.error("pass --prefix s3://... or --local-server")

    with contextlib.ExitStack() as cleanup:
        prefix, m = bench_reader.open_dataset(args, cleanup, "profile-reader")
        st = Storage(prefix)
        print(f"endpoint {os.environ.get('AWS_ENDPOINT_URL', 'AWS')}  data {prefix}: {m.total_bytes / MB:.1f} MiB "
              f"in {len(m.shards)} shards, chunks of {m.chunk_records} records "
              f"({m.chunk_records * m.record.record_bytes / MB:.2f} MiB)")
        if _has_nonfinite is None:
            print("(decode + finite check + copy skipped: advflow.platform.data.reader has no _has_nonfinite)")
        measured = stages(prefix, m, st)
        measured["LatentStream (out_dtype stored)"] = lambda: reader_run(prefix, m, args)
        for run in measured.values():  # warm-up pass, untimed: clients, connections, first reads
            run()
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in measured}
        st.reset_io_counters()
        for _ in range(args.repeats):  # interleaved so drift in machine load hits every stage alike
            for name, run in measured.items():
                results[name].append(run())
        counts = st.io_counters()
        med = statistics.median
        raw_cpu, raw_mbs = (med(v) for v in zip(*results["raw GET (boto3, whole objects)"]))
        print(f"\n{'stage':34s} {'cpu-ms/MB':>10} {'x raw':>6} {'MB/s':>8} {'x raw':>6}")
        for name, values in results.items():
            cpu, mbs = med(v[0] for v in values), med(v[1] for v in values)
            print(f"{name:34s} {cpu:10.2f} {cpu / raw_cpu:6.2f} {mbs:8.1f} {mbs / raw_mbs:6.2f}")
        print(f"(medians of {args.repeats}; this process's CPU only. Storage counters over the read / "
              f"read_verified passes: {counts['requests']} requests, {counts['bytes'] / MB:.1f} MiB)")
        stats, mb = profile_reader(prefix, m, args)
        print_profile(stats, mb, args.top)
        return 0


if __name__ == "__main__":
    sys.exit(main())
