"""The GPU checks (run on a machine with CUDA: `bash infra/gpu_checks.sh`; skipped elsewhere).

bf16 reloads: under bf16 DeepSpeed keeps an fp32 master of every weight at any ZeRO stage (BF16
per-parameter master of DeepSpeed's FP16_UnfusedOptimizer at stage 0, the ZeRO optimizer's
fragments at 1/2), so an EMA or D reload written into the bf16
module alone is undone by the next step. After a reload and several steps at lr ~ 0, the fp32
master must equal the reloaded weights and the bf16 module their rounding.

Skipped, not run, on CPU: these tests create their own process group, and DeepSpeed caches the first
group it sees, so a second one would break tests/test_train_equivalence.py in the same session.
The same reloads run in bf16 on CPU workers in tests/test_reload.py (2 gloo workers, ZeRO 0 and 2).
"""

from __future__ import annotations

import os

import pytest
import torch

from advflow.platform.config import RunSpec
from fakes import OneRankContext

CUDA = torch.cuda.is_available()




@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    from advflow.platform.net import free_port

    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("nccl" if CUDA else "gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _spec(prefix: str, stage: int, gpu: bool, precision: str | None = None) -> RunSpec:
    return RunSpec.from_dict({
        "data": {"prefix": prefix, "shuffle_buffer": 64, "prefetch": 1},
        "model": {"size": "tiny"},
        "optim": {"lr": 1e-3, "ema_decay": 0.9},
        "train": {"steps": 12, "global_batch": 8, "checkpoint_every": 12},
        "distributed": {"workers": 1, "use_gpu": gpu, "precision": precision or ("bf16" if gpu else "fp32"),
                        "zero_stage_g": stage, "zero_stage_d": stage},
        "phases": [{"name": "warm", "start": 0, "lr": 1e-3}, {"name": "move", "start": 3},
                   {"name": "frozen", "start": 6, "lr": 1e-30, "d_reload_from": "warm_end", "ema_reload_every": 2}],
    })


def _check_reloads_last(prefix: str, stage: int, gpu: bool, precision: str | None = None) -> None:
    from advflow.platform.train.engines import read_weights
    from advflow.platform.train.loop import TrainLoop

    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    w = TrainLoop(_spec(prefix, stage, gpu, precision), OneRankContext(), device=device)
    w.setup()
    m = w.method
    try:
        for step in range(12):  # D reload at 6, EMA reloads at 8 and 10; lr ~ 0 from 6 on
            phase = w.phases.at(step)  # runs the phase events (reloads) of this step
            m.set_lr(phase, w.recovery.lr_factor())
            cfg = m.cfg.with_phase(phase)
            if step == 10:  # what G was reloaded from (later G steps still fold G into the EMA)
                reloaded = {k: v.clone() for k, v in m.ema.shadow.items()}
            m.d_step(step, cfg)
            m.g_step(step, cfg)

        snap = m.d_tags["warm_end"]
        for engine, module, want_all in ((m.engines["d"], m.D, snap), (m.engines["g"], m.G, reloaded)):
            masters = read_weights(engine)  # the optimizer's fp32 copy: exactly the reloaded weights
            for name, p in module.named_parameters():
                want = want_all[name].to(device).float()
                if p.requires_grad:  # frozen pos_embed has no master, only its bf16 module copy
                    torch.testing.assert_close(masters[name].to(device), want, rtol=0, atol=1e-7)
                torch.testing.assert_close(p.detach().float(), want.to(p.dtype).float(), rtol=0, atol=1e-7)
    finally:
        w.close()


@pytest.mark.integration  # DeepSpeed builds engines (its op checks run the compiler)
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 master weights)")
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_bf16_reloads_last(digits, process_group, stage):
    _check_reloads_last(digits, stage, gpu=True)
