"""Picked ports and the Ray head that binds them.

A CI run lost its Ray head this way: the head's client-server port, picked free beforehand, was
taken by Ray's own autoscaler metrics server (which lets the OS choose, from the ephemeral range)
in the two seconds before the client server bound it. `ray start --block` then stopped the whole
head, after the dashboard had already answered the health probe.
"""

from __future__ import annotations

import os
import socket

import pytest

from advflow.infra.local import proc, services
from advflow.infra.local.proc import ServiceError, ephemeral_range, free_ports, port_owner_in_session


@pytest.mark.integration
def test_picked_ports_stay_below_the_ephemeral_range():
    low, _ = ephemeral_range()
    ports = free_ports(40)
    assert len(set(ports)) == 40
    assert all(proc._PICK_FLOOR <= port < low for port in ports), (low, ports)
    for port in ports:  # free when returned
        with socket.socket() as sock:
            sock.bind((proc.LOCALHOST, port))


def test_the_platform_and_the_stack_pick_ports_by_one_rule():
    """The picking rule lives in the platform (local_launch picks its rendezvous port with it); the
    stack's services use the same functions through infra.local.proc."""
    from advflow.platform import net

    assert (proc.free_ports, proc.free_port, proc.ephemeral_range) == (net.free_ports, net.free_port, net.ephemeral_range)
    assert (proc._PICK_FLOOR, proc.LOCALHOST) == (net._PICK_FLOOR, net.LOCALHOST)
    assert services.free_ports is net.free_ports and services.free_port is net.free_port


@pytest.mark.integration
def test_without_room_below_the_ephemeral_range_the_os_picks():
    low, high = ephemeral_range()
    ports = free_ports(3, ephemeral=(proc._PICK_FLOOR + 10, high))
    assert len(set(ports)) == 3 and all(low <= port <= high for port in ports), (low, high, ports)


def test_ephemeral_range_reads_the_kernel_file_and_falls_back(tmp_path):
    (tmp_path / "range").write_text("40000\t50000\n")
    assert ephemeral_range(tmp_path / "range") == (40000, 50000)
    assert ephemeral_range(tmp_path / "missing") == (32768, 60999)


@pytest.mark.integration
def test_port_owner_in_session_tells_ours_from_someone_elses():
    with socket.socket() as sock:
        sock.bind((proc.LOCALHOST, 0))
        port = sock.getsockname()[1]
        assert port_owner_in_session(port, os.getsid(0)) is False  # bound, not listening
        sock.listen()
        assert port_owner_in_session(port, os.getsid(0)) is True
        assert port_owner_in_session(port, 1) is False  # init's session does not hold it


def _held_port() -> socket.socket:
    """A port that another process (this test) listens on, below the ephemeral range."""
    sock = socket.socket()
    sock.bind((proc.LOCALHOST, free_ports(1)[0]))
    sock.listen()
    return sock


@pytest.mark.slow
def test_a_head_whose_picked_port_was_lost_starts_again_on_new_ports(tmp_path, monkeypatch):
    real = services.free_ports
    calls = []
    with _held_port() as taken:
        lost = taken.getsockname()[1]

        def pick(count, *args, **kwargs):
            got = real(count, *args, **kwargs)
            calls.append(got)
            return got[:2] + [lost] + got[3:] if len(calls) == 1 else got  # the client port is lost

        monkeypatch.setattr(services, "free_ports", pick)
        with services.start_ray_head(tmp_path / "head", num_cpus=1, timeout_s=120) as head:
            assert len(calls) == 2
            assert head.info["client_port"] != lost and head.health() is None
            assert port_owner_in_session(head.info["client_port"], head.pid) is True
            log = (tmp_path / "head" / "ray.log").read_text()
            assert "Address already in use" in log or "Failed to bind" in log


@pytest.mark.slow
def test_a_head_on_a_taken_chosen_port_fails_and_points_at_its_log(tmp_path, monkeypatch):
    real = services.free_ports
    calls = []
    monkeypatch.setattr(services, "free_ports", lambda *a, **k: calls.append(1) or real(*a, **k))
    with _held_port() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ServiceError, match=r"exited during start-up .*ray\.log"):
            services.start_ray_head(tmp_path / "head", client_port=port, num_cpus=1, timeout_s=120)
    assert len(calls) == 1  # a port the caller chose is never swapped for another one
    assert f"127.0.0.1:{port}" in (tmp_path / "head" / "ray.log").read_text()
