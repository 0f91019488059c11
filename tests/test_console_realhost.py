"""A real guest's serial console through the libvirt driver and a console hub: a real libvirtd
(tests/lab), a real QEMU guest under TCG whose serial port is a pty and whose init runs a busybox
shell on it; a command typed through ``LibvirtDriver.open_console`` (``virDomainOpenConsole`` on
a blocking ``virStream`` read on a thread of its own) runs in the guest and its output comes
back, through the hub that fans it out to viewers and keeps the ring; the stream ends when
interrupted from another thread, and a guest whose serial port is a file is refused naming the
domain and libvirt's reason.

Then the whole of vmweb's path over that real console: two in-process hosts (test-driver
VMs), the console of a VM on host1 backed by the real guest's (host1's console opener given the
lab driver's ``open_console``: vmweb's own guests log their serial port to a file, which libvirt
cannot open as a console — docs/console.md), typed into with ``vmweb``'s console client at
host2, relayed over the peers' mutual TLS.

Skipped only where real hosts cannot run (see lab.hosts.lab_available).
"""

from __future__ import annotations

import gzip
import threading
import time

import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import defer, reactor, threads

from lab.fixtures import guest_artifacts, lab2  # noqa: F401  (fixtures)
from lab.guest import BUSYBOX, _Cpio, guest_domain_xml, make_base_image
from procs import password_of
from test_console import running_cluster
from test_dead_hosts import until
from test_history import two_hosts  # noqa: F401  (a fixture)
from vmwebd.client import ConsoleConnection
from vmwebd.console.hub import ConsoleService, _Hub
from vmwebd.console.ring import ConsoleRing
from vmwebd.dom.records import VmRec, status_of
from vmwebd.errors import HypervisorError
from vmwebd.hv.libvirt_driver import LibvirtDriver

pytestmark = [pytest.mark.slow, pytest.mark.realhost]

BOOT = 120.0  # a TCG boot on a loaded machine
INIT = b"""#!/bin/sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
echo 1 > /proc/sys/kernel/printk
echo VMWEB-CONSOLE-UP
export PS1='guest# '
exec setsid cttyhack sh -i
"""


def shell_initramfs(path) -> str:
    """An initramfs whose init runs an interactive busybox shell on the console (ttyS0)."""
    c = _Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("init", INIT, 0o755)
    path.write_bytes(gzip.compress(c.finish(), mtime=0))
    return str(path)


def with_pty_serial(xml: str, log: str) -> str:
    """The domain with its serial port on a pty (and the console on it) instead of a file, what
    it prints also logged to ``log`` (libvirt's ``<log>`` of a character device)."""
    dom = etree.fromstring(xml.encode())
    dev = dom.find("devices")
    for old in dev.findall("serial"):
        dev.remove(old)
    serial = etree.SubElement(dev, "serial", type="pty")
    etree.SubElement(serial, "log", file=log, append="on")
    etree.SubElement(serial, "target", port="0")
    console = etree.SubElement(dev, "console", type="pty")
    etree.SubElement(console, "target", type="serial", port="0")
    return etree.tostring(dom, encoding="unicode")


class Collector:
    """A hub's viewer gathering the output (on the reactor thread), waited on from a thread."""

    def __init__(self):
        self.out = b""
        self.why = None
        self.cond = threading.Condition()

    def output(self, data):
        with self.cond:
            self.out += data
            self.cond.notify_all()

    def ended(self, why):
        with self.cond:
            self.why = why
            self.cond.notify_all()

    def pause_input(self):
        pass

    def resume_input(self):
        pass

    def wait(self, pattern: bytes, timeout: float, poke=None) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while pattern not in self.out:
                left = deadline - time.monotonic()
                assert left > 0 and self.why is None, (
                    f"{pattern!r} not seen ({self.why}): {self.out[-400:]!r}"
                )
                if poke is not None:
                    self.cond.release()
                    try:
                        poke()
                    finally:
                        self.cond.acquire()
                self.cond.wait(min(left, 2.0))


