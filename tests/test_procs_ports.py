"""Ports for test daemons (tests/procs.py: free_port): reserved, never twice, never one in use."""

from __future__ import annotations

import fcntl
import socket

import pytest

import procs


class Scripted:
    """An rng whose randint returns the given ports in turn."""

    def __init__(self, *ports: int):
        self.ports = list(ports)

    def randint(self, lo: int, hi: int) -> int:
        port = self.ports.pop(0)
        assert lo <= port <= hi
        return port


def _candidates(n: int) -> list[int]:
    high = procs._ephemeral_low() - 1
    return [high - 7 - 13 * i for i in range(n)]


def test_ports_are_below_the_ephemeral_range_and_never_repeat():
    """Ports come from below the kernel's ephemeral range and one process never gets one twice."""
    ports = [procs.free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    assert all(1024 <= p < procs._ephemeral_low() for p in ports)
    a = ports[0]
    b = procs.free_port(Scripted(a, *_candidates(3)))
    assert b != a


def test_a_port_locked_by_another_run_is_skipped():
    """A port another test run holds (its lock file) is skipped."""
    locked, other = [p for p in _candidates(40) if p not in procs._reserved][:2]
    procs.PORT_LOCK_DIR.mkdir(mode=0o1777, exist_ok=True)
    with open(procs.PORT_LOCK_DIR / str(locked), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert procs.free_port(Scripted(locked, other)) == other


def test_a_port_in_use_is_skipped():
    """A port something listens on is skipped."""
    busy, other = [p for p in _candidates(60)[20:] if p not in procs._reserved][:2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", busy))
        s.listen()
        assert procs.free_port(Scripted(busy, other)) == other


def test_the_search_is_bounded(monkeypatch):
    """When every candidate is taken, free_port fails after a bounded number of tries."""
    monkeypatch.setattr(procs, "_reserve", lambda port: False)
    with pytest.raises(RuntimeError, match="after 200 tries"):
        procs.free_port()
