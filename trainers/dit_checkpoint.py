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

Generator kind. The tensors tell 1NFE (no t_embedder) and any-step (t_tgt_embedder) generators apart,
but a generator with t_embedder and no t_tgt_embedder fits two models with identical shapes: a
"multistep" generator (K steps; t_embedder embeds the source time s) and a depth-repeated 1NFE
generator (the paper's 56/112-layer models: the same blocks run R times, pass i adding the embedding
of t_i = 1 - i/R). The weights record neither K nor R, so such a file is refused
(AmbiguousCheckpointError) unless the caller says which (kind="multistep" with nfe=K, or repeats=R;
jobs/register_checkpoint.py: --kind multistep --nfe K, or --repeats R) or the kind is RECORDED beside
the weights. Recorded means any of (read by `read_recorded`, in this order):
  1. safetensors metadata (the `__metadata__` header, string values): "advflow.kind" (one of
     "1nfe", "multistep", "anystep"), "advflow.nfe" (K, e.g. "4"), "advflow.repeats" (R, e.g. "2");
     `record_metadata(G)` builds these for `safetensors.torch.save_file(..., metadata=...)`;
  2. a JSON sidecar `<file stem>.json` next to the file (g.safetensors -> g.json);
  3. a JSON sidecar `generator.json` in the same directory: the GeneratorSpec that advflow's logged
     and registered models carry (platform/tracking/model_format.py, SPEC_FILE).
A JSON sidecar records `kind`, `nfe`, `repeats` either at top level ({"kind": "1nfe", "repeats": 2})
or under "generator" (the GeneratorSpec layout: {"format": "advflow-generator", "generator":
{"kind": ..., "nfe": ..., "repeats": ..., ...}, ...}); a JSON object with none of them is not a record
and is ignored, an unreadable one is an error. Sources that disagree, a record that does not fit the
tensors, and an explicit argument that contradicts the record are errors naming both sides. A
recorded nfe also supplies K (a multistep generator needs it, see GeneratorOptions).

Official SiT / CAFM-SiT layout (`convert_cafm_sit`, `build_from_cafm_sit`; register_checkpoint.py
--layout cafm-sit): see the section "CAFM-SiT" below for the facts and the conversion.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from advflow.trainers.models import (
    KINDS,
    SIZES,
    TIME_FREQ_DIM,
    build_classifier,
    build_discriminator,
    build_generator,
)

__all__ = [
    "CheckpointError",
    "AmbiguousCheckpointError",
    "WRAPPER_KEYS",
    "RECORD_KEYS",
    "METADATA_PREFIX",
    "SPEC_SIDECAR",
    "Recorded",
    "read_recorded",
    "record_metadata",
    "read_state_dict",
    "load_dit_state_dict",
    "infer_role",
    "infer_options",
    "build_from_checkpoint",
    "LAYOUTS",
    "SIT_TIME_SCALE",
    "convert_cafm_sit",
    "build_from_cafm_sit",
]

