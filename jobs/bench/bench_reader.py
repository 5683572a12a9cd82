"""Reader throughput against raw boto3 GETs, same endpoint, same data, one run.

    # self-contained: starts a local S3-compatible server (moto, a test dependency) in a separate
    # process on 127.0.0.1 and writes a synthetic SD-VAE-shaped dataset (4x32x32 fp16) to it
    python jobs/bench/bench_reader.py --local-server            # 256 MiB in 16 MiB shards

    # an existing dataset on any endpoint (AWS_ENDPOINT_URL / credentials from the environment)
    python jobs/bench/bench_reader.py --prefix s3://bucket/latents

Prints raw boto3 MB/s (whole-shard GETs, one at a time: the issue's baseline, with botocore's
default CRC32 body check and without it, as the reader's client runs; and range GETs of chunk
size with the reader's concurrency, for reference), the reader's records/s and MB/s over
--epochs epochs with its background prefetch, the ratio reader / raw (goal >= 0.9), and the CPU
this process spends per MB on each path (on a CPU-starved host that, not I/O, sets the ratio), and
the bytes the reader read against those it gave out (its own counters). `--partitions V` makes the
one reader hold V canonical partitions; `python jobs/bench/profile_reader.py` breaks the reader's
CPU down by stage.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from advflow.infra.local import services
from advflow.platform.data.reader import LatentStream
from advflow.platform.data.shards import (
    Manifest, RecordSpec, default_chunk_records, encode_shard, read_manifest, shard_name, write_manifest,
)
from advflow.platform.data.storage import Storage


def write_synthetic(prefix: str, size_mb: float, shard_mb: float, shape: tuple[int, int, int]) -> Manifest:
    spec = RecordSpec(shape, "float16")
    per_shard = max(1, int(shard_mb * 2**20) // spec.record_bytes)
    total = max(per_shard, int(size_mb * 2**20) // spec.record_bytes)
    chunk = default_chunk_records(spec, per_shard)
    st = Storage(prefix)
    rng = np.random.default_rng(0)
    shards = []
    for k, a in enumerate(range(0, total, per_shard)):
        n = min(per_shard, total - a)
        x = rng.standard_normal((n, *shape), dtype=np.float32)
        y = rng.integers(0, 1000, n)
        data, info = encode_shard(x, y, spec, chunk, shard_name(k))
        st.write_atomic(info.name, data)
        shards.append(info)
    m = Manifest(record=spec, chunk_records=chunk, shards=shards, num_classes=1000,
                 encoder={"name": "synthetic", "scaling_factor": 1.0}, channel_mean=[0.0] * shape[0],
                 channel_std=[1.0] * shape[0], params={"synthetic": True})
    write_manifest(st, m)
    return m


def _client(crc: bool = True):
    """boto3's S3 client. crc=True: botocore's defaults, which check a CRC32 of every GET body (the
    baseline as a plain boto3 user gets it); False: no body check, as the reader's client (whose
    sha256 check replaces it): the fair floor."""
    import boto3
    from botocore.config import Config

    extra = {} if crc else {"response_checksum_validation": "when_required"}
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
                        config=Config(max_pool_connections=64, **extra))


def raw_sequential(prefix: str, m: Manifest, crc: bool = True) -> tuple[float, float]:
    """(MB/s, client CPU ms per MB) of whole-shard GETs, one after another."""
    bucket, _, key = prefix[len("s3://"):].partition("/")
    c = _client(crc)
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for s in m.shards:
        n += len(c.get_object(Bucket=bucket, Key=f"{key}/{s.name}")["Body"].read())
    return n / 2**20 / (time.perf_counter() - t0), 1e3 * (time.process_time() - c0) / (n / 2**20)


def raw_concurrent(prefix: str, m: Manifest, threads: int) -> float:
    """MB/s of chunk-sized range GETs with `threads` in flight (the reader's request pattern)."""
    bucket, _, key = prefix[len("s3://"):].partition("/")
    c = _client()
    rb = m.record.record_bytes
    jobs = [(s.name, a * rb, b * rb - 1) for s in m.shards for a, b in m.chunk_bounds(s)]

    def get(j):
        name, a, b = j
        return len(c.get_object(Bucket=bucket, Key=f"{key}/{name}", Range=f"bytes={a}-{b}")["Body"].read())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(get, jobs))
    return n / 2**20 / (time.perf_counter() - t0)


def reader_epoch(prefix: str, m: Manifest, batch_size: int, prefetch: int, shuffle_buffer: int,
                 out_dtype: str, epochs: float, partitions: int = 1) -> tuple[float, float, float, float]:
    """(records/s, MB/s of stored bytes, client CPU ms per MB, bytes read / bytes given out) over
    `epochs` epochs, timed from iter() (start-up counts)."""
    ds = LatentStream(prefix, batch_size, prefetch=prefetch, shuffle_buffer=shuffle_buffer, seed=0,
                      out_dtype=out_dtype, partitions=partitions)
    batches = int(m.num_records * epochs) // batch_size
    t0, c0 = time.perf_counter(), time.process_time()
    it = iter(ds)
    for _ in range(batches):
        x, _ = next(it)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    ds.close()
    recs = batches * batch_size
    mb = recs * m.record.record_bytes / 2**20
    return recs / dt, mb / dt, 1e3 * cpu / mb, ds.io_counters()["bytes"] / (recs * m.record.record_bytes)


