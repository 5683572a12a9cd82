"""Training-loop benchmarks for issue 4's performance section (a benchmark, not a test).

    python jobs/bench/bench_train.py                          # all three parts, CPU-sized defaults
    python jobs/bench/bench_train.py --parts overhead --size tiny --batch 64 --steps 200 --short-steps 50
    python jobs/bench/bench_train.py --parts cost --cost-size S/2 --cost-batch 8 --cost-reps 3
    python jobs/bench/bench_train.py --data /tmp/digits       # reuse a dataset made by prepare_latents.py

1. overhead: one AFM run (same model, batch, steps, ZeRO-2, one worker) four ways: a bare PyTorch
   loop in this process (afm.d_loss/g_loss, torch AdamW, grad clip, EMA, the same LatentStream);
   the real training loop `TrainLoop` in this process (DeepSpeed, no launcher); `run_local` (the loop
   in a spawned process); Ray Train (`ensure_ray()`, `build_torch_trainer(spec).fit()`). Steady state only:
   "body" sums the loop's own per-step timer (StepTimes.total; the same span in the bare loop) over
   the report windows after the first; "wall" also counts what happens between steps (metric
   flush, reports); "cpu" is the CPU time of the process doing the work, the figure to trust on a
   shared machine. In this process they are read per window; for the launched runs they are
   (X(steps) - X(short_steps)) / (steps - short_steps) over two runs, which cancels start-up and the
   final checkpoint (worker CPU: getrusage of run_local's children; /proc samples of Ray's
   RayTrainWorker processes). A last short Ray run with log_every=--stall-window shows the stall
   when reports come faster than Ray Train's controller takes them. Goal: Ray+DS / bare <= 1.05.
2. cost: one AFM iteration (d_loss + backward, g_loss + backward) against one flow-matching step
   (fm_loss + backward) of the same multistep generator, plus the 1NFE case, fused and unfused D,
   and one no-grad G forward as the unit. Reps are interleaved across the variants so machine load
   hits them alike; medians of CPU time give the ratios. Paper: 14.5 vs 3 units (4.83x); goal <= 4.0x.
4. live: the digits demo on Ray with the live-metrics export (tracking.live_metrics) on and off,
   alternated; samples/s of each, and the export's own cost per window. Goal: under 1 % slower.
3. demo: the digits demo (jobs/configs/digits_tiny.yaml, data prefix replaced, --demo-steps) on
   Ray; the loop's reported per-step breakdown (data wait, D step, G step, checkpoint, total) of
   rank 0 and the wall time the driver saw. Goal: data wait < 2 % of the step.

All ratios come from this one run on this machine; on a shared CPU rerun before trusting a 5 % gap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from advflow.infra.local.proc import free_port

REPO = Path(__file__).resolve().parents[2]  # jobs/bench/bench_train.py -> the repo root
DEMO_CONFIG = REPO / "jobs" / "configs" / "digits_tiny.yaml"


# ----------------------------------------------------------------------------- shared helpers


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def make_digits(out: str) -> str:
    """The digits dataset exactly as `jobs/prepare_latents.py --source digits --encoder pixel` makes it."""
    from advflow.platform.data.prepare import PrepareConfig, prepare

    if not Path(out, "manifest.json").is_file():
        prepare(PrepareConfig(source="digits", out=out, encoder="pixel", progress=False))
    return out


def demo_dict(prefix: str) -> dict:
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["data"]["prefix"] = prefix
    return raw


def overhead_spec(args, prefix: str, storage: str, name: str, steps: int, log_every: int | None = None):
    """The digits recipe at the requested size/batch/steps, one worker, ZeRO-2, final checkpoint only."""
    from advflow.platform.config import RunSpec

    raw = demo_dict(prefix)
    raw["run"].update(name=name, storage_path=storage)
    raw["model"]["size"] = args.size
    raw["train"].update(steps=steps, global_batch=args.batch, log_every=log_every or args.window,
                        checkpoint_every=steps)
    raw["distributed"].update(workers=1, cpus_per_worker=1, zero_stage_g=2, zero_stage_d=2)
    return RunSpec.from_dict(raw)


def steady(reports: list[dict], skip: int = 1, drop_ckpt: bool = False) -> dict[str, float]:
    """Sum the loop's `time/*` windows (and `wall` where present) after the first `skip` windows;
    drop_ckpt also leaves out windows that ended in a checkpoint (their wall includes the save)."""
    rows, prev = [], 0
    for r in reports:
        if "time/total" in r:
            rows.append({**r, "_n": int(r["step"]) - prev})
            prev = int(r["step"])
    rows = [r for r in rows[skip:] if not (drop_ckpt and r.get("_ckpt"))]
    out = {k: sum(r[f"time/{k}"] for r in rows) for k in ("data", "d_step", "g_step", "checkpoint", "total")}
    out["wall"] = sum(r.get("wall", float("nan")) for r in rows)
    out["cpu"] = sum(r.get("cpu", float("nan")) for r in rows)
    out["steps"] = sum(r["_n"] for r in rows)
    return out


def per_step_ms(seconds: float, steps: int) -> float:
    return 1e3 * seconds / steps if steps else float("nan")


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else f"{c:.2f}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "-" * len(line(cells[0]))
    return "\n".join([title, sep, line(cells[0]), sep, *map(line, cells[1:]), sep])


# ----------------------------------------------------------------------------- part 1: overhead


def bare_loop(spec) -> dict:
    """The AFM iteration of `TrainLoop` (methods/afm.py) without DeepSpeed or a launcher: same data
    streams, seeds, models, phase plan, clipping, EMA and on-device metrics flushed once per report
    window. One worker: each draw is the whole batch of its step's generator (StepEnv.generator)."""
    from advflow.platform.data.reader import LatentStream
    from advflow.platform.train.methods import step_seed
    from advflow.platform.train.methods.afm import D_DRAWS, G_DRAWS
    from advflow.platform.train.phases import plan_of
    from advflow.trainers import afm
    from advflow.trainers.ema import EMA
    from advflow.trainers.models import build_discriminator, build_generator

    d, t, o, a, m = spec.data, spec.train, spec.optim, spec.adversarial, spec.model
    streams = {name: LatentStream(d.prefix, spec.micro_batch, partitions=spec.partitions, seed=t.seed, stream=name,
                                  shuffle_buffer=d.shuffle_buffer, prefetch=d.prefetch) for name in ("d", "g")}
    iters = {k: iter(s) for k, s in streams.items()}
    man = streams["d"].manifest
    c, h, _ = man.shape
    common = dict(in_channels=c, input_size=h, num_classes=man.num_classes)
    torch.manual_seed(t.seed)
    G = build_generator(m.size, kind=m.kind, nfe=m.nfe, repeats=m.repeats, **common)
    D = build_discriminator(m.d_size or m.size, time_cond=m.kind != "1nfe", **common)
    opts = {}
    for key, net in (("g", G), ("d", D)):
        opts[key] = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=o.lr, betas=o.betas,
                                      weight_decay=o.weight_decay, eps=o.eps)
    ema = EMA(G, decay=o.ema_decay)
    base = afm.AFMConfig(gp_fraction=a.gp_fraction, gp_eps=a.gp_eps, use_gradnorm=a.gradnorm,
                         gradnorm_momentum=a.gradnorm_momentum)
    gradnorm = afm.make_gradnorm(base)
    plan = plan_of(spec)

    def update(key: str, net, loss) -> None:
        opts[key].zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip)
        opts[key].step()

    reports, pending, body, t_window, c_window = [], [], 0.0, time.perf_counter(), time.process_time()
    for step in range(t.steps):
        t0 = time.perf_counter()
        params = plan.at(step)
        cfg = base.with_phase(params)
        for group in opts["g"].param_groups:
            group["lr"] = params.lr * G.lr_scale
        for group in opts["d"].param_groups:
            group["lr"] = params.lr_d
        x, y = next(iters["d"])
        gen = torch.Generator().manual_seed(step_seed(t.seed, step, 0, D_DRAWS))  # (seed, step, micro, purpose)
        z = torch.randn(x.shape, generator=gen)
        loss, dm = afm.d_loss(G, D, x, y, z, cfg, generator=gen)
        update("d", D, loss)
        x, y = next(iters["g"])
        gen = torch.Generator().manual_seed(step_seed(t.seed, step, 0, G_DRAWS))
        z = torch.randn(x.shape, generator=gen)
        loss, gm = afm.g_loss(G, D, gradnorm, x, y, z, cfg, generator=gen)
        update("g", G, loss)
        ema.update(G)
        pending.append(torch.stack([v.detach().float().reshape(()) for v in {**dm, **gm}.values()]))
        body += time.perf_counter() - t0
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            torch.stack(pending).tolist()  # the loop's one host sync per window
            pending.clear()
            now, cpu = time.perf_counter(), time.process_time()
            reports.append({"step": step + 1, "time/total": body, "time/data": 0.0, "time/d_step": 0.0,
                            "time/g_step": 0.0, "time/checkpoint": 0.0, "wall": now - t_window,
                            "cpu": cpu - c_window, "_ckpt": False})
            body, t_window, c_window = 0.0, now, cpu
    for s in streams.values():
        s.close()
    return {"reports": reports}


