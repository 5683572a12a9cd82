"""1D optimal-transport toy (the AFM paper's Fig. 1 claim, measured).

Trains AFM / GAN / flow matching on the four-mode mixture (or a 1D .npy sample set) and writes
OUT/metrics.json (w1, ot_map_mae, ...), OUT/map.npz (z, gz) and OUT/map.png.

  python jobs/toy.py --out runs/toy/afm_s0                       # AFM 1NFE, seed 0
  python jobs/toy.py --method gan --out runs/toy/gan             # lambda_ot = 0
  python jobs/toy.py --method fm --nfe 8 --out runs/toy/fm8      # flow matching, 8 Euler steps
  python jobs/toy.py --data samples.npy --out runs/toy/mine      # any (N,) float array
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
import torch

from advflow.platform.atomic import write_bytes, write_text
from advflow.platform.outputs import check_writable
from advflow.trainers.toy import ToyConfig, evaluate, make_target, ot_map, train


def plot_map(z: np.ndarray, gz: np.ndarray, target, metrics: dict):
    """Left: learned map G(z) against the exact OT map T(z). Right: generated vs data densities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_map, ax_den) = plt.subplots(1, 2, figsize=(11, 4.2))
    order = np.argsort(z)
    ax_map.plot(z[order], ot_map(target, z[order]), color="k", lw=2, label="exact OT map T(z)")
    ax_map.scatter(z, gz, s=2, alpha=0.3, color="tab:red", label="learned G(z)")
    ax_map.set(xlabel="z ~ N(0, 1)", ylabel="x", title=f"map  (mean |G - T| = {metrics['ot_map_mae']:.3f})")
    ax_map.legend(loc="upper left", markerscale=4)
    ref = target.reference(len(gz), np.random.default_rng(0))
    lo, hi = min(ref.min(), gz.min()), max(ref.max(), gz.max())
    bins = np.linspace(lo - 0.05, hi + 0.05, 200)
    ax_den.hist(ref, bins=bins, density=True, alpha=0.5, color="k", label="data")
    ax_den.hist(gz, bins=bins, density=True, alpha=0.5, color="tab:red", label="generated")
    ax_den.set(xlabel="x", ylabel="density", title=f"densities  (W1 = {metrics['w1']:.3f})")
    ax_den.legend()
    s = metrics.get("settings", {})
    fig.suptitle(f"{s.get('method', '?')}  nfe={s.get('nfe', '?')}  seed={s.get('seed', '?')}")
    fig.tight_layout()
    return fig


def save_outputs(out_dir: str, metrics: dict, z: np.ndarray, gz: np.ndarray, target) -> None:
    """Write out_dir/metrics.json, map.npz (z, gz) and map.png, each atomically."""
    import matplotlib.pyplot as plt

    write_text(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=2, sort_keys=True, default=str))
    buf = io.BytesIO()
    np.savez(buf, z=z, gz=gz)
    write_bytes(os.path.join(out_dir, "map.npz"), buf.getvalue())
    fig = plot_map(z, gz, target, metrics)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        write_bytes(os.path.join(out_dir, "map.png"), buf.getvalue())
    finally:
        plt.close(fig)


def run(cfg: ToyConfig, out_dir: str, progress: bool = True, target=None) -> dict:
    """Train, evaluate and write the three outputs; returns the metrics."""
    result = train(cfg, progress=progress, target=target)
    metrics, z, gz = evaluate(result)
    save_outputs(out_dir, metrics, z, gz, result.target)
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = ToyConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["afm", "gan", "fm"], default=d.method)
    p.add_argument("--nfe", type=int, default=d.nfe, help="AFM generator steps K; FM Euler steps")
    p.add_argument("--ot-scale", type=float, default=None, help="lambda_ot start (afm 0.05, gan 0)")
    p.add_argument("--ot-end", type=float, default=d.ot_end, help="lambda_ot at the end (cosine)")
    p.add_argument("--ot-schedule", choices=["constant", "cosine"], default=d.ot_schedule)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--n-freqs", type=int, default=d.n_freqs)
    p.add_argument("--lambda-gp", type=float, default=d.lambda_gp)
    p.add_argument("--lambda-cp", type=float, default=d.lambda_cp)
    p.add_argument("--ema", type=float, default=d.ema)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data", default=None, help=".npy file with a float array of shape (N,)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--map-samples", type=int, default=d.map_samples)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads: 1 is safest on a shared machine (more threads spin-wait "
                   "badly under load); 2 on an idle 2-core machine halves the wall time")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        cfg = ToyConfig(
            method=a.method, nfe=a.nfe, steps=a.steps, batch=a.batch, lr=a.lr, width=a.width,
            depth=a.depth, n_freqs=a.n_freqs, ot_scale=a.ot_scale, ot_end=a.ot_end,
            ot_schedule=a.ot_schedule, lambda_gp=a.lambda_gp, lambda_cp=a.lambda_cp, ema=a.ema,
            seed=a.seed, data=a.data, eval_samples=a.eval_samples, map_samples=a.map_samples,
            extra={"argv": sys.argv[1:] if argv is None else list(argv)},
        )
        target = make_target(cfg)  # validates --data before any training
        check_writable(a.out, "--out", folder=True)  # the outputs are written after the training
    except ValueError as exc:  # OutputError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    metrics = run(cfg, a.out, progress=not a.no_progress, target=target)
    keys = ("w1", "ot_map_mae", "between_modes_frac", "train_seconds")
    print(json.dumps({k: metrics[k] for k in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
