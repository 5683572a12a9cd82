"""Table 11's EMA reload and D reload must last: under ZeRO 1/2 the optimizer's fp32 master copy
would overwrite weights written into the module at its next step, so the reloads go through
DeepSpeed (engines.write_weights). Checked where it matters, in the weights several optimizer
steps AFTER the reload (at lr ~ 0, so the weights must stay exactly where the reload put them), and
again after steps at a normal lr (they must move away, or the first check proves nothing).

Two gloo workers per ZeRO stage, in fp32 and in bf16. Under bf16 DeepSpeed keeps an fp32 master of
every weight at any stage (the BF16 optimizer at stage 0) and copies it, rounded, into the bf16
module after each step: the module several steps after the reload equals the reloaded weights
rounded to bf16 only if the master took them. The same check runs on a GPU in tests/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from advflow.platform.config import RunSpec
from advflow.platform.train.local_launch import run_local

TINY_LR = 1e-30  # > 0 as the config requires; Adam moves float32 weights by lr * O(1): nothing


def reload_spec(prefix: str, stage: int, precision: str = "fp32") -> RunSpec:
    return RunSpec.from_dict({
        "data": {"prefix": prefix, "shuffle_buffer": 128, "prefetch": 2},
        "model": {"size": "tiny"},
        "optim": {"lr": 1e-3, "ema_decay": 0.9},
        "adversarial": {"ot_scale": 0.1},
        "train": {"steps": 18, "global_batch": 16, "log_every": 2, "checkpoint_every": 7},
        "distributed": {"workers": 2, "zero_stage_g": stage, "zero_stage_d": stage, "precision": precision},
        "run": {"keep_checkpoints": 3},
        "phases": [
            {"name": "warm", "start": 0, "lr": 1e-3},
            {"name": "move", "start": 4},  # D keeps training away from the warm_end snapshot
            # D reloaded at 8; EMA copied into G at 10 and 12; every step of the phase at lr ~ 0.
            {"name": "frozen", "start": 8, "lr": TINY_LR, "d_reload_from": "warm_end", "ema_reload_every": 2},
            {"name": "normal", "start": 14, "lr": 1e-3, "ema_reload_every": 0},
        ],
    })


def _module_weights(checkpoint, engine: str) -> dict[str, torch.Tensor]:
    # The engine's weights as the checkpoint holds them: the optimizer's fp32 masters (what the next
    # step continues from; under bf16 the module is their bf16 rounding).
    return load_file(str(checkpoint / engine / "weights.safetensors"))


def _as(weights: dict[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """What the module holds after a step whose master is `weights`: bf16 rounds them."""
    if precision == "fp32":
        return weights
    return {k: v.to(torch.bfloat16).float() for k, v in weights.items()}


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    keys = sorted(set(a) & set(b))
    assert keys, "no common weights"
    num = sum((a[k] - b[k]).square().sum() for k in keys)
    den = sum(b[k].square().sum() for k in keys)
    return float((num / den).sqrt())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16"), (2, "bf16")])
@pytest.mark.integration
def test_reloads_survive_later_optimizer_steps(digits, tmp_path, stage, precision):
    run = tmp_path / f"zero{stage}-{precision}"
    history = run_local(reload_spec(digits, stage, precision), run)
    assert [r["phase"] for r in history if r["step"] in (8, 9, 14, 15)] == [1.0, 2.0, 2.0, 3.0]
    after_reload, after_normal = run / "checkpoint_000014", run / "checkpoint_000018"
    for ckpt in (after_reload, after_normal):
        assert (ckpt / "COMPLETE").is_file()

    snapshot = load_file(str(after_reload / "dtag-warm_end.safetensors"))
    g, d = _module_weights(after_reload, "g"), _module_weights(after_reload, "d")
    ema = load_file(str(after_reload / "ema.safetensors"))
    # 2 G steps and 6 D steps after the last reload: the fp32 masters are still exactly the reloaded
    # weights. D's in bf16 too: the master holds the snapshot itself, not its bf16 rounding. G is
    # compared in the module's precision: after the reload the EMA keeps averaging in the bf16
    # module (its rounding of the master), so in bf16 the EMA of this later step moved off the EMA
    # that was reloaded by a fraction of a bf16 rounding step.
    g_gap, d_gap = _rel(_as(g, precision), _as(ema, precision)), _rel(d, snapshot)
    assert g_gap < 1e-6, f"ZeRO-{stage} {precision}: G drifted {g_gap:.3g} from the EMA it was reloaded from"
    assert d_gap < 1e-6, f"ZeRO-{stage} {precision}: D drifted {d_gap:.3g} from the reloaded snapshot"
    if precision == "bf16":  # the snapshot is the fp32 master, not the bf16 module (engines.read_weights)
        assert all(v.dtype == torch.float32 for v in snapshot.values())
        assert _rel(snapshot, _as(snapshot, "bf16")) > 1e-4

    # The reload really replaced something: D had moved away from the snapshot before it.
    assert _rel(_module_weights(run / "checkpoint_000007", "d"), snapshot) > 1e-3
    g_end, d_end = _module_weights(after_normal, "g"), _module_weights(after_normal, "d")
    ema_end = load_file(str(after_normal / "ema.safetensors"))
    assert _rel(d_end, snapshot) > 1e-3, "D did not move at a normal lr after the reload"
    assert _rel(g_end, ema_end) > 1e-4, "G did not move away from the EMA at a normal lr"
    assert _rel(g_end, g) > 1e-3


def test_a_master_write_weights_cannot_reach_is_an_error():
    """An engine that keeps an fp32 master in a layout advflow does not know must refuse the reload,
    never write the module alone (the next step would silently undo it)."""
    from types import SimpleNamespace

    from advflow.platform.train.engines import write_weights

    module = torch.nn.Linear(2, 2)
    engine = SimpleNamespace(module=module, optimizer=SimpleNamespace(),  # no fp32_groups, no _hp_mapping
                             bfloat16_enabled=lambda: True, fp16_enabled=lambda: False,
                             zero_optimization_stage=lambda: 0)
    with pytest.raises(RuntimeError, match="cannot reach"):
        write_weights(engine, {k: torch.zeros_like(v) for k, v in module.state_dict().items()})
    engine.bfloat16_enabled = lambda: False  # fp32 at ZeRO-0: the module is the only copy
    write_weights(engine, {k: torch.zeros_like(v) for k, v in module.state_dict().items()})
    assert all(float(p.abs().sum()) == 0 for p in module.parameters())
