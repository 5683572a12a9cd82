"""Check that a job can write its output before it does the work.

A job that generates for minutes and then cannot write its result (a typo'd folder, a read-only
mount, /proc) wastes the work and ends in a traceback from the temp file. Each job calls
`check_writable` on every local output path it was given, first thing after parsing its
arguments; the error is one line naming the flag, the path and the fix.

The check creates nothing the user would see: it probes the path's nearest existing folder with a
hidden file that it removes at once (a missing folder is created by the job's own write, and
creating a folder needs the same permission on its parent as creating a file does). s3:// and other
URLs are not checked here: their storage is checked by whoever opens it.
"""

from __future__ import annotations

import os
from pathlib import Path


class OutputError(ValueError):
    """A user-facing output-path error: `<flag> <path>: <problem>; <fix>`, one line."""


def check_writable(path: str | os.PathLike | None, what: str, *, folder: bool = False) -> None:
    """Raise OutputError unless `path` (a file, or with `folder=True` a folder) can be written.

    `what` names where the path came from (`--out`), so the message points at the flag to change.
    None or an empty string (an optional output not asked for) and URLs (`s3://...`) pass."""
    if path is None or str(path) == "" or "://" in str(path):
        return
    p = Path(path).expanduser()
    where = f"{what} {path}"
    if p.exists():
        if folder and not p.is_dir():
            raise OutputError(f"{where}: exists and is not a folder; pass a folder path (or remove the file)")
        if not folder and p.is_dir():
            raise OutputError(f"{where}: is a folder; pass a file path (a file name inside it, e.g. {p / 'out'})")
        if not folder and not os.access(p, os.W_OK):
            raise OutputError(f"{where}: the file exists and is read-only; make it writable or pass another path")
    # The nearest folder that exists: the probe goes there (the job creates the missing ones below it).
    probe_dir = p if folder and p.is_dir() else p.parent
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputError(f"{where}: {probe_dir} is a file, not a folder; pass a path under an existing folder")
    _probe(probe_dir, where)


def _probe(folder: Path, where: str) -> None:
    """Create and remove a hidden file in `folder`: the one test that covers permissions, read-only
    mounts, pseudo-filesystems (/proc) and full disks alike (os.access misses the last three)."""
    probe = folder / f".advflow-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputError(f"{where}: cannot create files in {folder} ({reason}); pass a path in a folder "
                          "you can write to") from None
    try:
        os.close(fd)
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
