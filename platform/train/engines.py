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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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


# DeepSpeed internals. The two functions below are advflow's only uses of DeepSpeed's private
# (underscore) names; `_masters`, `_zero_partitions`, `_inner` and `ENGINE_COUNTERS` read
# undocumented attributes of its optimizers and engine. Weights and moments themselves go through
# deepspeed.utils' documented safe_get/set_full_* functions. Checked against DeepSpeed 0.19.8 (the
# pinned range is >=0.16,<0.20); tests/test_engine_state.py exercises every layout. ARCHITECTURE.md
# lists them.


def _fragment_linked(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed linked `p` to its fp32 master fragment (ZeRO 1/2, the BF16 optimizer), i.e.
    whether `safe_set_full_fp32_param` writes anything: it silently does nothing otherwise. Reads
    DeepSpeed's private `_hp_mapping` attribute (what safe_set_full_* test themselves); reading
    needs no such test, `safe_get_full_fp32_param` returns None for an unlinked parameter."""
    return hasattr(p, "_hp_mapping")


def _relink_optimizer_state(engine) -> None:
    """Point every parameter's fragment at the inner optimizer's state as it is now. DeepSpeed
    links them once, lazily at its first step, to whatever state exists then; a restore into an
    engine that has not stepped creates that state itself and must link it (DeepSpeed's private
    `_hp_optimizer_states_linked` flag and `_lazy_init_hp_params_optimizer_state` of the ZeRO 1/2
    optimizer; no public API does this)."""
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()


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
        if value.shape != p.shape:
            raise KeyError(f"write_weights: {name!r} has shape {tuple(value.shape)}, the model's is {tuple(p.shape)}")
        p.data.copy_(value.to(p.dtype))
        if not p.requires_grad:
            continue
        if _fragment_linked(p):
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
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)  # None where DeepSpeed linked no fragment (documented)
            if full is None and masters is not None:
                full = masters.get(id(p))
        out[name] = (full if full is not None else p.detach()).float().to("cpu", copy=True)
    for name, b in engine.module.named_buffers():
        out[name] = b.detach().to("cpu", copy=True)
    return out


def set_lr(engine, lr: float) -> None:
    """Apply the phase plan's learning rate (DeepSpeed's ZeRO optimisers expose param_groups)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def _zero_partitions(engine) -> list[torch.Tensor] | None:
    """The flat fp32 partitions ZeRO 1/2 hands the inner optimizer (one per param group), else None."""
    return getattr(engine.optimizer, "single_partition_of_fp32_groups", None)


