"""The prepare pipeline: images -> encoder -> latent shards + manifest under a prefix.

Order of writes (why an interrupted run is always safe):
1. each shard is written atomically, then its receipt `_parts/shard-XXXXX.json` (also atomic);
   a receipt therefore proves its shard is complete, and carries the shard's checksums and stats;
2. the manifest is written last, in one atomic write, from the receipts.
A crash leaves at most shards without a manifest (readers refuse the prefix: "manifest not found").
Re-running with the same parameters skips shards whose receipt matches (same parameter id, same
object size) and, if the manifest exists, does nothing: the job is idempotent. Different
parameters over an existing dataset are refused unless `overwrite`, which deletes the manifest
first so that no reader ever sees an old manifest over new shards.

Record order: all (image, flip) items are permuted with `seed` before sharding, so every shard and
chunk is a random sample of the classes (the reader's chunk-level shuffle relies on that).

Execution: shards are independent jobs. With a Ray address (`ray_address` or RAY_ADDRESS) they run
as Ray tasks on the cluster; otherwise in this process. A tqdm bar counts records either way.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from advflow.platform.data.digits import digits_arrays, digits_pixels, digits_split, resize_digits
from advflow.platform.data.encoders import (
    EncoderSpec, build_encoder, center_crop_resize, encoder_record, planned_latent_shape,
)
from advflow.platform.data.shards import (
    DTYPES, MANIFEST_NAME, PARTS_DIR, Manifest, ManifestError, RecordSpec, ShardInfo, check_records,
    default_chunk_records, encode_shard, read_manifest, shard_name, write_manifest,
)
from advflow.platform.data.storage import Storage
from advflow.platform.log import get_logger

log = get_logger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")


@dataclass
class PrepareConfig:
    """Arguments of one prepare run (also stored in the manifest as `params`).

    source: "digits" (scikit-learn's 8x8 handwritten digits) or an ImageFolder directory (one
        sub-directory per class, JPEG/PNG files).
    out: destination prefix, s3://bucket/path or a local directory.
    encoder: "pixel" or "sd-vae"; vae_path: local AutoencoderKL folder (sd-vae only);
        vae_sample: "sample" (posterior sample, seeded) or "mean".
    resolution: image side after ADM centre crop/resize; None = 8 for digits, 256 for folders.
    flips: also store a horizontally flipped copy of every image (doubles the records).
    shard_records: records per shard. chunk_records: records per checksummed read unit
        (None = shards split evenly into chunks of at most ~16 MiB). dtype: "float16" or "float32" storage.
    seed: record order and VAE posterior sampling. limit: keep only the first N items after the
        seeded permutation (quick runs).
    digits_holdout / digits_holdout_seed: digits only. The stratified held-out split
        (data.digits.digits_split) is the reference of the digits quality metric, so only the train
        split is written; recorded in the manifest (params and encoder["holdout"]). 0 writes all 1797.
    batch_size: images per encoder call. device: encoder device.
    ray_address: Ray cluster address ("auto", "ray://host:10001", or "local" for a local test
        cluster); None = RAY_ADDRESS if set, else in-process. ray_gpus: GPUs per Ray task.
    overwrite: replace a dataset made with different parameters. endpoint_url: S3 endpoint override.
    """

    source: str
    out: str
    encoder: str = "pixel"
    vae_path: str | None = None
    vae_sample: str = "sample"
    resolution: int | None = None
    flips: bool = False
    shard_records: int = 8192
    chunk_records: int | None = None
    dtype: str = "float16"
    seed: int = 0
    limit: int | None = None
    batch_size: int = 64
    device: str | None = None
    ray_address: str | None = None
    ray_gpus: float = 0.0
    overwrite: bool = False
    endpoint_url: str | None = None
    progress: bool = True
    digits_holdout: float = 0.2
    digits_holdout_seed: int = 0
    strict: bool = False
    """Refuse a source whose class folders hold anything but .jpg/.jpeg/.png files (default: warn)."""

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source is empty: use 'digits' or an ImageFolder directory (--source)")
        if not self.out:
            raise ValueError("out is empty: pass --out s3://bucket/path or a local directory")
        if self.source != "digits" and not os.path.isdir(self.source):
            raise ValueError(f"--source {self.source!r}: not 'digits' and not a directory (expected one "
                             "sub-directory per class with JPEG/PNG images)")
        EncoderSpec(self.encoder, self.vae_path, self.device, self.vae_sample)  # validates encoder fields
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: use one of {sorted(DTYPES)}")
        for name in ("shard_records", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.chunk_records is not None and self.chunk_records < 1:
            raise ValueError(f"chunk_records must be >= 1, got {self.chunk_records}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.digits_holdout < 1.0:
            raise ValueError(f"digits_holdout must be in [0, 1) (0 = no held-out split), got {self.digits_holdout}")
        if self.digits_holdout_seed < 0:
            raise ValueError(f"digits_holdout_seed must be >= 0, got {self.digits_holdout_seed}")

    @property
    def holdout(self) -> dict[str, Any] | None:
        """The digits hold-out as the manifest records it (count filled in by prepare), or None."""
        if self.source != "digits" or self.digits_holdout == 0:
            return None
        return {"fraction": self.digits_holdout, "seed": self.digits_holdout_seed}

    @property
    def image_resolution(self) -> int:
        return self.resolution or (8 if self.source == "digits" else 256)


# -- sources ----------------------------------------------------------------------------------------
def scan_source(source: str, strict: bool = False) -> tuple[list[Any], list[int], list[str], int]:
    """-> (refs, labels, class_names, channels). refs are digits indices or image file paths.

    Entries of a class folder that are not .jpg/.jpeg/.png files are not read: they are counted and
    warned about in one line (a stray README or .txt would otherwise vanish without a word), or
    refused with `strict`."""
    if source == "digits":
        _, labels = digits_arrays()
        return list(range(len(labels))), labels.tolist(), [str(i) for i in range(10)], 1
    classes = sorted(e.name for e in os.scandir(source) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"--source {source}: no class sub-directories found (ImageFolder layout: "
                         f"{source}/<class>/<image>.jpg)")
    refs, labels, skipped = [], [], []
    for k, c in enumerate(classes):
        entries = sorted(os.listdir(os.path.join(source, c)))
        files = [f for f in entries if f.endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(source, c, f))]
        kept = set(files)
        skipped += [os.path.join(c, f) for f in entries if f not in kept]
        refs += [os.path.join(source, c, f) for f in files]
        labels += [k] * len(files)
    if skipped:
        what = (f"--source {source}: {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} in class folders "
                f"{'is' if len(skipped) == 1 else 'are'} not a .jpg/.jpeg/.png file (e.g. {', '.join(skipped[:3])})")
        if strict:
            raise ValueError(f"{what}; remove them, or drop --strict to skip them")
        log.warning("%s; skipped (pass --strict to refuse such a source)", what)
    if not refs:
        raise ValueError(f"--source {source}: class folders hold no .jpg/.jpeg/.png files")
    return refs, labels, classes, 3


def load_images(refs: list[Any], source: str, resolution: int) -> torch.Tensor:
    """-> (N, C, R, R) float32 in [-1, 1]."""
    if source == "digits":
        x, _ = digits_pixels(np.asarray(refs, dtype=np.int64))  # (N, 1, 8, 8) in [-1, 1]
        return resize_digits(x, resolution)  # the digits evaluator replays this exact resize
    from PIL import Image

    arrs = []
    for path in refs:
        try:
            with Image.open(path) as im:
                arrs.append(center_crop_resize(im.convert("RGB"), resolution))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            # PIL reports broken files as OSError, SyntaxError (bad PNG chunks) or ValueError.
            raise ValueError(f"{path}: cannot read image ({exc}); remove or replace the file") from exc
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()  # (N, 3, R, R) in [0, 255]
    return x / 127.5 - 1.0


# -- one shard ---------------------------------------------------------------------------------------
@dataclass
class ShardJob:
    """Everything one worker needs to build shard `index` (plain data: Ray ships it)."""

    index: int
    refs: list[Any]
    labels: list[int]
    flips: list[bool]
    out: str
    endpoint_url: str | None
    source: str
    resolution: int
    encoder: EncoderSpec
    shape: tuple[int, int, int]
    dtype: str
    chunk_records: int
    num_classes: int
    seed: int
    batch_size: int
    params_id: str


def run_shard(job: ShardJob, on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Encode, check and write one shard, then its receipt. Returns the receipt."""
    storage = Storage(job.out, endpoint_url=job.endpoint_url)
    enc = build_encoder(job.encoder)
    spec = RecordSpec(job.shape, job.dtype)
    name = shard_name(job.index)
    outs = []
    for b, a in enumerate(range(0, len(job.refs), job.batch_size)):
        refs = job.refs[a:a + job.batch_size]
        x = load_images(refs, job.source, job.resolution)  # (n, C, R, R)
        flip = torch.tensor(job.flips[a:a + job.batch_size])
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        gen = enc.make_generator(job.seed * 1_000_003 + job.index * 10_007 + b) if hasattr(enc, "make_generator") else None
        outs.append(enc.encode(x, gen).numpy())
        if on_batch:
            on_batch(len(refs))
    z = np.concatenate(outs).astype(DTYPES[job.dtype])  # (N, C', H', W') as stored
    y = np.asarray(job.labels, dtype=np.int64)
    # Refuse to write what the reader would refuse to read.
    check_records(z, y, job.num_classes, f"{storage.url(name)} (while encoding)")
    data, info = encode_shard(z, y, spec, job.chunk_records, name)
    z64 = z.astype(np.float64)
    receipt = {
        "params_id": job.params_id,
        "shard": asdict(info),
        "count": int(z.shape[0] * z.shape[2] * z.shape[3]),
        "sum": z64.sum(axis=(0, 2, 3)).tolist(),
        "sumsq": (z64 ** 2).sum(axis=(0, 2, 3)).tolist(),
    }
    storage.write_atomic(name, data)
    storage.write_atomic(f"{PARTS_DIR}/{name}.json", json.dumps(receipt).encode())
    return receipt


