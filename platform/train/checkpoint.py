"""Training checkpoints: a `Checkpointer` given named stateful parts, that owns its cadence.

The worker hands the checkpointer its parts by name (torchtitan's `states={...}`): both DeepSpeed
engines, EMA(G), the gradient-normalisation buffers, the D snapshots, the data-stream states and
the loop state. The checkpointer never looks inside the worker; each part knows how to write itself
into, and read itself back from, a checkpoint directory (`Part`). Adapters for tensors and JSON
live here; the DeepSpeed one is `engines.EngineState`.

Layout of one checkpoint directory (each rank writes its part into its own staging directory; Ray
Train merges the ranks' directories into one under `storage_path` and registers the checkpoint only
after every rank has uploaded, so a checkpoint becomes visible only when complete):

    g/weights.safetensors   G's weights at full precision (fp32 masters)      (rank 0)
    g/optim.safetensors     G's optimizer moments per parameter               (rank 0)
    d/...                   the same for D
    ema.safetensors         EMA(G) weights                                    (rank 0)
    gradnorm.safetensors    GradNormalizer buffers                            (rank 0)
    dtag-<tag>.safetensors  D snapshots taken at phase ends                   (rank 0; Table 11's D reload)
    readers.json            data-stream states                                 (rank 0; the same on every rank)
    trainer.json            format, step, world size, config, and the parts' JSON state (EMA
                            counters, engine step counters, resumes)          (rank 0, written last)

Every file is safetensors or JSON: nothing in a checkpoint is a pickle, so nothing read back on
resume can run code. The size does not grow with the step: the per-step metric rows live in the
run's metrics log (metrics_log.py), not here. Nothing depends on the number of workers that wrote
it, so a checkpoint resumes on any number of workers that divides data.partitions
(`Checkpointer(elastic=True)`): the engines re-partition the full tensors (engines.EngineState) and
the streams continue their canonical partitions. (`PerRankJSON` with `elastic=False` is for parts
that are per rank; the trainer has none today.)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from advflow.platform.atomic import write_text
from advflow.platform.train.cadence import Cadence

FORMAT_VERSION = 2  # 2: engines as safetensors (no DeepSpeed pickles), no metric history, elastic
META_NAME = "trainer.json"


class ResumeError(RuntimeError):
    """A run checkpoint is incomplete or belongs to another run layout (the message says which)."""


class Part(Protocol):
    """One named piece of training state.

    save: write this rank's files under `root`; return JSON-able entries for trainer.json
    (rank 0's are kept) or None. load: read them back; `meta` is the whole trainer.json.
    required: files that must exist for a checkpoint written by `world_size` ranks."""

    def save(self, root: Path, rank: int) -> dict[str, Any] | None: ...

    def load(self, root: Path, rank: int, meta: dict[str, Any]) -> None: ...

    def required(self, world_size: int) -> list[str]: ...


@contextlib.contextmanager
def staging_dir(delete: bool = True) -> Iterator[str]:
    """A private directory a rank writes its checkpoint files into before reporting them.
    delete=False: whoever it is reported to owns it (an asynchronous upload deletes it when done);
    it is still removed here if the block fails before the report."""
    tmp = tempfile.mkdtemp(prefix="advflow-ckpt-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if delete:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True))


# What a checkpoint may hold: formats whose readers never run code. Ray's own marker files are JSON.
SAFE_SUFFIXES = (".safetensors", ".json", ".jsonl", ".png")
SAFE_NAMES = ("COMPLETE",)


def unexpected_files(names: Iterable[str]) -> list[str]:
    """The names (relative paths) among `names` of files advflow never writes into a checkpoint."""
    return sorted(n for n in names if not (PurePosixPath(n).suffix in SAFE_SUFFIXES or PurePosixPath(n).name in SAFE_NAMES))


def is_pickle(head: bytes) -> bool:
    """Whether a file's first two bytes open a pickle (protocols 2-5)."""
    return head[:2] in _PICKLE_MAGIC


def needs_head_check(name: str) -> bool:
    """Files whose first bytes are checked for a pickle (a PNG cannot start with one)."""
    return PurePosixPath(name).suffix != ".png"


def check_listing(names: Iterable[str], head: Callable[[str], bytes], where: str) -> None:
    """The planted-file rule over a listing of a checkpoint's files (relative names), wherever the
    checkpoint is: `head(name)` returns a file's first two bytes; `where` is how the checkpoint is
    named in the message (its storage URI, so the user can find the file). Used by
    `Checkpointer.load` on the worker and by the driver's preflight on the stored checkpoint."""
    names = sorted(names)
    odd = unexpected_files(names)
    if odd:
        raise ResumeError(
            f"{where}: unexpected file(s) {odd[:5]}{' ...' if len(odd) > 5 else ''}: an advflow checkpoint holds only "
            "safetensors, JSON and PNG files, never a pickle, and nothing else in it is ever loaded. Check where "
            "the file came from (anyone with write access to the storage can plant one), remove it, and resume")
    for name in names:
        if needs_head_check(name) and is_pickle(head(name)):
            raise ResumeError(f"{where.rstrip('/')}/{name}: a pickle under a safe file name: the checkpoint was tampered "
                              "with. It is not loaded: resume from an earlier checkpoint")


def check_files(root: Path, shown_as: str | None = None) -> None:
    """Refuse a checkpoint directory holding any file advflow does not write (see Checkpointer.load).
    `shown_as`: the checkpoint's storage URI, named in messages instead of a local (temporary) copy."""
    names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()]
    check_listing(names, lambda name: _head(root / name), shown_as or str(root))


