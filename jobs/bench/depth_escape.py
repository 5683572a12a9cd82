"""When does D's early saturation end? One AFM run (depth-repeated by default), per-step D statistics,
in a plain single-process loop or read from a platform run, to find which difference makes advflow's
R = 2 escape D's early win at ~100 iterations while the official trainer stays stuck (issue 23, item 6).

The plain loop is the platform's step written out with plain torch: the same network, data stream,
per-sample draws and `trainers.afm` losses, with `torch.optim.AdamW` + `clip_grad_norm_` instead of
DeepSpeed's engine step and its clipping. One thing at a time can then differ:

    --gp-rows spaced|first     which m rows of a batch get R1/R2 (advflow: evenly spaced; official: the first m)
    --ot-clock iteration|update  lambda_ot read at iteration k (advflow) or at update count 2k + 1 (a clock
                               that counts D and G updates, as an "official step is half an iteration")
    --platform-run DIR         instead of training: read a platform run's per-step metrics log (train it
                               with jobs/train.py --no-ray or local_launch, 1 or 2 workers)

    python jobs/bench/depth_escape.py --repeats 2 --seed 0 --steps 400 [--gp-rows first] [--ot-clock update]

Prints the first saturated iteration, the escape iteration (the first after it whose next 10 iterations
have mean d_loss above 0.1, i.e. D no longer wins every pair), the saturated share and the peak D
gradient norm before clipping; `--json FILE` appends the record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

SATURATED = 1e-2  # d_loss below this: D separates every real/fake pair by a wide logit margin
ESCAPED = 0.1  # mean d_loss over the next WINDOW iterations above this: D no longer wins every pair
WINDOW = 10


def escape_stats(d_loss: list[float], d_grad: list[float]) -> dict:
    """First saturated iteration, escape iteration (None: never), saturated share, peak D gradient norm."""
    first = next((i for i, v in enumerate(d_loss) if v < SATURATED), None)
    escape = None
    if first is not None:
        for i in range(first + 1, len(d_loss) - WINDOW + 1):
            if sum(d_loss[i:i + WINDOW]) / WINDOW > ESCAPED:
                escape = i
                break
    finite = [g for g in d_grad if math.isfinite(g)]
    return {"first_saturated": first, "escape": escape,
            "saturated_share": sum(v < SATURATED for v in d_loss) / max(1, len(d_loss)),
            "peak_d_grad": max(finite) if finite else None}


def plain_loop(spec, steps: int, gp_rows: str, ot_clock: str) -> tuple[list[float], list[float]]:
    import torch

    from advflow.platform.data.reader import LatentStream
    from advflow.platform.train.methods import step_seed
    from advflow.platform.train.phases import plan_of
    from advflow.trainers import afm
    from advflow.trainers.models import build_discriminator, build_generator

    if gp_rows == "first":
        afm.gp_indices = lambda n, m, device=None: torch.arange(m, device=device)  # the official choice
    torch.manual_seed(spec.train.seed)
    streams = {name: LatentStream(spec.data.prefix, spec.train.global_batch, partitions=spec.partitions,
                                  seed=spec.train.seed, stream=name, shuffle_buffer=spec.data.shuffle_buffer,
                                  prefetch=spec.data.prefetch) for name in ("d", "g")}
    iters = {k: iter(s) for k, s in streams.items()}
    m = streams["d"].manifest
    common = dict(in_channels=m.shape[0], input_size=m.shape[1], num_classes=m.num_classes)
    mc = spec.model
    G = build_generator(mc.size, kind=mc.kind, nfe=mc.nfe, repeats=mc.repeats, **common)
    D = build_discriminator(mc.d_size or mc.size, time_cond=mc.kind != "1nfe", **common)
    o = spec.optim
    opt = {"g": torch.optim.AdamW([p for p in G.parameters() if p.requires_grad], lr=o.lr * G.lr_scale,
                                  betas=o.betas, weight_decay=o.weight_decay, eps=o.eps),
           "d": torch.optim.AdamW([p for p in D.parameters() if p.requires_grad], lr=o.lr, betas=o.betas,
                                  weight_decay=o.weight_decay, eps=o.eps)}
    plan = plan_of(spec)
    a = spec.adversarial
    base = afm.AFMConfig(gp_fraction=a.gp_fraction, gp_eps=a.gp_eps, source=a.source)
    gradnorm = afm.make_gradnorm(base)
    d_loss, d_grad = [], []
    for k in range(steps):
        cfg = base.with_phase(plan.at(k))
        if ot_clock == "update":  # the schedule's clock counts D and G updates: twice as fast
            cfg = dataclasses.replace(cfg, lambda_ot=plan.at(2 * k + 1).lambda_ot)
        for purpose, name, net in ((1, "d", D), (2, "g", G)):
            opt[name].zero_grad(set_to_none=True)
            x, y = next(iters[name])
            gen = torch.Generator().manual_seed(step_seed(spec.train.seed, k, 0, purpose))
            z = torch.randn(x.shape, generator=gen)
            if name == "d":
                loss, _ = afm.d_loss(G, D, x, y, z, cfg, generator=gen)
            else:
                loss, _ = afm.g_loss(G, D, gradnorm, x, y, z, cfg, generator=gen)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf"))
            opt[name].step()
            if name == "d":
                d_loss.append(loss.item())
                d_grad.append(float(norm))
        if (k + 1) % 50 == 0:
            print(f"  iteration {k + 1}/{steps}: d_loss {d_loss[-1]:.2e}", file=sys.stderr, flush=True)
    for s in streams.values():
        s.close()
    return d_loss, d_grad


def from_platform_run(run_dir: str) -> tuple[list[float], list[float]]:
    from advflow.platform.train.metrics_log import MetricsLog

    rows = sorted(MetricsLog(run_dir).read(), key=lambda r: r["step"])
    return [r["d_loss"] for r in rows], [r.get("d_grad_norm", float("nan")) for r in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/digits_tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", help="data prefix (default: the config's data.prefix)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=400, help="iterations to train (the schedules keep train.steps)")
    p.add_argument("--gp-rows", choices=["spaced", "first"], default="spaced")
    p.add_argument("--ot-clock", choices=["iteration", "update"], default="iteration")
    p.add_argument("--platform-run", help="read this platform run's metrics log instead of training")
    p.add_argument("--label", default=None)
    p.add_argument("--json", help="append the record to this JSON-lines file")
    args = p.parse_args(argv)

    from advflow.platform.config import load_config

    sets = list(args.overrides) + [f"model.repeats={args.repeats}", f"train.seed={args.seed}"]
    if args.data:
        sets.append(f"data.prefix={args.data}")
    spec = load_config(args.config, sets)
    t0 = time.perf_counter()
    if args.platform_run:
        d_loss, d_grad = from_platform_run(args.platform_run)
        how = f"platform run {args.platform_run}"
    else:
        d_loss, d_grad = plain_loop(spec, args.steps, args.gp_rows, args.ot_clock)
        how = f"plain AdamW loop, gp rows {args.gp_rows}, lambda_ot clock {args.ot_clock}"
    record = {"label": args.label or how, "repeats": args.repeats, "seed": args.seed, "steps": len(d_loss),
              "seconds": time.perf_counter() - t0, **escape_stats(d_loss, d_grad)}
    print(json.dumps(record))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
