"""``vmweb vm console CLUSTER VM`` as a real process on a real terminal (a pty) against an
in-process node: keys typed reach the VM's console and its answer shows, Ctrl-] leaves with the
terminal's settings as they were, and refusals print one line naming the VM.

As in tests/test_console.py, each VM's console is a real shell on a real pty (the test driver
has no consoles).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import termios
import time

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from procs import REPO, password_of
from test_console import running_cluster, with_shells
from vmwebd.dom.records import VmRec, status_of

pytestmark = pytest.mark.slow

WAIT = 30.0


def vmweb(node, *args, user="alice", password=None, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMWEB_")}
    env.update(
        VMWEB_HOST=node.api_address,
        VMWEB_USER=user,
        VMWEB_PASSWORD=password_of(user) if password is None else password,
    )
    return subprocess.Popen([sys.executable, "-m", "vmwebd.cli", *args], cwd=REPO, env=env, **kw)


def read_until(fd: int, pattern: bytes, got: bytearray, timeout: float = WAIT) -> None:
    """Reads ``fd`` into ``got`` until ``pattern`` shows (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while pattern not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"{pattern!r} not seen in {bytes(got[-400:])!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            assert data, f"the terminal closed before {pattern!r}; read {bytes(got[-400:])!r}"
            got += data


@pytest_twisted.inlineCallbacks
def test_vmweb_vm_console_types_reads_and_leaves_with_ctrl_bracket(start_node):
    """On a terminal: the banner names the VM and the escape key, a command typed runs in the
    VM's console and its answer shows, Ctrl-] leaves with status 0, and the terminal's
    settings are back as they were (raw mode undone)."""
    h = yield start_node()
    with_shells(h.node)
    (vm,) = yield running_cluster(h.node, "lab1", "alice", 1)

    def story():
        master, slave = os.openpty()
        before = termios.tcgetattr(slave)
        try:
            p = vmweb(h.node, "vm", "console", "lab1", vm.name, stdin=slave, stdout=slave, stderr=slave)
            got = bytearray()
            read_until(master, b"Ctrl-] leaves", got)
            assert f"Connected to the console of lab1/{vm.name}".encode() in got
            os.write(master, b"echo cli-$((40+2))\r")
            read_until(master, b"cli-42\r\n", got)
            os.write(master, b"\x1d")
            assert p.wait(WAIT) == 0
            assert termios.tcgetattr(slave) == before
        finally:
            os.close(master)
            os.close(slave)

    yield threads.deferToThread(story)
    yield defer.succeed(None)


@pytest_twisted.inlineCallbacks
def test_vmweb_vm_console_refusals_print_one_line(start_node):
    """A stopped VM, another user's VM, a wrong password: exit 1 with one line naming the VM or
    the refusal; no terminal needed to say so."""
    h = yield start_node()
    with_shells(h.node)
    (vm,) = yield running_cluster(h.node, "lab2", "alice", 1)
    yield defer.maybeDeferred(h.node.manager.set_vm_power, "lab2", vm.name, "stopped", force=True)
    yield h.node.domsvc.wait_for(
        lambda: status_of(h.node.domsvc.dom, h.node.domsvc.dom.get(VmRec, vm.id)).state == "shutoff", 30
    )

    def run(**kw):
        p = vmweb(
            h.node,
            "vm",
            "console",
            "lab2",
            vm.name,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kw,
        )
        out, err = p.communicate(timeout=WAIT)
        return p.returncode, out, err

    def story():
        code, out, err = run()
        assert code == 1 and out == ""
        assert err == (
            f"vmweb: Server.ConsoleUnavailable: the console of VM lab2/{vm.name} is not "
            f"available: it is not running (its state is shutoff)\n"
        )
        code, _, err = run(user="bob")
        assert (
            code == 1
            and err.startswith("vmweb: Client.NotAuthorized: user 'bob' may not see or change cluster 'lab2'")
            and err.count("\n") == 1
        )
        code, _, err = run(password="wrong")
        assert code == 1 and err.startswith("vmweb: Client.NotAuthorized:") and err.count("\n") == 1

    yield threads.deferToThread(story)