_PICKLE_MAGIC = {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}  # pickle protocols 2-5


def _head(path: Path) -> bytes:
    if not path.is_file():
        return b""  # a dangling symlink: nothing to read (its name was checked above)
    with open(path, "rb") as f:
        return f.read(2)


def read_meta(directory: str | Path, shown_as: str | None = None) -> dict[str, Any]:
    path = Path(directory) / META_NAME
    where = shown_as or str(directory)
    if not path.is_file():
        raise ResumeError(f"{where}: no {META_NAME}; this is not a complete advflow checkpoint")
    return parse_meta(path.read_text(), f"{where.rstrip('/')}/{META_NAME}")


def parse_meta(text: str | bytes, where: str) -> dict[str, Any]:
    """trainer.json's content, checked for its format; `where` names the file in messages."""
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise ResumeError(f"{where}: not valid JSON ({err}); the checkpoint is corrupted: resume from an earlier "
                          "one") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ResumeError(f"{where}: format {meta.get('format') if isinstance(meta, dict) else None} is not "
                          f"{FORMAT_VERSION}; resume it with the advflow version that wrote it")
    return meta


class Checkpointer:
    """Saves and restores named parts; decides by itself when a checkpoint is due.

    Collective: every rank calls `save` at the same steps with its own staging directory, and
    `load` with the restored directory. Rank 0 writes trainer.json last, so its presence marks a
    directory whose parts were all written."""

    def __init__(self, parts: dict[str, Part], *, rank: int, world_size: int, every: int, last_step: int,
                 config: dict[str, Any], elastic: bool = False):
        self.parts, self.rank, self.world_size = parts, rank, world_size
        self.elastic = elastic  # every part re-shards: a checkpoint of N workers loads on M
        self.cadence = Cadence(every, last_step)
        self.config = config
        self.last_saved = 0  # the step of the latest checkpoint (restored or written)

    def due(self, step: int) -> bool:
        return self.cadence.due(step)

    def save(self, directory: str | Path, step: int) -> None:
        root = Path(directory)
        meta: dict[str, Any] = {}
        for name, part in self.parts.items():
            entries = part.save(root, self.rank) or {}
            clash = set(entries) & (set(meta) | {"format", "step", "world_size", "config"})
            assert not clash, f"checkpoint part {name!r} writes trainer.json keys already taken: {clash}"
            meta.update(entries)
        if self.rank == 0:
            _write_json(root / META_NAME, {"format": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                                           "config": self.config, **meta})
        self.last_saved = step

    def load(self, directory: str | Path, shown_as: str | None = None) -> int:
        """Restore every part from `directory`; returns the checkpoint's step. `shown_as`: where
        the checkpoint is stored (e.g. s3://.../checkpoint_000400), named in every message instead
        of `directory` when that is a temporary local copy.

        Nothing in storage is trusted: before anything is read, every file must be of a kind that
        is parsed without running code (safetensors, JSON, PNG, the local COMPLETE marker); any
        other file (a pickle, a .pt, an executable) stops the resume with its name. Parse errors
        of the files that are read name the file too."""
        root = Path(directory)
        where = shown_as or str(directory)
        check_files(root, where)
        try:
            return self._load(root, where)
        except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ResumeError(f"{where}: a checkpoint file is not what its name says ({err}); the checkpoint "
                              "is corrupted or was tampered with: resume from an earlier one") from None

    def _load(self, root: Path, where: str) -> int:
        meta = read_meta(root, where)
        written_by = int(meta["world_size"])
        if written_by != self.world_size and not self.elastic:
            raise ResumeError(
                f"{where}: written by {written_by} workers, resuming with {self.world_size}; this run's "
                f"some of its parts are per worker, so set distributed.workers={written_by} to resume it")
        missing = [f for part in self.parts.values() for f in part.required(written_by)
                   if not (root / f).exists()]
        if missing:
            raise ResumeError(f"{where}: incomplete checkpoint, missing {missing}")
        for part in self.parts.values():
            part.load(root, self.rank, meta)
        self.last_saved = int(meta["step"])
        return self.last_saved


# ----------------------------------------------------------------------------------------- adapters


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}