# -- the whole dataset ---------------------------------------------------------------------------------
def _params(cfg: PrepareConfig, refs: list[Any], shape: tuple[int, int, int], chunk_records: int,
            holdout: dict[str, Any] | None) -> dict[str, Any]:
    """What determines the bytes of the dataset; stored in the manifest and compared on re-runs."""
    src = "digits" if cfg.source == "digits" else os.path.abspath(cfg.source)
    listing = hashlib.sha256("\n".join(map(str, refs)).encode()).hexdigest()[:16]
    # Only digits datasets carry the hold-out key, so ImageFolder datasets made before it existed still match.
    extra = {"digits_holdout": holdout} if cfg.source == "digits" else {}
    return {
        **extra,
        "source": src, "source_items": len(refs), "source_listing_sha256": listing,
        "encoder": cfg.encoder, "vae_path": os.path.abspath(cfg.vae_path) if cfg.vae_path else None,
        "vae_sample": cfg.vae_sample if cfg.encoder == "sd-vae" else None,
        "resolution": cfg.image_resolution, "flips": cfg.flips, "shard_records": cfg.shard_records,
        "chunk_records": chunk_records, "dtype": cfg.dtype, "seed": cfg.seed, "limit": cfg.limit,
        "latent_shape": list(shape),
    }


