"""LatentStream: an infinite, shuffled, partitioned, exactly resumable stream of latent batches.

How the order is defined (a pure function of manifest, seed, stream name and partition; nothing
about it depends on timing, so it can be recomputed after a restart without reading data):
1. Epoch e: the dataset's chunks (fixed runs of records, each checksummed in the manifest; a shard
   is one or more chunks) are permuted with a generator seeded by (seed, stream, e). Concatenated,
   they form one sequence of N records, the same on every rank.
2. How that sequence is shared among the P = world_size * num_workers partitions (partition
   p = rank * num_workers + worker) depends on `order`:
   - "global" (the default): the sequence is read whole; it is cut into slots of `batch_size`
     records, and partition p takes slots p, p + P, p + 2P, ... So P consecutive slots form one
     global batch of P * batch_size records, and the global batches are the same for any P with
     the same P * batch_size: a run can resume on another number of workers (elastic) and see the
     same global batches. Every partition reads every chunk (P-fold read amplification; each keeps
     1/P of the records).
   - "partitioned": the sequence is cut into P contiguous slices of N//P or N//P+1 records and
     partition p reads slice p only (no amplification), so the data seen depends on P and resume
     needs the same P.
   Either way, within an epoch every record is read exactly once across the partitions.
3. The sequence a partition reads (the whole epoch, or its slice) is cut into blocks of
   `shuffle_buffer` records; a block is loaded into memory in a permuted order drawn from a
   generator seeded by (seed, stream, e, p, block) ("global": p = 0, the same on every partition).
   This is the in-memory shuffle buffer; unlike a reservoir buffer its state is just "which block,
   how far in", so resume reloads one block instead of replaying the epoch.
4. Batches are consecutive records (of this partition's slots); they run across block and epoch
   boundaries.

Resume state is therefore one number, `records_consumed` (equal on every rank, since all ranks take
the same number of steps; "global": records of the global sequence, whatever P), plus the arguments
that define the order (checked on load).

Reads: each chunk is one HTTP range GET (or file read). A background thread keeps `prefetch`
chunk reads in flight on an I/O pool; each I/O thread checks its chunk's sha256 against the
manifest and its values (finite, labels in range), then copies the records straight into their
shuffled slots of the block (one copy, in the stored dtype, into recycled buffers). The background
thread cuts finished blocks into ready batches (cast to float32 there), so `next()` only takes a
batch off a queue. A bad byte anywhere raises ShardError naming the shard; nothing is skipped.
"""

from __future__ import annotations

import atexit
import hashlib
import queue
import threading
import weakref
from bisect import bisect_right
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from advflow.platform.data.shards import Manifest, ShardError, check_records, read_manifest
from advflow.platform.data.storage import RetryPolicy, Storage

__all__ = ["LatentStream", "read_manifest"]

STATE_VERSION = 2  # 2: `order` ("global" streams resume on another world size)
ORDERS = ("global", "partitioned")
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
    "world_size": "order 'partitioned' ties the data to the number of workers: resume with the same number, "
                  "or train with data.order 'global' (resumes on any number of workers)",
    "global_batch": "the global batch (workers x micro batch) must stay the same to resume exactly: keep "
                    "train.global_batch and train.grad_accum as the run had them",
}