class _Recorder:
    """A WorkerContext for the loop run in this process: keeps reports with their wall-clock time
    (no checkpoint is kept, no metrics log written)."""

    rank, world_size = 0, 1
    takes_staging_dir = False

    def __init__(self):
        self.reports: list[dict] = []

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str | None = None) -> None:
        self.reports.append({**metrics, "_t": time.perf_counter(), "_cpu": time.process_time(),
                             "_ckpt": checkpoint_dir is not None})

    def restore_dir(self) -> str | None:
        return None

    def fetch_checkpoint(self, name: str) -> str:
        raise FileNotFoundError(f"{name}: this benchmark keeps no checkpoints")

    def run_storage(self) -> str | None:
        return None

    def drain(self) -> None:
        pass


def inproc_loop(spec) -> dict:
    """`TrainLoop` (DeepSpeed engines) in this process, gloo world of one; times setup and checkpoints."""
    import torch.distributed as dist

    from advflow.platform.train.loop import TrainLoop

    class Timed(TrainLoop):
        """The real loop; only marks the end of set-up, records each metric window (the loop reports
        to its context at checkpoints only) and times each checkpoint save."""

        def setup(self):
            super().setup()
            ctx.reports.append({"_t": time.perf_counter(), "_cpu": time.process_time(), "_setup": True})

        def run_callbacks(self, moment):
            if moment.rows and moment.checkpoint_dir is None:  # a window closed between checkpoints
                ctx.reports.append({"step": moment.step, **self.window.times.as_metrics(), "_t": time.perf_counter(),
                                    "_cpu": time.process_time(), "_ckpt": False})
            return super().run_callbacks(moment)

        def save_checkpoint(self, step, rows, window):
            t0 = time.perf_counter()
            super().save_checkpoint(step, rows, window)
            checkpoint_s.append(time.perf_counter() - t0)

    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    ctx, checkpoint_s = _Recorder(), []
    try:
        t0 = time.perf_counter()
        Timed(spec, ctx).train()
    finally:
        dist.destroy_process_group()
    reports = [r for r in ctx.reports if "time/total" in r]
    for r, before in zip(reports, ctx.reports):  # a window: previous report (or set-up end) to this one
        r["wall"], r["cpu"] = r["_t"] - before["_t"], r["_cpu"] - before["_cpu"]
    return {"reports": reports, "setup_s": ctx.reports[0]["_t"] - t0, "checkpoint_s": checkpoint_s}


