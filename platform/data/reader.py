"""LatentStream: an infinite, shuffled, exactly resumable stream of latent batches whose record
order does not depend on the number of workers, and of which each worker reads only its share.

The order is defined by V canonical partitions (`partitions`; the idea of MosaicML Streaming's
canonical nodes). It is a pure function of the manifest, the seed, the stream name, the epoch and
V, never of the number of workers or of timing, so any world size that divides V replays it and a
restart recomputes it without reading data:
1. Epoch e: the dataset's chunks (fixed runs of records, each checksummed in the manifest; a shard
   is one or more chunks) are permuted with a generator seeded by (seed, stream, e) and
   concatenated into one sequence of N records, which is then rotated by an offset drawn from the
   same seeds. The rotation moves the partition boundaries (and the records left out, below) from
   epoch to epoch, also on a dataset of one chunk.
2. Canonical partition v (0 <= v < V) owns records [v*s, (v+1)*s) of that sequence, s = N // V.
   The N - V*s < V records after the last partition are not used in epoch e (a different run of
   records each epoch). Within an epoch no record is used twice.
3. A partition reads its slice in blocks of ceil(shuffle_buffer / V) records; a block is loaded
   into memory in a permuted order drawn from (seed, stream, e, v, block). Its state is "which
   block, how far in", so a resume reloads one block per partition, not the epoch. Even partitions
   walk their slice upwards and odd ones downwards, so two neighbours reach the chunk they share
   at the same time (both at the start or both at the end of the epoch) and one read serves both.
4. Draw k (one `next()` on every rank) takes records [k*c, (k+1)*c) of every partition's stream,
   where c = (records one draw takes across the cluster) / V. Physical partition p (rank *
   num_workers + worker; P of them, P dividing V) owns canonical partitions [p*V/P, (p+1)*V/P)
   and its batch is their c records each, in partition order. In rank order the batches of one
   draw form the same global batch for every P that divides V.

Reads: a physical partition reads only the chunks its canonical partitions touch, and its
partitions form one contiguous run of the rotated sequence. A chunk is read once per epoch by each
physical partition that needs it: across the cluster N records plus at most one chunk per worker
boundary and one at the rotation point. `read_schedule` replays the producer's schedule without
I/O (what the scale simulation and the read-volume numbers are computed from); `io_counters`
counts what was actually read.

Resume state is one number, `partition_records` (records each canonical partition has given out;
the same for every partition, on every rank, whatever the world size), plus the arguments that
define the order (checked on load).

I/O: each chunk is one HTTP range GET (or file read) on an I/O pool, with `prefetch` reads in
flight; the I/O thread checks its sha256 (computed while the bytes arrive, see
`Storage.read_verified`) and its values (finite, labels in range). A chunk stays in memory from
the first block that needs it to the last. The background thread copies records into their
shuffled block slots, cuts draws out of the blocks (cast to the output dtype there), and queues
them, so `next()` only takes a batch off a queue. A bad byte anywhere raises ShardError naming the
shard; nothing is skipped.
"""

from __future__ import annotations

import atexit
import hashlib
import queue
import threading
import weakref
from bisect import bisect_right
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from advflow.platform.data.shards import Manifest, ShardError, check_records, read_manifest
from advflow.platform.data.storage import RetryPolicy, Storage

__all__ = ["LatentStream", "read_manifest", "read_schedule", "ReadVolume"]

STATE_VERSION = 3  # 3: canonical partitions; 2 (data.order global / partitioned) cannot be replayed
_POLL_S = 0.1
_LIVE_PRODUCERS: "weakref.WeakSet[_Producer]" = weakref.WeakSet()


@atexit.register
def _stop_producers() -> None:
    # Daemon threads still inside torch/numpy when the interpreter tears down can abort the
    # process ("terminate called without an active exception"); stop them first.
    for p in list(_LIVE_PRODUCERS):
        p.stop_event.set()
    for p in list(_LIVE_PRODUCERS):
        p.join(timeout=5)


