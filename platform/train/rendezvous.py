"""The process group's rendezvous, bound to the address it is meant for (Ray-free).

torch's env:// rendezvous starts its TCPStore server on rank 0 listening on EVERY interface
(`*:MASTER_PORT`), whatever MASTER_ADDR says, and gloo picks its own listening address from the
hostname. On the local stack, where every service binds 127.0.0.1, that put a job's sockets on the
machine's routable address. Here rank 0 binds the store's socket itself, to `addr` only, and hands
it to TCPStore (`master_listen_fd`); the other ranks connect as clients; gloo (and NCCL) are told
to use the loopback interface when `addr` is a loopback address. On a multi-node cluster `addr` is
rank 0's node address, which is what the other nodes must reach, so only that address listens.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket

import torch.distributed as dist

_HOSTED: list = []  # rank 0's store and its socket, alive as long as the process group


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def host_store(addr: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0: the rendezvous store listening on addr:port only."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(max(128, world_size))
    store = dist.TCPStore(addr, port, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                          master_listen_fd=sock.fileno(), wait_for_workers=False)
    _HOSTED[:] = [store, sock]
    return store


def init_process_group(backend: str, rank: int, world_size: int, addr: str, port: int,
                       timeout_s: float = 1800.0, env: dict[str, str] | None = None) -> None:
    """Join (rank 0: host) the rendezvous at addr:port and initialise the default process group.
    MASTER_ADDR / MASTER_PORT are set as env:// would, for code that reads them (DeepSpeed).
    env: `distributed.nccl`, set first, since NCCL reads its variables when the group starts;
    timeout_s: `distributed.timeout_s`, how long any collective may wait."""
    os.environ.update(env or {})
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    if is_loopback(addr):
        # gloo and NCCL listen on the interface they pick; on one machine that must be loopback.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = (host_store(addr, port, world_size, timeout_s) if rank == 0
             else dist.TCPStore(addr, port, world_size, False, timeout=timeout))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