WRAPPER_KEYS = ("ema", "model", "state_dict")  # preference order when `key` is not given
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / torch.compile wrappers
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# Fixed tables whose flat and batched forms are the same data (only the view differs).
RESHAPABLE = ("pos_embed", "dis_embed", "cls_embed")
_LIST_LIMIT = 20  # entries per category in the mismatch report
RECORD_KEYS = ("kind", "nfe", "repeats")  # what a record beside the weights may say about a generator
METADATA_PREFIX = "advflow."  # safetensors metadata keys: advflow.kind, advflow.nfe, advflow.repeats
# Directory-wide sidecar; the same name as advflow.platform.tracking.model_format.SPEC_FILE (trainers/
# does not import the platform; tests check the two agree).
SPEC_SIDECAR = "generator.json"
_CLI = "jobs/register_checkpoint.py"
_RECORD_HINT = (
    "record it beside the weights (safetensors metadata advflow.kind / advflow.nfe / advflow.repeats, "
    "or kind / nfe / repeats in a JSON sidecar <file stem>.json or generator.json)"
)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says why and what to do.

    cli: where set, a one-line variant of the message naming jobs/register_checkpoint.py's flags
    instead of the Python arguments (that job prints it).
    """

    def __init__(self, message: str, *, cli: str | None = None):
        super().__init__(message)
        self.cli = cli


class AmbiguousCheckpointError(CheckpointError):
    """Generator weights that fit both a multistep and a depth-repeated 1NFE generator, with nothing
    (argument or record) saying which."""


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
# What is recorded beside the weights (see the module docstring)
# ----------------------------------------------------------------------------------------------------


class Recorded(dict):
    """{key: value} for the RECORD_KEYS recorded beside a checkpoint; `.sources[key]` says where."""

    def __init__(self, values: Mapping | None = None, sources: Mapping | None = None):
        super().__init__(values or {})
        self.sources = {k: (sources or {}).get(k, "the recorded= argument") for k in self}


def _record_value(key: str, value, where: str):
    if key == "kind":
        if value not in KINDS:
            raise CheckpointError(f"{where}: kind={value!r} is not a generator kind; use one of {list(KINDS)}")
        return value
    if isinstance(value, str) and value.strip().isdigit():  # safetensors metadata holds strings
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where}: {key}={value!r} must be a positive integer")
    return value


def _check_record(values: Mapping, where: str) -> dict:
    out = {k: _record_value(k, v, where) for k, v in values.items() if k in RECORD_KEYS and v is not None}
    kind = out.get("kind")
    if kind not in (None, "1nfe") and out.get("repeats", 1) > 1:
        raise CheckpointError(f"{where}: repeats={out['repeats']} with kind={kind!r}; depth repetition is "
                              "for kind='1nfe' only")
    if kind == "1nfe" and out.get("nfe", 1) != 1:
        raise CheckpointError(f"{where}: nfe={out['nfe']} with kind='1nfe'; a 1NFE generator takes one step")
    return out


def _metadata_record(path: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as e:  # corrupt header: _read_file reports it in the same words
        raise CheckpointError(f"checkpoint {path!r}: not a readable safetensors file ({e})") from e
    return {k[len(METADATA_PREFIX):]: v for k, v in meta.items()
            if k.startswith(METADATA_PREFIX) and k[len(METADATA_PREFIX):] in RECORD_KEYS}


def _sidecar_record(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"sidecar {str(path)!r}: not readable JSON ({e}); fix or remove it") from e
    if not isinstance(obj, dict):
        return {}
    body = obj.get("generator") if isinstance(obj.get("generator"), dict) else obj
    return {k: body[k] for k in RECORD_KEYS if k in body}


def read_recorded(path: str | os.PathLike) -> Recorded:
    """What is recorded beside the checkpoint file `path` about its generator (kind / nfe / repeats).

    Reads, in order, the safetensors metadata (advflow.kind / advflow.nfe / advflow.repeats), the
    sidecar `<stem>.json` and the sidecar `generator.json` in the same directory (see the module
    docstring for their layout). Returns a (possibly empty) Recorded; raises CheckpointError when two
    sources disagree or a value is invalid.
    """
    path = Path(os.fspath(path))
    sources: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".safetensors" and path.is_file():
        sources.append((f"safetensors metadata of {str(path)!r}", _metadata_record(str(path))))
    seen = set()
    for side in (path.with_suffix(".json"), path.with_name(SPEC_SIDECAR)):
        if side == path or side in seen or not side.is_file():
            continue
        seen.add(side)
        sources.append((f"sidecar {str(side)!r}", _sidecar_record(side)))
    values: dict = {}
    where: dict = {}
    for src, raw in sources:
        for k, v in _check_record(raw, src).items():
            if k in values and values[k] != v:
                raise CheckpointError(
                    f"checkpoint {str(path)!r}: {k}={values[k]!r} recorded in {where[k]} contradicts "
                    f"{k}={v!r} recorded in {src}; fix or remove one of them"
                )
            values.setdefault(k, v)
            where.setdefault(k, src)
    _check_record(values, f"checkpoint {str(path)!r} (records combined from {sorted(set(where.values()))})")
    return Recorded(values, where)


def record_metadata(generator) -> dict[str, str]:
    """safetensors metadata recording a generator's kind, nfe and repeats (G or its .config)."""
    cfg = generator if isinstance(generator, Mapping) else generator.config
    return {METADATA_PREFIX + k: str(cfg[k]) for k in RECORD_KEYS}


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