def _stream_key(stream: str) -> int:
    return int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")


def _manifest_digest(m: Manifest) -> str:
    """Identity of the data the order is defined over (shard names, sizes and checksums)."""
    h = hashlib.sha256()
    for s in m.shards:
        h.update(f"{s.name}:{s.records}:{s.sha256};".encode())
    h.update(f"chunk={m.chunk_records}".encode())
    return h.hexdigest()[:16]


_RESUME_HINTS = {
    "version": "the checkpoint was written by an advflow whose data order (data.order global/partitioned) "
               "predates canonical partitions and cannot be replayed; start a new run (or resume it with "
               "the advflow commit that wrote it)",
    "partitions": "the record order is defined by data.partitions: resume with the value the run was "
                  "started with (any number of workers that divides it works)",
    "shuffle_buffer": "the shuffle blocks are part of the order: resume with the data.shuffle_buffer the run "
                      "was started with",
}


def block_records(shuffle_buffer: int, partitions: int) -> int:
    """Records per shuffle block of one canonical partition: the buffer is shared by the V
    partitions, so one worker holding all of them holds about `shuffle_buffer` records."""
    return max(1, -(-shuffle_buffer // partitions))


class _Plan:
    """The record order of every canonical partition (see module doc); index arithmetic only."""

    def __init__(self, m: Manifest, seed: int, stream: str, partitions: int, shuffle: bool, block: int):
        units = [(si, a, b) for si, s in enumerate(m.shards) for a, b in m.chunk_bounds(s)]
        self.unit_len = np.array([b - a for _, a, b in units], dtype=np.int64)
        self.n = int(self.unit_len.sum())
        if self.n < partitions:
            raise ValueError(
                f"dataset has {self.n} records, fewer than partitions = {partitions}; lower data.partitions "
                "(it must stay a multiple of the number of workers) or use a bigger dataset"
            )
        self.parts = partitions
        self.s = self.n // partitions  # records of each partition per epoch
        self.seed, self.key, self.shuffle, self.block = seed, _stream_key(stream), shuffle, block
        self._epoch = -1
        self._order = self._cum = np.zeros(0, dtype=np.int64)
        self._rot = 0

    def _load_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.key, epoch, 0]))
            self._order = rng.permutation(len(self.unit_len))
            self._rot = int(rng.integers(self.n))
        else:
            self._order, self._rot = np.arange(len(self.unit_len)), 0
        self._cum = np.concatenate([[0], np.cumsum(self.unit_len[self._order])])  # (U+1,)
        self._epoch = epoch

    def num_blocks(self) -> int:
        return -(-self.s // self.block)

    def block_len(self, j: int) -> int:
        return min(self.block, self.s - j * self.block)

    def pieces(self, epoch: int, v: int, j: int) -> list[tuple[int, int, int]]:
        """[(unit, lo, hi)]: block j of partition v in `epoch` = records [lo, hi) of each listed
        chunk, in sequence order (the block's input order)."""
        self._load_epoch(epoch)
        n = self.block_len(j)
        a = j * self.block if v % 2 == 0 else self.s - j * self.block - n  # odd partitions walk down
        a += v * self.s + self._rot  # position in the permuted, unrotated sequence (mod N)
        out, left = [], n
        while left:
            p = a % self.n
            k = bisect_right(self._cum, p) - 1  # the chunk holding position p
            lo = p - int(self._cum[k])
            hi = min(int(self.unit_len[self._order[k]]), lo + left)
            out.append((int(self._order[k]), lo, hi))
            a, left = a + hi - lo, left - (hi - lo)
        return out

    def permutation(self, epoch: int, v: int, j: int, n: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.key, epoch, 1, v, j]))
        return rng.permutation(n)

    def schedule(self, epoch: int, owned: range, first_block: int = 0
                 ) -> tuple[list[tuple[int, int, list[tuple[int, int, int]]]], Counter]:
        """The blocks of `owned` partitions in the order a draw needs them (block-major: block j of
        every partition before block j + 1 of any), from `first_block`, and how many blocks use
        each chunk (a chunk read is kept until its last user has copied from it)."""
        blocks, uses = [], Counter()
        for j in range(first_block, self.num_blocks()):
            for v in owned:
                pcs = self.pieces(epoch, v, j)
                uses.update(u for u, _, _ in pcs)
                blocks.append((j, v, pcs))
        return blocks, uses


