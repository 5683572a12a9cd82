"""Free TCP ports to hand to a server that binds them later (a leaf: the standard library only).

The platform picks them for the plain-process launcher's process group (`train/local_launch.py`);
`advflow.infra.local.proc` re-exports them for the local stack's services.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOCALHOST = "127.0.0.1"

# Ports picked here are bound later by another process, so the pick races with everything that
# binds port 0 in between: every outgoing connection and every server that lets the OS choose
# (Ray's raylet, object manager and agents do). The OS hands those out from the ephemeral range
# only, so a pick below that range cannot be taken by them. One such collision killed a test's
# Ray head: its client server found its pre-picked port taken, and `ray start --block` then
# stopped the whole head. The floor stays above Ray's worker ports (10002-19999 by default),
# which Ray's workers pick explicitly.
_PICK_FLOOR = 20000
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range(path: Path = _EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """(low, high) of the OS's ephemeral ports; Linux's default when the file cannot be read."""
    try:
        low, high = (int(x) for x in path.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bound(host: str, port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


def free_ports(count: int, host: str = LOCALHOST, *, ephemeral: tuple[int, int] | None = None) -> list[int]:
    """``count`` distinct ports free right now, below the ephemeral range when there is room.

    Racy by nature (the caller's server binds later), but only against other explicit picks:
    see ``_PICK_FLOOR``. Each is held bound while the rest are picked, so none repeats. Without
    room below the ephemeral range, the OS picks (port 0)."""
    low, _ = ephemeral or ephemeral_range()
    rng = random.SystemRandom()
    held: list[socket.socket] = []
    try:
        if low - _PICK_FLOOR >= 1000:
            for _ in range(50 * count):
                if len(held) == count:
                    break
                sock = _bound(host, rng.randrange(_PICK_FLOOR, low))
                if sock is not None:
                    held.append(sock)
        while len(held) < count:
            sock = _bound(host, 0)
            assert sock is not None, "binding port 0 cannot fail"
            held.append(sock)
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


def free_port(host: str = LOCALHOST) -> int:
    """One port as ``free_ports`` picks them (for tests and services; bind it soon after)."""
    return free_ports(1, host)[0]
