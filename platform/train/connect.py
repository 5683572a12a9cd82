"""Which Ray a job runs on, said out loud: the configured cluster (`--ray-address` or RAY_ADDRESS),
reached within a bounded time or refused with the address and the fix; a private local Ray only
when no address is configured, and the job says so.

Why a probe before `ray.init`: given an address where nothing listens, `ray.init` retries the GCS
for minutes (measured: still waiting after 300 s on Ray 2.60), and the fallback this module replaced
then started a local Ray, so a job meant for a cluster ran on the driver's machine without a word.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlparse

from advflow.platform.config import ConfigError
from advflow.platform.log import get_logger

log = get_logger(__name__)

CONNECT_TIMEOUT_ENV = "ADVFLOW_RAY_CONNECT_TIMEOUT_S"
CONNECT_TIMEOUT_S = 30.0
_FIX = ("start the cluster (`advflow stack up` locally, `ray start --head` or the RayCluster), fix the "
        "address (the GCS address host:port, e.g. 127.0.0.1:6379, or ray://host:10001), or unset "
        "RAY_ADDRESS and drop --ray-address to run on a private local Ray")


class RayUnreachable(ConfigError):
    """The configured Ray address does not answer; the message names it and the fix."""


def configured_address(address: str | None = None) -> tuple[str | None, str]:
    """(address, where it came from): the flag, else RAY_ADDRESS, else (None, "")."""
    if address:
        return address, "--ray-address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return (env, "RAY_ADDRESS") if env else (None, "")


def probe_target(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for `address`; None for `auto`/`local`, which name no endpoint."""
    if address in ("auto", "local"):
        return None
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if parsed.hostname is None or parsed.port is None:
        raise RayUnreachable(f"{address!r} is not a Ray address (host:port, ray://host:port, "
                             f"http://host:port or auto); {_FIX}")
    return parsed.hostname, parsed.port


def wait_reachable(address: str, source: str, timeout_s: float | None = None, *, connect=socket.create_connection,
                   clock=time.monotonic, sleep=time.sleep) -> None:
    """Return once something accepts TCP connections at `address`, or raise RayUnreachable after
    `timeout_s` (default ADVFLOW_RAY_CONNECT_TIMEOUT_S, 30 s): a cluster that is still starting
    gets that long to come up."""
    target = probe_target(address)
    if target is None:
        return
    if timeout_s is None:
        timeout_s = float(os.environ.get(CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT_S))
    deadline = clock() + timeout_s
    while True:
        try:
            connect(target, timeout=max(0.1, min(5.0, deadline - clock()))).close()
            return
        except OSError as err:
            if clock() >= deadline:
                raise RayUnreachable(
                    f"{source}={address}: no Ray cluster answers at {target[0]}:{target[1]} after "
                    f"{timeout_s:.0f} s ({err.strerror or err}); {_FIX} "
                    f"({CONNECT_TIMEOUT_ENV} sets how long to wait)") from None
            sleep(1.0)


def check_configured(address: str | None = None) -> None:
    """Raise RayUnreachable now when a configured cluster does not answer (before a job creates
    anything: a study, an MLflow run); nothing to check when none is configured."""
    address, source = configured_address(address)
    if address is not None:
        wait_reachable(address, source)


def ensure_ray(address: str | None = None, *, runtime_env: dict | None = None) -> None:
    """Connect this driver to the configured Ray cluster, or start a private local Ray when none is
    configured. A no-op when Ray is already initialised (tests, a second call)."""
    import ray

    if ray.is_initialized():
        return
    address, source = configured_address(address)
    if address is None or address == "local":
        why = "no Ray address is configured (--ray-address, RAY_ADDRESS)" if address is None else f"{source}=local"
        log.info(f"{why}: starting a private local Ray on this machine for this job only; "
                 "set RAY_ADDRESS=host:port (or --ray-address) to run on a cluster")
        ray.init(address="local", runtime_env=runtime_env, include_dashboard=False, log_to_driver=True)
        return
    wait_reachable(address, source)
    # A dashboard URL (what `ray job submit` takes) is not a driver address; on a node of that
    # cluster "auto" finds the GCS from the node's own records.
    init_address = "auto" if address.startswith(("http://", "https://")) else address
    try:
        ray.init(address=init_address, runtime_env=runtime_env, log_to_driver=True)
    except ConnectionError as err:
        raise RayUnreachable(f"{source}={address}: {err}; {_FIX}") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    log.info(f"connected to the Ray cluster at {address} ({source}): {len(nodes)} node(s), "
             f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")