@dataclass
class ReadVolume:
    """One physical partition's reads in one epoch, from the producer's own schedule (no I/O)."""

    requests: int  # chunk reads (range GETs)
    bytes: int  # bytes read
    used_bytes: int  # bytes of the records it gives out
    peak_held_bytes: int  # most chunk bytes held at once (a chunk stays from its first user to its last)


def read_schedule(manifest: Manifest, partitions: int, world_size: int, *, seed: int = 0, stream: str = "main",
                  shuffle_buffer: int = 2048, epoch: int = 0) -> list[ReadVolume]:
    """Per physical partition (rank), what the reader reads in `epoch`: the schedule `_Producer`
    runs, replayed without reading (for the read-volume table and the scale simulation)."""
    if partitions % world_size:
        raise ValueError(f"world_size {world_size} does not divide partitions {partitions}")
    plan = _Plan(manifest, seed, stream, partitions, True, block_records(shuffle_buffer, partitions))
    rb, per = manifest.record.record_bytes, partitions // world_size
    out = []
    for p in range(world_size):
        blocks, uses = plan.schedule(epoch, range(p * per, (p + 1) * per))
        left, held, peak, seen = dict(uses), 0, 0, set()
        for _, _, pcs in blocks:
            for u, _, _ in pcs:
                if u not in seen:
                    seen.add(u)
                    held += int(plan.unit_len[u]) * rb
                    peak = max(peak, held)
            for u, _, _ in pcs:
                left[u] -= 1
                if not left[u]:
                    held -= int(plan.unit_len[u]) * rb
        out.append(ReadVolume(len(seen), int(sum(plan.unit_len[u] for u in seen)) * rb, per * plan.s * rb, peak))
    return out


_SCRATCH = threading.local()


def _has_nonfinite(x: np.ndarray) -> bool:
    """NaN/Inf test on the raw bits: a value is non-finite iff its exponent bits are all ones.
    ~3x cheaper than np.isfinite on fp16; the scratch buffer is per thread and reused."""
    if x.dtype.itemsize not in (2, 4):
        return not bool(np.isfinite(x).all())
    bits = x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)
    mag, exp = (0x7FFF, 0x7C00) if x.dtype.itemsize == 2 else (0x7FFFFFFF, 0x7F800000)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.dtype != bits.dtype or buf.size < bits.size:
        buf = _SCRATCH.buf = np.empty(bits.size, dtype=bits.dtype)
    scratch = buf[: bits.size].reshape(bits.shape)
    np.bitwise_and(bits, mag, out=scratch)
    return bool(scratch.max() >= exp) if scratch.size else False


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Read:
    """One chunk read in flight or held: its future gives (x (n, C, H, W) stored dtype, y (n,))
    views of the verified bytes; `uses` counts the blocks still to copy from it."""

    __slots__ = ("future", "uses")

    def __init__(self, future: Future, uses: int):
        self.future, self.uses = future, uses


class _Block:
    """One shuffle block of one partition: record k of the block's input order lands at
    x[dest[k]] (dest is the block's seeded permutation), so filling and shuffling are one copy.
    x/y are views of pooled buffers in the stored dtype; `pos` is how far draws have taken it."""

    __slots__ = ("n", "x", "y", "dest", "buf", "pos")

    def __init__(self, n: int, dest: np.ndarray | None, buf: tuple[np.ndarray, np.ndarray]):
        self.n, self.dest, self.buf, self.pos = n, dest, buf, 0
        self.x = buf[0][:n]  # (n, C, H, W) stored dtype
        self.y = buf[1][:n]  # (n,) int64