def run_local_wall(spec, run_dir: str) -> dict:
    """Wall time of run_local and the CPU time its (waited-for) worker processes used."""
    import resource

    from advflow.platform.train.local_launch import run_local

    def children_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    t0, c0 = time.perf_counter(), children_cpu()
    run_local(spec, run_dir)
    return {"wall": time.perf_counter() - t0, "cpu": children_cpu() - c0}


class RayWorkerCpu:
    """Samples the CPU time of Ray Train worker processes (not our children) from /proc while a fit
    runs; the last sample before a worker exits misses its tail, which cancels in a difference."""

    def __init__(self, period: float = 0.25):
        import threading

        self.period, self.seen, self._stop = period, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        t0 = time.time()
        while not self._stop.is_set():
            for p in psutil.process_iter(["pid", "cmdline", "create_time", "cpu_times"]):
                info = p.info
                if info["create_time"] and info["create_time"] >= t0 - 1 and info["cpu_times"] and \
                        "RayTrainWorker" in " ".join(info["cmdline"] or []):
                    ct = info["cpu_times"]
                    self.seen[info["pid"]] = ct.user + ct.system
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def cpu(self) -> float:
        return sum(self.seen.values()) if self.seen else float("nan")


def _collector(path: str):
    from ray.train import UserCallback

    class Collect(UserCallback):
        """Writes each report of rank 0 with the controller's clock (the callback runs in Ray's controller)."""

        def __init__(self, out: str):
            self.out = out

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.out, "a") as f:
                f.write(json.dumps({**(metrics[0] if metrics else {}), "_t": time.time(),
                                    "_ckpt": checkpoint is not None}) + "\n")

    return Collect(path)