@pytest_twisted.inlineCallbacks
def test_typing_into_a_real_guests_serial_console(lab2, guest_artifacts, tmp_path):  # noqa: F811
    """A command typed into a real TCG guest's console runs there and its output comes back
    through the driver's stream and the hub (and into the serial port's log file); closing the
    hub interrupts the blocked read and releases the stream; a guest with its serial port on a
    file is refused saying so."""
    h1 = lab2.hosts[0]
    disk = make_base_image(tmp_path / "disk.qcow2", 16)
    initrd = shell_initramfs(tmp_path / "shell.img")
    xml = guest_domain_xml(
        "vmweb-console-test", guest_artifacts.kernel, initrd, str(disk), str(tmp_path / "unused.log")
    )
    conn = yield threads.deferToThread(h1.connect)
    log = tmp_path / "pty-serial.log"
    dom = yield threads.deferToThread(conn.createXML, with_pty_serial(xml, str(log)), 0)
    disk2 = make_base_image(tmp_path / "disk2.qcow2", 16)
    filexml = guest_domain_xml(
        "vmweb-console-file", guest_artifacts.kernel, initrd, str(disk2), str(tmp_path / "file-serial.log")
    )
    other = yield threads.deferToThread(conn.createXML, filexml, 0)
    driver = LibvirtDriver(h1.uri, reactor=reactor)
    service = ConsoleService("h1", reactor, None, driver.open_console, lambda principal, cluster, vm: None)
    try:
        with pytest.raises(HypervisorError) as e:
            yield driver.open_console("vmweb-console-file")
        assert "domain 'vmweb-console-file'" in str(e.value) and "PTY" in str(e.value), str(e.value)
        print(f"a file serial port: {e.value}")
        with pytest.raises(HypervisorError) as e:
            yield driver.open_console("vmweb-no-such-domain")
        assert "vmweb-no-such-domain" in str(e.value)

        stream = yield driver.open_console("vmweb-console-test")
        hub = _Hub(service, "real/guest", stream, ConsoleRing())
        service.hubs["real/guest"] = hub
        viewer = Collector()
        att = hub.attach(viewer)

        def story():
            started = time.monotonic()
            # Output printed before the console was opened is gone (a pty keeps none): ask for a
            # prompt until the shell answers.
            viewer.wait(b"guest# ", BOOT, poke=lambda: reactor.callFromThread(att.write, b"\n"))
            booted = time.monotonic() - started
            reactor.callFromThread(att.write, b"echo real-$((6*7)) $(uname -s)\n")
            viewer.wait(b"real-42 Linux", 60)
            return booted

        booted = yield threads.deferToThread(story)
        print(f"first prompt on the console after {booted:.1f} s")
        assert b"real-42 Linux" in hub.ring.snapshot()
        # The same output is in the serial log too: a pty console keeps the log a file gives.
        yield until(lambda: log.exists() and b"real-42 Linux" in log.read_bytes(), 10, "the serial log")
        att.detach()  # the last viewer: the hub closes, its read is interrupted
        yield until(lambda: service.open_streams == 0, 30, "the stream to be released")
        assert viewer.why is None  # a viewer that left is not told of the end
    finally:
        yield driver.close()
        for d in (dom, other):
            try:
                yield threads.deferToThread(d.destroy)
            except Exception:
                pass
        yield threads.deferToThread(conn.close)
    yield defer.succeed(None)


@pytest_twisted.inlineCallbacks
def test_a_real_guests_console_through_vmweb_from_another_host(
    lab2,  # noqa: F811
    guest_artifacts,  # noqa: F811
    two_hosts,  # noqa: F811
    tmp_path,
):
    """alice, at host2, types into the console of her VM on host1 whose console is a real
    guest's: the command runs in the guest and its output comes back through host1's hub, the
    relay and the WebSocket; closing leaves no stream or relay open."""
    h1 = lab2.hosts[0]
    disk = make_base_image(tmp_path / "disk.qcow2", 16)
    initrd = shell_initramfs(tmp_path / "shell.img")
    xml = guest_domain_xml(
        "vmweb-console-relay", guest_artifacts.kernel, initrd, str(disk), str(tmp_path / "unused.log")
    )
    conn = yield threads.deferToThread(h1.connect)
    dom = yield threads.deferToThread(conn.createXML, with_pty_serial(xml, str(tmp_path / "s.log")), 0)
    driver = LibvirtDriver(h1.uri, reactor=reactor)
    a, b = yield two_hosts()
    a.node.consoles.opener = lambda name: driver.open_console("vmweb-console-relay")
    try:
        vms = yield running_cluster(a.node, "real", "alice", 4)
        yield b.node.domsvc.wait_for(
            lambda: all(
                (st := status_of(b.node.domsvc.dom, vm)) is not None and st.state == "running" for vm in vms
            ),
            30,
        )
        vm = next(v for v in b.node.domsvc.dom.all(VmRec) if v.cluster == "real" and v.host == "host1")

        def story():
            c = ConsoleConnection(
                b.node.api_address, "real", vm.name, user="alice", password=password_of("alice"), timeout=BOOT
            )
            out = b""
            deadline = time.monotonic() + BOOT
            c.ws.settimeout(2)
            while b"guest# " not in out:
                assert time.monotonic() < deadline, out[-300:]
                c.send(b"\n")
                kind, data = c.recv()
                if kind == "output":
                    out += data
            c.ws.settimeout(60)
            c.send(b"echo via-vmweb-$((6*7)) $(uname -s)\n")
            while b"via-vmweb-42 Linux" not in out:
                kind, data = c.recv()
                assert kind == "output", (kind, data)
                out += data
            c.close()

        yield threads.deferToThread(story)
        yield until(
            lambda: a.node.consoles.open_streams == 0 and not b.node.consoles.relay.live,
            30,
            "the real stream and the relay to close",
        )
    finally:
        yield driver.close()
        try:
            yield threads.deferToThread(dom.destroy)
        except Exception:
            pass
        yield threads.deferToThread(conn.close)