def _layout(state_dict: Mapping) -> tuple[str, dict, str | None, bool, bool]:
    """(role, options read from shapes, kind the tensors suggest, has t_embedder, has t_tgt_embedder).

    The suggested kind is None for discriminators and classifiers; for a generator with t_embedder and
    no t_tgt_embedder it is "multistep", which may also be a depth-repeated 1NFE generator.
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
        return role, opts, None, has_t, False
    opts["num_classes"] = _need(state_dict, "y_embedder.embedding_table.weight", role).shape[0]
    if role == "discriminator":
        opts["time_cond"] = has_t
        return role, opts, None, has_t, False

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
    return role, opts, found, has_t, has_tgt


AMBIGUOUS_MESSAGE = (
    "state dict: ambiguous generator: t_embedder without t_tgt_embedder fits both a multistep generator "
    "(K steps; t_embedder embeds the source time s) and a depth-repeated 1NFE generator (the same blocks "
    "run R times; t_embedder embeds the pass time t_i = 1 - i/R), and the weights record neither. "
    "Pick one: kind='multistep' with nfe=K for the multistep generator, or repeats=R (R > 1) for the "
    f"depth-repeated 1NFE generator ({_CLI}: --kind multistep --nfe K, or --repeats R); or {_RECORD_HINT}"
)
AMBIGUOUS_CLI = (
    "ambiguous generator weights (t_embedder without t_tgt_embedder): they fit both a multistep generator "
    "and a depth-repeated 1NFE generator; pass --kind multistep --nfe K for the multistep generator, or "
    "--repeats R (R > 1) for the depth-repeated 1NFE generator (or record advflow.kind / advflow.nfe / "
    "advflow.repeats in the safetensors metadata, or in a <file stem>.json / generator.json sidecar)"
)


def _fmt(values: Mapping) -> str:
    return ", ".join(f"{k}={values[k]!r}" for k in RECORD_KEYS if values.get(k) is not None)


def _flags(values: Mapping) -> str:
    return " ".join(f"--{k} {values[k]}" for k in RECORD_KEYS if values.get(k) is not None)


def _implied(values: Mapping) -> dict:
    """The kind/repeats/nfe that `values` pin down: repeats > 1 means kind '1nfe'; a step kind
    ('multistep', 'anystep') means repeats 1; kind '1nfe' means nfe 1."""
    out = {k: values.get(k) for k in RECORD_KEYS}
    if out["kind"] is None and out["repeats"] is not None and out["repeats"] > 1:
        out["kind"] = "1nfe"
    if out["kind"] in ("multistep", "anystep") and out["repeats"] is None:
        out["repeats"] = 1
    if out["kind"] == "1nfe" and out["nfe"] is None:
        out["nfe"] = 1
    return out


def _sources(recorded: Mapping) -> str:
    sources = getattr(recorded, "sources", {})
    return ", ".join(sorted({sources.get(k, "the recorded= argument") for k in recorded}))


def _resolve(found: str, has_t: bool, has_tgt: bool, kind, repeats, nfe, recorded) -> tuple[str, int, int | None]:
    """(kind, repeats, nfe or None) of a generator from the tensors, the arguments and the record."""
    given = _check_record({"kind": kind, "repeats": repeats, "nfe": nfe}, "arguments")
    rec = _check_record(recorded or {}, f"recorded ({_sources(recorded or {})})")
    g, r = _implied(given), _implied(rec)
    # nfe of an any-step generator is only its default step count: an argument may override the record.
    clash = [k for k in RECORD_KEYS if g[k] is not None and r[k] is not None and g[k] != r[k]
             and not (k == "nfe" and "anystep" in (g["kind"], r["kind"]))]
    if clash:
        where = _sources(recorded)
        raise CheckpointError(
            f"state dict: the arguments {_fmt(given)} contradict {_fmt(rec)} recorded in {where}; "
            "drop the arguments or fix the record",
            cli=f"{_flags(given)} contradicts {_fmt(rec)} recorded in {where}; drop the flags or fix the record",
        )
    kind = g["kind"] if g["kind"] is not None else r["kind"]
    repeats = g["repeats"] if g["repeats"] is not None else r["repeats"]
    nfe = given.get("nfe", rec.get("nfe"))  # only a K someone gave; the builder's default otherwise
    if kind is None:
        if found == "multistep" and repeats is None:
            raise AmbiguousCheckpointError(AMBIGUOUS_MESSAGE, cli=AMBIGUOUS_CLI)
        kind = found  # repeats=1 on the ambiguous layout: not depth-repeated, so multistep
    if repeats is None:
        repeats = 1
    # What the weights must contain for (kind, repeats): check the hints against them.
    wants_t, wants_tgt = kind != "1nfe" or repeats > 1, kind == "anystep"
    if (wants_t, wants_tgt) != (has_t, has_tgt):
        origin = ""
        if rec and not ({"kind", "repeats"} & set(given)):
            origin = f"; kind/repeats come from what is recorded in {_sources(recorded)}"
        raise CheckpointError(
            f"state dict: kind={kind!r}, repeats={repeats} needs t_embedder={wants_t}, t_tgt_embedder={wants_tgt}, "
            f"but the weights have t_embedder={has_t}, t_tgt_embedder={has_tgt} (they look like kind={found!r}"
            + (", or kind='1nfe' with repeats>1" if found == "multistep" else "")
            + ")" + origin
        )
    return kind, repeats, nfe


def infer_options(state_dict: Mapping, *, kind: str | None = None, repeats: int | None = None,
                  nfe: int | None = None, recorded: Mapping | None = None) -> dict:
    """Options (including "name") for the builder matching `infer_role(state_dict)`.

    Read from tensor shapes: size name (depth, width, patch looked up in SIZES; heads are not stored
    and come from the table), in_channels, input_size, num_classes; generators: kind, repeats (and nfe
    when given or recorded); discriminators: time_cond.

    Generators: no t_embedder is "1nfe", t_tgt_embedder is "anystep". t_embedder without
    t_tgt_embedder is either "multistep" or a depth-repeated 1NFE generator (weight-tied, so the same
    shapes): that layout raises AmbiguousCheckpointError unless `kind` / `repeats` pick one
    (kind="multistep", or repeats=R > 1 with or without kind="1nfe"; repeats=1 also means multistep)
    or `recorded` does. recorded: what is recorded beside the file (`read_recorded(path)`, or any
    mapping with kind / nfe / repeats); an argument contradicting it is a CheckpointError naming
    both (except nfe of an any-step generator, its default step count, which an argument overrides).
    nfe is returned only when given or recorded; K of a multistep generator is not in the weights.
    kind/repeats/nfe/recorded are ignored for discriminators and classifiers.
    """
    role, opts, found, has_t, has_tgt = _layout(state_dict)
    if role != "generator":
        return opts
    kind, repeats, nfe = _resolve(found, has_t, has_tgt, kind, repeats, nfe, recorded)
    opts.update(kind=kind, repeats=repeats)
    if nfe is not None:
        opts["nfe"] = nfe
    return opts


def _looks_like(state_dict: Mapping) -> str:
    """What the tensors alone say, for error reports (the ambiguous layout names both readings)."""
    role, opts, found, _, _ = _layout(state_dict)
    if role != "generator":
        return _describe(opts, role)
    opts.update(kind=found, repeats=1)
    alt = " (or kind='1nfe' with repeats>1: weights do not record R)" if found == "multistep" else ""
    return _describe(opts, role) + alt


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


def _check_against_record(model: nn.Module, path: str) -> None:
    """A generator model must agree with what is recorded beside the file it is loaded from."""
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping) or "kind" not in config or "repeats" not in config:
        return
    rec = read_recorded(path)
    want = _implied(rec)
    keys = ["kind", "repeats"] + (["nfe"] if config["kind"] == "multistep" else [])
    if any(want[k] is not None and want[k] != config.get(k) for k in keys):
        raise CheckpointError(
            f"checkpoint {path!r}: the model is a generator with {_fmt(config)} but {_fmt(rec)} is recorded in "
            f"{_sources(rec)}; build the model with the recorded options (build_from_checkpoint) or fix the record"
        )


def load_dit_state_dict(model: nn.Module, source, *, key: str | None = None) -> nn.Module:
    """Copy DiT-layout weights from `source` (path or dict, see read_state_dict) into `model`.

    Every tensor must match by name and shape (pos_embed/dis_embed/cls_embed may come flat or
    batched). On any mismatch, raises ONE CheckpointError listing missing, unexpected and mis-shaped
    keys (expected vs got) plus what the file looks like (size, kind, ...) against the model's config.
    For a generator loaded from a path, the kind / repeats (and a multistep K) recorded beside the
    file (read_recorded) must match the model's. Returns the model.
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
            lines.append(f"  the file looks like: {_looks_like(sd)}")
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
    if isinstance(source, (str, os.PathLike)):
        _check_against_record(model, os.fspath(source))
    model.load_state_dict(mapped, strict=True)
    return model


