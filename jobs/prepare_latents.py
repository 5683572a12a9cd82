"""Encode a dataset into latent shards, or verify an existing one.

    python jobs/prepare_latents.py --source digits --encoder pixel --out PREFIX
    python jobs/prepare_latents.py --source /data/imagenet/train --encoder sd-vae \
        --vae-path /models/sd-vae-ft-ema --resolution 256 --flips --out s3://bucket/in256
    python jobs/prepare_latents.py --verify PREFIX

PREFIX is s3://bucket/path (endpoint override: AWS_ENDPOINT_URL or --endpoint-url) or a local
directory. Runs on the Ray cluster when --ray-address or RAY_ADDRESS is set, in-process otherwise.
--verify exits 0 when every shard matches the manifest, 1 (listing each bad shard) otherwise.
"""

from __future__ import annotations

import argparse
import sys

from advflow.platform.data.prepare import PrepareConfig, prepare
from advflow.platform.data.shards import DataError, verify_dataset
from advflow.platform.data.storage import StorageError
from advflow.platform.outputs import check_writable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verify", metavar="PREFIX", help="check every shard of PREFIX against its manifest and exit")
    p.add_argument("--source", help="'digits' or an ImageFolder directory (one sub-folder per class)")
    p.add_argument("--out", help="destination prefix: s3://bucket/path or a local directory")
    p.add_argument("--encoder", default="pixel", choices=["pixel", "sd-vae"])
    p.add_argument("--vae-path", help="local AutoencoderKL folder (sd-vae)")
    p.add_argument("--vae-sample", default="sample", choices=["sample", "mean"])
    p.add_argument("--resolution", type=int, help="image side (default: 8 for digits, 256 for folders)")
    p.add_argument("--digits-holdout", type=float, default=0.2,
                   help="digits: fraction held out (stratified) as the quality metric's reference; 0 keeps all")
    p.add_argument("--digits-holdout-seed", type=int, default=0, help="digits: seed of the held-out split")
    p.add_argument("--flips", action="store_true", help="also store horizontally flipped copies")
    p.add_argument("--shard-records", type=int, default=8192)
    p.add_argument("--chunk-records", type=int, help="records per checksummed read unit (default: shards split evenly into <= ~16 MiB)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="keep only N (randomly chosen) items")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--device", help="encoder device (default: cuda if available)")
    p.add_argument("--ray-address", help="Ray cluster address ('auto', 'ray://host:10001', 'local')")
    p.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per Ray task")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset made with other parameters")
    p.add_argument("--endpoint-url", help="S3 endpoint override (default: AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--strict", action="store_true",
                   help="refuse a source whose class folders hold files that are not .jpg/.jpeg/.png (default: skip them with a warning)")
    args = p.parse_args(argv)
    if not args.verify and not (args.source and args.out):
        p.error("pass --source and --out to prepare, or --verify PREFIX")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.verify:
            problems = verify_dataset(args.verify, endpoint_url=args.endpoint_url)
            for line in problems:
                print(f"BAD {line}", file=sys.stderr)
            print(f"{args.verify}: {'OK' if not problems else f'{len(problems)} bad shard(s)'}")
            return 1 if problems else 0
        # A local prefix is checked before any image is encoded (an s3:// one by its storage).
        check_writable(args.out, "--out", folder=True)
        cfg = PrepareConfig(
            source=args.source, out=args.out, encoder=args.encoder, vae_path=args.vae_path,
            vae_sample=args.vae_sample, resolution=args.resolution, flips=args.flips,
            shard_records=args.shard_records, chunk_records=args.chunk_records, dtype=args.dtype,
            seed=args.seed, limit=args.limit, batch_size=args.batch_size, device=args.device,
            ray_address=args.ray_address, ray_gpus=args.ray_gpus, overwrite=args.overwrite,
            endpoint_url=args.endpoint_url, progress=not args.no_progress,
            digits_holdout=args.digits_holdout, digits_holdout_seed=args.digits_holdout_seed, strict=args.strict,
        )
        m = prepare(cfg)
        print(f"{cfg.out}: {m.num_records} records of {list(m.shape)} {m.record.dtype} in {len(m.shards)} "
              f"shard(s), {m.num_classes} classes, encoder {m.encoder['name']}")
        return 0
    except (ValueError, DataError, StorageError, FileNotFoundError) as exc:
        print(f"[advflow] prepare_latents: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
