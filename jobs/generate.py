"""Generate a sample grid from a registered generator (one step, or K for multi-step models).

  python jobs/generate.py --model models:/NAME@champion --labels 0-9 --per-label 8 --seed 0 --out grid.png
  python jobs/generate.py --model models:/NAME/3 --labels 1,3,5-7 --out g.png --npz images.npz

The model goes through advflow.platform.tracking.registry.load_generator (aliases pinned to a version, every
file scanned for pickle data before anything is loaded). Row i of the grid (image i, label-major:
all images of the first label, then the next) uses seed + i, so the same arguments give the same
images. --npz also saves the raw uint8 images (N, H, W, C) with their labels and seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


MAX_LABELS = 10_000  # grid rows; more than any class count in use (ImageNet: 1000), and a typo'd
# range (0-1000000) would otherwise build a million-row list before the model is even loaded


def parse_labels(text: str) -> list[int]:
    """"0-9", "1,3,5", "0-2,7" -> list of ints in the order given (ranges inclusive). A label given
    twice gets two grid rows (with different seeds), so repeats are kept."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                if len(out) + hi_i - lo_i + 1 > MAX_LABELS:
                    raise OverflowError
                out.extend(range(lo_i, hi_i + 1))
            else:
                out.append(int(part))
        except OverflowError:
            raise ValueError(f"--labels: {text!r} asks for over {MAX_LABELS} labels (one grid row each); "
                             "list the model's class ids, e.g. 0-9") from None
        except ValueError:
            raise ValueError(f"--labels: {part!r} in {text!r} is not an int or an a-b range with a <= b; "
                             "use e.g. 0-9 or 1,3,5") from None
    return out


def check_labels(labels: list[int], num_classes: int, given: str) -> None:
    """ValueError naming each label outside [0, num_classes) once, as `--labels <given>: ...`."""
    from advflow.platform.tracking.model_format import labels_outside

    problem = labels_outside(labels, num_classes)
    if problem:
        raise ValueError(f"--labels {given}: {problem}")


def _save_npz(path: Path, **arrays) -> None:
    import io

    import numpy as np

    from advflow.platform.atomic import write_bytes

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def needs_tracking_server(model: str) -> bool:
    """models:/ and runs:/ URIs are resolved by the MLflow server; a local model folder, file:// or
    s3:// location is read directly and needs no server."""
    return model.startswith(("models:/", "runs:/"))


def _fail(err) -> None:
    """The one line a user sees for a refused command (no traceback: every refusal here is a
    mistake in the arguments or the environment, and the line names the fix)."""
    from advflow.platform.log import get_logger

    get_logger("jobs.generate").error("generate: %s", err)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION, runs:/... or a folder")
    p.add_argument("--labels", default="0-9", help="class ids: 0-9, 1,3,5 or mixed")
    p.add_argument("--per-label", type=int, default=8, help="images per label (one grid row per label)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--out", required=True, help="grid PNG (written atomically)")
    p.add_argument("--npz", default=None, help="also save the uint8 images, labels and seeds here")
    p.add_argument("--vae-path", default=None, help="override the recorded SD-VAE folder (sd-vae decoders)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from advflow.platform.outputs import check_writable

    try:
        # Before the model loads and the images are made: a path that cannot be written would
        # otherwise fail only after all the work, on the grid's temp file.
        check_writable(a.out, "--out")
        check_writable(a.npz, "--npz")
        labels = parse_labels(a.labels)
        if a.per_label < 1:
            raise ValueError(f"--per-label: {a.per_label} must be >= 1")
        if a.seed < 0:
            raise ValueError(f"--seed: {a.seed} must be >= 0")
    except ValueError as e:
        _fail(e)
        return 2
    if needs_tracking_server(a.model):
        from advflow.platform.tracking.runs import TrackingURIMissing, require_tracking_uri

        try:
            require_tracking_uri(f"--model {a.model}")
        except TrackingURIMissing as e:
            _fail(e)
            return 2
    from mlflow.exceptions import MlflowException

    from advflow.platform.images import save_grid
    from advflow.platform.tracking.registry import load_generator

    try:
        model = load_generator(a.model, vae_path=a.vae_path, device=a.device)
    except (MlflowException, ValueError, FileNotFoundError) as e:  # unknown model/alias, refused artifact
        _fail(f"--model {a.model}: {e}")
        return 2
    src = model.source
    try:
        check_labels(labels, model.spec.num_classes, a.labels)  # before the images, once per label
    except ValueError as e:
        _fail(e)
        return 2
    ys = [y for y in labels for _ in range(a.per_label)]
    seeds = [a.seed + i for i in range(len(ys))]
    try:
        images = model.images(ys, seeds)  # (N, C, H, W) in [-1, 1]
    except ValueError as e:  # the model's own checks (seeds)
        _fail(e)
        return 2
    save_grid(images, a.out, nrow=a.per_label)
    if a.npz:
        from advflow.platform.images import to_uint8

        _save_npz(Path(a.npz), images=to_uint8(images), labels=ys, seeds=seeds)
    sampler = model.spec.sampler
    print(f"model {src['requested']} -> {src['name'] or '-'} version {src['version'] or '-'} "
          f"(run {src['run_id'] or '-'}); kind={sampler['kind']} nfe={sampler['nfe']} "
          f"repeats={sampler['repeats']}; {len(ys)} images -> {a.out}" + (f", {a.npz}" if a.npz else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