def build_from_checkpoint(source, *, key: str | None = None, kind: str | None = None,
                          repeats: int | None = None, recorded: Mapping | None = None, **options) -> nn.Module:
    """Build the model a checkpoint describes (role and options inferred) and load its weights.

    kind/repeats (and options["nfe"]): generator hints, see infer_options. recorded: what is recorded
    beside the weights; default: `read_recorded(source)` when source is a path (pass it when source is
    a dict read from a file, as jobs/register_checkpoint.py does). A multistep generator needs K: from
    nfe= or the record, else CheckpointError. Other keyword options are passed to the builder.
    """
    sd = read_state_dict(source, key=key)
    role = infer_role(sd)
    builder = {"generator": build_generator, "discriminator": build_discriminator, "classifier": build_classifier}[role]
    if role != "generator":
        if kind is not None or repeats is not None:
            raise CheckpointError(f"kind/repeats: only apply to generators, but the file holds a {role}")
        return load_dit_state_dict(builder(**{**infer_options(sd), **options}), sd)
    if recorded is None and isinstance(source, (str, os.PathLike)):
        recorded = read_recorded(source)
    opts = infer_options(sd, kind=kind, repeats=repeats, nfe=options.pop("nfe", None), recorded=recorded)
    if opts["kind"] == "multistep" and "nfe" not in opts:
        raise CheckpointError(
            "state dict: a 'multistep' generator needs K, the number of steps it was trained for, which the "
            f"weights do not record; pass nfe=K ({_CLI}: --nfe K) or {_RECORD_HINT}",
            cli="a 'multistep' generator needs K, the number of steps it was trained for, which the weights do "
                "not record; pass --nfe K",
        )
    opts.update(options)
    return load_dit_state_dict(builder(**opts), sd)