def _inner(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds the moments (DeepSpeed's wrappers keep it as `.optimizer`)."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def _state_owners(engine) -> dict[str, torch.Tensor]:
    """{trainable parameter name: the tensor the inner optimizer keys its per-parameter state by}
    for the layouts without ZeRO partitions: the parameter itself (ZeRO-0, fp32) or its fp32 master
    (FP16_UnfusedOptimizer, bf16 at ZeRO-0)."""
    masters = _masters(engine)
    return {name: (masters[id(p)] if masters is not None else p)
            for name, p in engine.module.named_parameters() if p.requires_grad}


def _step_of(states) -> int:
    steps = {int(s["step"]) for s in states if "step" in s}
    assert len(steps) <= 1, f"parameters disagree on the optimizer step: {sorted(steps)}"
    return steps.pop() if steps else 0


@torch.no_grad()
def read_optimizer_state(engine) -> tuple[dict[str, torch.Tensor], int]:
    """The optimizer's moments per trainable parameter at full size, on the CPU, and its step count:
    ({"<key>/<parameter name>": tensor}, step), independent of the ZeRO stage and the world size.

    Under ZeRO 1/2 each moment is gathered from its fragments (`safe_get_full_optimizer_state`, an
    all-reduce: collective, every rank calls it in the same order). Elsewhere the state is
    replicated and read in place."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = _inner(engine)
    flats = _zero_partitions(engine)
    out: dict[str, torch.Tensor] = {}
    if flats is not None:
        states = [inner.state[f] for f in flats if f in inner.state]
        keys = sorted(k for s in states[:1] for k, v in s.items() if torch.is_tensor(v) and v.dim() == 1)
        for name, p in engine.module.named_parameters():
            if p.requires_grad and states:
                for key in keys:
                    out[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).float().to("cpu", copy=True)
        return out, _step_of(states)
    owners = _state_owners(engine)
    states = [inner.state[o] for o in owners.values() if o in inner.state]
    for name, owner in owners.items():
        for key, v in inner.state.get(owner, {}).items():
            if torch.is_tensor(v) and v.shape == owner.shape and v.dim() > 0:
                out[f"{key}/{name}"] = v.float().to("cpu", copy=True)
    return out, _step_of(states)


def _new_state(like: torch.Tensor, keys: set[str], step: int) -> dict[str, torch.Tensor]:
    # torch's AdamW keeps `step` as a float32 CPU scalar (not capturable, not fused), moments like the weights.
    return {"step": torch.tensor(float(step), dtype=torch.float32), **{k: torch.zeros_like(like) for k in keys}}


@torch.no_grad()
def write_optimizer_state(engine, tensors: dict[str, torch.Tensor], step: int) -> None:
    """Restore what `read_optimizer_state` returned into a freshly built engine of any ZeRO stage
    and world size: each rank keeps the slice it owns. The inner optimizer's state is created here
    when the engine has not stepped yet (torch and DeepSpeed create it lazily at the first step,
    and a first step would decay the moments before they are overwritten)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    inner = _inner(engine)
    keys = {k.split("/", 1)[0] for k in tensors}
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    missing = sorted({n for n, _ in named} - {k.split("/", 1)[1] for k in tensors}) if tensors else []
    if missing:
        raise KeyError(f"optimizer state: no moments for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    flats = _zero_partitions(engine)
    if flats is not None:
        for f in flats:
            if not inner.state.get(f):
                inner.state[f] = _new_state(f, keys, step)
            inner.state[f]["step"].fill_(float(step))
        # Point every parameter's fragment at the state just created (these tensors, updated in place).
        _relink_optimizer_state(engine)
        for name, p in named:
            for key in sorted(keys):
                safe_set_full_optimizer_state(p, tensors[f"{key}/{name}"].to(p.device, torch.float32), key)
        return
    for name, owner in _state_owners(engine).items():
        state = inner.state.get(owner)
        if not state:
            state = inner.state[owner] = _new_state(owner, keys, step)
        state["step"].fill_(float(step))
        for key in keys:
            state[key].copy_(tensors[f"{key}/{name}"].to(owner.device, state[key].dtype))


ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


class EngineState:
    """A DeepSpeed engine as a checkpoint part (`checkpoint.Part`), in a format that is the same
    whatever the ZeRO stage and the number of workers, with no pickle anywhere:

        <name>/weights.safetensors   every parameter and buffer at full precision (the fp32 master
                                     where there is one, see read_weights)
        <name>/optim.safetensors     the optimizer's moments per parameter ("exp_avg/<param>", ...)
        trainer.json["engine.<name>"]  the optimizer step and DeepSpeed's step counters

    Why not DeepSpeed's own save_checkpoint: its files are pickles (read with
    torch.load(weights_only=False), so a file planted in storage would run code on resume), and its
    ZeRO shards are per worker, so a run could only resume on the number of workers that wrote it.
    Gathering costs one all-reduce per parameter and moment at a checkpoint (collective; rank 0
    writes); loading re-partitions on any world size. The learning rate is not stored: the phase
    plan sets it at every step."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    @property
    def key(self) -> str:
        return f"engine.{self.name}"

    def save(self, root, rank: int) -> dict[str, Any] | None:
        weights = read_weights(self.engine)
        moments, step = read_optimizer_state(self.engine)
        if rank != 0:
            return None
        folder = Path(root) / self.name
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "weights.safetensors"))
        save_file({k: v.contiguous() for k, v in moments.items()}, str(folder / "optim.safetensors"))
        return {self.key: {"optimizer_step": step, "zero_stage": self.engine.zero_optimization_stage(),
                           **{c: int(getattr(self.engine, c)) for c in ENGINE_COUNTERS}}}

    def load(self, root, rank: int, meta: dict) -> None:
        folder = Path(root) / self.name
        entry = meta.get(self.key)
        if entry is None:
            raise ResumeError(f"{root}: trainer.json has no {self.key!r} entry; this checkpoint was not "
                              "written by this advflow version")
        try:
            write_weights(self.engine, load_file(str(folder / "weights.safetensors")))
            write_optimizer_state(self.engine, load_file(str(folder / "optim.safetensors")),
                                  int(entry["optimizer_step"]))
        except KeyError as err:
            raise ResumeError(f"{folder}: {err.args[0]}; the checkpoint belongs to another model "
                              "(model.size / model.kind differ from the run that wrote it)") from None
        for c in ENGINE_COUNTERS:
            setattr(self.engine, c, int(entry[c]))

    def required(self, world_size: int) -> list[str]:
        return [f"{self.name}/weights.safetensors", f"{self.name}/optim.safetensors"]