def ray_fit(spec, log_path: str) -> dict:
    from advflow.platform.train.ray_launch import build_torch_trainer

    t0 = time.time()
    with RayWorkerCpu() as sampler:
        result = build_torch_trainer(spec, callbacks=[_collector(log_path)]).fit()
    wall = time.time() - t0
    if result.error:
        raise RuntimeError(f"Ray run {spec.run.name} failed: {result.error}")
    reports = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    return {"reports": reports, "fit_s": wall, "t0": t0, "worker_cpu_s": sampler.cpu,
            "worker_pids": sorted(sampler.seen)}


def controller_wall(reports: list[dict], skip: int = 1) -> tuple[float, int]:
    """(seconds, steps) between the `skip`-th report and the last progress report, on the controller's
    clock (it polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default)."""
    prog = [r for r in reports if "time/total" in r and not r["_ckpt"]]
    if len(prog) <= skip:
        return float("nan"), 0
    a, b = prog[skip - 1], prog[-1]
    return b["_t"] - a["_t"], int(b["step"]) - int(a["step"])


def part_overhead(args, prefix: str, work: str) -> tuple[str, dict]:
    short = args.short_steps
    specs = {n: overhead_spec(args, prefix, f"{work}/runs", f"ovh_{n}", s)
             for n, s in (("long", args.steps), ("short", short))}
    spec = specs["long"]
    out: dict = {}
    log(f"overhead: bare loop, {spec.train.steps} steps x batch {spec.micro_batch}, size {args.size}")
    out["bare"] = bare_loop(spec)
    log("overhead: TrainLoop in this process (DeepSpeed, no launcher)")
    out["inproc"] = inproc_loop(overhead_spec(args, prefix, f"{work}/runs", "ovh_inproc", args.steps))
    if "local" in args.modes:
        log("overhead: run_local (two lengths)")
        out["local"] = {n: run_local_wall(s, f"{work}/local_{n}") for n, s in specs.items()}
    if "ray" in args.modes:
        from advflow.platform.train.ray_launch import ensure_ray

        log(f"overhead: Ray Train (two lengths), ray address {args.ray_address}")
        ensure_ray(args.ray_address)
        out["ray"] = {n: ray_fit(s, f"{work}/ray_{n}.jsonl") for n, s in specs.items()}
        if args.stall_window:
            # Ray Train V2 takes one report per controller poll (2 s) into a queue of one: a loop that
            # reports more often than that blocks inside ray.train.report, outside the loop's timer.
            stall = overhead_spec(args, prefix, f"{work}/runs", "ovh_stall", args.stall_steps, args.stall_window)
            log(f"overhead: Ray stall check, log_every={args.stall_window}, {args.stall_steps} steps")
            out["ray_stall"] = ray_fit(stall, f"{work}/ray_stall.jsonl")

    rows, base = [], {}
    def add(name: str, body: float, wall: float, cpu: float, note: str) -> None:
        base.setdefault("wall", wall)
        base.setdefault("cpu", cpu)
        rows.append([name, body, wall, cpu, wall / base["wall"], cpu / base["cpu"], note])

    for name in ("bare", "inproc"):
        s = steady(out[name]["reports"], drop_ckpt=True)
        n = s["steps"]
        add({"bare": "bare torch loop", "inproc": "TrainLoop+DS, in-process"}[name],
            per_step_ms(s["total"], n), per_step_ms(s["wall"], n), per_step_ms(s["cpu"], n), f"{n} steps timed")
    n_diff = args.steps - short
    if "local" in out:
        lw = out["local"]
        add("run_local (DS, no Ray)", float("nan"), per_step_ms(lw["long"]["wall"] - lw["short"]["wall"], n_diff),
            per_step_ms(lw["long"]["cpu"] - lw["short"]["cpu"], n_diff),
            f"runs {lw['short']['wall']:.1f}s/{lw['long']['wall']:.1f}s")
    if "ray" in out:
        r = out["ray"]
        s = steady(r["long"]["reports"])
        add("Ray Train + DS ZeRO-2", per_step_ms(s["total"], s["steps"]),
            per_step_ms(r["long"]["fit_s"] - r["short"]["fit_s"], n_diff),
            per_step_ms(r["long"]["worker_cpu_s"] - r["short"]["worker_cpu_s"], n_diff),
            f"fits {r['short']['fit_s']:.1f}s/{r['long']['fit_s']:.1f}s")
        cw, cn = controller_wall(r["long"]["reports"])
        rows.append(["  (Ray, controller clock)", float("nan"), per_step_ms(cw, cn), float("nan"),
                     per_step_ms(cw, cn) / base["wall"], float("nan"), f"{cn} steps between reports"])
        if "ray_stall" in out:
            # Start-up + final checkpoint (the intercept of the two default fits) taken off its fit time.
            per = (r["long"]["fit_s"] - r["short"]["fit_s"]) / n_diff
            fixed = r["short"]["fit_s"] - short * per
            st, steps = out["ray_stall"], args.stall_steps
            sb = steady(st["reports"])
            rows.append([f"Ray, log_every={args.stall_window} (stall check)", per_step_ms(sb["total"], sb["steps"]),
                         per_step_ms(st["fit_s"] - fixed, steps), float("nan"),
                         (st["fit_s"] - fixed) / steps / (base["wall"] / 1e3), float("nan"),
                         f"fit {st['fit_s']:.1f}s, {steps} steps"])
    notes = (f"body = loop's own per-step timer (StepTimes.total) in steady state (first window of "
             f"{args.window} skipped); wall = everything between steps too; cpu = CPU seconds of the "
             f"process(es) doing the work (robust to other load on the machine); launched runs: "
             f"(T({args.steps}) - T({short})) / {n_diff} over two runs.\n"
             f"ratios are against the bare loop. Goal Ray+DS <= 1.05x. "
             f"TrainLoop set-up in-process: {out['inproc']['setup_s']:.1f}s; its checkpoints took "
             + ", ".join(f"{c:.2f}s" for c in out["inproc"]["checkpoint_s"]))
    text = table(f"1. Platform overhead: {args.size}, micro-batch {args.batch}, {args.steps} steps, 1 worker, "
                 "ZeRO-2 G/D (ms per iteration = one D step + one G step)",
                 ["path", "body ms/it", "wall ms/it", "cpu ms/it", "wall x", "cpu x", "note"], rows) + "\n" + notes
    return text, {"rows": rows, "raw": out}


