"""The Checkpointer with fake stateful parts: what it writes, when, and what it refuses on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advflow.platform.train.checkpoint import (META_NAME, Checkpointer, JSONEntries, PerRankJSON, ResumeError,
                                               SharedJSON)


class FakePart:
    """Writes one file per rank (value = its state); keeps a JSON entry on rank 0; logs calls."""

    def __init__(self, name: str, value: int, calls: list):
        self.name, self.value, self.calls = name, value, calls

    def save(self, root: Path, rank: int):
        (root / f"{self.name}-{rank}.json").write_text(str(self.value))
        self.calls.append(("save", self.name, rank, (root / META_NAME).exists()))
        return {f"{self.name}_value": self.value} if rank == 0 else None

    def load(self, root: Path, rank: int, meta: dict):
        assert meta[f"{self.name}_value"] == int((root / f"{self.name}-0.json").read_text())
        self.value = int((root / f"{self.name}-{rank}.json").read_text())
        self.calls.append(("load", self.name, rank))

    def required(self, world_size: int):
        return [f"{self.name}-{r}.json" for r in range(world_size)]


class Counter:
    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def two_ranks(tmp_path: Path, values=(1, 2)):
    """Simulate a 2-rank save: both ranks write into one directory (Ray Train merges them so)."""
    calls: list = []
    ranks = []
    for rank in (0, 1):
        parts = {"a": FakePart("a", values[0] + rank, calls), "b": FakePart("b", values[1] + rank, calls)}
        ranks.append(Checkpointer(parts, rank=rank, world_size=2, every=5, last_step=12, config={"x": 1}))
    for c in reversed(ranks):  # rank 1 first: rank 0's trainer.json must come last within rank 0
        c.save(tmp_path, 10)
    return ranks, calls


def test_round_trip_restores_every_part_on_every_rank(tmp_path):
    ranks, calls = two_ranks(tmp_path)
    meta = json.loads((tmp_path / META_NAME).read_text())
    assert meta["step"] == 10 and meta["world_size"] == 2 and meta["config"] == {"x": 1}
    assert meta["a_value"] == 1 and meta["b_value"] == 2
    # trainer.json is written after every part of rank 0 (so its presence means the parts exist).
    assert all(not meta_seen for op, _, rank, meta_seen in calls if op == "save" and rank == 0)
    for rank in (0, 1):
        parts = {"a": FakePart("a", -1, []), "b": FakePart("b", -1, [])}
        step = Checkpointer(parts, rank=rank, world_size=2, every=5, last_step=12, config={}).load(tmp_path)
        assert step == 10
        assert (parts["a"].value, parts["b"].value) == (1 + rank, 2 + rank)


def test_cadence_is_the_checkpointers(tmp_path):
    (c0, _), _ = two_ranks(tmp_path)
    assert [s for s in range(1, 13) if c0.due(s)] == [5, 10, 12]


def test_refuses_another_world_size_naming_the_fix(tmp_path):
    two_ranks(tmp_path)
    one = Checkpointer({"a": FakePart("a", 0, [])}, rank=0, world_size=1, every=5, last_step=12, config={})
    with pytest.raises(ResumeError, match="distributed.workers=2"):
        one.load(tmp_path)


def test_refuses_a_missing_rank_file_and_loads_nothing(tmp_path):
    two_ranks(tmp_path)
    (tmp_path / "b-1.json").unlink()
    part = FakePart("a", -1, [])
    c = Checkpointer({"a": part, "b": FakePart("b", -1, [])}, rank=0, world_size=2, every=5, last_step=12, config={})
    with pytest.raises(ResumeError, match=r"missing \['b-1.json'\]"):
        c.load(tmp_path)
    assert part.value == -1  # nothing was half-restored


def test_refuses_a_directory_without_trainer_json(tmp_path):
    c = Checkpointer({}, rank=0, world_size=1, every=5, last_step=12, config={})
    with pytest.raises(ResumeError, match="not a complete advflow checkpoint"):
        c.load(tmp_path)


def test_json_adapters(tmp_path):
    streams = {"d": Counter(3), "g": Counter(4)}
    reloaded: list = []
    loop = Counter(7)
    for rank in (1, 0):
        parts = {"readers": PerRankJSON({k: Counter(v.n + 10 * rank) for k, v in streams.items()}),
                 "loop": JSONEntries(loop)}
        Checkpointer(parts, rank=rank, world_size=2, every=1, last_step=1, config={}).save(tmp_path, 1)
    assert json.loads((tmp_path / "reader-rank1.json").read_text()) == {"d": {"n": 13}, "g": {"n": 14}}
    fresh = {"d": Counter(), "g": Counter()}
    fresh_loop = Counter()
    parts = {"readers": PerRankJSON(fresh, after_load=lambda: reloaded.append(True)), "loop": JSONEntries(fresh_loop)}
    Checkpointer(parts, rank=1, world_size=2, every=1, last_step=1, config={}).load(tmp_path)
    assert (fresh["d"].n, fresh["g"].n, fresh_loop.n, reloaded) == (13, 14, 7, [True])


def test_elastic_checkpointer_loads_another_world_size_and_checks_the_writers_files(tmp_path):
    """elastic=True (the trainer's: its data streams are the same on every rank): a checkpoint of 2 ranks loads on 1 and on 3; the files it
    must have are those of the world that wrote it."""
    loop, streams = Counter(7), {"d": Counter(3)}
    for rank in (1, 0):
        Checkpointer({"readers": SharedJSON(streams), "loop": JSONEntries(loop), "a": FakePart("a", rank, [])},
                     rank=rank, world_size=2, every=1, last_step=1, config={}, elastic=True).save(tmp_path, 1)
    assert json.loads((tmp_path / "readers.json").read_text()) == {"d": {"n": 3}}
    for world in (1, 3):
        fresh = {"d": Counter()}
        parts = {"readers": SharedJSON(fresh), "loop": JSONEntries(Counter()), "a": FakePart("a", -1, [])}
        step = Checkpointer(parts, rank=0, world_size=world, every=1, last_step=1, config={},
                            elastic=True).load(tmp_path)
        assert (step, fresh["d"].n) == (1, 3)
    (tmp_path / "a-1.json").unlink()  # a file of the writing world (rank 1 of 2) is gone
    with pytest.raises(ResumeError, match=r"missing \['a-1.json'\]"):
        Checkpointer({"a": FakePart("a", -1, [])}, rank=0, world_size=1, every=1, last_step=1, config={},
                     elastic=True).load(tmp_path)


def test_staging_dir_is_left_to_an_asynchronous_upload_but_never_leaks_on_failure():
    from advflow.platform.train.checkpoint import staging_dir

    with staging_dir() as tmp:
        Path(tmp, "x").write_text("1")
    assert not Path(tmp).exists()
    with staging_dir(delete=False) as kept:  # the upload thread deletes it after uploading
        Path(kept, "x").write_text("1")
    assert Path(kept, "x").read_text() == "1"
    import shutil

    shutil.rmtree(kept)
    with pytest.raises(RuntimeError, match="boom"):
        with staging_dir(delete=False) as failed:  # nothing was reported: nobody else will delete it
            raise RuntimeError("boom")
    assert not Path(failed).exists()