class _Plan:
    """The record order of one partition (see module doc); cheap, index arithmetic only."""

    def __init__(self, m: Manifest, seed: int, stream: str, part: int, parts: int, shuffle: bool, block: int):
        units = [(si, a, b) for si, s in enumerate(m.shards) for a, b in m.chunk_bounds(s)]
        self.unit_shard = np.array([u[0] for u in units], dtype=np.int64)
        self.unit_start = np.array([u[1] for u in units], dtype=np.int64)  # first record in shard
        self.unit_len = np.array([u[2] - u[1] for u in units], dtype=np.int64)
        self.n = int(self.unit_len.sum())
        if self.n < parts:
            raise ValueError(
                f"dataset has {self.n} records, fewer than world_size * num_workers = {parts} "
                "partitions; use fewer ranks/workers or a bigger dataset"
            )
        self.begin = part * self.n // parts
        self.end = (part + 1) * self.n // parts
        self.size = self.end - self.begin  # records of this partition per epoch
        self.seed, self.key, self.part, self.shuffle, self.block = seed, _stream_key(stream), part, shuffle, block
        self._epoch = -1
        self._order = self._cum = np.zeros(0, dtype=np.int64)

    def _load_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.key, epoch, 0]))
            self._order = rng.permutation(len(self.unit_len))
        else:
            self._order = np.arange(len(self.unit_len))
        self._cum = np.concatenate([[0], np.cumsum(self.unit_len[self._order])])  # (U+1,)
        self._epoch = epoch

    def num_blocks(self) -> int:
        return -(-self.size // self.block)

    def block_len(self, j: int) -> int:
        return min(self.block, self.size - j * self.block)

    def pieces(self, epoch: int, j: int) -> list[tuple[int, int, int]]:
        """[(unit, lo, hi)]: block j of `epoch` = records [lo, hi) of each listed chunk, in order."""
        self._load_epoch(epoch)
        a = self.begin + j * self.block
        b = a + self.block_len(j)
        out = []
        k = bisect_right(self._cum, a) - 1  # the chunk holding global position a
        while a < b:
            unit = int(self._order[k])
            lo = a - int(self._cum[k])
            hi = min(int(self._cum[k + 1]), b) - int(self._cum[k])
            out.append((unit, lo, hi))
            a += hi - lo
            k += 1
        return out

    def permutation(self, epoch: int, j: int, n: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.key, epoch, 1, self.part, j]))
        return rng.permutation(n)


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


class _Block:
    """One shuffle block being filled: record k of the block's input order lands at x[dest[k]]
    (dest is the block's seeded permutation), so filling and shuffling are the same single copy.
    x/y are views of pooled buffers in the stored dtype (no per-block allocation, no page faults)."""

    __slots__ = ("n", "x", "y", "dest", "remaining", "buf")

    def __init__(self, n: int, dest: np.ndarray | None, buf: tuple[np.ndarray, np.ndarray]):
        self.n, self.remaining, self.dest, self.buf = n, n, dest, buf
        self.x = buf[0][:n]  # (n, C, H, W) stored dtype
        self.y = buf[1][:n]  # (n,) int64