# ----------------------------------------------------------------------------- part 2: cost


def part_cost(args) -> tuple[str, dict]:
    from advflow.trainers import afm
    from advflow.trainers.fm import fm_loss
    from advflow.trainers.models import build_discriminator, build_generator, parameter_count

    torch.manual_seed(0)
    n, c, s, k = args.cost_batch, args.cost_channels, args.cost_input, args.cost_classes
    common = dict(in_channels=c, input_size=s, num_classes=k)
    g_multi = build_generator(args.cost_size, kind="multistep", nfe=2, **common)
    d_multi = build_discriminator(args.cost_size, time_cond=True, **common)
    g_one = build_generator(args.cost_size, kind="1nfe", **common)
    d_one = build_discriminator(args.cost_size, time_cond=False, **common)
    x, z = torch.randn(n, c, s, s), torch.randn(n, c, s, s)
    y = torch.randint(0, k, (n,))
    gradnorm = afm.make_gradnorm(afm.AFMConfig())
    nets = (g_multi, d_multi, g_one, d_one)

    def clear() -> None:
        for net in nets:
            net.zero_grad(set_to_none=True)

    def fwd_unit() -> dict:
        with torch.no_grad():
            g_multi(x, y, torch.ones(n), torch.full((n,), 0.5))
        return {}

    def fm_step() -> dict:
        fm_loss(g_multi, x, y, z, torch.rand(n)).backward()
        return {}

    def afm_step(G, D, fused: bool):
        cfg = afm.AFMConfig(fused_d=fused)

        def run() -> dict:
            t0 = time.process_time()
            afm.d_loss(G, D, x, y, z, cfg)[0].backward()
            t1 = time.process_time()
            afm.g_loss(G, D, gradnorm, x, y, z, cfg)[0].backward()
            return {"d": t1 - t0, "g": time.process_time() - t1}
        return run

    variants = {
        "G forward, no grad (1 unit)": fwd_unit,
        "FM step (multistep G)": fm_step,
        "AFM multistep K=2, fused D": afm_step(g_multi, d_multi, True),
        "AFM multistep K=2, unfused D": afm_step(g_multi, d_multi, False),
        "AFM 1NFE, fused D": afm_step(g_one, d_one, True),
        "AFM 1NFE, unfused D": afm_step(g_one, d_one, False),
    }
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    parts = {name: {"d": [], "g": []} for name in variants}
    log(f"cost: {args.cost_size} G {parameter_count(g_multi) / 1e6:.1f}M / D {parameter_count(d_multi) / 1e6:.1f}M "
        f"params, batch {n} of {c}x{s}x{s}, {args.cost_reps} reps after 1 warm-up, interleaved")
    for rep in range(args.cost_reps + 1):
        for name, fn in variants.items():
            clear()
            t0, c0 = time.perf_counter(), time.process_time()
            extra = fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rep:  # rep 0 warms up allocators and kernels
                times[name].append(dt)
                cpu[name].append(dc)
                for key, v in extra.items():
                    parts[name][key].append(v)
        log(f"cost: rep {rep}/{args.cost_reps} done")
    med = {name: statistics.median(v) for name, v in cpu.items()}
    unit, fm = med["G forward, no grad (1 unit)"], med["FM step (multistep G)"]
    rows = []
    for name, v in med.items():
        d = statistics.median(parts[name]["d"]) * 1e3 if parts[name]["d"] else float("nan")
        g = statistics.median(parts[name]["g"]) * 1e3 if parts[name]["g"] else float("nan")
        spread = (max(cpu[name]) - min(cpu[name])) / v * 100
        rows.append([name, statistics.median(times[name]) * 1e3, v * 1e3, d, g, v / unit, v / fm,
                     f"+-{spread / 2:.0f}%"])
    text = table(f"2. Cost per G update: {args.cost_size}, batch {n}, latents {c}x{s}x{s} "
                 f"(fwd+bwd, no optimizer step; median of {args.cost_reps}; {torch.get_num_threads()} thread(s))",
                 ["variant", "wall ms", "cpu ms", "D part cpu", "G part cpu", "units", "x FM", "cpu spread"], rows)
    text += ("\nunits, x FM and parts use this thread's CPU time (steady under machine load); units = time / one "
             "G forward. Paper: FM 3 units, AFM 14.5 (4.83x FM). Goal AFM <= 4.0x FM. fused D: one D call on "
             "[real, fake, real+eps n, fake+eps n].")
    return text, {"rows": rows, "times": times}


