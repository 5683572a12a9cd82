"""Reference statistics for `eval.kind: fid`, computed as ADM's evaluation suite computes them.

    python jobs/fid_reference.py --data PREFIX --inception pt_inception-2015-12-05-6726825d.pth --out ref.npz
    python jobs/fid_reference.py --images /data/val --inception ... --out ref.npz --limit 50000

--data reads a prepared dataset (jobs/prepare_latents.py; s3://bucket/path or a directory) and decodes
its latents the way they were made (the manifest's encoder: pixel, or the SD-VAE); --images reads
every PNG/JPEG/WebP under a folder (one size for all). Either way the images become uint8, go
through the FID Inception-v3 (`platform/eval/inception.py`: the TF graph's resize and scaling), and
`--out` gets `mu` (2048,), `sigma` (2048, 2048) and `num_images`, written atomically: the file
`eval.reference_stats` reads. It also gets `features`, the float32 features of a seeded subset of at
most --max-features images (default 10,000; 0: none), and with --data their `labels` (the dataset's
classes): the reference of eval/precision, eval/recall and eval/diversity (`platform/eval/coverage.py`).
--adm-batch also writes the uint8 images as `arr_0` (N, H, W, 3), the reference batch ADM's
evaluator.py takes (it holds every image in memory: 50k 256x256 images are 9.8 GB), with --data their
labels as `arr_1` (N,) (the layout of ADM's class-conditional sample batches).
--limit keeps a seeded random subset. A dataset prepared with --flips holds each image twice
(original and mirror); its statistics then describe that doubled set.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from advflow.platform.atomic import write_bytes
from advflow.platform.data.shards import DataError, read_manifest
from advflow.platform.data.storage import Storage, StorageError
from advflow.platform.eval.fid import (ADM_IMAGES, ADM_LABELS, MAX_REFERENCE_FEATURES, as_uint8_pixels,
                                      inception_features, save_reference)
from advflow.platform.eval.inception import load_inception
from advflow.platform.outputs import OutputError, check_writable

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="PREFIX", help="a prepared dataset: s3://bucket/path or a directory")
    src.add_argument("--images", metavar="DIR", help="a folder of images (searched recursively)")
    p.add_argument("--inception", required=True, metavar="PATH",
                   help="FID Inception weights (pt_inception-2015-12-05-*.pth or .safetensors), a local file")
    p.add_argument("--out", required=True, metavar="PATH.npz", help="where the statistics go")
    p.add_argument("--adm-batch", metavar="PATH.npz", help="also write the uint8 images as ADM's `arr_0` batch")
    p.add_argument("--limit", type=int, help="use a random subset of N images (seeded by --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-features", type=int, default=MAX_REFERENCE_FEATURES, metavar="N",
                   help="store the features of at most N images (a subset seeded by --seed) for precision, recall "
                        f"and diversity (default {MAX_REFERENCE_FEATURES}; 0: none)")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception (and decoder) call")
    p.add_argument("--device", help="Inception and decoder device (default: cuda if available)")
    p.add_argument("--endpoint-url", help="S3 endpoint override (default: AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for flag, value in (("--out", a.out), ("--adm-batch", a.adm_batch)):
        if value and not value.endswith(".npz"):
            p.error(f"{flag} {value}: name an .npz file (e.g. {value}.npz)")
    if not os.path.isfile(a.inception):
        p.error(f"--inception {a.inception}: no such file; download the FID Inception weights "
                "(pt_inception-2015-12-05-6726825d.pth) yourself and pass their path")
    if a.images and not os.path.isdir(a.images):
        p.error(f"--images {a.images}: no such folder")
    if a.limit is not None and a.limit < 2:
        p.error(f"--limit {a.limit}: statistics need at least 2 images")
    if a.batch_size < 1:
        p.error(f"--batch-size {a.batch_size}: must be >= 1")
    if a.max_features < 0:
        p.error(f"--max-features {a.max_features}: must be >= 0 (0 stores no features)")
    try:  # before the Inception pass over every image: the files are written at the end
        check_writable(a.out, "--out")
        check_writable(a.adm_batch, "--adm-batch")
    except OutputError as err:
        p.error(str(err))
    return a


def subset(total: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the images to use: all, or a seeded random `limit` of them."""
    if limit is None or limit >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))