def _ray_address(cfg: PrepareConfig) -> str | None:
    return cfg.ray_address or os.environ.get("RAY_ADDRESS") or None


def prepare(cfg: PrepareConfig) -> Manifest:
    """Build (or confirm) the dataset described by `cfg`; returns its manifest."""
    storage = Storage(cfg.out, endpoint_url=cfg.endpoint_url)
    refs, labels, class_names, channels = scan_source(cfg.source, cfg.strict)
    holdout = cfg.holdout
    if holdout is not None:  # digits: keep the train split only; the held-out split is the eval reference
        train_idx, held_idx = digits_split(holdout["seed"], holdout["fraction"])
        refs, labels = [refs[i] for i in train_idx], [labels[i] for i in train_idx]
        holdout = {**holdout, "count": int(len(held_idx))}
    res = cfg.image_resolution
    enc_spec = EncoderSpec(cfg.encoder, os.path.abspath(cfg.vae_path) if cfg.vae_path else None,
                           cfg.device, cfg.vae_sample)
    img_channels = 3 if cfg.encoder == "sd-vae" else channels
    shape = planned_latent_shape(enc_spec, (img_channels, res, res))
    spec = RecordSpec(shape, cfg.dtype)
    chunk_records = min(cfg.chunk_records or default_chunk_records(spec, cfg.shard_records), cfg.shard_records)
    params = _params(cfg, refs, shape, chunk_records, holdout)
    params_id = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]

    if storage.exists(MANIFEST_NAME):
        try:
            old = read_manifest(storage)
            same = old.params == params
        except ManifestError:
            old, same = None, False
        if same and old is not None:
            tqdm.write(f"{storage.url(MANIFEST_NAME)}: dataset already complete with these parameters; nothing to do")
            return old
        if not cfg.overwrite:
            diff = sorted(k for k in params if old is None or old.params.get(k) != params[k])
            raise ValueError(f"{storage.url()}: already holds a dataset made with different parameters "
                             f"({', '.join(diff) or 'unreadable manifest'}); use another --out or pass --overwrite")
        storage.remove(MANIFEST_NAME)  # first: never an old manifest over new shards

    # Seeded order over (image, flip) items, then contiguous shards.
    items = [(i, False) for i in range(len(refs))] + ([(i, True) for i in range(len(refs))] if cfg.flips else [])
    order = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7])).permutation(len(items))
    items = [items[k] for k in order]
    if cfg.limit is not None:
        items = items[: cfg.limit]
    n_shards = math.ceil(len(items) / cfg.shard_records)
    jobs = []
    for k in range(n_shards):
        part = items[k * cfg.shard_records:(k + 1) * cfg.shard_records]
        jobs.append(ShardJob(
            index=k, refs=[refs[i] for i, _ in part], labels=[labels[i] for i, _ in part],
            flips=[f for _, f in part], out=storage.uri, endpoint_url=storage.endpoint_url,
            source=cfg.source if cfg.source == "digits" else os.path.abspath(cfg.source), resolution=res,
            encoder=enc_spec, shape=shape, dtype=cfg.dtype, chunk_records=chunk_records,
            num_classes=len(class_names), seed=cfg.seed, batch_size=cfg.batch_size, params_id=params_id,
        ))

    receipts: dict[int, dict[str, Any]] = {}
    listed = storage.list_sizes()
    parts = storage.list_sizes(PARTS_DIR)
    todo = []
    for job in jobs:
        name = shard_name(job.index)
        rec = None
        if f"{name}.json" in parts:
            try:
                rec = json.loads(storage.read(f"{PARTS_DIR}/{name}.json"))
            except ValueError:
                rec = None
        if rec and rec.get("params_id") == params_id and listed.get(name) == rec["shard"]["bytes"]:
            receipts[job.index] = rec  # finished by an earlier run
        else:
            todo.append(job)

    total = sum(len(j.refs) for j in todo)
    with tqdm(total=total, unit="img", desc=f"encode {len(todo)}/{n_shards} shards", disable=not cfg.progress) as bar:
        address = _ray_address(cfg)
        if todo and address:
            receipts.update(_run_ray(todo, address, cfg.ray_gpus, bar))
        else:
            for job in todo:
                receipts[job.index] = run_shard(job, on_batch=bar.update)

    manifest = _assemble(receipts, n_shards, spec, chunk_records, class_names, enc_spec, params)
    write_manifest(storage, manifest)  # last, atomic
    # Shards left by an earlier, larger run (after --overwrite) are not in the manifest; remove
    # them now that nothing can point at them.
    keep = {s.name for s in manifest.shards}
    for name in listed:
        if name.startswith("shard-") and name.endswith(".bin") and name not in keep:
            storage.remove(name)
            storage.remove(f"{PARTS_DIR}/{name}.json")
    return manifest