# ----------------------------------------------------------------------------- part 3: demo


def part_demo(args, prefix: str, work: str) -> tuple[str, dict]:
    from advflow.platform.config import RunSpec
    from advflow.platform.train.ray_launch import ensure_ray

    raw = demo_dict(prefix)
    raw["run"].update(name="demo", storage_path=f"{work}/runs")
    raw["train"]["steps"] = args.demo_steps
    if args.demo_workers:
        raw["distributed"]["workers"] = args.demo_workers
    spec = RunSpec.from_dict(raw)
    log(f"demo: digits_tiny on Ray, {spec.distributed.workers} workers, {spec.train.steps} steps, "
        f"global batch {spec.train.global_batch}, log every {spec.train.log_every}, "
        f"checkpoint every {spec.train.checkpoint_every}")
    ensure_ray(args.ray_address)
    res = ray_fit(spec, f"{work}/demo.jsonl")
    s = steady(res["reports"])
    steps = s["steps"]
    cw, cn = controller_wall(res["reports"])
    ckpts = [r for r in res["reports"] if r["_ckpt"]]
    rows = [[key, per_step_ms(s[key], steps), 100 * s[key] / s["total"] if s["total"] else float("nan")]
            for key in ("data", "d_step", "g_step", "checkpoint", "total")]
    rows.append(["wall (controller clock, progress reports)", per_step_ms(cw, cn),
                 100 * cw / cn / (s["total"] / steps) if cn and steps else float("nan")])
    rows.append(["wall (whole fit incl. start-up)", per_step_ms(res["fit_s"], spec.train.steps), float("nan")])
    text = table(f"3. Training-loop breakdown, digits demo (rank 0, {steps} steady steps after the first "
                 f"{spec.train.log_every}; {len(ckpts)} checkpoint(s))",
                 ["component (loop's time/* metrics)", "ms/step", "% of total"], rows)
    frac = s["data"] / s["total"] if s["total"] else float("nan")
    text += (f"\ndata wait {100 * frac:.2f}% of step time (goal < 2%: {'met' if frac < 0.02 else 'NOT met'}). "
             f"time/checkpoint is what the loop reports (see report: it is reset before it is reported).")
    return text, {"rows": rows, "raw": res}


