"""Load DiT-layout checkpoints (the released AFM weights) into advflow models.

The released files are plain state dicts in the original DiT layout (x_embedder.proj, t_embedder.mlp.0/.2,
y_embedder.embedding_table, blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1},
final_layer.{linear, adaLN_modulation.1}, pos_embed; discriminators add dis_embed and final_layer.1;
any-step generators add t_tgt_embedder). advflow.trainers.models uses the same names, so mapping is a
name-for-name copy after stripping wrapper prefixes, plus a reshape for the flat/batched forms of the
fixed tables (pos_embed (T, D) vs (1, T, D); dis_embed/cls_embed (D,) vs (1, 1, D)).

Sources: a path (.pt/.pth/.ckpt/.bin are read with torch.load(weights_only=True) only, so a pickle
holding arbitrary Python objects is refused; .safetensors via safetensors) or an in-memory dict.
Wrapper dicts such as {"model": sd, "ema": sd, "step": ...} are unwrapped: `key` picks an entry,
otherwise the first of WRAPPER_KEYS present ("ema" first: the EMA weights are the ones to sample with).
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Mapping

import torch
from torch import nn

from advflow.trainers.models import SIZES, build_classifier, build_discriminator, build_generator

__all__ = [
    "CheckpointError",
    "WRAPPER_KEYS",
    "read_state_dict",
    "load_dit_state_dict",
    "infer_role",
    "infer_options",
    "build_from_checkpoint",
]

WRAPPER_KEYS = ("ema", "model", "state_dict")  # preference order when `key` is not given
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / torch.compile wrappers
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# Fixed tables whose flat and batched forms are the same data (only the view differs).
RESHAPABLE = ("pos_embed", "dis_embed", "cls_embed")
_LIST_LIMIT = 20  # entries per category in the mismatch report


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def _read_file(path: str) -> Mapping:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file; check the path")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"checkpoint {path!r}: not a readable safetensors file ({e})") from e
    if lower.endswith(TORCH_SUFFIXES):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"checkpoint {path!r}: refused to unpickle it, it holds Python objects other than tensors "
                f"and plain containers (torch.load weights_only=True). If you trust the file, re-save just "
                f"the state dict (e.g. torch.save(ckpt['ema'], 'ema.pt')) or convert it to .safetensors. "
                f"Detail: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from e
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path!r}: not a readable torch file ({e})") from e
    raise CheckpointError(
        f"checkpoint {path!r}: unknown file type; use .safetensors or one of {list(TORCH_SUFFIXES)}"
    )


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _unwrap(obj, key: str | None, where: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a dict of tensors, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{where}: key={key!r} not found; top-level keys are {sorted(map(str, obj))}")
        sd = obj[key]
    elif _is_state_dict(obj):
        sd = obj
    else:
        found = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not found:
            raise CheckpointError(
                f"{where}: neither a state dict nor a wrapper with one of {list(WRAPPER_KEYS)}; "
                f"top-level keys are {sorted(map(str, obj))}; pass key=<entry holding the weights>"
            )
        key, sd = found[0], obj[found[0]]
    if not _is_state_dict(sd):
        bad = sorted(str(k) for k, v in sd.items() if not torch.is_tensor(v)) if isinstance(sd, Mapping) else []
        raise CheckpointError(
            f"{where}: entry {key!r} is not a state dict of tensors"
            + (f" (non-tensor values at {bad[:_LIST_LIMIT]})" if bad else "")
        )
    return sd


def _strip(sd: Mapping, where: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, value in sd.items():
        clean = name
        while clean.startswith(STRIP_PREFIXES):
            clean = clean.split(".", 1)[1]
        if clean in out:
            raise CheckpointError(f"{where}: {name!r} and another key both map to {clean!r} after prefix stripping")
        out[clean] = value
    return out


def read_state_dict(source, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read `source` (path or dict) into a flat {name: tensor} dict with wrapper prefixes stripped.

    key: wrapper entry to use; default: the dict itself if it is a state dict, else the first of
    WRAPPER_KEYS ("ema", "model", "state_dict") present.
    """
    if isinstance(source, (str, os.PathLike)):
        where = f"checkpoint {os.fspath(source)!r}"
        obj = _read_file(os.fspath(source))
    elif isinstance(source, Mapping):
        where, obj = "state dict", source
    else:
        raise CheckpointError(f"source: expected a file path or a dict, got {type(source).__name__}")
    return _strip(_unwrap(obj, key, where), where)