class _Producer(threading.Thread):
    """Background thread: walks the owned partitions' blocks in the order draws need them, keeps
    up to `prefetch` chunk reads in flight on an I/O pool (which verifies and decodes them), copies
    each finished block's records into their shuffled slots, cuts draws (c records of every owned
    partition, cast to the output dtype; batches own their memory, so block buffers are recycled)
    and queues them in order. Any error is forwarded to the consumer."""

    def __init__(self, ds: "LatentStream", plan: _Plan, owned: range, start: int, per_draw: int):
        super().__init__(daemon=True, name=f"LatentStream-{ds.stream}")
        self.ds, self.plan, self.owned, self.c = ds, plan, owned, per_draw
        self.epoch, offset = divmod(start, plan.s)
        self.first_block, self.skip = divmod(offset, plan.block)
        self.ready: dict[int, deque[_Block]] = {v: deque() for v in owned}
        self.avail = dict.fromkeys(owned, 0)  # records each partition has loaded and not given out
        self.out: queue.Queue = queue.Queue(maxsize=max(2, min(64, 2 * ds.shuffle_buffer // ds.batch_size)))
        self.stop_event = threading.Event()
        self._free: list[tuple[np.ndarray, np.ndarray]] = []
        self._stored = ds.manifest.record.numpy_dtype["x"].base
        self._as_stored = ds.out_dtype == "stored"  # batches in the stored dtype: a memcpy, no cast
        self._rows_per_copy = max(1, 32767 // int(np.prod(ds.manifest.shape)))
        # Blocks loaded ahead of the draws, at most: every owned partition's next block plus the
        # chunk reads in flight (a chunk can feed many small blocks).
        self._ahead = len(owned) * plan.block + ds.prefetch * ds.manifest.chunk_records

    def _buffer(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._free:
            shape = (self.plan.block, *self.ds.manifest.shape)
            self._free.append((np.empty(shape, self._stored), np.empty(self.plan.block, np.int64)))
        return self._free.pop()

    def _blocks(self) -> Iterator[tuple[int, int, int, list[tuple[int, int, int]], Counter]]:
        epoch, first = self.epoch, self.first_block
        while True:
            blocks, uses = self.plan.schedule(epoch, self.owned, first)
            for j, v, pcs in blocks:
                yield epoch, j, v, pcs, uses
            epoch, first = epoch + 1, 0

    def _put(self, item: Any) -> bool:
        while not self.stop_event.is_set():
            try:
                self.out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        pool = ThreadPoolExecutor(max_workers=self.ds.prefetch, thread_name_prefix="LatentStream-io")
        reads: dict[tuple[int, int], _Read] = {}
        inflight: deque[Future] = deque()
        window: deque = deque()  # (partition, block, [(read, key, lo, hi, offset)]) in need order
        loaded = 0  # records of the blocks in `window`
        try:
            for epoch, j, v, pcs, uses in self._blocks():
                if self.stop_event.is_set():
                    return
                n = self.plan.block_len(j)
                blk = _Block(n, self.plan.permutation(epoch, v, j, n), self._buffer())
                if epoch == self.epoch and j == self.first_block:
                    blk.pos = self.skip  # resuming mid-block: what the last run gave out is dropped
                entries, off = [], 0
                for unit, lo, hi in pcs:
                    key = (epoch, unit)
                    r = reads.get(key)
                    if r is None:
                        r = reads[key] = _Read(pool.submit(self.ds._fetch_chunk, unit), uses[unit])
                        inflight.append(r.future)
                    entries.append((r, key, lo, hi, off))
                    off += hi - lo
                window.append((v, blk, entries))
                loaded += n
                # Finish blocks at once when their reads are done; wait on the oldest only when
                # `prefetch` reads are in flight or enough is loaded ahead.
                while window:
                    while inflight and inflight[0].done():
                        inflight.popleft()
                    if not (len(inflight) >= self.ds.prefetch or loaded >= self._ahead
                            or all(e[0].future.done() for e in window[0][2])):
                        break
                    pv, pblk, pentries = window.popleft()
                    loaded -= pblk.n
                    self._fill(pblk, pentries, reads)
                    self.ready[pv].append(pblk)
                    self.avail[pv] += pblk.n - pblk.pos
                    while min(self.avail.values()) >= self.c:
                        if not self._put(self._make_batch()):
                            return
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer, never dropped
            self._put(_Failure(exc))
        finally:
            # Waits only for reads already running (each bounded by the storage timeouts).
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _fill(blk: _Block, entries: list, reads: dict[tuple[int, int], _Read]) -> None:
        """Copy each piece into the block's shuffled slots; drop a chunk after its last user."""
        for r, key, lo, hi, off in entries:
            x, y = r.future.result()  # re-raises read / checksum / value errors here
            dst = slice(off, off + hi - lo) if blk.dest is None else blk.dest[off:off + hi - lo]
            blk.x[dst] = x[lo:hi]
            blk.y[dst] = y[lo:hi]
            r.uses -= 1
            if not r.uses:
                del reads[key]

    def _make_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.empty((self.ds.batch_size, *self.ds.manifest.shape), dtype=self.ds._out_torch_dtype)
        y = torch.empty(self.ds.batch_size, dtype=torch.int64)
        o, step = 0, self._rows_per_copy
        xn = x.numpy() if self._as_stored else None
        for v in self.owned:
            need, q = self.c, self.ready[v]
            self.avail[v] -= need
            while need:
                blk = q[0]
                take = min(need, blk.n - blk.pos)
                if xn is not None:  # stored dtype out: one memcpy
                    np.copyto(xn[o:o + take], blk.x[blk.pos:blk.pos + take])
                else:
                    # torch's cast is vectorised (~4x numpy's fp16 loop) but splits copies above
                    # 32768 elements across its OpenMP pool, whose spin-waiting cost more CPU than
                    # the copy on small hosts; copies below that size stay on this thread.
                    src = torch.from_numpy(blk.x[blk.pos:blk.pos + take])
                    for k in range(0, take, step):
                        x[o + k:o + min(k + step, take)].copy_(src[k:k + step])
                y[o:o + take].copy_(torch.from_numpy(blk.y[blk.pos:blk.pos + take]))
                o, need, blk.pos = o + take, need - take, blk.pos + take
                if blk.pos == blk.n:
                    self._free.append(blk.buf)  # fully given out: recycle its buffers
                    q.popleft()
        return x, y


class _StreamIterator:
    """Yields (x (B, C, H, W) float32 or stored dtype, y int64 (B,)) forever; advances the counter."""

    def __init__(self, ds: "LatentStream"):
        self.ds = ds
        owned, per_draw = ds._layout()
        self.producer = _Producer(ds, ds._plan(), owned, ds._consumed, per_draw)
        _LIVE_PRODUCERS.add(self.producer)
        self.producer.start()
        self._per_draw = per_draw
        self._closed = False
        weakref.finalize(self, self.producer.stop_event.set)

    def __iter__(self) -> "_StreamIterator":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._closed:
                raise RuntimeError("this LatentStream iterator was closed (a newer iter() or load_state_dict replaced it)")
            try:
                item = self.producer.out.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.producer.is_alive():
                    raise RuntimeError("LatentStream producer thread stopped unexpectedly") from None
                continue
            if isinstance(item, _Failure):
                self.close()
                raise item.exc
            self.ds._consumed += self._per_draw  # counted before the caller sees the batch
            return item

    def close(self, wait: bool = True) -> None:
        self._closed = True
        self.producer.stop_event.set()
        if wait and self.producer is not threading.current_thread():
            self.producer.join(timeout=30)


class LatentStream(IterableDataset):
    """Infinite stream of (x, y) batches from a latent dataset prefix.

    prefix: `s3://bucket/path` or a local directory holding manifest.json and shards.
    batch_size: records per yielded batch (per rank, per DataLoader worker).
    rank, world_size: this process's place among the training ranks.
    partitions: V, the number of canonical partitions that defines the order (module doc). The
        physical partitions (world_size * num_workers) must divide it, and it must divide the
        records one draw takes across them (batch_size * world_size * num_workers). Any number of
        workers that divides V replays the same global batches, so a run resumes on it. None: the
        number of physical partitions (what a stream that never changes its world size needs).
    seed: base seed (>= 0) of every shuffle; same seed + same arguments = same stream.
    stream: name of this stream; different names give independent orders over the same data
        (the trainer uses "d" and "g" for the discriminator and generator batches).
    shuffle: False: no chunk permutation, rotation or block shuffle (with one partition: manifest
        order, for evaluation).
    shuffle_buffer: records of the in-memory shuffle blocks, shared by the V partitions (a block
        of one partition is ceil(shuffle_buffer / V) records).
    prefetch: chunk reads kept in flight by the background thread (also its I/O threads). Each
        is one chunk (<= ~16 MiB), so 4 in flight is ~64 MiB ahead of the trainer; raise it on
        high-latency links, lower it on CPU-starved hosts (each thread also hashes).
    num_workers, worker_id: partition override; by default taken from torch's DataLoader worker
        info (1 / 0 in the main process). Exact resume (state_dict) is for the main-process path;
        with DataLoader workers each worker keeps its own counter.
    out_dtype: "float32" (default, the trainer's contract) or "stored" (the manifest dtype, e.g.
        float16: no CPU cast, half the host-to-device bytes; cast on the GPU instead).
    expect_shape: if given, the manifest's record shape must equal it (model/data mismatch check).
    check_sizes: list the prefix at construction and fail fast on missing or wrong-sized shards.
    endpoint_url, retry, storage_options: see `Storage`.

    Iterating yields x: float32 (B, C, H, W), y: int64 (B,). Calling iter() again (or after
    load_state_dict) continues from the current state; one live iterator per instance.
    """

    def __init__(
        self,
        prefix: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        partitions: int | None = None,
        seed: int = 0,
        stream: str = "main",
        shuffle: bool = True,
        shuffle_buffer: int = 4096,
        prefetch: int = 4,
        out_dtype: str = "float32",
        num_workers: int | None = None,
        worker_id: int | None = None,
        expect_shape: tuple[int, ...] | None = None,
        check_sizes: bool = True,
        endpoint_url: str | None = None,
        retry: RetryPolicy | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got rank={rank}")
        if partitions is not None and partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 record, got {shuffle_buffer}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if out_dtype not in ("float32", "stored"):
            raise ValueError(f"out_dtype must be 'float32' or 'stored', got {out_dtype!r}")
        if (num_workers is None) != (worker_id is None):
            raise ValueError("pass both num_workers and worker_id, or neither")
        if num_workers is not None and not 0 <= worker_id < num_workers:  # type: ignore[operator]
            raise ValueError(f"worker_id must be in [0, num_workers={num_workers}), got {worker_id}")
        self.prefix, self.batch_size = prefix, int(batch_size)
        self.rank, self.world_size, self.seed, self.stream = rank, world_size, int(seed), str(stream)
        self.shuffle, self.shuffle_buffer, self.prefetch = bool(shuffle), int(shuffle_buffer), int(prefetch)
        self._partitions = partitions
        self._worker_override = (num_workers, worker_id) if num_workers is not None else None
        self._layout()  # checked here for this process; DataLoader workers check again at iter()
        self.storage = Storage(prefix, endpoint_url=endpoint_url, retry=retry, storage_options=storage_options)
        self.manifest = read_manifest(self.storage)
        if expect_shape is not None and tuple(expect_shape) != self.manifest.shape:
            raise ValueError(
                f"{self.storage.url('manifest.json')}: records have shape {list(self.manifest.shape)} but "
                f"expect_shape is {list(expect_shape)}; the dataset was made with another encoder/resolution"
            )
        if check_sizes:
            self._check_sizes()
        self._digest = _manifest_digest(self.manifest)
        self.out_dtype = out_dtype
        self._out_torch_dtype = torch.float32 if out_dtype == "float32" else \
            torch.from_numpy(np.zeros(1, self.manifest.record.numpy_dtype["x"].base)).dtype
        # Canonical chunk numbering shared with _Plan: (shard index, first record, record count).
        self._unit_table = [(si, a, b - a) for si, s in enumerate(self.manifest.shards)
                            for a, b in self.manifest.chunk_bounds(s)]
        self._plan()  # a dataset smaller than the partitions fails here, not in the thread
        self._consumed = 0
        self._io_lock = threading.Lock()
        self._io = {"requests": 0, "bytes": 0}
        self._values_ok: set[int] = set()  # chunks whose values passed (see _fetch_chunk)
        self._live: weakref.ReferenceType | None = None

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started with 'spawn' pickle the dataset; a live iterator and the
        # lock stay behind.
        state = self.__dict__.copy()
        state["_live"] = None
        state["_io_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._io_lock = threading.Lock()

    # -- metadata -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return self.manifest.shape

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def _physical(self) -> tuple[int, int]:
        """(p, P): this physical partition and how many there are."""
        if self._worker_override is not None:
            nw, wid = self._worker_override
        else:
            info = get_worker_info()
            nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * nw + wid, self.world_size * nw

    @property
    def partitions(self) -> int:
        return self._partitions if self._partitions is not None else self._physical()[1]

    def _layout_error(self, physical: int) -> None:
        v = self.partitions
        if v % physical:
            fits = [w for w in range(1, v + 1) if v % w == 0]
            raise ValueError(f"partitions {v} is not divisible by the {physical} physical partitions "
                             f"(world_size x DataLoader workers); the order of partitions {v} replays on "
                             f"{fits} of them: use one of those, or another data.partitions")
        raise ValueError(f"partitions {v} does not divide the {self.batch_size * physical} records one draw "
                         f"takes (batch_size {self.batch_size} x {physical} physical partitions), so the "
                         f"partitions cannot give out equal shares: pick data.partitions dividing it")

    def _layout(self) -> tuple[range, int]:
        """(the canonical partitions this physical partition owns, records each gives per draw)."""
        p, phys = self._physical()
        v = self.partitions
        if v % phys or (self.batch_size * phys) % v:
            self._layout_error(phys)
        per = v // phys
        return range(p * per, (p + 1) * per), self.batch_size * phys // v

    def _plan(self) -> _Plan:
        v = self.partitions
        return _Plan(self.manifest, self.seed, self.stream, v, self.shuffle, block_records(self.shuffle_buffer, v))

    @property
    def epoch_records(self) -> int:
        """Records each canonical partition gives out per epoch (the epoch uses V times that)."""
        return self.manifest.num_records // self.partitions

    def _check_sizes(self) -> None:
        listed = self.storage.list_sizes()
        for s in self.manifest.shards:
            uri = self.storage.url(s.name)
            if s.name not in listed:
                raise ShardError(f"{uri}: listed in the manifest but missing from the prefix")
            if listed[s.name] != s.bytes:
                kind = "truncated" if listed[s.name] < s.bytes else "larger than the manifest says"
                raise ShardError(f"{uri}: {kind}: object has {listed[s.name]} bytes, manifest says {s.bytes} "
                                 f"({s.records} records x {self.manifest.record.record_bytes} bytes); "
                                 "re-run the prepare job")

    # -- reading ---------------------------------------------------------------------------------
    def _fetch_chunk(self, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """Read one chunk, verify its sha256 and values; (x, y) views of its bytes. Runs in the
        I/O threads (the read, the hash and the numpy checks release the GIL)."""
        m = self.manifest
        si, first, n = self._unit_table[unit]
        shard = m.shards[si]
        uri = self.storage.url(shard.name)
        rb = m.record.record_bytes
        start, end = first * rb, (first + n) * rb
        try:
            data, digest = self.storage.read_verified(shard.name, start, end)
        except FileNotFoundError as exc:
            raise ShardError(f"{uri}: listed in the manifest but missing (read of bytes {start}-{end})") from exc
        with self._io_lock:
            self._io["requests"] += 1
            self._io["bytes"] += len(data)
        if len(data) != end - start:
            raise ShardError(f"{uri}: truncated: bytes {start}-{end} requested, {len(data)} returned; "
                             f"manifest says the shard has {shard.bytes} bytes")
        chunk_index = first // m.chunk_records
        if digest != shard.chunk_sha256[chunk_index]:
            raise ShardError(f"{uri}: checksum mismatch in chunk {chunk_index} (records {first}-{first + n - 1}, "
                             f"bytes {start}-{end}): sha256 {digest[:12]}..., manifest "
                             f"{shard.chunk_sha256[chunk_index][:12]}...; the shard is corrupted")
        x, y = m.record.decode(data)  # strided views into `data`
        # The value check is a function of the bytes, and the sha256 above proved them the ones
        # already checked: once per chunk and process (from the second epoch on it is free).
        if unit not in self._values_ok:
            if _has_nonfinite(x) or ((y < 0) | (y >= m.num_classes)).any():
                check_records(x, y, m.num_classes, uri, first_index=first)  # slow path: names the record
            self._values_ok.add(unit)
        return x, y

    def io_counters(self) -> dict[str, int]:
        """Chunk reads this stream made and the bytes they returned (retries not counted: see
        `Storage.io_counters` for requests on the wire)."""
        with self._io_lock:
            return dict(self._io)

    def __iter__(self) -> _StreamIterator:
        self._close_live()
        it = _StreamIterator(self)
        self._live = weakref.ref(it)
        return it

    def _close_live(self) -> None:
        live = self._live() if self._live is not None else None
        if live is not None:
            live.close()
        self._live = None

    def close(self) -> None:
        """Stop the background thread of the live iterator (also happens when it is garbage collected)."""
        self._close_live()

    # -- resume ------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """What defines the record order: not the world size, not the batch size."""
        return {"seed": self.seed, "stream": self.stream, "partitions": self.partitions, "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer, "num_records": self.manifest.num_records,
                "dataset": self._digest}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: `partition_records` (the same for every partition, on every
        rank) plus the arguments that define the order. epoch / offset_in_epoch are for humans."""
        epoch, offset = divmod(self._consumed, self.epoch_records)
        return {"version": STATE_VERSION, "partition_records": self._consumed, "epoch": epoch,
                "offset_in_epoch": offset, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batch of a new iterator is exactly the batch an
        uninterrupted run would have produced, on any world size that divides the partitions.
        Raises ValueError naming any field whose value differs from this stream's arguments."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state 'version' is {state.get('version')!r}, expected {STATE_VERSION}: "
                             f"{_RESUME_HINTS['version']}")
        for key, mine in self._identity().items():
            if state.get(key) != mine:
                raise ValueError(
                    f"reader state field {key!r} is {state.get(key)!r} but this stream has {mine!r}; "
                    f"{_RESUME_HINTS.get(key, 'build the LatentStream with the same arguments and data to resume exactly')}"
                )
        consumed = state.get("partition_records")
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"reader state field 'partition_records' must be an int >= 0, got {consumed!r}")
        self._close_live()
        self._consumed = consumed
