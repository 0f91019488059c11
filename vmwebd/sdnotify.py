"""The few lines of the systemd notify protocol vmwebd needs (no library).

systemd passes ``NOTIFY_SOCKET`` (a path, or an abstract name starting with ``@``) to a
``Type=notify`` service; the service sends it datagrams of newline-separated ``KEY=value``
assignments: ``READY=1`` once it serves, ``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1``
at least every ``WATCHDOG_USEC`` microseconds, ``STOPPING=1`` when it begins to shut down.
See sd_notify(3). Without ``NOTIFY_SOCKET`` (not started by systemd) every call does nothing.

Sending never blocks (the socket is non-blocking) and never raises: a daemon must not die because
its supervisor is slow or gone. A failed send is logged and reported by returning False.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.logger import Logger

__all__ = ["Notifier"]

_FROM_ENVIRONMENT = object()


class Notifier:
    """Sends sd_notify datagrams to ``socket_path`` (default: ``$NOTIFY_SOCKET``).

    ``environ`` is where :meth:`watchdog_interval` reads ``WATCHDOG_USEC`` / ``WATCHDOG_PID``
    (default: ``os.environ``). Each sending method returns True if the datagram was sent, False if
    there is no socket or the send failed.
    """

    log = Logger()

    def __init__(
        self,
        socket_path: str | None = _FROM_ENVIRONMENT,  # type: ignore[assignment]
        environ: Mapping[str, str] | None = None,
    ):
        self.environ = os.environ if environ is None else environ
        if socket_path is _FROM_ENVIRONMENT:
            socket_path = self.environ.get("NOTIFY_SOCKET")
        self.socket_path = socket_path or None
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self.socket_path is not None

    def _address(self) -> str | bytes:
        assert self.socket_path is not None
        if self.socket_path.startswith("@"):
            # An abstract socket name: a leading NUL byte instead of the '@'.
            return b"\0" + self.socket_path[1:].encode()
        return self.socket_path

    def notify(self, *assignments: str) -> bool:
        """Send one datagram made of ``KEY=value`` ``assignments``, one per line."""
        if self.socket_path is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._socket.sendto(message, self._address())
        except OSError as e:
            self.log.warn("cannot notify systemd at {path}: {error}", path=self.socket_path, error=e)
            return False
        return True

    def ready(self) -> bool:
        """Tell systemd the daemon has started and serves."""
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status`` (newlines become spaces)."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Tell systemd the daemon is alive (call every :meth:`watchdog_interval` / 2)."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Tell systemd the daemon is shutting down."""
        return self.notify("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None if the watchdog is not enabled for us.

        Like sd_watchdog_enabled(3): ``WATCHDOG_USEC`` must be a positive integer, and if
        ``WATCHDOG_PID`` is set it must be our pid (otherwise the variables were meant for a
        parent process). Malformed values count as "not enabled". Ping at about half this.
        """
        usec = self.environ.get("WATCHDOG_USEC")
        if not usec:
            return None
        pid = self.environ.get("WATCHDOG_PID")
        try:
            if pid and int(pid) != os.getpid():
                return None
            value = int(usec)
        except ValueError:
            return None
        return value / 1_000_000 if value > 0 else None

    def close(self) -> None:
        """Close the socket (a later call opens a new one)."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
