"""A program under a pseudo-terminal as a console stream (:class:`vmwebd.hv.driver.ConsoleStream`).

libvirt's test driver, which simulates the hosts of the demo and most tests, cannot open a
domain's console (``virDomainOpenConsole`` is not supported there: measured on 2026-12-02 with
libvirt 9.0). Everything above the stream (the ring, the hub, the relay between hosts, the web
page and the command line) is the same whatever the source, so those tiers give each VM a real
local source: a program (a shell) on a real pty, read and written through the kernel's pty
exactly as QEMU's ``<serial type='pty'>`` is. The real-host tier uses the hypervisor's own.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading

from vmwebd.hv.driver import ConsoleStream


class PtyConsole(ConsoleStream):
    """``argv`` started in a session of its own on a fresh pty; its output is the console's."""

    def __init__(self, argv, env=None, cwd=None):
        master, slave = os.openpty()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self._master = master
        self._lock = threading.Lock()
        self._released = False

    def read(self, n: int) -> bytes:
        try:
            return os.read(self._master, n)
        except OSError as e:
            if e.errno == errno.EIO:  # every holder of the pty's other side has gone
                return b""
            raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._master, view) :]
            except OSError as e:
                if e.errno == errno.EIO:
                    return  # the program ended: the reader sees the end
                raise

    def interrupt(self) -> None:
        """Ends the program (its whole session): the pty's other side closes, and a blocked read
        answers the end. The descriptor itself stays open until :meth:`release`, so no other
        file can take its number while the reader may still use it."""
        with self._lock:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.interrupt()
        self.proc.wait()
        os.close(self._master)


def shell_opener(prompt: str = "{vm}$ "):
    """``open_console(name)`` for a driver without consoles: a fresh ``/bin/sh`` per VM under a pty
    with its prompt naming the VM (a Deferred, as the driver's method; the fork happens off the
    reactor thread)."""
    from twisted.internet import threads

    def opener(name: str):
        env = {"PATH": "/usr/bin:/bin", "PS1": prompt.format(vm=name), "TERM": "xterm", "HOME": "/"}
        return threads.deferToThread(PtyConsole, ["/bin/sh", "-i"], env=env, cwd="/")

    return opener