# ----------------------------------------------------------------------------------------------------
# Inferring what a file holds
# ----------------------------------------------------------------------------------------------------


def _has(sd: Mapping, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def _need(sd: Mapping, name: str, role: str) -> torch.Tensor:
    if name not in sd:
        raise CheckpointError(f"state dict: missing {name!r}, required to recognise a DiT {role}")
    return sd[name]


def infer_role(state_dict: Mapping) -> str:
    """"discriminator" (has dis_embed), "classifier" (has cls_embed) or "generator"."""
    if "dis_embed" in state_dict:
        return "discriminator"
    if "cls_embed" in state_dict:
        return "classifier"
    return "generator"


def infer_options(state_dict: Mapping, *, kind: str | None = None, repeats: int | None = None) -> dict:
    """Options (including "name") for the builder matching `infer_role(state_dict)`.

    Read from tensor shapes: size name (depth, width, patch looked up in SIZES; heads are not stored
    and come from the table), in_channels, input_size, num_classes; generators: kind; discriminators:
    time_cond. Not recorded by the weights: K (nfe; left to the builder default) and the depth
    repetition R. A generator with t_embedder but no t_tgt_embedder is either "multistep" or a
    depth-repeated 1NFE generator (weight-tied, so same shapes); it is reported as "multistep" unless
    the caller passes kind="1nfe" with repeats=R (or repeats=R > 1 alone).
    """
    role = infer_role(state_dict)
    proj = _need(state_dict, "x_embedder.proj.weight", role)
    if proj.dim() != 4:
        raise CheckpointError(f"state dict: x_embedder.proj.weight must be 4D (D, C, p, p), got {tuple(proj.shape)}")
    width, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    tokens = _need(state_dict, "pos_embed", role).numel() // width
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"state dict: pos_embed holds {tokens} tokens, not a square grid")
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    names = [n for n, s in SIZES.items() if (s.depth, s.width, s.patch) == (depth, width, patch)]
    if not names:
        known = {n: (s.depth, s.width, s.patch) for n, s in SIZES.items()}
        raise CheckpointError(
            f"state dict: no size in SIZES has depth={depth}, width={width}, patch={patch}; "
            f"known (depth, width, patch): {known}"
        )
    opts: dict = {"name": names[0], "in_channels": in_channels, "input_size": grid * patch}
    has_t = _has(state_dict, "t_embedder.")

    if role == "classifier":
        opts["num_classes"] = _need(state_dict, "final_layer.1.weight", role).shape[0]
        return opts
    opts["num_classes"] = _need(state_dict, "y_embedder.embedding_table.weight", role).shape[0]
    if role == "discriminator":
        opts["time_cond"] = has_t
        return opts

    out = _need(state_dict, "final_layer.linear.weight", role).shape[0] // (patch * patch)
    if out != in_channels:
        sigma = ""
        if out == 2 * in_channels:
            sigma = " (2x: an original DiT with learn_sigma=True; AFM generators predict C channels)"
        raise CheckpointError(
            f"state dict: final_layer.linear outputs {out} channels per pixel but the input has {in_channels}{sigma}; "
            "advflow generators output exactly in_channels"
        )
    has_tgt = _has(state_dict, "t_tgt_embedder.")
    found = "anystep" if has_tgt else ("multistep" if has_t else "1nfe")
    if kind is None:
        kind = "1nfe" if (found == "multistep" and repeats is not None and repeats > 1) else found
    if repeats is None:
        repeats = 1
    # What the weights must contain for (kind, repeats): check the hints against them.
    wants_t, wants_tgt = kind != "1nfe" or repeats > 1, kind == "anystep"
    if (wants_t, wants_tgt) != (has_t, has_tgt):
        raise CheckpointError(
            f"state dict: kind={kind!r}, repeats={repeats} needs t_embedder={wants_t}, t_tgt_embedder={wants_tgt}, "
            f"but the weights have t_embedder={has_t}, t_tgt_embedder={has_tgt} (they look like kind={found!r}"
            + (", or kind='1nfe' with repeats>1" if found == "multistep" else "")
            + ")"
        )
    opts.update(kind=kind, repeats=repeats)
    return opts


