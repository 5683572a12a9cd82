"""The on-disk format of a latent dataset: raw fixed-size records in shards, plus one JSON manifest.

Layout under a prefix (S3 or local):
    shard-00000.bin ... shard-NNNNN.bin   records, back to back, no header
    manifest.json                         written last, atomically; the only entry point
    _parts/shard-00000.bin.json ...       prepare's per-shard receipts (idempotent re-runs)

Record = latent `x` (C, H, W) in the manifest's dtype, little-endian, followed by an int64 label `y`.
Record i of a shard starts at byte i * record_bytes, so any record range is one HTTP range GET and
partitioning/resume need no index. Integrity: the manifest stores the sha256 of every shard and of
every "chunk" (a fixed number of records, the reader's unit of fetch), so every byte the reader
receives is verified before use, even though it never downloads a shard in one piece.
See DATA.md (next to this module) for why this format.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from advflow.platform.data.storage import Storage

MANIFEST_NAME = "manifest.json"
PARTS_DIR = "_parts"
FORMAT_NAME = "advflow-latent-shards"
FORMAT_VERSION = 1
LABEL_DTYPE = "<i8"
# Manifest dtype name -> little-endian numpy type. bf16 has no numpy type; fp16 holds SD-VAE latents
# (|x| < ~40 after scaling) with ~3 significant digits, which is what the field uses.
DTYPES = {"float16": "<f2", "float32": "<f4"}
# Reader's GET size. S3 serves 8-16 MiB range GETs at full per-connection speed; smaller ones pay
# per-request latency, larger ones coarsen the shuffle and the prefetch memory (prefetch x chunk).
DEFAULT_CHUNK_BYTES = 16 << 20


class DataError(Exception):
    """Bad dataset content or layout. The message names the URI (shard or manifest) and the problem."""


class ManifestError(DataError):
    """The manifest is missing, unreadable or inconsistent."""


class ShardError(DataError):
    """A shard is missing, truncated, corrupted or holds invalid records."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


@dataclass(frozen=True)
class RecordSpec:
    """Shape and dtype of one record's latent; the label is always int64."""

    shape: tuple[int, int, int]
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"record dtype {self.dtype!r} not supported; use one of {sorted(DTYPES)}")
        if len(self.shape) != 3 or any(int(s) < 1 for s in self.shape):
            raise ValueError(f"record shape {list(self.shape)} must be (C, H, W) with positive sizes")

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype([("x", DTYPES[self.dtype], tuple(self.shape)), ("y", LABEL_DTYPE)])

    @property
    def record_bytes(self) -> int:
        return self.numpy_dtype.itemsize

    def encode(self, x: np.ndarray, y: np.ndarray) -> bytes:
        """(N, C, H, W) latents + (N,) labels -> N * record_bytes bytes."""
        if tuple(x.shape[1:]) != tuple(self.shape):
            raise ValueError(f"latents have shape {tuple(x.shape[1:])}, spec says {tuple(self.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} latents but {y.shape[0]} labels")
        rec = np.empty(x.shape[0], dtype=self.numpy_dtype)
        rec["x"] = x
        rec["y"] = y
        return rec.tobytes()

    def decode(self, buf: bytes | memoryview) -> tuple[np.ndarray, np.ndarray]:
        """Bytes -> ((N, C, H, W) latents in the stored dtype, (N,) int64 labels); views, no copy."""
        rec = np.frombuffer(buf, dtype=self.numpy_dtype)
        return rec["x"], rec["y"]


@dataclass
class ShardInfo:
    """One shard as the manifest lists it."""

    name: str
    records: int
    bytes: int
    sha256: str
    chunk_sha256: list[str]


