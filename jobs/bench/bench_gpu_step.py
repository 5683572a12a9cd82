"""One GPU's AFM iteration at ImageNet scale, as the recipes run it (a benchmark, not a test).

    python jobs/bench/bench_gpu_step.py                      # XL/2 1NFE, micro batch 32, bf16, ZeRO-2
    python jobs/bench/bench_gpu_step.py --size B/2 --micro-batch 64 --iters 50

What it runs: the recipe's G and D (`jobs/configs/imagenet_xl2_1nfe.yaml`: XL/2, 4x32x32 SD-VAE
latents, 1000 classes) in two DeepSpeed engines built by `engines.build_engine` (bf16, ZeRO-2 for
both, grad clip 50), one D update then one G update per iteration on random latents (no data
stream: this measures the GPU work), with the loss settings of phase 1 (R1/R2 on 25 %, gradnorm,
lambda_ot 0.2). The recipe's per-GPU batch is 256 / 8 workers = 32.

It prints ms per iteration (median over the timed iterations after --warmup), images per second
(each update draws its own batch, so 2 x micro-batch images per iteration), peak GPU memory, and an
MFU estimate: the paper counts an AFM 1NFE iteration as 14.5 units of one G forward, so
  MFU = 14.5 * 2 * G_MACs_per_image * batch / seconds_per_iteration / peak_bf16_flops
with G's multiply-accumulates counted by a forward hook on every nn.Linear / nn.Conv2d and the
attention products (an estimate, as the paper's unit count is). --peak-tflops is the dense bf16
peak of the card (H100/H200 SXM: 989).

It also checks the EMA reload through the optimizer's fp32 master in bf16 at this size: after
`write_weights` and one more step at lr 1e-30, G's fp32 master equals the EMA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from advflow.platform.train.engines import EngineSpec, build_engine, write_weights
from advflow.trainers import afm
from advflow.trainers.ema import EMA
from advflow.trainers.models import SIZES, build_discriminator, build_generator


def g_macs_per_image(G: torch.nn.Module, shape: tuple[int, int, int], device: torch.device) -> float:
    """Multiply-accumulates of one G forward per image: linear/conv layers by hooks, plus attention's
    two (T x T x D) products per block, read off the token count of each block's input."""
    macs = 0

    def on_linear(mod, inp, out):
        nonlocal macs
        macs += inp[0].numel() // inp[0].shape[-1] * mod.in_features * mod.out_features

    def on_conv(mod, inp, out):
        nonlocal macs
        k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
        macs += out.numel() * k

    hooks = []
    for m in G.modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(on_linear))
        elif isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv))
    n = 2
    x = torch.randn(n, *shape, device=device)
    y = torch.zeros(n, dtype=torch.long, device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        G(x, y)
    for h in hooks:
        h.remove()
    size = SIZES[G.config["name"]]
    tokens = (shape[1] // size.patch) * (shape[2] // size.patch)
    attn = 2 * tokens * tokens * size.width * size.depth * G.repeats  # q k^T and attn v, per pass
    return macs / n + attn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="XL/2")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    from advflow.platform.outputs import OutputError, check_writable

    try:  # before the timed steps: the JSON is written at the end
        check_writable(a.json or None, "--json")
    except OutputError as err:
        ap.error(str(err))

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1").items():
        os.environ.setdefault(k, v)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    shape = (4, 32, 32)
    torch.manual_seed(0)
    G = build_generator(a.size, kind="1nfe").to(device)
    D = build_discriminator(a.size, time_cond=False).to(device)
    macs = g_macs_per_image(G, shape, device)
    ema = EMA(G, decay=0.9999)
    cfg = afm.AFMConfig(lambda_ot=0.2)
    gradnorm = afm.make_gradnorm(cfg).to(device)
    spec = dict(micro_batch=a.micro_batch, grad_accum=1, lr=1e-4, betas=(0.0, 0.9), weight_decay=0.01, eps=1e-8,
                grad_clip=50.0, bf16=cuda)
    g_engine = build_engine(G, EngineSpec(stage=a.zero, **spec))
    d_engine = build_engine(D, EngineSpec(stage=a.zero, **spec))
    gen = torch.Generator(device=device).manual_seed(1)

    def iteration() -> None:
        for engine in (d_engine, g_engine):
            x = torch.randn(a.micro_batch, *shape, device=device, generator=gen)
            y = torch.randint(0, 1000, (a.micro_batch,), device=device, generator=gen)
            z = torch.randn(x.shape, device=device, generator=gen)
            if engine is d_engine:
                loss, _ = afm.d_loss(G, d_engine, x, y, z, cfg, generator=gen)
            else:
                loss, _ = afm.g_loss(g_engine, D, gradnorm, x, y, z, cfg, generator=gen)
            engine.backward(loss)
            engine.step()
        ema.update(G)

    times = []
    torch.cuda.reset_peak_memory_stats() if cuda else None
    for i in range(a.warmup + a.iters):
        torch.cuda.synchronize() if cuda else None
        t0 = time.perf_counter()
        iteration()
        torch.cuda.synchronize() if cuda else None
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    flops = 14.5 * 2 * macs * a.micro_batch / sec
    result = {
        "size": a.size, "micro_batch": a.micro_batch, "zero": a.zero, "bf16": cuda, "iters": a.iters,
        "ms_per_iteration": 1e3 * sec, "images_per_s": 2 * a.micro_batch / sec, "peak_mem_gib": peak,
        "g_gmacs_per_image": macs / 1e9, "tflops_14_5_units": flops / 1e12,
        "mfu": flops / (a.peak_tflops * 1e12),
        "g_params_m": sum(p.numel() for p in G.parameters()) / 1e6,
        "d_params_m": sum(p.numel() for p in D.parameters()) / 1e6,
    }

    # EMA reload through the fp32 master at this size, then one step at lr ~ 0.
    from deepspeed.utils import safe_get_full_fp32_param

    write_weights(g_engine, ema.shadow)
    for group in g_engine.optimizer.param_groups:
        group["lr"] = 1e-30
    iteration()
    worst = 0.0
    for name, p in G.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p).float()
            worst = max(worst, (full - ema.shadow[name].to(full.device).float()).abs().max().item())
    result["ema_reload_master_max_abs_diff_after_step"] = worst
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