def _assemble(receipts: dict[int, dict[str, Any]], n_shards: int, spec: RecordSpec, chunk_records: int,
              class_names: list[str], enc_spec: EncoderSpec, params: dict[str, Any]) -> Manifest:
    assert sorted(receipts) == list(range(n_shards)), "every shard must have a receipt before the manifest"
    count = sum(r["count"] for r in receipts.values())
    s1 = np.sum([r["sum"] for r in receipts.values()], axis=0)
    s2 = np.sum([r["sumsq"] for r in receipts.values()], axis=0)
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean ** 2, 0.0))
    encoder = encoder_record(enc_spec)
    if params.get("digits_holdout"):
        # The digits evaluator (eval.EVALUATORS["digits"].build gets manifest.encoder) picks its reference by it.
        encoder["holdout"] = params["digits_holdout"]
    shards = [ShardInfo(**receipts[k]["shard"]) for k in range(n_shards)]
    return Manifest(
        record=spec, chunk_records=chunk_records, shards=shards, num_classes=len(class_names),
        encoder=encoder, channel_mean=mean.tolist(), channel_std=std.tolist(), params=params,
        class_names=class_names, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _run_ray(jobs: list[ShardJob], address: str, gpus: float, bar: tqdm) -> dict[int, dict[str, Any]]:
    """Shards as Ray tasks (workers need advflow installed and the same storage credentials)."""
    import ray

    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=max(1, min(2, os.cpu_count() or 1)), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=3)(run_shard)
    pending = {task.remote(j): j for j in jobs}
    out: dict[int, dict[str, Any]] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        try:
            out[job.index] = ray.get(done[0])
        except ray.exceptions.RayTaskError as err:
            # The task's own error (e.g. "<file>: cannot read image ...") already names the culprit;
            # Ray's wrapper would put ~40 lines of remote traceback in front of it.
            if isinstance(err.cause, (ValueError, OSError)):
                log.debug("shard %d failed in a Ray task:\n%s", job.index, err)
                raise err.cause from None
            raise
        bar.update(len(job.refs))
    return out