# ----------------------------------------------------------------------------------------------------
# CAFM-SiT: the official SiT / CAFM-SiT generator layout
# ----------------------------------------------------------------------------------------------------
#
# Facts (official code ByteDance-Seed/Adversarial-Flow-Models at 519601d; SiT = willisma/SiT models.py):
# - Files. CAFM's trainer saves every model with torch.save(state_dict) as
#   states/<step:010>/models/{gen,ema,dis}.pth (common/persistence/manager.py:93-96 and
#   dataclass.py:42-45); gen/dis from `.module._orig_mod.state_dict()` (train_continuous_adversarial_
#   flow_imagenet.py:757-787), so no `module.` / `_orig_mod.` prefix; ema.pth is the EMA generator (decay
#   0.99, trainer:517-526), the one to import. Released CAFM-SiT weights are "the same format as the
#   official SiT checkpoint" (configs/generate/cafm/README.md:4): a plain state dict, which the trainer
#   itself loads with load_state_dict(strict=True) (trainer:83-88). dis.pth (dis_embed, final_layer.1)
#   is the discriminator, not an importable generator.
# - Names and shapes: SiT's own (models/cafm/sit/sit_mod.py:27-58 subclasses SiT; its LayerNorms have no
#   parameters): x_embedder.proj (D, C, p, p), pos_embed (1, T, D), t_embedder.mlp.{0,2}, y_embedder.
#   embedding_table, blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1},
#   final_layer.{linear, adaLN_modulation.1}: the names advflow's Generator uses (SiT-XL/2 = XL/2).
# - Class table: 1001 rows (configs/models/cafm/sit/xl2.yaml:12 num_classes 1001 with
#   class_dropout_prob 0; the pretrained SiT-XL-2-256.pt has 1000 classes + SiT's CFG row), row 1000
#   the dropped label: imported as num_classes = rows - 1 with null_label=True.
# - learn_sigma=True (xl2.yaml:10): final_layer.linear outputs p*p*2C values per token, laid out
#   (p_row, p_col, channel) with channel fastest (SiT unpatchify); SiT.forward keeps channels [0, C)
#   (x.chunk(2, dim=1)[0]), so the rows with channel >= C never reach the output and are dropped.
# - Time and sign: SiT was trained with t_sit = 0 noise, 1 data and predicts v_sit = data - noise; its
#   TimestepEmbedder embeds sinusoids of t_sit ITSELF (no 1000x). CAFM's Generator
#   (models/cafm/sit/generator.py:6-10) returns -SiT(x, 1 - t, y): our convention (t = 1 noise,
#   velocity z - x). advflow's embedder embeds sinusoids of 1000 t.
#
# Conversion (exact): the sign goes into final_layer.linear (weight and bias negated); the flip t -> 1 - t
# goes into t_embedder.mlp.0: for frequency f, [cos f(1-t), sin f(1-t)] = [cos f cos ft + sin f sin ft,
# sin f cos ft - cos f sin ft], a fixed linear map of [cos ft, sin ft], folded into the columns of
# mlp.0.weight (computed in float64). What cannot be folded is the frequency scale: SiT's frequencies
# 10000^(-k/128) versus advflow's 1000 x those (advflow lacks the 96 lowest); so the imported generator
# is built with time_scale=SIT_TIME_SCALE (GeneratorOptions.time_scale: the embedder sees sinusoids of
# time_scale * t; default 1000, recorded in .config only when it differs). The result is a plain
# advflow "multistep" generator whose velocity(x_t, y, t) equals CAFM's Generator(x_t, y, t) and whose
# t_embedder takes our t directly, so a D built from its trunk (trainers/cafm.py) needs no flip either.

