"""distributed.timeout_s and distributed.nccl (issue 13 §7): validated where they are defined, and
in effect on the workers' process group. On CPU (gloo) the NCCL variables are set but inert; the
timeout is real: a collective that a peer never joins fails after it instead of hanging."""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from pathlib import Path

import pytest

from advflow.platform.config import ConfigError, RunSpec

REPO = Path(__file__).resolve().parents[1]

BASE = {"data": {"prefix": "/tmp/x"}}


def spec(**dist) -> RunSpec:
    return RunSpec.from_dict({**BASE, "distributed": dist})


def test_nccl_names_values_and_timeout_are_validated():
    s = spec(timeout_s=600, nccl={"NCCL_DEBUG": "WARN", "NCCL_IB_DISABLE": 1, "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                                  "NCCL_SOME_NEW_KNOB": "x"})
    assert s.distributed.timeout_s == 600.0
    assert s.distributed.nccl == {"NCCL_DEBUG": "WARN", "NCCL_IB_DISABLE": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                                  "NCCL_SOME_NEW_KNOB": "x"}
    assert spec().distributed.timeout_s == 1800.0 and spec().distributed.nccl == {}
    with pytest.raises(ConfigError, match=r"distributed\.nccl\.NCCL_SOCKET_IFNAM: looks like a misspelling of "
                                          r"NCCL_SOCKET_IFNAME.*write NCCL_SOCKET_IFNAME"):
        spec(nccl={"NCCL_SOCKET_IFNAM": "eth0"})
    with pytest.raises(ConfigError, match=r"distributed\.nccl\.nccl_debug: is not an NCCL variable name"):
        spec(nccl={"nccl_debug": "WARN"})
    with pytest.raises(ConfigError, match=r"distributed\.nccl\.OMP_NUM_THREADS: is not an NCCL"):
        spec(nccl={"OMP_NUM_THREADS": "4"})
    with pytest.raises(ConfigError, match=r"distributed\.timeout_s: must be > 0"):
        spec(timeout_s=0)


def test_the_ray_workers_process_group_takes_both():
    from advflow.platform.train.ray_launch import torch_config

    cfg = torch_config(spec(timeout_s=90, nccl={"NCCL_DEBUG": "INFO"}))
    assert (cfg.backend, cfg.timeout_s, cfg.env) == ("gloo", 90.0, {"NCCL_DEBUG": "INFO"})
    assert torch_config(spec(use_gpu=True)).backend == "nccl"


def test_the_gpu_recipe_carries_its_documented_settings_to_the_process_group():
    from advflow.platform.config import load_config
    from advflow.platform.train.ray_launch import torch_config

    recipe = load_config(str(REPO / "jobs/configs/imagenet_xl2_1nfe.yaml"), ["distributed.nccl.NCCL_SOCKET_IFNAME=eth0"])
    cfg = torch_config(recipe)
    assert cfg.backend == "nccl" and cfg.timeout_s == recipe.distributed.timeout_s == 1800
    assert cfg.env == {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_SOCKET_IFNAME": "eth0"}


def _rank(rank: int, port: int, timeout_s: float, out) -> None:
    import os

    import torch.distributed as dist

    from advflow.platform.train.rendezvous import init_process_group

    init_process_group("gloo", rank, 2, "127.0.0.1", port, timeout_s=timeout_s, env={"NCCL_DEBUG": "WARN"})
    if rank == 1:  # a wedged peer: alive, never joins the collective
        time.sleep(30)
        return
    t0 = time.monotonic()
    try:
        dist.barrier()
        out.put(("joined", time.monotonic() - t0, os.environ.get("NCCL_DEBUG")))
    except Exception as err:  # noqa: BLE001 - the timeout error is what the test wants
        out.put((type(err).__name__, time.monotonic() - t0, os.environ.get("NCCL_DEBUG")))


@pytest.mark.integration
def test_a_collective_a_peer_never_joins_fails_after_timeout_s():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, 3.0, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        outcome, waited, nccl_debug = out.get(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert outcome != "joined", "the barrier completed without the peer"
    assert 2.0 <= waited < 20.0, f"the barrier failed after {waited:.1f} s, not the configured 3 s"
    assert nccl_debug == "WARN"  # distributed.nccl reached the worker's environment


def test_a_local_storage_path_on_a_cluster_of_several_hosts_is_warned_about(capsys):
    from advflow.platform.train.ray_launch import warn_node_local_storage

    one_host = [{"Alive": True, "NodeManagerAddress": "127.0.0.1"}] * 3
    two_hosts = [{"Alive": True, "NodeManagerAddress": "10.0.0.1"}, {"Alive": True, "NodeManagerAddress": "10.0.0.2"},
                 {"Alive": False, "NodeManagerAddress": "10.0.0.3"}]
    local = RunSpec.from_dict({**BASE, "run": {"storage_path": "/mnt/runs"}})
    on_s3 = RunSpec.from_dict({**BASE, "run": {"storage_path": "s3://b/runs"}})
    assert not warn_node_local_storage(local, one_host) and not warn_node_local_storage(on_s3, two_hosts)
    assert warn_node_local_storage(local, two_hosts)
    err = capsys.readouterr().err
    assert "run.storage_path=/mnt/runs" in err and "2 hosts" in err and "s3://" in err