Batches = Iterator[tuple[torch.Tensor, np.ndarray | None]]


def dataset_batches(prefix: str, a: argparse.Namespace) -> tuple[int, Batches]:
    """(number of images, (uint8 (n, 3, H, W) images, (n,) labels) batches) of a prepared dataset, decoded
    as it was encoded."""
    from advflow.platform.data.encoders import ENCODERS

    storage = Storage(prefix, endpoint_url=a.endpoint_url)
    m = read_manifest(storage)
    keep = subset(m.num_records, a.limit, a.seed)
    name = m.encoder.get("name")
    if name not in ENCODERS:
        raise ValueError(f"{storage.url()}: the manifest's encoder {name!r} is unknown; expected one of "
                         f"{sorted(ENCODERS)} (a dataset from a newer advflow?)")
    decoder = ENCODERS[name].decoder(m.encoder, a.device)  # once: the SD-VAE loads in seconds

    def batches() -> Batches:
        first = 0
        for shard in m.shards:
            rows = keep[(keep >= first) & (keep < first + shard.records)] - first
            first += shard.records
            if not len(rows):
                continue
            x, y = m.record.decode(storage.read(shard.name))  # (records, C, h, w) latents, (records,) labels
            for i in range(0, len(rows), a.batch_size):
                chunk = rows[i:i + a.batch_size]
                latents = torch.from_numpy(np.asarray(x[chunk], dtype=np.float32))
                # the images, in [-1, 1] -> uint8, and their classes
                yield as_uint8_pixels(decoder.decode(latents).cpu()), np.asarray(y[chunk], dtype=np.int64)

    return len(keep), batches()


def folder_batches(folder: str, a: argparse.Namespace) -> tuple[int, Batches]:
    """(number of images, (uint8 (n, 3, H, W) images, None) batches) of the images under `folder`, in path
    order (a folder has no labels: the reference then supports precision and recall, not diversity)."""
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"--images {folder}: {len(files)} image file(s) ({'/'.join(IMAGE_SUFFIXES)}) found; "
                         "statistics need at least 2")
    files = [files[i] for i in subset(len(files), a.limit, a.seed)]

    def batches() -> Batches:
        size = None
        for i in range(0, len(files), a.batch_size):
            arrays = []
            for f in files[i:i + a.batch_size]:
                try:
                    with Image.open(f) as im:
                        arr = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
                except OSError as exc:
                    raise ValueError(f"{f}: not a readable image ({exc}); remove it or fix it") from exc
                size = size or arr.shape
                if arr.shape != size:
                    raise ValueError(f"{f}: {arr.shape[1]}x{arr.shape[0]} pixels, the first image is "
                                     f"{size[1]}x{size[0]}; resize or crop the folder to one size first")
                arrays.append(arr)
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), None

    return len(files), batches()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        total, batches = (dataset_batches(a.data, a) if a.data else folder_batches(a.images, a))
        model = load_inception(a.inception, a.device)
        kept: list[np.ndarray] = []
        labels: list[np.ndarray | None] = []

        def counted() -> Iterator[torch.Tensor]:
            with tqdm(total=total, unit="img", desc="inception features", disable=a.no_progress) as bar:
                for batch, y in batches:
                    if a.adm_batch:
                        kept.append(batch.permute(0, 2, 3, 1).numpy())  # (n, H, W, 3)
                    labels.append(y)
                    yield batch
                    bar.update(len(batch))

        feats = inception_features(model, counted(), a.batch_size)  # (N, 2048)
        y = np.concatenate(labels) if labels and all(v is not None for v in labels) else None
        save_reference(a.out, feats, y, max_features=a.max_features, seed=a.seed)
        if a.adm_batch:
            buf = io.BytesIO()
            np.savez(buf, **{ADM_IMAGES: np.concatenate(kept), **({ADM_LABELS: y} if y is not None else {})})
            write_bytes(a.adm_batch, buf.getvalue())
    except (ValueError, DataError, StorageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stored = min(len(feats), a.max_features)
    what = (f"; the features of {stored} of them" + (" with their labels" if y is not None else "")) if stored else ""
    print(f"{a.out}: mu, sigma of {len(feats)} images from {a.data or a.images}{what}"
          + (f"; {a.adm_batch}: their uint8 batch (arr_0)" if a.adm_batch else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