@dataclass
class Manifest:
    """Everything a reader or trainer needs to know about a dataset.

    record: latent shape/dtype. chunk_records: records per checksummed chunk (last chunk of a
    shard may be shorter). num_classes / class_names: label space. encoder: {"name", "scaling_factor",
    ...}. channel_mean / channel_std: per latent channel, over the whole dataset (after scaling).
    params: the arguments the dataset was created with (compared on re-runs).
    """

    record: RecordSpec
    chunk_records: int
    shards: list[ShardInfo]
    num_classes: int
    encoder: dict[str, Any]
    channel_mean: list[float]
    channel_std: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    created: str = ""

    @property
    def num_records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.record.shape)  # type: ignore[return-value]

    @property
    def scaling_factor(self) -> float:
        return float(self.encoder.get("scaling_factor", 1.0))

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def chunk_bounds(self, shard: ShardInfo) -> list[tuple[int, int]]:
        """[(first_record, end_record)] of each chunk of `shard`."""
        n, c = shard.records, self.chunk_records
        return [(a, min(a + c, n)) for a in range(0, n, c)]

    def to_json(self) -> str:
        body = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created": self.created,
            "record": {
                "shape": list(self.record.shape),
                "dtype": self.record.dtype,
                "label_dtype": "int64",
                "byte_order": "little",
                "record_bytes": self.record.record_bytes,
            },
            "chunk_records": self.chunk_records,
            "num_records": self.num_records,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "encoder": self.encoder,
            "channel_mean": self.channel_mean,
            "channel_std": self.channel_std,
            "params": self.params,
            "shards": [asdict(s) for s in self.shards],
        }
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, uri: str) -> "Manifest":
        """Parse and validate; every problem raises ManifestError naming `uri` and the field."""
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{uri}: not valid JSON ({exc}); re-run the prepare job") from exc
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise ManifestError(f"{uri}: 'format' is not {FORMAT_NAME!r}; not an advflow latent manifest")
        if d.get("version") != FORMAT_VERSION:
            raise ManifestError(f"{uri}: format version {d.get('version')!r} unsupported (this reader: {FORMAT_VERSION})")

        def need(key: str, obj: dict = d) -> Any:
            if key not in obj:
                raise ManifestError(f"{uri}: field {key!r} is missing")
            return obj[key]

        rec = need("record")
        try:
            spec = RecordSpec(tuple(int(s) for s in need("shape", rec)), str(need("dtype", rec)))
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"{uri}: field 'record' is invalid: {exc}") from exc
        if rec.get("label_dtype", "int64") != "int64" or rec.get("byte_order", "little") != "little":
            raise ManifestError(f"{uri}: field 'record' declares label_dtype/byte_order this reader does not read (int64, little)")
        if int(rec.get("record_bytes", spec.record_bytes)) != spec.record_bytes:
            raise ManifestError(
                f"{uri}: field 'record.record_bytes' is {rec.get('record_bytes')} but shape "
                f"{list(spec.shape)} {spec.dtype} + int64 label gives {spec.record_bytes}"
            )
        chunk_records = int(need("chunk_records"))
        if chunk_records < 1:
            raise ManifestError(f"{uri}: field 'chunk_records' must be >= 1, got {chunk_records}")
        num_classes = int(need("num_classes"))
        if num_classes < 1:
            raise ManifestError(f"{uri}: field 'num_classes' must be >= 1, got {num_classes}")
        shards = []
        for i, s in enumerate(need("shards")):
            try:
                info = ShardInfo(str(s["name"]), int(s["records"]), int(s["bytes"]), str(s["sha256"]),
                                 [str(h) for h in s["chunk_sha256"]])
            except (KeyError, TypeError, ValueError) as exc:
                raise ManifestError(f"{uri}: shards[{i}] is malformed ({exc!r})") from exc
            if info.bytes != info.records * spec.record_bytes:
                raise ManifestError(
                    f"{uri}: shard {info.name} lists {info.bytes} bytes for {info.records} records, "
                    f"but records of shape {list(spec.shape)} {spec.dtype} take {spec.record_bytes} bytes "
                    f"each ({info.records * spec.record_bytes}); wrong dtype or shape in the manifest"
                )
            if len(info.chunk_sha256) != math.ceil(info.records / chunk_records):
                raise ManifestError(f"{uri}: shard {info.name} has {len(info.chunk_sha256)} chunk checksums, "
                                    f"expected {math.ceil(info.records / chunk_records)}")
            shards.append(info)
        if not shards:
            raise ManifestError(f"{uri}: field 'shards' is empty")
        if "num_records" in d and int(d["num_records"]) != sum(s.records for s in shards):
            raise ManifestError(f"{uri}: 'num_records' {d['num_records']} != sum of shard records")
        mean, std = list(need("channel_mean")), list(need("channel_std"))
        if len(mean) != spec.shape[0] or len(std) != spec.shape[0]:
            raise ManifestError(f"{uri}: channel_mean/channel_std need {spec.shape[0]} entries (one per channel)")
        return cls(
            record=spec, chunk_records=chunk_records, shards=shards, num_classes=num_classes,
            encoder=dict(need("encoder")), channel_mean=[float(v) for v in mean],
            channel_std=[float(v) for v in std], params=dict(d.get("params", {})),
            class_names=[str(c) for c in d.get("class_names", [])], created=str(d.get("created", "")),
        )