# ----------------------------------------------------------------------------- part 4: live metrics


def part_live(args, prefix: str, work: str) -> tuple[str, dict]:
    """The demo on Ray with the live export on and off (tracking.live_metrics), alternated
    --live-pairs times so machine load hits both alike: samples/s of the steady windows. Plus the
    export's own cost: LiveMetrics.window on a real AFM row in this Ray-connected process, against
    the window's wall time."""
    from advflow.platform.config import RunSpec
    from advflow.platform.tracking.live import LiveMetrics
    from advflow.platform.train.methods.afm import AFMStep
    from advflow.platform.train.ray_launch import ensure_ray

    ensure_ray(args.ray_address)
    rate: dict[bool, list[float]] = {True: [], False: []}
    last_row: dict = {}
    for pair in range(args.live_pairs):
        for on in (True, False) if pair % 2 == 0 else (False, True):
            raw = demo_dict(prefix)
            raw["run"].update(name=f"live-{int(on)}-{pair}", storage_path=f"{work}/runs")
            # A report per window (Ray Train's reports are the checkpoints): log_every = checkpoint_every,
            # so each report's time/total spans the whole window it closes (the save is not in it).
            raw["train"].update(steps=args.demo_steps, log_every=args.live_window, checkpoint_every=args.live_window)
            raw["eval"]["every"] = args.demo_steps
            raw["tracking"].update(live_metrics=on)
            spec = RunSpec.from_dict(raw)
            res = ray_fit(spec, f"{work}/live-{int(on)}-{pair}.jsonl")
            s = steady(res["reports"])  # every report is a checkpoint; time/total excludes the save
            rate[on].append(s["steps"] * spec.train.global_batch / s["total"])
            last_row = next((r for r in reversed(res["reports"]) if "d_loss" in r), last_row)
            log(f"live export {'on ' if on else 'off'} (pair {pair}): {rate[on][-1]:.1f} samples/s")
    row = {k: float(v) for k, v in last_row.items() if isinstance(v, (int, float)) and not k.startswith(("_", "time/"))}
    row["step"] = 1
    names = AFMStep.names
    exporter = LiveMetrics("bench", "afm", 0, losses=names.losses, grads=names.grads, logits=names.logits)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        exporter.window([row], {"samples_per_s": 1.0}, 1.0, 0.1)
    per_window = (time.perf_counter() - t0) / n
    on, off = statistics.median(rate[True]), statistics.median(rate[False])
    demo_train = yaml.safe_load(DEMO_CONFIG.read_text())["train"]  # the demo's own window
    window_s = demo_train["log_every"] * demo_train["global_batch"] / off if off else float("nan")
    rows = [["export on (median samples/s)", on, " ".join(f"{x:.1f}" for x in rate[True])],
            ["export off (median samples/s)", off, " ".join(f"{x:.1f}" for x in rate[False])],
            ["on / off", on / off, ""],
            [f"export cost per window ({len(row)} series, ms)", per_window * 1e3, ""],
            ["export cost / window wall time (%)", 100 * per_window / window_s, ""]]
    text = table(f"4. Live metrics export, digits demo on Ray ({args.demo_steps} steps, {args.live_pairs} pair(s) "
                 "alternated)", ["figure", "value", "runs"], rows)
    text += ("\nGoal: under 1% slower. The direct cost (rank 0 sets every series of a window once) is the "
             "figure to trust on a shared CPU; the on/off ratio of whole runs carries the machine's noise.")
    return text, {"rows": rows, "rate": {str(k): v for k, v in rate.items()}, "per_window_s": per_window}