def data_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options this benchmark shares with profile_reader.py: where the data is, the reader's."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", help="existing dataset (s3://...)")
    p.add_argument("--local-server", action="store_true", help="start a local S3 server and write synthetic data")
    p.add_argument("--size-mb", type=float, default=256)
    p.add_argument("--shard-mb", type=float, default=16)
    p.add_argument("--shape", default="4,32,32")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--shuffle-buffer", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    return p


def open_dataset(args: argparse.Namespace, cleanup: contextlib.ExitStack, tag: str) -> tuple[str, Manifest]:
    """(prefix, manifest): --prefix as it is, or --local-server: moto's S3 server in its own process
    (so it does not share this process's GIL; its log in a temporary directory removed after it
    stops) with a synthetic dataset written to it."""
    if not args.local_server:
        prefix = args.prefix.rstrip("/")
        return prefix, read_manifest(prefix)
    scratch = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix=f"advflow-{tag}-")))
    server = cleanup.enter_context(services.start_moto(scratch, timeout_s=60))
    os.environ.update(server.env)  # its endpoint and the key it generated (it refuses others)
    _client().create_bucket(Bucket="advflow-bench")
    prefix = "s3://advflow-bench/latents"
    shape = tuple(int(v) for v in args.shape.split(","))
    return prefix, write_synthetic(prefix, args.size_mb, args.shard_mb, shape)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    p = data_parser(__doc__)
    p.add_argument("--epochs", type=float, default=3.0,
                   help="reader epochs per measurement (amortises start-up and the read-ahead left at the end)")
    p.add_argument("--partitions", type=int, default=1,
                   help="the reader's canonical partitions (one worker holds all of them: V chunks in memory)")
    p.add_argument("--out-dtype", default="float32", choices=["float32", "stored"],
                   help="reader output dtype (float32 casts on the CPU; stored leaves fp16 for the GPU)")
    args = p.parse_args(argv)
    if not args.prefix and not args.local_server:
        p.error("pass --prefix s3://... or --local-server")

    with contextlib.ExitStack() as cleanup:
        prefix, m = open_dataset(args, cleanup, "bench-reader")
        print(f"endpoint {os.environ.get('AWS_ENDPOINT_URL', 'AWS')}  data {prefix}: {m.num_records} records "
              f"x {m.record.record_bytes} B = {m.total_bytes / 2**20:.1f} MiB in {len(m.shards)} shards "
              f"({m.shards[0].bytes / 2**20:.1f} MiB), chunks of {m.chunk_records} records")
        raw_sequential(prefix, m)  # warm-up pass, untimed: first reads of fresh objects cost the server more
        seq, seq_cpu, nocrc, nocrc_cpu, conc, rps, mbs, rd_cpu, amp = ([] for _ in range(9))
        for r in range(args.repeats):  # interleaved so drift in machine load hits all of them alike
            a, b = raw_sequential(prefix, m)
            seq.append(a)
            seq_cpu.append(b)
            a, b = raw_sequential(prefix, m, crc=False)
            nocrc.append(a)
            nocrc_cpu.append(b)
            conc.append(raw_concurrent(prefix, m, args.prefetch))
            a, b, c, d = reader_epoch(prefix, m, args.batch_size, args.prefetch, args.shuffle_buffer,
                                      args.out_dtype, args.epochs, args.partitions)
            rps.append(a)
            mbs.append(b)
            rd_cpu.append(c)
            amp.append(d)
            print(f"  run {r}: raw seq {seq[-1]:.1f} MB/s ({seq_cpu[-1]:.2f} cpu-ms/MB)  no CRC {nocrc[-1]:.1f} MB/s "
                  f"({nocrc_cpu[-1]:.2f})  raw x{args.prefetch} {conc[-1]:.1f} MB/s  reader {a:,.0f} rec/s "
                  f"{b:.1f} MB/s ({c:.2f} cpu-ms/MB, read {d:.3f}x what it gave out)")
        med = statistics.median
        print(f"raw boto3 GET, whole shards, sequential : {med(seq):8.1f} MB/s")
        print(f"  the same without botocore's CRC32     : {med(nocrc):8.1f} MB/s")
        print(f"raw boto3 GET, chunk ranges, {args.prefetch} threads  : {med(conc):8.1f} MB/s")
        print(f"reader (V={args.partitions}, prefetch={args.prefetch}, batch={args.batch_size}, out {args.out_dtype}) : "
              f"{med(rps):8,.0f} records/s  {med(mbs):8.1f} MB/s")
        print(f"ratio reader / raw sequential           : {med(mbs) / med(seq):8.2f}x  (goal >= 0.9)")
        print(f"ratio reader / raw without CRC32        : {med(mbs) / med(nocrc):8.2f}x")
        print(f"ratio reader / raw concurrent           : {med(mbs) / med(conc):8.2f}x")
        print(f"client CPU per MB: raw {med(seq_cpu):.2f} ms (without CRC32 {med(nocrc_cpu):.2f}), reader "
              f"{med(rd_cpu):.2f} ms (this process only; the server's CPU is not counted)")
        print(f"bytes the reader read / bytes it gave out: {med(amp):.3f} (read-ahead of the last epoch included)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
