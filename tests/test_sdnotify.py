"""Tests of the systemd notify protocol (vmwebd.sdnotify) and of systemd/vmwebd.service."""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from vmwebd.sdnotify import Notifier

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "vmwebd.service"
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


@pytest.fixture
def path_socket(tmp_path):
    """A datagram socket bound to a file (in tmp_path unless that path is too long for AF_UNIX)."""
    directory = tmp_path
    short = None
    if len(str(tmp_path / "notify")) > SUN_PATH_MAX:
        directory = Path(short := tempfile.mkdtemp(prefix="sdn"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(directory / "notify")
    sock.bind(path)
    sock.settimeout(5)  # a bound on a missing datagram, not a wait: delivery is synchronous
    yield sock, path
    sock.close()
    if short:
        shutil.rmtree(short)


@pytest.fixture
def abstract_socket():
    """A datagram socket bound to a unique abstract name; yields it and its '@name' form."""
    name = f"vmwebd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


def test_messages_reach_a_path_socket(path_socket):
    """ready, status, watchdog and stopping each send their exact datagram to a socket file."""
    sock, path = path_socket
    notifier = Notifier(path)
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"
    assert notifier.status("serving 3 peers")
    assert sock.recv(4096) == b"STATUS=serving 3 peers"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_messages_reach_an_abstract_socket(abstract_socket):
    """A NOTIFY_SOCKET starting with '@' is the abstract socket of that name."""
    sock, name = abstract_socket
    notifier = Notifier(name)
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.close()


def test_socket_path_defaults_to_environment(abstract_socket, monkeypatch):
    """Without an argument the notifier uses $NOTIFY_SOCKET."""
    sock, name = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    notifier = Notifier()
    assert notifier.enabled
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_status_is_one_line(abstract_socket):
    """A multi-line status is sent as one STATUS line, so it cannot inject other assignments."""
    sock, name = abstract_socket
    assert Notifier(name).status("syncing\nREADY=1")
    assert sock.recv(4096) == b"STATUS=syncing READY=1"


def test_no_socket_is_a_no_op(monkeypatch):
    """With NOTIFY_SOCKET unset every call does nothing and returns False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert [notifier.ready(), notifier.status("x"), notifier.watchdog(), notifier.stopping()] == [False] * 4


def test_unreachable_socket_does_not_raise(tmp_path):
    """Notifying a socket that does not exist logs and returns False instead of raising."""
    assert Notifier(str(tmp_path / "gone")).ready() is False


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(environ, expected):
    """watchdog_interval is WATCHDOG_USEC in seconds, only when WATCHDOG_PID is unset or ours."""
    assert Notifier(None, environ=environ).watchdog_interval() == expected


# -- the unit file ---------------------------------------------------------------------------------
def test_unit_declares_the_service_contract():
    """The unit is Type=notify with a 30 s watchdog, restart on failure and a state directory."""
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str
    unit.read(UNIT)
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["WatchdogSec"] == "30"
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "vmwebd"
    assert service["ExecStart"].split()[1:3] == ["--config", "/etc/vmwebd/vmwebd.xml"]
    assert "MemoryDenyWriteExecute" not in service
    assert "/var/lib/vmwebd" in service["ReadWritePaths"].split()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    """systemd-analyze verify finds nothing wrong with the unit but, maybe, a missing binary."""
    text = UNIT.read_text()
    binary = next(
        line.split("=", 1)[1].split()[0] for line in text.splitlines() if line.startswith("ExecStart=")
    )
    # verify also checks that ExecStart's binary exists; it is not installed on a dev machine, so
    # check a copy that runs /bin/true, and the original for that one complaint only.
    copy = tmp_path / "vmwebd.service"
    copy.write_text(text.replace(f"ExecStart={binary} ", f"ExecStart={shutil.which('true')} "))
    assert copy.read_text() != text
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")

    original = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True)
    complaints = [line for line in (original.stdout + original.stderr).splitlines() if line]
    if os.access(binary, os.X_OK):
        assert complaints == []
    else:
        assert complaints == [
            f"vmwebd.service: Command {binary} is not executable: No such file or directory"
        ]
