"""Canonical partitions: what each worker reads (counted), how well the order mixes the classes,
and that the read-volume replay (`read_schedule`) is what the reader really does."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from advflow.platform.data.reader import LatentStream, read_schedule
from helpers_data import make_dataset

EPOCHS = 10


@pytest.fixture(scope="module")
def many_chunks(tmp_path_factory):
    """4096 records in chunks of 16 (256 chunks): a partition of V = 8 spans 32 chunks."""
    prefix = str(tmp_path_factory.mktemp("chunks"))
    _, m = make_dataset(prefix, 4096, shard_records=512, chunk_records=16)
    return prefix, m


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_each_worker_reads_its_share_and_the_cluster_reads_the_dataset_once_per_epoch(many_chunks, world):
    """Bytes counted by the reader over 10 epochs, W workers in one process: the cluster reads
    <= 1.1x the dataset per epoch whatever W (the former data.order global read W x), each worker about 1/W
    of it, and each worker's count is what `read_schedule` replays (plus the read-ahead)."""
    prefix, m = many_chunks
    v, draw = 8, 64
    kw = dict(partitions=v, seed=5, stream="d", shuffle_buffer=64, prefetch=1)
    streams = [LatentStream(prefix, draw // world, rank=r, world_size=world, **kw) for r in range(world)]
    its = [iter(s) for s in streams]
    per_draw = draw // v
    for _ in range(EPOCHS * streams[0].epoch_records // per_draw):
        for it in its:
            next(it)
    for s in streams:
        s.close()
    got = [s.io_counters()["bytes"] for s in streams]
    size = m.total_bytes
    print(f"\nW={world}: per worker {[round(b / size / EPOCHS, 3) for b in got]} of the dataset per epoch, "
          f"cluster {sum(got) / size / EPOCHS:.3f}")
    assert sum(got) <= 1.1 * EPOCHS * size
    planned = np.zeros(world)
    for e in range(EPOCHS):
        planned += [r.bytes for r in read_schedule(m, v, world, seed=5, stream="d", shuffle_buffer=64, epoch=e)]
    ahead = read_schedule(m, v, world, seed=5, stream="d", shuffle_buffer=64, epoch=EPOCHS)
    for rank in range(world):
        # the reader read the planned epochs, and of the next one at most what that epoch plans
        assert planned[rank] <= got[rank] <= planned[rank] + ahead[rank].bytes
        assert got[rank] <= 1.1 * EPOCHS * size / world + ahead[rank].bytes


def test_read_schedule_counts_the_boundary_chunks_and_no_others(many_chunks):
    """Per epoch the cluster reads every chunk once, plus at most one per worker boundary and one
    at the rotation point; one worker (any V) reads each chunk once."""
    _, m = many_chunks
    chunk_bytes = m.chunk_records * m.record.record_bytes
    for world in (1, 2, 4, 8):
        vols = read_schedule(m, 8, world, seed=1, shuffle_buffer=64)
        extra = sum(r.bytes for r in vols) - m.total_bytes
        assert 0 <= extra <= world * chunk_bytes, (world, extra)
        assert sum(r.used_bytes for r in vols) == 4096 // 8 * 8 * m.record.record_bytes
    assert read_schedule(m, 64, 1, seed=1, shuffle_buffer=64)[0].bytes == m.total_bytes


def test_global_batches_mix_the_classes_like_a_uniform_shuffle(digits):
    """Chi-square over one epoch of the digits with the demo's V = 64 and global batch 64: the class
    counts of the global batches are what uniform sampling gives (p > 0.001), no record repeats,
    and the same statistic rejects batches cut from a class-sorted order (the test has power)."""
    v, world, gb = 64, 2, 64
    streams = [LatentStream(digits, gb // world, rank=r, world_size=world, partitions=v, seed=0, stream="g",
                            shuffle_buffer=1024) for r in range(world)]
    its = [iter(s) for s in streams]
    draws = streams[0].epoch_records  # one record of every partition per draw: one epoch
    labels, ids = [], []
    for _ in range(draws):
        batch = [next(it) for it in its]
        labels.append(np.concatenate([b[1].numpy() for b in batch]))
        ids += [i for b in batch for i in ids_of_digits(b[0])]
    for s in streams:
        s.close()
    assert len(set(ids)) == len(ids) == draws * v  # no record twice in the epoch

    all_labels = np.concatenate(labels)
    p = np.bincount(all_labels, minlength=10) / len(all_labels)

    def pvalue(batches: list[np.ndarray]) -> float:
        chi = sum(((np.bincount(b, minlength=10) - gb * p) ** 2 / (gb * p)).sum() for b in batches)
        return float(stats.chi2.sf(chi, df=len(batches) * 9))

    shuffled = pvalue(labels)
    ordered = np.sort(all_labels)
    clumped = pvalue([ordered[k * gb:(k + 1) * gb] for k in range(draws)])
    print(f"\nchi-square p-value: reader {shuffled:.3f}, class-sorted batches {clumped:.1e}")
    assert shuffled > 1e-3
    assert clumped < 1e-6


def ids_of_digits(x) -> list[bytes]:
    """A digit image's bytes are its identity (the digits carry no id field)."""
    return [row.numpy().tobytes() for row in x]


def test_simulate_scale_reports_what_the_reader_schedule_gives(capsys):
    """jobs/bench/simulate_scale.py's numbers are read_schedule's (the producer's own schedule),
    not a formula beside it: its row for (V, W) carries the replay's bytes and GETs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / "bench" / "simulate_scale.py"
    spec = importlib.util.spec_from_file_location("simulate_scale_test", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)  # type: ignore[union-attr]
    args = ["--records", "20000", "--shape", "4,8,8", "--shard-records", "4096", "--chunk-mb", "0.25",
            "--workers", "2,8", "--partitions", "8", "--global-batch", "64"]
    assert sim.main(args) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] == ["8"]]
    m = sim.synthetic_manifest(20000, (4, 8, 8), "float16", 4096, int(0.25 * 2**20) // 520)
    for row, world in zip(lines, (2, 8)):
        vols = read_schedule(m, 8, world)
        assert int(row[1]) == world
        assert float(row[4]) == pytest.approx(sum(v.bytes for v in vols) / m.total_bytes, abs=1e-3)
        assert int(row[5].replace(",", "")) == sum(v.requests for v in vols)
    assert len(lines) == 2
