"""The ImageNet recipes run the official schedule per G update and per image seen.

The official trainer counts one step per optimizer update (D or G, alternating, one batch each); an
advflow iteration is one D update plus one G update. So official step S is iteration S / 2, and the
official values below are computed from the official configs' numbers (1M-step cosine, 5005 steps
per epoch at batch 256, Table 11's epochs), never from advflow's recipe files.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from advflow.platform.config import load_config
from advflow.platform.train.phases import plan_of

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
OFFICIAL_DECAY_STEPS = 1_000_000
STEPS_PER_EPOCH = 5005  # official: ceil(1,281,167 / 256) steps
# Table 11, XL/2 1NFE: the epochs at which phases 2, 3 and 4 begin, and the end of training.
TABLE11_EPOCHS = (90, 110, 120, 125)


def official_lambda_ot(step: int, start: float, end: float) -> float:
    p = min(step / OFFICIAL_DECAY_STEPS, 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * p)) / 2


def official_phase(step: int) -> int:
    """0-based phase index at an official step (phases switch at Table 11's epochs)."""
    return sum(step >= e * STEPS_PER_EPOCH for e in TABLE11_EPOCHS[:3])


RECIPES = {  # recipe: (lambda_ot start, end) of the official config
    "imagenet_xl2_1nfe": (0.2, 0.005), "imagenet_l2_1nfe": (0.2, 0.005), "imagenet_m2_1nfe": (0.2, 0.005),
    "imagenet_b2_1nfe": (0.2, 0.01), "imagenet_xl2_2nfe": (0.25, 0.005), "imagenet_xl2_4nfe": (0.25, 0.005),
    "imagenet_xl2_56layer": (0.2, 0.005), "imagenet_xl2_112layer": (0.2, 0.005),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_lambda_ot_and_phase_at_official_steps(name):
    spec = load_config(CONFIGS / f"{name}.yaml")
    plan = plan_of(spec)
    start, end = RECIPES[name]
    # Official steps inside phase 1 and around every boundary (odd steps are G updates).
    for s in (0, 1, 20_001, 200_000, 450_448, 450_449, 450_450, 550_549, 550_550, 600_599, 600_600, 625_000):
        p = plan.at(s // 2)
        assert p.phase_index == official_phase(s), f"{name}: official step {s}"
        if official_phase(s) == 0:
            # Per G update: G update j is official step 2j+1 and iteration j here, which reads the
            # schedule at official step 2j: one official step apart, where the cosine moves by at
            # most (start - end) * pi / 2 / 1M < 4e-7.
            assert p.lambda_ot == pytest.approx(official_lambda_ot(s, start, end), abs=4e-7), f"{name}: step {s}"
            assert p.lambda_ot == pytest.approx(official_lambda_ot(s - s % 2, start, end), rel=1e-12)
        else:
            assert p.lambda_ot == pytest.approx(0.001)
    # The decay itself is the official one: half-way (official step 500k) it is at the midpoint.
    decay = plan.phases[0].lambda_ot
    assert decay.value(250_000) == pytest.approx((start + end) / 2)
    assert decay.value(500_000) == pytest.approx(end)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_phase_boundaries_are_table11_epochs_of_images_seen(name):
    spec = load_config(CONFIGS / f"{name}.yaml")
    images_per_iteration = 2 * spec.train.global_batch  # a D batch and a G batch
    epoch_images = STEPS_PER_EPOCH * 256  # what the official trainer draws per epoch
    starts = [p.start for p in plan_of(spec).phases[1:]] + [spec.train.steps]
    epochs = [k * images_per_iteration / epoch_images for k in starts]
    assert epochs == pytest.approx(TABLE11_EPOCHS, abs=1e-3), f"{name}: phases begin at epochs {epochs}"
    # EMA reload and checkpoints once per epoch of images (2502.5 iterations, rounded up).
    every = plan_of(spec).at(starts[0]).ema_reload_every
    assert every * images_per_iteration / epoch_images == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_guided_phase_four_uses_the_paper_settings(name):
    spec = load_config(CONFIGS / f"{name}.yaml")
    p = plan_of(spec).at(spec.train.steps - 1)
    assert (p.phase_name, p.guidance, p.augment_p) == ("guided", True, 0.4)
    if spec.model.kind == "1nfe":
        assert (p.lambda_cg, p.cg_t_range, spec.cg_t_mode) == (0.003, (0.0, 0.1), "uniform")
    else:
        assert (p.lambda_cg, p.cg_t_range, spec.cg_t_mode) == (0.02, (0.0, 0.49), "target")
    assert spec.guidance.classifier
    # Earlier phases are guidance-free and unaugmented.
    early = plan_of(spec).at(plan_of(spec).phases[-1].start - 1)
    assert (early.guidance, early.lambda_cg, early.augment_p) == (False, 0.0, 0.0)


def test_official_clipping_and_sampler_defaults():
    clip = {name: load_config(CONFIGS / f"{name}.yaml").optim.grad_clip for name in RECIPES}
    assert {n: c for n, c in clip.items() if "layer" not in n and "nfe" in n and "1nfe" in n} == {
        n: 50.0 for n in RECIPES if "1nfe" in n}
    assert all(clip[n] == 5.0 for n in ("imagenet_xl2_2nfe", "imagenet_xl2_4nfe", "imagenet_xl2_56layer",
                                        "imagenet_xl2_112layer"))
    anystep = load_config(CONFIGS / "imagenet_xl2_anystep.yaml")
    assert (anystep.model.kind, anystep.model.nfe, anystep.optim.grad_clip) == ("anystep", 8, 5.0)


@pytest.mark.integration  # starts jobs/train.py
def test_print_config_states_the_unit():
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config",
                          str(CONFIGS / "imagenet_xl2_1nfe.yaml"), "--print-config"],
                         capture_output=True, text=True, check=True).stdout
    head = " ".join(line[2:] for line in out.splitlines() if line.startswith("# "))
    assert "ITERATIONS" in head and "one D update then one G update" in head and "S/2" in head
    assert f"{312813 * 2 * 256:,} samples" in head