def default_chunk_records(spec: RecordSpec, shard_records: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Records per chunk: at most ~chunk_bytes, and dividing shards into equal chunks (so no shard
    ends in a tiny chunk that would cost a whole request)."""
    target = max(1, chunk_bytes // spec.record_bytes)
    per_shard = math.ceil(shard_records / target)
    return math.ceil(shard_records / per_shard)


def checksums(data: bytes, spec: RecordSpec, chunk_records: int) -> tuple[str, list[str]]:
    """sha256 of the whole shard bytes and of each chunk of `chunk_records` records."""
    step = chunk_records * spec.record_bytes
    view = memoryview(data)
    chunks = [hashlib.sha256(view[a:a + step]).hexdigest() for a in range(0, len(data), step)]
    return hashlib.sha256(view).hexdigest(), chunks


def check_records(x: np.ndarray, y: np.ndarray, num_classes: int, where: str, first_index: int = 0) -> None:
    """Raise ShardError if any latent is NaN/Inf or any label is outside [0, num_classes).
    `where` names the shard URI; `first_index` is the record number of x[0] within it."""
    flat = x.reshape(x.shape[0], -1)
    finite = np.isfinite(flat).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0]) + first_index
        raise ShardError(f"{where}: record {bad} contains NaN or Inf values; re-encode this shard")
    out = (y < 0) | (y >= num_classes)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise ShardError(f"{where}: record {i + first_index} has label {int(y[i])}, outside "
                         f"[0, {num_classes}) (num_classes from the manifest)")


def encode_shard(x: np.ndarray, y: np.ndarray, spec: RecordSpec, chunk_records: int, name: str) -> tuple[bytes, ShardInfo]:
    """Serialise one shard; returns its bytes and the manifest entry describing them."""
    data = spec.encode(np.ascontiguousarray(x), np.asarray(y))
    whole, chunks = checksums(data, spec, chunk_records)
    return data, ShardInfo(name=name, records=int(x.shape[0]), bytes=len(data), sha256=whole, chunk_sha256=chunks)


def write_manifest(storage: Storage, manifest: Manifest) -> None:
    """Atomic single write; callers write it only after every shard it lists is in place."""
    storage.write_atomic(MANIFEST_NAME, manifest.to_json().encode())


def read_manifest(prefix: str | Storage, **storage_kwargs: Any) -> Manifest:
    """Load and validate the manifest at `prefix` (s3://bucket/path or a directory).

    storage_kwargs go to `Storage` (endpoint_url, retry, storage_options)."""
    storage = prefix if isinstance(prefix, Storage) else Storage(prefix, **storage_kwargs)
    try:
        raw = storage.read(MANIFEST_NAME)
    except FileNotFoundError as exc:
        raise ManifestError(
            f"{storage.url(MANIFEST_NAME)}: manifest not found. Either the prefix is wrong or the "
            "prepare job has not finished (the manifest is written last); run "
            "`python jobs/prepare_latents.py ... --out PREFIX`"
        ) from exc
    return Manifest.from_json(raw, storage.url(MANIFEST_NAME))


def verify_dataset(prefix: str | Storage, *, check_values: bool = True, **storage_kwargs: Any) -> list[str]:
    """Check every shard against the manifest. Returns a list of problems, one line per bad shard,
    each naming the shard URI (empty list = all good). Raises ManifestError if the manifest itself
    is missing or invalid."""
    storage = prefix if isinstance(prefix, Storage) else Storage(prefix, **storage_kwargs)
    m = read_manifest(storage)
    listed = storage.list_sizes()
    problems: list[str] = []
    for s in m.shards:
        uri = storage.url(s.name)
        if s.name not in listed:
            problems.append(f"{uri}: listed in the manifest but missing")
            continue
        if listed[s.name] != s.bytes:
            kind = "truncated" if listed[s.name] < s.bytes else "longer than expected"
            problems.append(f"{uri}: {kind}: {listed[s.name]} bytes, manifest says {s.bytes}")
            continue
        data = storage.read(s.name)
        whole, chunks = checksums(data, m.record, m.chunk_records)
        if whole != s.sha256:
            bad = [i for i, (a, b) in enumerate(zip(chunks, s.chunk_sha256)) if a != b]
            problems.append(f"{uri}: checksum mismatch (sha256 {whole[:12]}..., manifest {s.sha256[:12]}...; "
                            f"bad chunks {bad[:5]})")
            continue
        if check_values:
            x, y = m.record.decode(data)
            try:
                check_records(x, y, m.num_classes, uri)
            except ShardError as exc:
                problems.append(str(exc))
    return problems


def dataset_tags(prefix: str) -> dict[str, str]:
    """Provenance of the dataset at `prefix` for run and model tags: {'data.manifest_uri',
    'data.manifest_sha256'}, or {'data.manifest_error': why} when the manifest cannot be read
    (tracking must not hide the reader's own, clearer error, which comes when training starts)."""
    try:
        storage = Storage(prefix)
        raw = storage.read(MANIFEST_NAME)
        return {"data.manifest_uri": storage.url(MANIFEST_NAME),
                "data.manifest_sha256": hashlib.sha256(raw).hexdigest()}
    except Exception as err:  # noqa: BLE001 - see the docstring
        return {"data.manifest_error": str(err)[:500]}
