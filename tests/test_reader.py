"""LatentStream: partitioning, seeded shuffling, exact resume, independent streams; local and S3."""

from __future__ import annotations

import json
import time

import pytest
import torch

from advflow.platform.data.reader import LatentStream, read_manifest
from helpers_data import ids_of, make_dataset

N = 300  # records; shards of 50, chunks of 16: chunk and block boundaries fall mid-shard


def _take(it, batches: int) -> list[list[int]]:
    return [ids_of(next(it)[0]) for _ in range(batches)]


def _stream(prefix: str, **kw) -> LatentStream:
    kw.setdefault("batch_size", 7)
    kw.setdefault("shuffle_buffer", 40)
    kw.setdefault("prefetch", 3)
    return LatentStream(prefix, **kw)


def test_batches_have_contract_types(storage_root):
    make_dataset(storage_root, N)
    ds = _stream(storage_root)
    x, y = next(iter(ds))
    assert x.dtype == torch.float32 and x.shape == (7, 2, 3, 3)
    assert y.dtype == torch.int64 and y.shape == (7,)
    # labels travel with their records: make_dataset sets y = id % num_classes
    assert y.tolist() == [i % 7 for i in ids_of(x)]
    ds.close()


@pytest.mark.parametrize("order", ["global", "partitioned"])
def test_two_ranks_two_workers_cover_each_epoch_exactly_once(storage_root, order):
    make_dataset(storage_root, N)
    epochs: list[list[int]] = [[], []]
    for rank in range(2):
        for worker in range(2):
            ds = _stream(storage_root, batch_size=1, rank=rank, world_size=2, num_workers=2,
                         worker_id=worker, seed=3, order=order)
            # "global": every partition reads the whole epoch and keeps every 4th record
            per_epoch = ds.epoch_records // 4 if order == "global" else ds.epoch_records
            got = [i for b in _take(iter(ds), 2 * per_epoch) for i in b]
            ds.close()
            epochs[0] += got[:per_epoch]
            epochs[1] += got[per_epoch:]
    for e, seen in enumerate(epochs):
        assert sorted(seen) == list(range(N)), f"epoch {e}: union is not exactly the dataset"


@pytest.mark.integration
def test_dataloader_workers_read_disjoint_partitions(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, N)
    ds = _stream(prefix, batch_size=5, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    it = iter(loader)
    per_worker: list[set[int]] = [set(), set()]
    for k in range(20):  # DataLoader alternates workers in order
        per_worker[k % 2].update(ids_of(next(it)[0]))
    del it
    assert len(per_worker[0]) == 50 and len(per_worker[1]) == 50
    assert not per_worker[0] & per_worker[1]


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, N)
    a = [i for b in _take(iter(_stream(prefix, batch_size=N, seed=5)), 2) for i in b]
    b = [i for b in _take(iter(_stream(prefix, batch_size=N, seed=5)), 2) for i in b]
    c = [i for b in _take(iter(_stream(prefix, batch_size=N, seed=6)), 1) for i in b]
    assert a == b, "same seed must give the same stream"
    assert sorted(a[:N]) == sorted(a[N:]) == list(range(N))  # one batch = one epoch here
    assert a[:N] != a[N:], "epochs must be shuffled differently"
    assert a[:N] != c, "different seeds must give different orders"
    assert a[:N] != list(range(N))


def test_no_shuffle_streams_in_manifest_order(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, N)
    got = _take(iter(_stream(prefix, batch_size=100, shuffle=False)), 4)
    assert [i for b in got for i in b] == list(range(N)) + list(range(100))


def test_two_streams_are_independent_and_each_complete(storage_root):
    make_dataset(storage_root, N)
    d = [i for b in _take(iter(_stream(storage_root, batch_size=N, stream="d")), 1) for i in b]
    g = [i for b in _take(iter(_stream(storage_root, batch_size=N, stream="g")), 1) for i in b]
    assert sorted(d) == sorted(g) == list(range(N))
    assert d != g
    same_pos = sum(a == b for a, b in zip(d, g))
    assert same_pos < 10, f"{same_pos} identical positions: streams look correlated"


@pytest.mark.parametrize("order", ["global", "partitioned"])
@pytest.mark.parametrize("rank", [0, 1])
def test_exact_resume_mid_shard_mid_epoch(storage_root, rank, order):
    make_dataset(storage_root, N)
    kw = dict(rank=rank, world_size=2, seed=11, stream="g", order=order)
    ref = _stream(storage_root, **kw)
    it = iter(ref)
    _take(it, 13)  # partitioned: 91 of the partition's 150 records; global: 182 of 300. Mid-block, mid-epoch
    state = json.loads(json.dumps(ref.state_dict()))  # must survive a JSON checkpoint
    assert state["epoch"] == 0 and 0 < state["offset_in_epoch"] < ref.epoch_records
    assert state["offset_in_epoch"] % 40 != 0  # not on a block boundary
    expected = _take(it, 40)  # runs past the end of the epoch (global: past two)
    ref.close()

    resumed = _stream(storage_root, **kw)
    resumed.load_state_dict(state)
    assert _take(iter(resumed), 40) == expected
    per_batch = 7 * (2 if order == "global" else 1)  # global: records of the global sequence
    assert resumed.state_dict()["records_consumed"] == state["records_consumed"] + 40 * per_batch
    resumed.close()


