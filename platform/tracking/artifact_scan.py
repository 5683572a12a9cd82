"""Refuse model directories that contain pickle data, before anything in them is loaded.

advflow models hold only safetensors weights, JSON and MLflow's YAML/text metadata. A pickle anywhere
in a model directory means the artifact was tampered with or is not an advflow model; unpickling it
runs arbitrary code, so the whole directory is refused (not just the file skipped) and nothing in it
is ever passed to pickle.load / torch.load.

Checks per file (every file, recursively): no symlinks; no pickle-style names (*.pkl, *.pt, ...);
*.safetensors must parse as safetensors (its first bytes are a header length, so the magic-byte test
below would misfire on it); any other file must not start like a pickle stream (0x80 + protocol
2-5), must not be a zip archive with a pickle member (torch.save's data.pkl) and must not parse as a
protocol 0/1 pickle that imports or calls something.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import struct
import zipfile
from pathlib import Path

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".dill")
# Opcodes through which a pickle reaches code (imports a global, calls it, or builds an object).
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}
_TEXT_PICKLE_PROBE = 1 << 20  # bytes parsed for protocol 0/1 pickles; metadata files are far smaller
_ZIP_MAGIC = b"PK\x03\x04"


class UnsafeArtifactError(ValueError):
    """A model directory holds pickle data (or something that is not an advflow model file)."""


def _is_pickle_head(head: bytes) -> bool:
    # Protocols 2-5 begin with PROTO (0x80) and the protocol number.
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _is_text_pickle(data: bytes) -> bool:
    """True when `data` parses as a complete protocol 0/1 pickle that can reach code.

    pickletools.genops only decodes opcodes; it never imports or calls anything."""
    seen: set[str] = set()
    try:
        for opcode, _arg, _pos in pickletools.genops(io.BytesIO(data)):
            seen.add(opcode.name)
            if opcode.name == "STOP":
                return bool(seen & _CODE_OPCODES)
    except Exception:  # noqa: BLE001 - any decoding failure means "not a pickle"
        return False
    return False


def _zip_pickle_member(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.lower().endswith(PICKLE_SUFFIXES):
                    return info.filename
                with zf.open(info) as member:
                    if _is_pickle_head(member.read(2)):
                        return info.filename
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError):
        return "<unreadable zip archive>"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """None if `path` is a well-formed safetensors file (header length, JSON header, sizes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return "is too short to be a safetensors file"
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 << 20:
            return "has an impossible safetensors header length"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "has a safetensors header that is not JSON"
    if not isinstance(header, dict):
        return "has a safetensors header that is not a JSON object"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"has a malformed safetensors entry {key!r}"
        end = max(end, offsets[1])
    if 8 + n + end != size:
        return "does not have the size its safetensors header describes"
    return None


def file_problem(path: Path) -> str | None:
    """Why `path` may not be part of an advflow model, or None if it is acceptable."""
    if path.is_symlink():
        return "is a symbolic link (advflow models contain only regular files)"
    name = path.name.lower()
    if name.endswith(PICKLE_SUFFIXES):
        return "has a pickle/torch file name"
    if not path.is_file():
        return "is not a regular file"
    if name.endswith(".safetensors"):
        return _safetensors_problem(path)
    with open(path, "rb") as f:
        head = f.read(_TEXT_PICKLE_PROBE)
    if _is_pickle_head(head):
        return "is a pickle stream (starts with the pickle protocol header)"
    if head.startswith(_ZIP_MAGIC):
        member = _zip_pickle_member(path)
        if member is not None:
            return f"is a zip archive (torch.save format) holding pickle data ({member})"
    if _is_text_pickle(head):
        return "is a protocol 0/1 pickle stream"
    return None


def scan_model_dir(root: str | os.PathLike) -> int:
    """Check every file under `root`; raise UnsafeArtifactError on the first offender.

    Returns the number of files checked (so callers and tests can see the scan ran)."""
    root = Path(root)
    if not root.is_dir():
        raise UnsafeArtifactError(f"model directory {root}: not a directory; pass the downloaded model folder")
    checked = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for entry in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / entry
            if entry in dirnames and not path.is_symlink():
                continue  # real sub-folders are walked; symlinked ones are refused below
            why = file_problem(path)
            if why is not None:
                raise UnsafeArtifactError(
                    f"refusing to load model {root}: file {path.relative_to(root)} {why}. advflow models "
                    "contain only safetensors weights and JSON/YAML/text metadata, never pickle, so this "
                    "artifact was tampered with or is not an advflow model; nothing in it was loaded. "
                    "Re-log the generator with advflow.platform.tracking.registry.log_generator."
                )
            checked += 1
    return checked
