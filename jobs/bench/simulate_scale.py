"""What the data reader does at cluster scale, computed from its own schedule (no data, no I/O).

    python jobs/bench/simulate_scale.py                       # ImageNet-sized latents, W = 8, 64, 512
    python jobs/bench/simulate_scale.py --chunk-mb 1          # the same with 1 MiB chunks

For each (V partitions, W workers) it replays the reader's read schedule for one epoch
(`advflow.platform.data.reader.read_schedule`, the code the background thread runs) over a
manifest of the given size, and prints per worker and for the cluster: bytes read per epoch (and
their ratio to the dataset), range GETs per epoch, the GETs per second S3 sees at --step-rate
optimizer steps per second, and the memory of the shuffle state (the chunk bytes held at the peak
plus the shuffle blocks). The resume state itself is one integer per stream.
"""

from __future__ import annotations

import argparse
import sys
import time

from advflow.platform.data.reader import block_records, read_schedule
from advflow.platform.data.shards import Manifest, RecordSpec, ShardInfo, default_chunk_records, shard_name


def synthetic_manifest(records: int, shape: tuple[int, ...], dtype: str, shard_records: int,
                       chunk_records: int | None) -> Manifest:
    spec = RecordSpec(shape, dtype)
    chunk = chunk_records or default_chunk_records(spec, shard_records)
    shards = []
    for k, a in enumerate(range(0, records, shard_records)):
        n = min(shard_records, records - a)
        shards.append(ShardInfo(shard_name(k), n, n * spec.record_bytes, "", [""] * -(-n // chunk)))
    return Manifest(record=spec, chunk_records=chunk, shards=shards, num_classes=1000, encoder={"name": "synthetic"},
                    channel_mean=[0.0] * shape[0], channel_std=[1.0] * shape[0])


def rows(m: Manifest, partitions: int, world: int, *, shuffle_buffer: int, global_batch: int, step_rate: float,
         streams: int) -> dict:
    vols = read_schedule(m, partitions, world, shuffle_buffer=shuffle_buffer)
    size = m.total_bytes
    worker_bytes = max(v.bytes for v in vols)
    cluster_bytes = sum(v.bytes for v in vols)
    gets = sum(v.requests for v in vols)
    epochs_per_s = step_rate * global_batch / (m.num_records // partitions * partitions)
    blocks = partitions // world * block_records(shuffle_buffer, partitions) * m.record.record_bytes
    return {"V": partitions, "W": world, "worker_GB": worker_bytes / 1e9, "cluster_GB": cluster_bytes / 1e9,
            "ratio": cluster_bytes / size, "GETs": gets, "GETs_per_s": gets * epochs_per_s * streams,
            "mem_MB": (max(v.peak_held_bytes for v in vols) + blocks) / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_281_167, help="ImageNet-1k train")
    p.add_argument("--shape", default="4,32,32", help="SD-VAE latents of 256x256 images")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--shard-records", type=int, default=8192, help="prepare_latents.py's default")
    p.add_argument("--chunk-mb", type=float, default=None, help="chunk size (default: prepare's, ~16 MiB)")
    p.add_argument("--workers", default="8,64,512")
    p.add_argument("--partitions", default="64,512", help="V values; a W that does not divide V is skipped")
    p.add_argument("--shuffle-buffer", type=int, default=2048, help="data.shuffle_buffer's default")
    p.add_argument("--global-batch", type=int, default=1024)
    p.add_argument("--step-rate", type=float, default=2.0, help="optimizer steps per second")
    p.add_argument("--streams", type=int, default=2, help="data streams per run (AFM: D's and G's)")
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    spec = RecordSpec(shape, args.dtype)
    chunk = None if args.chunk_mb is None else max(1, int(args.chunk_mb * 2**20) // spec.record_bytes)
    m = synthetic_manifest(args.records, shape, args.dtype, args.shard_records, chunk)
    chunk_mib = m.chunk_records * spec.record_bytes / 2**20
    print(f"dataset: {m.num_records:,} records x {spec.record_bytes} B = {m.total_bytes / 1e9:.2f} GB, "
          f"{len(m.shards)} shards, chunks of {m.chunk_records} records ({chunk_mib:.2f} MiB); global batch "
          f"{args.global_batch}, {args.step_rate} steps/s, {args.streams} streams, shuffle_buffer {args.shuffle_buffer}")
    header = f"{'V':>5} {'W':>5} {'GB/worker':>10} {'GB/cluster':>11} {'x dataset':>10} {'GETs/epoch':>11} " \
             f"{'GETs/s (S3)':>12} {'MB held/worker':>15}"
    print(header)
    print("-" * len(header))
    for v in (int(x) for x in args.partitions.split(",")):
        for w in (int(x) for x in args.workers.split(",")):
            if v % w:
                continue
            t0 = time.perf_counter()
            r = rows(m, v, w, shuffle_buffer=args.shuffle_buffer, global_batch=args.global_batch,
                     step_rate=args.step_rate, streams=args.streams)
            print(f"{r['V']:>5} {r['W']:>5} {r['worker_GB']:>10.3f} {r['cluster_GB']:>11.2f} {r['ratio']:>10.3f} "
                  f"{r['GETs']:>11,} {r['GETs_per_s']:>12.1f} {r['mem_MB']:>15.1f}   ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