def test_resume_refuses_a_different_order(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, N)
    state = _stream(prefix, seed=1).state_dict()
    with pytest.raises(ValueError, match="'seed' is 1 but this stream has 2"):
        _stream(prefix, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="'shuffle_buffer'"):
        _stream(prefix, seed=1, shuffle_buffer=41).load_state_dict(state)


def _global_batches(prefix: str, world: int, batch: int, n: int, state: dict | None = None, **kw):
    """n global batches of a `world`-rank "global" stream: rank r's batch k is the r-th slice of
    global batch k. Returns (batches, the state after them)."""
    streams = [_stream(prefix, rank=r, world_size=world, batch_size=batch, **kw) for r in range(world)]
    its = []
    for s in streams:
        if state is not None:
            s.load_state_dict(state)
        its.append(iter(s))
    out = [[i for it in its for i in ids_of(next(it)[0])] for _ in range(n)]
    states = [s.state_dict() for s in streams]
    for s in streams:
        s.close()
    assert all(st["records_consumed"] == states[0]["records_consumed"] for st in states)
    return out, json.loads(json.dumps(states[0]))


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3)])
def test_global_order_resumes_on_another_world_size(tmp_path, before, after):
    """Elastic resume: the global batches do not depend on the number of ranks (same global
    batch), so a state written by `before` ranks continues on `after` ranks with the batches an
    uninterrupted run has, and every epoch still reads each record once."""
    prefix = str(tmp_path / "d")
    make_dataset(prefix, N)
    gb, kw = 12, dict(seed=9, stream="d", shuffle_buffer=40)
    reference, _ = _global_batches(prefix, 1, gb, 60, **kw)  # 720 records: past two epochs
    head, state = _global_batches(prefix, before, gb // before, 17, **kw)  # 204: mid-block, mid-epoch
    tail, _ = _global_batches(prefix, after, gb // after, 43, state=state, **kw)
    assert head + tail == reference
    flat = [i for b in reference for i in b]
    assert sorted(flat[:N]) == sorted(flat[N:2 * N]) == list(range(N))
    with pytest.raises(ValueError, match="'global_batch' is 12 but this stream has 10.*train.global_batch"):
        _stream(prefix, batch_size=5, rank=0, world_size=2, **kw).load_state_dict(state)


def test_partitioned_order_refuses_another_world_size(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, N)
    state = _stream(prefix, rank=0, world_size=2, order="partitioned").state_dict()
    with pytest.raises(ValueError, match="'world_size' is 2 but this stream has 1.*data.order 'global'"):
        _stream(prefix, order="partitioned").load_state_dict(state)


def test_load_state_restarts_a_live_iterator(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, N)
    ds = _stream(prefix, seed=4)
    it = iter(ds)
    first = _take(it, 3)
    ds.load_state_dict({**ds.state_dict(), "records_consumed": 0})
    with pytest.raises(RuntimeError, match="closed"):
        next(it)
    assert _take(iter(ds), 3) == first


def test_read_manifest_exposes_metadata(storage_root):
    make_dataset(storage_root, N)
    m = read_manifest(storage_root)
    assert (m.shape, m.num_classes, m.scaling_factor, m.encoder["name"]) == ((2, 3, 3), 7, 1.0, "pixel")
    assert len(m.channel_mean) == len(m.channel_std) == 2


def test_rejects_more_partitions_than_records(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, 3, shard_records=3)
    with pytest.raises(ValueError, match="fewer than world_size"):
        iter(LatentStream(prefix, 1, rank=0, world_size=4, order="partitioned"))
    # "global" needs no slice per partition: the 4 ranks take turns over the whole sequence
    firsts = [ids_of(next(iter(LatentStream(prefix, 1, rank=r, world_size=4, shuffle=False)))[0]) for r in range(4)]
    assert firsts == [[0], [1], [2], [0]]


def test_prefetch_runs_ahead_of_the_consumer(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, N)
    ds = _stream(prefix, batch_size=5, prefetch=2)
    it = iter(ds)
    next(it)
    deadline = time.monotonic() + 10
    while it.producer.out.qsize() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    # batches are being prepared by the background thread while the caller does nothing
    assert it.producer.out.qsize() >= 2
    assert ds.state_dict()["records_consumed"] == 5  # read-ahead does not count as consumed
    ds.close()


def test_stored_dtype_output_matches_float32(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, N, dtype="float16")
    a, ya = next(iter(_stream(prefix, seed=2)))
    b, yb = next(iter(_stream(prefix, seed=2, out_dtype="stored")))
    assert a.dtype == torch.float32 and b.dtype == torch.float16
    assert torch.equal(a, b.float()) and torch.equal(ya, yb)


def test_single_chunk_dataset_streams_across_epochs(tmp_path):
    """The digits demo is one shard of one chunk: reads must not merge across epochs forever."""
    prefix = str(tmp_path / "d")
    make_dataset(prefix, 30, shard_records=30, chunk_records=30)
    got = [i for b in _take(iter(_stream(prefix, batch_size=10, shuffle_buffer=8)), 12) for i in b]
    for e in range(4):
        assert sorted(got[30 * e:30 * (e + 1)]) == list(range(30))