LAYOUTS = ("dit", "cafm-sit")
SIT_TIME_SCALE = 1.0  # SiT embeds sinusoids of t itself; DiT / advflow of 1000 t
_SIT_MAX_PERIOD = 10000.0


def _fold_time_flip(w: torch.Tensor) -> torch.Tensor:
    """mlp.0 weight (D, 256) acting on SiT's [cos f s | sin f s] at s = 1 - t -> the same map acting on
    [cos f t | sin f t]; frequencies f_k = 10000^(-k/128) as SiT's timestep_embedding."""
    half = TIME_FREQ_DIM // 2
    if w.dim() != 2 or w.shape[1] != TIME_FREQ_DIM:
        raise CheckpointError(f"state dict: t_embedder.mlp.0.weight must be (D, {TIME_FREQ_DIM}), got {tuple(w.shape)}")
    f = torch.exp(-math.log(_SIT_MAX_PERIOD) * torch.arange(half, dtype=torch.float64) / half)
    cf, sf = torch.cos(f), torch.sin(f)
    wc, ws = w[:, :half].double(), w[:, half:].double()
    return torch.cat([wc * cf + ws * sf, wc * sf - ws * cf], dim=1).to(w.dtype)


def convert_cafm_sit(source, *, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """An official SiT / CAFM-SiT generator (path or dict; see read_state_dict for files and wrappers)
    -> (advflow state dict, generator options without nfe). See the CAFM-SiT section above.

    Options: name, in_channels, input_size, num_classes (table rows - 1), null_label=True,
    kind="multistep", repeats=1, time_scale=SIT_TIME_SCALE. Raises CheckpointError for a discriminator
    (dis.pth), an any-step/1NFE layout or an output width that is neither C nor 2C.
    """
    where = f"checkpoint {os.fspath(source)!r}" if isinstance(source, (str, os.PathLike)) else "state dict"
    sd = dict(read_state_dict(source, key=key))
    if "dis_embed" in sd:
        raise CheckpointError(f"{where}: holds the CAFM discriminator (dis_embed; dis.pth), not the generator; "
                              "pass the generator file (ema.pth, or gen.pth)")
    for name in ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
                 "final_layer.linear.weight", "final_layer.linear.bias"):
        if name not in sd:
            raise CheckpointError(f"{where}: missing {name!r}: not an official SiT / CAFM-SiT generator "
                                  "(layout cafm-sit); for an AFM/DiT release use the default layout (dit)")
    if _has(sd, "t_tgt_embedder."):
        raise CheckpointError(f"{where}: has t_tgt_embedder (an AFM any-step generator); use the default layout (dit)")
    proj = sd["x_embedder.proj.weight"]
    if proj.dim() != 4:
        raise CheckpointError(f"{where}: x_embedder.proj.weight must be 4D (D, C, p, p), got {tuple(proj.shape)}")
    channels, patch = proj.shape[1], proj.shape[2]
    lin_w, lin_b = sd["final_layer.linear.weight"], sd["final_layer.linear.bias"]
    out = lin_w.shape[0] // (patch * patch)
    if out == 2 * channels:  # learn_sigma: keep channels [0, C) of each (p_row, p_col) group
        keep = (torch.arange(lin_w.shape[0]) % out) < channels
        lin_w, lin_b = lin_w[keep], lin_b[keep]
    elif out != channels:
        raise CheckpointError(f"{where}: final_layer.linear outputs {out} channels per pixel for {channels} input "
                              f"channels; SiT outputs {channels} or, with learn_sigma, {2 * channels}")
    sd["final_layer.linear.weight"] = -lin_w  # CAFM's Generator negates SiT's output
    sd["final_layer.linear.bias"] = -lin_b
    sd["t_embedder.mlp.0.weight"] = _fold_time_flip(sd["t_embedder.mlp.0.weight"])
    opts = infer_options(sd, kind="multistep")
    opts.pop("nfe", None)
    rows = opts["num_classes"]
    if rows < 2:
        raise CheckpointError(f"{where}: y_embedder.embedding_table has {rows} row(s); SiT's has the classes plus "
                              "the null (CFG) row")
    opts.update(num_classes=rows - 1, null_label=True, time_scale=SIT_TIME_SCALE)
    return sd, opts


def build_from_cafm_sit(source, *, key: str | None = None, nfe: int | None = None, **options) -> nn.Module:
    """Build the advflow multistep generator equal to an official CAFM-SiT (or SiT) generator: its
    velocity(x_t, y, t) is CAFM's Generator(x_t, y, t) = -SiT(x_t, 1 - t, y) (see convert_cafm_sit).

    nfe: K, the Euler steps it samples with (not in the weights; required). Other keyword options go to
    build_generator.
    """
    sd, opts = convert_cafm_sit(source, key=key)
    if nfe is None:
        raise CheckpointError(
            "state dict: a SiT / CAFM-SiT velocity model is imported as a 'multistep' generator, which needs K, "
            f"the number of Euler steps it samples with (not in the weights); pass nfe=K ({_CLI}: --nfe K)",
            cli="a SiT / CAFM-SiT velocity model is imported as a 'multistep' generator: pass --nfe K, the "
                "Euler steps it samples with",
        )
    opts.update(nfe=nfe, **options)
    return load_dit_state_dict(build_generator(**opts), sd)