# ----------------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="overhead,cost,demo",
                   help="comma list of overhead, cost, demo, live (the live-metrics export on/off)")
    p.add_argument("--data", help="existing digits dataset prefix (default: make one in a temp dir)")
    p.add_argument("--work", help="scratch directory (default: a new temp dir)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process (workers use 1)")
    g = p.add_argument_group("1. overhead")
    g.add_argument("--size", default="tiny", help="model size for the overhead runs (tiny, S/2, ...)")
    g.add_argument("--batch", type=int, default=64, help="global batch = micro-batch (one worker)")
    g.add_argument("--steps", type=int, default=200, help="iterations of the long runs")
    g.add_argument("--short-steps", type=int, default=50, help="iterations of the short runs (differential)")
    g.add_argument("--window", type=int, default=25, help="log_every: steps per report window")
    g.add_argument("--modes", default="local,ray", help="launched paths to include: local, ray")
    g.add_argument("--stall-window", type=int, default=2,
                   help="log_every of an extra short Ray run that shows report stalls (0: skip it)")
    g.add_argument("--stall-steps", type=int, default=30)
    g.add_argument("--ray-address", default="local",
                   help="'local' (default) starts a private Ray; 'auto' joins a running cluster")
    g = p.add_argument_group("2. cost")
    g.add_argument("--cost-size", default="S/2")
    g.add_argument("--cost-batch", type=int, default=8)
    g.add_argument("--cost-input", type=int, default=16)
    g.add_argument("--cost-channels", type=int, default=4)
    g.add_argument("--cost-classes", type=int, default=10)
    g.add_argument("--cost-reps", type=int, default=3)
    g = p.add_argument_group("4. live (parts=live)")
    g.add_argument("--live-pairs", type=int, default=2, help="demo runs with the export on and off, each")
    g.add_argument("--live-window", type=int, default=50, help="steps per window and report in these runs")
    g = p.add_argument_group("3. demo")
    g.add_argument("--demo-steps", type=int, default=300)
    g.add_argument("--demo-workers", type=int, default=0, help="override the config's workers (0: keep)")
    p.add_argument("--json", help="also write all figures to this JSON file")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    bad = set(args.parts) - {"overhead", "cost", "demo", "live"}
    if bad:
        p.error(f"--parts: unknown {sorted(bad)}; use overhead, cost, demo, live")
    if not 0 < args.short_steps < args.steps:
        p.error("--short-steps must be in (0, --steps)")
    if args.short_steps <= args.window:
        p.error("--short-steps must exceed --window (the first window is warm-up)")
    from advflow.platform.outputs import OutputError, check_writable

    try:  # before the runs: the figures are written at the very end, the scratch folder at once
        check_writable(args.json, "--json")
        check_writable(args.work, "--work", folder=True)
    except OutputError as err:
        p.error(str(err))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    work = args.work or tempfile.mkdtemp(prefix="advflow-bench-train-")
    Path(work).mkdir(parents=True, exist_ok=True)
    log(f"scratch: {work}")
    prefix = args.data
    if {"overhead", "demo", "live"} & set(args.parts) and not prefix:
        prefix = make_digits(f"{work}/digits")
    texts, figures = [], {}
    t0 = time.perf_counter()
    if "cost" in args.parts:
        text, figures["cost"] = part_cost(args)
        texts.append(text)
        print(text + "\n", flush=True)
    if "overhead" in args.parts:
        text, figures["overhead"] = part_overhead(args, prefix, work)
        texts.append(text)
        print(text + "\n", flush=True)
    if "demo" in args.parts:
        text, figures["demo"] = part_demo(args, prefix, work)
        texts.append(text)
        print(text + "\n", flush=True)
    if "live" in args.parts:
        text, figures["live"] = part_live(args, prefix, work)
        texts.append(text)
        print(text + "\n", flush=True)
    print("=" * 100 + "\nSUMMARY (one run, " + f"{time.perf_counter() - t0:.0f}s)\n" + "\n\n".join(texts), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **figures}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