class TensorFile:
    """A module or object whose state_dict() is tensors only, in one safetensors file (rank 0)."""

    def __init__(self, obj, filename: str):
        self.obj, self.filename = obj, filename

    def save(self, root: Path, rank: int) -> None:
        if rank == 0:
            save_file(_contiguous(self.obj.state_dict()), str(root / self.filename))

    def load(self, root: Path, rank: int, meta: dict[str, Any]) -> None:
        self.obj.load_state_dict(load_file(str(root / self.filename)))

    def required(self, world_size: int) -> list[str]:
        return [self.filename]


class EMAState:
    """EMA(G): shadow weights in ema.safetensors, counters in trainer.json["ema"] (rank 0)."""

    COUNTERS = ("decay", "warmup", "num_updates")

    def __init__(self, ema, filename: str = "ema.safetensors"):
        self.ema, self.filename = ema, filename

    def save(self, root: Path, rank: int) -> dict[str, Any] | None:
        if rank != 0:
            return None
        state = self.ema.state_dict()
        save_file(_contiguous(state["shadow"]), str(root / self.filename))
        return {"ema": {k: state[k] for k in self.COUNTERS}}

    def load(self, root: Path, rank: int, meta: dict[str, Any]) -> None:
        self.ema.load_state_dict({**meta["ema"], "shadow": load_file(str(root / self.filename))})

    def required(self, world_size: int) -> list[str]:
        return [self.filename]


class SnapshotFiles:
    """Named tensor snapshots (`tag -> state dict`, e.g. D at a phase end), one file each (rank 0).

    `snapshots` is a mutable mapping owned by the caller; load replaces its contents."""

    def __init__(self, snapshots: dict[str, dict[str, torch.Tensor]], prefix: str = "dtag-"):
        self.snapshots, self.prefix = snapshots, prefix

    def save(self, root: Path, rank: int) -> None:
        if rank == 0:
            for tag, weights in self.snapshots.items():
                save_file(_contiguous(weights), str(root / f"{self.prefix}{tag}.safetensors"))

    def load(self, root: Path, rank: int, meta: dict[str, Any]) -> None:
        self.snapshots.clear()
        self.snapshots.update({p.name[len(self.prefix):-len(".safetensors")]: load_file(str(p))
                               for p in root.glob(f"{self.prefix}*.safetensors")})

    def required(self, world_size: int) -> list[str]:
        return []


class PerRankJSON:
    """Objects with JSON state_dicts (the data streams), one file per rank: `{name: state}`."""

    def __init__(self, objects: dict[str, Any], pattern: str = "reader-rank{rank}.json",
                 after_load: Callable[[], None] | None = None):
        self.objects, self.pattern, self.after_load = objects, pattern, after_load

    def save(self, root: Path, rank: int) -> None:
        _write_json(root / self.pattern.format(rank=rank), {k: o.state_dict() for k, o in self.objects.items()})

    def load(self, root: Path, rank: int, meta: dict[str, Any]) -> None:
        states = json.loads((root / self.pattern.format(rank=rank)).read_text())
        for name, obj in self.objects.items():
            obj.load_state_dict(states[name])
        if self.after_load is not None:
            self.after_load()

    def required(self, world_size: int) -> list[str]:
        return [self.pattern.format(rank=r) for r in range(world_size)]


class SharedJSON:
    """Objects with JSON state_dicts that are the same on every rank (the data streams), in one file written by rank 0 and read by every rank: `{name: state}`."""

    def __init__(self, objects: dict[str, Any], filename: str = "readers.json",
                 after_load: Callable[[], None] | None = None):
        self.objects, self.filename, self.after_load = objects, filename, after_load

    def save(self, root: Path, rank: int) -> None:
        if rank == 0:
            _write_json(root / self.filename, {k: o.state_dict() for k, o in self.objects.items()})

    def load(self, root: Path, rank: int, meta: dict[str, Any]) -> None:
        states = json.loads((root / self.filename).read_text())
        for name, obj in self.objects.items():
            obj.load_state_dict(states[name])
        if self.after_load is not None:
            self.after_load()

    def required(self, world_size: int) -> list[str]:
        return [self.filename]


class JSONEntries:
    """An object whose state_dict() is JSON-able, stored as top-level trainer.json entries (rank 0)."""

    def __init__(self, obj):
        self.obj = obj

    def save(self, root: Path, rank: int) -> dict[str, Any] | None:
        return self.obj.state_dict() if rank == 0 else None

    def load(self, root: Path, rank: int, meta: dict[str, Any]) -> None:
        self.obj.load_state_dict(meta)

    def required(self, world_size: int) -> list[str]:
        return []


class NamedJSON:
    """An object with a JSON-able state_dict() under one trainer.json key `name` (rank 0). A
    checkpoint without the key (written before the part existed) leaves the object as it is."""

    def __init__(self, name: str, obj):
        self.name, self.obj = name, obj

    def save(self, root: Path, rank: int) -> dict[str, Any] | None:
        return {self.name: self.obj.state_dict()} if rank == 0 else None

    def load(self, root: Path, rank: int, meta: dict[str, Any]) -> None:
        if self.name in meta:
            self.obj.load_state_dict(meta[self.name])

    def required(self, world_size: int) -> list[str]:
        return []
