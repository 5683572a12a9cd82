"""Detached service processes: ports, sessions, health waits and log tails.

Why sessions: a service such as a Ray head is a tree (CLI, GCS, raylet, dashboard, workers).
Starting it with ``start_new_session=True`` makes its pid the session id of the whole tree, so
``stop_session`` reaches everything it spawned, and the tree outlives the CLI that started it.
Nothing here knows about Ray, S3 or MLflow; ``advflow.infra.local.services`` builds on it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# The port picking rule (below the ephemeral range) lives in the platform, which picks ports too;
# re-exported here for the services, the stack and the tests.
from advflow.platform.net import (  # noqa: F401 - re-exported
    _PICK_FLOOR,
    LOCALHOST,
    ephemeral_range,
    free_port,
    free_ports,
)


class ServiceError(RuntimeError):
    """A local service could not be started, health-checked or stopped."""


class PortInUseError(ServiceError):
    """A port that a service must bind is already taken on 127.0.0.1."""


def port_in_use(port: int, host: str = LOCALHOST) -> bool:
    """True when binding ``host:port`` fails, i.e. a server could not listen there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR; without it a socket in TIME_WAIT would read as "taken".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def require_free_port(port: int, service: str, how_to_change: str, host: str = LOCALHOST) -> None:
    """Raise PortInUseError naming the port, the service and how to pick another one."""
    if port_in_use(port, host):
        raise PortInUseError(
            f"port {port} on {host} is already in use, but {service} needs it. "
            f"Choose another port with {how_to_change}, or stop whatever listens there "
            f"(`ss -ltnp 'sport = :{port}'` shows it)."
        )


def spawn_detached(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path
) -> subprocess.Popen:
    """Start ``argv`` in a new session (pid == session id), output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(argv)}\n".encode())
        log.flush()
        try:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(cwd),
                env=dict(env),
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError as exc:
            raise ServiceError(f"cannot run {argv[0]!r}: {exc}; is the package installed?") from exc


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, session id) of ``pid`` from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after the last ')' are fixed:
    # state, ppid, pgrp, session, ...
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[3])


def _exited(pid: int) -> bool:
    """True when ``pid`` is gone or a zombie (False where /proc cannot tell)."""
    if not Path("/proc").is_dir():
        return False
    stat = _proc_stat(pid)
    return stat is None or stat[0] in ("Z", "X")


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``.

    A session, not a process group: Ray's raylet moves its workers into process groups of their own,
    but they stay in the session that ``spawn_detached`` opened. Zombies are skipped on purpose:
    when the CLI that spawned a service has exited, nobody may reap its dead children, and a zombie
    must not make a stopped service look alive.
    """
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: fall back to the leader's process group, zombies included
        try:
            os.killpg(sid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [sid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is not None and stat[1] == sid and stat[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def session_alive(sid: int) -> bool:
    """True while any non-zombie process of session ``sid`` runs."""
    return bool(session_members(sid))


def _signal_session(sid: int, sig: int) -> None:
    for pid in [sid, *session_members(sid)]:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait_session_gone(sid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        _reap(sid)
        if not session_alive(sid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def stop_session(sid: int, grace_s: float = 20.0, leader_first: bool = False) -> bool:
    """Stop every process of session ``sid``; True if anything was running.

    SIGTERM to all of it, SIGKILL to what is left after ``grace_s``. With ``leader_first`` the
    leader alone gets SIGTERM first, for half of ``grace_s``: a supervisor such as
    ``ray start --block`` then shuts its children down in order.
    """
    if not session_alive(sid):
        _reap(sid)
        return False
    if leader_first:
        try:
            os.kill(sid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if _wait_session_gone(sid, grace_s / 2):
            return True
        grace_s /= 2
    _signal_session(sid, signal.SIGTERM)
    if _wait_session_gone(sid, grace_s):
        return True
    _signal_session(sid, signal.SIGKILL)
    if _wait_session_gone(sid, 10.0):
        return True
    raise ServiceError(f"processes of session {sid} survived SIGKILL: {session_members(sid)}")


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 and the reason as body when nothing answered."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(getattr(exc, "reason", exc))


def _listening_sockets() -> dict[str, int] | None:
    """{socket inode: port} of every TCP socket in LISTEN (IPv4 and IPv6), or None without /proc/net."""
    found: dict[str, int] = {}
    seen_a_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        seen_a_table = True
        for row in rows:
            # sl local_address rem_address st ... inode; local_address is HEXIP:HEXPORT, LISTEN is 0A
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A":
                found[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    return found if seen_a_table else None


def session_listening_ports(sid: int) -> set[int] | None:
    """The TCP ports that processes of session ``sid`` listen on, or None where /proc cannot tell
    (not Linux). One pass over the session's file descriptors, however many ports are asked about."""
    sockets = _listening_sockets()
    if sockets is None:
        return None
    ports: set[int] = set()
    for pid in session_members(sid) if sockets else []:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in sockets:
                ports.add(sockets[target[8:-1]])
    return ports


def port_owner_in_session(port: int, sid: int) -> bool | None:
    """Whether a process of session ``sid`` listens on TCP ``port``: True, False (nobody, or
    someone else), or None where /proc cannot tell (not Linux)."""
    ports = session_listening_ports(sid)
    return None if ports is None else port in ports


def tcp_listening(port: int, host: str = LOCALHOST, timeout: float = 1.0) -> bool:
    """True when something accepts a TCP connection at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file ("" when it does not exist)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_healthy(
    name: str,
    probe: Callable[[], str | None],
    timeout_s: float,
    log_path: Path,
    sid: int | None = None,
    interval_s: float = 0.5,
) -> None:
    """Poll ``probe`` (None = healthy, else the reason) until healthy or ``timeout_s`` passes.

    Fails fast when the service's session (its process tree) has died, and every failure points at the log.
    """
    deadline = time.monotonic() + timeout_s
    reason = "not probed yet"
    while True:
        reason = probe() or ""
        if not reason:
            return
        # Every service's leader runs as long as the service does; once it has exited the start
        # failed, even while stragglers of its tree still wind down (a Ray head's take a minute).
        if sid is not None and (not session_alive(sid) or _exited(sid)):
            _reap(sid)
            raise ServiceError(
                f"{name} exited during start-up ({reason}). See its log {log_path}:\n"
                f"{tail(log_path)}"
            )
        if time.monotonic() >= deadline:
            raise ServiceError(
                f"{name} was not healthy after {timeout_s:.0f}s ({reason}). See its log {log_path}:"
                f"\n{tail(log_path)}"
            )
        time.sleep(interval_s)
