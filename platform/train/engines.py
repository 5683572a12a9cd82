"""DeepSpeed engines for G and D: one engine per network, each with its own ZeRO stage.

Why two engines and not one: G and D have separate optimisers and alternate steps; DeepSpeed
engines own exactly one model + optimiser each. What keeps two engines correct together (the
equivalence test in tests/test_train_equivalence.py checks it for ZeRO 0, 1 and 2):
- D's step runs G's plain module under no_grad, G's step runs D's plain module (`engine.module`)
  with D's parameters frozen, so neither engine's hooks fire during the other's backward
  (DeepSpeed issues 4923/5639: the other engine's reduce hooks see foreign gradients);
- ZeRO-3 is refused at config validation: it partitions parameters, so the frozen D would need
  DeepSpeed's gather hooks inside G's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advflow.platform.train.checkpoint import ResumeError


@dataclass(frozen=True)
class EngineSpec:
    """Everything one engine needs; built by the trainer from the run config."""

    stage: int
    micro_batch: int
    grad_accum: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    eps: float
    grad_clip: float
    bf16: bool


def deepspeed_config(spec: EngineSpec) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "zero_optimization": {"stage": spec.stage},
        # Our optimiser is torch AdamW (DeepSpeed's fused Adam is CUDA-only, and betas (0, 0.9)
        # are what matter, not the kernel); ZeRO 1/2 shard its state all the same.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if spec.grad_clip > 0:
        cfg["gradient_clipping"] = spec.grad_clip
    if spec.bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def build_engine(model: torch.nn.Module, spec: EngineSpec):
    """Wrap `model` in a DeepSpeed engine with an AdamW optimiser; returns the engine."""
    import deepspeed  # heavy import, only where engines are built

    trainable = [p for p in model.parameters() if p.requires_grad]  # pos_embed is a frozen parameter
    opt = torch.optim.AdamW(trainable, lr=spec.lr, betas=tuple(float(b) for b in spec.betas),
                            weight_decay=spec.weight_decay, eps=spec.eps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(spec),
                                      dist_init_required=False)
    return engine


def _masters(engine) -> dict[int, torch.Tensor] | None:
    """{id(param): its fp32 master tensor} for optimizers that keep per-parameter masters in
    `fp16_groups`/`fp32_groups` (DeepSpeed's FP16_UnfusedOptimizer: bf16 at ZeRO-0 with a client
    optimizer), else None. ZeRO 1/2 and the BF16 optimizer link each parameter to its master
    fragment instead (`_hp_mapping`, read and written through safe_get/set_full_fp32_param)."""
    opt = engine.optimizer
    lp, hp = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if not lp or not hp or not isinstance(hp[0], list):
        return None
    return {id(p): m for lp_group, hp_group in zip(lp, hp) for p, m in zip(lp_group, hp_group)}


def _has_master(engine) -> bool:
    return bool(engine.bfloat16_enabled() or engine.fp16_enabled() or engine.zero_optimization_stage() > 0)


@torch.no_grad()
def write_weights(engine, tensors) -> None:
    """Replace the engine's weights by `tensors` ({parameter or buffer name: tensor}) so that the
    next optimizer steps continue FROM them (Table 11's EMA reload and D reload).

    Writing into the module alone is not enough: under ZeRO 1/2, and under bf16 at any stage, the
    optimizer keeps an fp32 master copy of every trainable weight and copies it back over the module
    after each step, which would undo the write (measured: D back at its pre-reload weights exactly).
    So each trainable parameter is written twice, into the module (what the next forward uses) and
    into its fp32 master: through DeepSpeed's `safe_set_full_fp32_param` under ZeRO 1/2 and the BF16
    optimizer (every rank passes the full tensor; DeepSpeed keeps the slice that rank owns), and into
    the per-parameter master of the FP16_UnfusedOptimizer that DeepSpeed uses for bf16 at ZeRO-0
    (`safe_set_full_fp32_param` silently does nothing there: measured, the reload was undone). A
    master this function cannot find is an error, never a silent no-op. Without a master (ZeRO-0 in
    fp32) the module is the only copy. The optimizer's moments are kept as they are. ZeRO-3 is
    refused at config validation, so parameters are never partitioned here."""
    from deepspeed.utils import safe_set_full_fp32_param

    module = engine.module
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise KeyError(f"write_weights: no value for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    masters = _masters(engine)
    for name, p in params.items():
        value = tensors[name].to(device=p.device)
        p.data.copy_(value.to(p.dtype))
        if not p.requires_grad:
            continue
        if hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, value.float())
        elif masters is not None and id(p) in masters:
            masters[id(p)].copy_(value.to(masters[id(p)].dtype))
        elif _has_master(engine):
            raise RuntimeError(
                f"write_weights: {type(engine.optimizer).__name__} keeps an fp32 master of {name!r} that "
                "advflow cannot reach (unknown DeepSpeed optimizer layout); a reload would be undone by the "
                "next step. Use precision fp32 with ZeRO-0, or a DeepSpeed release in the pinned range")
    for name, b in buffers.items():
        if name in tensors:
            b.copy_(tensors[name].to(device=b.device, dtype=b.dtype))


@torch.no_grad()
def read_weights(engine) -> dict[str, torch.Tensor]:
    """The engine's weights at full precision, on the CPU: {parameter or buffer name: tensor}.

    Trainable parameters come from the optimizer's fp32 master where there is one (ZeRO 1/2, bf16
    at any stage; see write_weights for where it lives), so a snapshot taken in a bf16 run is not
    rounded to bf16 and the D reload restores the master exactly; elsewhere from the module.
    Collective under ZeRO 1/2 (each parameter's fragments are all-reduced): every rank must call it
    at the same point, as phase events are."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _masters(engine)
    out = {}
    for name, p in engine.module.named_parameters():
        full = None
        if p.requires_grad and hasattr(p, "_hp_mapping"):
            full = safe_get_full_fp32_param(p)
        elif p.requires_grad and masters is not None:
            full = masters.get(id(p))
        out[name] = (full if full is not None else p.detach()).float().to("cpu", copy=True)
    for name, b in engine.module.named_buffers():
        out[name] = b.detach().to("cpu", copy=True)
    return out


def set_lr(engine, lr: float) -> None:
    """Apply the phase plan's learning rate (DeepSpeed's ZeRO optimisers expose param_groups)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


class EngineState:
    """A DeepSpeed engine as a checkpoint part (`checkpoint.Part`): its own files under `<name>/`.

    Collective on save and load (every rank writes / reads its ZeRO shard). LR-scheduler state is
    not loaded: the phase plan sets the learning rate at every step."""

    TAG = "ds"

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    def save(self, root, rank: int) -> None:
        self.engine.save_checkpoint(str(root / self.name), tag=self.TAG)

    def load(self, root, rank: int, meta: dict) -> None:
        path, _ = self.engine.load_checkpoint(str(root / self.name), tag=self.TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise ResumeError(f"{root}/{self.name}: DeepSpeed found no checkpoint under tag {self.TAG!r}")

    def required(self, world_size: int) -> list[str]:
        return [f"{self.name}/{self.TAG}"]