def _describe(opts: Mapping, role: str) -> str:
    return f"{role} " + ", ".join(f"{k}={v!r}" for k, v in opts.items())


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    more = f" ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return [f"  {title} ({len(items)}):"] + [f"    {s}" for s in items[:_LIST_LIMIT]] + ([f"   {more}"] if more else [])


def load_dit_state_dict(model: nn.Module, source, *, key: str | None = None) -> nn.Module:
    """Copy DiT-layout weights from `source` (path or dict, see read_state_dict) into `model`.

    Every tensor must match by name and shape (pos_embed/dis_embed/cls_embed may come flat or
    batched). On any mismatch, raises ONE CheckpointError listing missing, unexpected and mis-shaped
    keys (expected vs got) plus what the file looks like (size, kind, ...) against the model's config.
    Returns the model.
    """
    sd = read_state_dict(source, key=key)
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected, shapes = [], []
    for name, value in sd.items():
        if name not in expected:
            unexpected.append(name)
            continue
        want = expected[name].shape
        if value.shape != want:
            if name in RESHAPABLE and value.numel() == expected[name].numel():
                value = value.reshape(want)
            else:
                shapes.append(f"{name}: expected {tuple(want)}, got {tuple(value.shape)}")
                continue
        mapped[name] = value
    missing = sorted(set(expected) - set(sd))
    if missing or unexpected or shapes:
        lines = ["checkpoint does not fit the model:"]
        lines += _listing("missing from the checkpoint", missing)
        lines += _listing("unexpected in the checkpoint", sorted(unexpected))
        lines += _listing("shape mismatch", shapes)
        try:
            found = infer_options(sd)
            alt = ""
            if found.get("kind") == "multistep":
                alt = " (or kind='1nfe' with repeats>1: weights do not record R)"
            lines.append(f"  the file looks like: {_describe(found, infer_role(sd))}{alt}")
        except CheckpointError as e:
            lines.append(f"  the file's size/kind could not be recognised: {e}")
        config = getattr(model, "config", None)
        if config is not None:
            role = type(model).__name__.lower()
            lines.append(f"  the model is:        {_describe(config, role)}")
        lines.append(
            "  fix: build the model with the file's options (infer_options / build_from_checkpoint) "
            "or pick the right file"
        )
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(mapped, strict=True)
    return model


def build_from_checkpoint(source, *, key: str | None = None, kind: str | None = None,
                          repeats: int | None = None, **options) -> nn.Module:
    """Build the model a checkpoint describes (role and options inferred) and load its weights.

    kind/repeats: hints for generators (see infer_options); other keyword options (e.g. nfe) are
    passed to the builder.
    """
    sd = read_state_dict(source, key=key)
    role = infer_role(sd)
    if role != "generator" and (kind is not None or repeats is not None):
        raise CheckpointError(f"kind/repeats: only apply to generators, but the file holds a {role}")
    opts = infer_options(sd, kind=kind, repeats=repeats)
    opts.update(options)
    builder = {"generator": build_generator, "discriminator": build_discriminator, "classifier": build_classifier}[role]
    return load_dit_state_dict(builder(**opts), sd)