class _Producer(threading.Thread):
    """Background thread: schedules chunk reads (up to `prefetch` in flight on an I/O pool, which
    also verifies, decodes and scatters them into their shuffle blocks), then cuts finished
    blocks into batches (cast to the output dtype; batches own their memory, so block buffers
    are recycled) and queues them in order. Any error is forwarded to the consumer."""

    def __init__(self, ds: "LatentStream", plan: _Plan, start: int, slot: tuple[int, int] = (0, 1)):
        super().__init__(daemon=True, name=f"LatentStream-{ds.stream}")
        self.ds, self.plan = ds, plan
        self.epoch, offset = divmod(start, plan.size)
        self.block, self.skip = divmod(offset, plan.block)
        # order "global": this partition keeps the batch_size-record slots s with s % slots == mine
        # of the sequence it reads; `pos` is that sequence's position (start is slot-aligned).
        self.mine, self.slots = slot
        self.pos = start
        # Ready batches: about two shuffle blocks' worth, at least two.
        self.out: queue.Queue = queue.Queue(maxsize=max(2, min(64, 2 * plan.block // ds.batch_size)))
        self.stop_event = threading.Event()
        self._free: list[tuple[np.ndarray, np.ndarray]] = []
        self._stored = ds.manifest.record.numpy_dtype["x"].base
        self._parts: list[tuple[_Block, int, int]] = []  # pieces of the batch being assembled
        self._have = 0
        self._rows_per_copy = max(1, 32767 // int(np.prod(ds.manifest.shape)))

    def _new_block(self, n: int, dest: np.ndarray | None) -> _Block:
        if not self._free:
            shape = (self.plan.block, *self.ds.manifest.shape)
            self._free.append((np.empty(shape, self._stored), np.empty(self.plan.block, np.int64)))
        return _Block(n, dest, self._free.pop())

    def _chunk_stream(self) -> Iterator[tuple[int, list[tuple[_Block, int, int, int]]]]:
        """(unit, [(block, offset in block, lo, hi)]) per chunk read, in stream order. A chunk cut
        by a block boundary is one read feeding two blocks."""
        epoch, j = self.epoch, self.block
        pending: tuple[int, list] | None = None
        while True:
            n = self.plan.block_len(j)
            blk = self._new_block(n, self.plan.permutation(epoch, j, n))
            off = 0
            for unit, lo, hi in self.plan.pieces(epoch, j):
                if pending is not None and pending[0] == unit:
                    pending[1].append((blk, off, lo, hi))
                else:
                    if pending is not None:
                        yield pending
                    pending = (unit, [(blk, off, lo, hi)])
                off += hi - lo
            j += 1
            if j == self.plan.num_blocks():
                epoch, j = epoch + 1, 0
                # Never merge reads across epochs: a one-chunk dataset would otherwise extend the
                # same pending read forever and never yield.
                if pending is not None:
                    yield pending
                    pending = None

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
        try:
            window: deque = deque()  # (future, pieces) in stream order
            for unit, pieces in self._chunk_stream():
                if self.stop_event.is_set():
                    return
                window.append((pool.submit(self.ds._fetch_chunk, unit, pieces), pieces))
                # Retire finished reads at once (blocks go out as soon as they are whole); block
                # on the oldest only when `prefetch` reads are in flight.
                while window and (len(window) >= self.ds.prefetch or window[0][0].done()):
                    fut, done_pieces = window.popleft()
                    fut.result()  # re-raises read / checksum / value errors here
                    for blk, _, lo, hi in done_pieces:
                        blk.remaining -= hi - lo
                        # Pieces arrive in stream order, so blocks complete in order.
                        if blk.remaining == 0 and not self._emit(blk):
                            return
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer, never dropped
            self._put(_Failure(exc))
        finally:
            # Waits only for reads already running (each bounded by the storage timeouts).
            pool.shutdown(wait=True, cancel_futures=True)

    def _emit(self, blk: _Block) -> bool:
        """Cut a finished block into batches; batches run across block (and epoch) boundaries."""
        pos, self.skip = self.skip, 0  # resuming mid-block: drop what the last run consumed
        bsz = self.ds.batch_size
        while pos < blk.n:
            slot, into = divmod(self.pos, bsz)
            take = min(bsz - into, blk.n - pos)
            if slot % self.slots == self.mine:  # another partition's slot is skipped whole
                self._parts.append((blk, pos, pos + take))
                self._have += take
            pos += take
            self.pos += take
            if self._have == bsz and not self._put(self._make_batch()):
                return False
        if blk.buf is not None and all(b is not blk for b, _, _ in self._parts):
            self._free.append(blk.buf)  # none of its records wait in a batch being cut: recycle it
            blk.buf = None
        return True

    def _make_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.empty((self.ds.batch_size, *self.ds.manifest.shape), dtype=self.ds._out_torch_dtype)
        y = torch.empty(self.ds.batch_size, dtype=torch.int64)
        o = 0
        step = self._rows_per_copy
        for blk, a, b in self._parts:
            src = torch.from_numpy(blk.x[a:b])
            # torch's cast is vectorised (~4x numpy's fp16 loop) but splits copies above 32768
            # elements across its OpenMP pool, whose spin-waiting cost more CPU than the copy on
            # small hosts; copies below that size stay on this thread.
            for k in range(0, b - a, step):
                x[o + k:o + min(k + step, b - a)].copy_(src[k:k + step])
            y[o:o + b - a].copy_(torch.from_numpy(blk.y[a:b]))
            o += b - a
        # Every block but the one still being cut is fully copied out: recycle its buffers.
        tail_blk, _, tail_end = self._parts[-1]
        keep = tail_blk if tail_end < tail_blk.n else None
        for blk, _, _ in self._parts:
            if blk is not keep and blk.buf is not None:
                self._free.append(blk.buf)
                blk.buf = None
        self._parts, self._have = [], 0
        return x, y


class _StreamIterator:
    """Yields (x (B, C, H, W) float32 or stored dtype, y int64 (B,)) forever; advances the counter."""

    def __init__(self, ds: "LatentStream", plan: _Plan):
        self.ds = ds
        self.producer = _Producer(ds, plan, ds._consumed, ds._slot())
        _LIVE_PRODUCERS.add(self.producer)
        self.producer.start()
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
            self.ds._consumed += self.ds._stride  # counted before the caller sees the batch
            return item

    def close(self, wait: bool = True) -> None:
        self._closed = True
        self.producer.stop_event.set()
        if wait and self.producer is not threading.current_thread():
            self.producer.join(timeout=30)


class LatentStream(IterableDataset):
    """Infinite stream of (x, y) batches from a latent dataset prefix.

    prefix: `s3://bucket/path` or a local directory holding manifest.json and shards.
    batch_size: records per yielded batch (per rank).
    rank, world_size: this process's place among the training ranks.
    seed: base seed (>= 0) of every shuffle; same seed + same arguments = same stream.
    stream: name of this stream; different names give independent orders over the same data
        (the trainer uses "d" and "g" for the discriminator and generator batches).
    shuffle: False streams chunks in manifest order without block shuffling (evaluation).
    order: "global" (default: the global batches are the same for any world_size with the same
        world_size * batch_size, so a run resumes on another number of workers) or "partitioned"
        (each partition reads only its slice: 1/world_size of the I/O, resume on the same world
        size only). See the module doc.
    shuffle_buffer: records per in-memory shuffle block (memory ~ 3 blocks of float32 latents).
    prefetch: chunk reads kept in flight by the background thread (also its I/O threads). Each
        is one chunk (<= ~16 MiB), so 4 in flight is ~64 MiB ahead of the trainer; raise it on
        high-latency links, lower it on CPU-starved hosts (each thread also hashes and casts).
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
        seed: int = 0,
        stream: str = "main",
        shuffle: bool = True,
        order: str = "global",
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
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 record, got {shuffle_buffer}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if out_dtype not in ("float32", "stored"):
            raise ValueError(f"out_dtype must be 'float32' or 'stored', got {out_dtype!r}")
        if (num_workers is None) != (worker_id is None):
            raise ValueError("pass both num_workers and worker_id, or neither")
        if num_workers is not None and not 0 <= worker_id < num_workers:  # type: ignore[operator]
            raise ValueError(f"worker_id must be in [0, num_workers={num_workers}), got {worker_id}")
        self.prefix, self.batch_size = prefix, int(batch_size)
        self.rank, self.world_size, self.seed, self.stream = rank, world_size, int(seed), str(stream)
        self.shuffle, self.shuffle_buffer, self.prefetch = bool(shuffle), int(shuffle_buffer), int(prefetch)
        self.order = order
        self._worker_override = (num_workers, worker_id) if num_workers is not None else None
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
        self._consumed = 0
        self._live: weakref.ReferenceType | None = None

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started with 'spawn' pickle the dataset; a live iterator stays behind.
        state = self.__dict__.copy()
        state["_live"] = None
        return state

    # -- metadata -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return self.manifest.shape

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def _partition(self) -> tuple[int, int]:
        if self._worker_override is not None:
            nw, wid = self._worker_override
        else:
            info = get_worker_info()
            nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * nw + wid, self.world_size * nw

    def _plan(self) -> _Plan:
        part, parts = self._partition() if self.order == "partitioned" else (0, 1)
        return _Plan(self.manifest, self.seed, self.stream, part, parts, self.shuffle, self.shuffle_buffer)

    def _slot(self) -> tuple[int, int]:
        """(mine, slots): which batch_size-record slots of the sequence it reads this partition keeps."""
        return self._partition() if self.order == "global" else (0, 1)

    @property
    def _stride(self) -> int:
        """Records of the read sequence that one batch of this partition advances (every partition
        takes one batch per step, so "global" advances by all P slots)."""
        return self.batch_size * self._slot()[1]

    @property
    def epoch_records(self) -> int:
        """Records of the sequence this partition reads per epoch (its slice, or the whole epoch)."""
        return self._plan().size

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
    def _fetch_chunk(self, unit: int, pieces: list[tuple[_Block, int, int, int]]) -> None:
        """Read one chunk, verify its sha256 and values, and copy its records into their blocks.
        Runs in the I/O threads (hashing and numpy copies release the GIL)."""
        m = self.manifest
        si, first, n = self._unit_table[unit]
        shard = m.shards[si]
        uri = self.storage.url(shard.name)
        rb = m.record.record_bytes
        start, end = first * rb, (first + n) * rb
        try:
            data = self.storage.read(shard.name, start, end)
        except FileNotFoundError as exc:
            raise ShardError(f"{uri}: listed in the manifest but missing (read of bytes {start}-{end})") from exc
        if len(data) != end - start:
            raise ShardError(f"{uri}: truncated: bytes {start}-{end} requested, {len(data)} returned; "
                             f"manifest says the shard has {shard.bytes} bytes")
        chunk_index = first // m.chunk_records
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.chunk_sha256[chunk_index]:
            raise ShardError(f"{uri}: checksum mismatch in chunk {chunk_index} (records {first}-{first + n - 1}, "
                             f"bytes {start}-{end}): sha256 {digest[:12]}..., manifest "
                             f"{shard.chunk_sha256[chunk_index][:12]}...; the shard is corrupted")
        x, y = m.record.decode(data)  # strided views into `data`
        if _has_nonfinite(x) or ((y < 0) | (y >= m.num_classes)).any():
            check_records(x, y, m.num_classes, uri, first_index=first)  # slow path: names the record
        for blk, off, lo, hi in pieces:
            dst = slice(off, off + hi - lo) if blk.dest is None else blk.dest[off:off + hi - lo]
            blk.x[dst] = x[lo:hi]  # cast to the output dtype and shuffle in one copy
            blk.y[dst] = y[lo:hi]

    def __iter__(self) -> _StreamIterator:
        self._close_live()
        it = _StreamIterator(self, self._plan())
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
        """What defines the record order. "global" does not depend on the number of partitions,
        only on the global batch (P * batch_size), so it resumes on any world size that keeps it."""
        out = {"seed": self.seed, "stream": self.stream, "order": self.order, "shuffle": self.shuffle,
               "shuffle_buffer": self.shuffle_buffer, "num_records": self.manifest.num_records,
               "dataset": self._digest}
        if self.order == "partitioned":
            out.update(world_size=self.world_size, num_workers=self._partition()[1] // self.world_size)
        else:
            out["global_batch"] = self._stride
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: `records_consumed` (the same on every rank; "global": of the
        global sequence) plus the arguments that define the order. epoch / offset_in_epoch are for
        humans (of the sequence this partition reads)."""
        epoch, offset = divmod(self._consumed, self._plan().size)
        return {"version": STATE_VERSION, "records_consumed": self._consumed, "epoch": epoch,
                "offset_in_epoch": offset, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batch of a new iterator is exactly the batch an
        uninterrupted run would have produced. Raises ValueError naming any field whose value
        differs from this stream's arguments (the order would not be the same)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state 'version' is {state.get('version')!r}, expected {STATE_VERSION}")
        for key, mine in self._identity().items():
            if state.get(key) != mine:
                raise ValueError(
                    f"reader state field {key!r} is {state.get(key)!r} but this stream has {mine!r}; "
                    f"{_RESUME_HINTS.get(key, 'build the LatentStream with the same arguments and data to resume exactly')}"
                )
        consumed = state.get("records_consumed")
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"reader state field 'records_consumed' must be an int >= 0, got {consumed!r}")
        self._close_live()
        self._consumed = consumed
