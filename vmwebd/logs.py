"""Where the daemon's log goes: journald under systemd, one line per event elsewhere.

Under systemd (``JOURNAL_STREAM`` names our standard error or output: journald reads it) each
event becomes one journal entry with its priority (:data:`PRIORITIES`) and, as fields of their
own, the values the event carries under the keys of :data:`FIELDS` (a ``twisted.logger`` event
holds its format keys, so ``log.info("cluster {cluster} created for {user}", ...)`` gives
``CLUSTER=`` and ``USER=``). Entries go over journald's native protocol (one datagram to
``/run/systemd/journal/socket`` per event: ``KEY=value`` lines, a value holding a newline sent
with its length); when that socket is missing or refuses an entry, the event is written to the
journal stream as ``<N>``-prefixed lines, which journald reads as priorities
(``SyslogLevelPrefix=``, on by default), without the extra fields.

Why not python-systemd's ``journal.send``: Debian ships it only for Debian's own interpreter
(``python3-systemd``, Python 3.11 on Debian 12) and PyPI only as source to build against
libsystemd's headers, while vmwebd runs from a virtualenv on 3.11 to 3.13; the native protocol
it speaks is small and stable, so vmwebd speaks it itself.

Elsewhere (a terminal, a file, the tests) the log stays one text line per event, with its time,
namespace and level, as Twisted writes it.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from typing import Callable, Mapping, TextIO

from twisted.logger import ILogObserver, LogLevel, formatEvent, textFileLogObserver
from zope.interface import implementer

#: Twisted log levels as syslog priorities (journald's PRIORITY=).
PRIORITIES: dict[LogLevel, int] = {
    LogLevel.critical: 2,
    LogLevel.error: 3,
    LogLevel.warn: 4,
    LogLevel.info: 6,
    LogLevel.debug: 7,
}
#: Event keys sent as journal fields of their own, first key found per field.
FIELDS: dict[str, tuple[str, ...]] = {
    "HOST": ("host",),
    "CLUSTER": ("cluster",),
    "VM": ("vm",),
    "USER": ("user", "by"),
    "REQUEST_ID": ("request_id",),
    "FAULTCODE": ("faultcode",),
}
JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: Longest value sent in a field of its own (a journal field holds up to 64 KiB by default).
MAX_FIELD_CHARS = 4096
TARGETS = ("auto", "journal", "text")


def priority_of(event: Mapping) -> int:
    return PRIORITIES.get(event.get("log_level"), 6)


def message_of(event: Mapping) -> str:
    """The event's text, and its traceback when it carries a failure."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            text = f"{text}\n{failure.getTraceback().rstrip()}"
        except Exception:  # a broken failure object must not lose the message
            text = f"{text}\n(traceback unavailable)"
    return text


def fields_of(event: Mapping) -> dict[str, str]:
    """The journal fields of an event: MESSAGE, PRIORITY, where it was logged, and FIELDS."""
    out = {"MESSAGE": message_of(event), "PRIORITY": str(priority_of(event)), "SYSLOG_IDENTIFIER": "vmwebd"}
    namespace = event.get("log_namespace")
    if namespace:
        out["LOG_NAMESPACE"] = str(namespace)
    for name, keys in FIELDS.items():
        for key in keys:
            value = event.get(key)
            if value is not None and value != "":
                out[name] = str(value)[:MAX_FIELD_CHARS]
                break
    return out


def encode_entry(fields: Mapping[str, str]) -> bytes:
    """One entry in journald's native protocol: ``KEY=value\\n`` per field, or for a value with a
    newline ``KEY\\n``, its length as 64-bit little-endian, the value and ``\\n``."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode("ascii") + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode("ascii") + b"=" + data + b"\n"
    return bytes(out)


def prefixed_lines(event: Mapping) -> str:
    """The event as ``<N>``-prefixed lines (every line: a traceback is one entry per line)."""
    prio = priority_of(event)
    return "".join(f"<{prio}>{line}\n" for line in message_of(event).splitlines() or [""])


@implementer(ILogObserver)
class JournalObserver:
    """Sends each event to journald: over the native socket when there is one, else as
    ``<N>``-prefixed lines on ``stream`` (the one journald reads)."""

    def __init__(
        self,
        stream: TextIO,
        socket_path: str | None = JOURNAL_SOCKET,
        sock_factory: Callable[[], socket.socket] | None = None,
    ):
        self.stream = stream
        self.socket_path = socket_path or None
        self._sock = None
        if self.socket_path is not None:
            try:
                self._sock = (sock_factory or _dgram_socket)()
            except OSError:
                self._sock = None

    def __call__(self, event: Mapping) -> None:
        if self._sock is not None and self.socket_path is not None:
            try:
                self._sock.sendto(encode_entry(fields_of(event)), self.socket_path)
                return
            except OSError:
                pass  # no journald there, or the entry is too large: the stream takes it
        try:
            self.stream.write(prefixed_lines(event))
            self.stream.flush()
        except (OSError, ValueError):
            pass  # nowhere left to log to; never raise into the logging system


def _dgram_socket() -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setblocking(False)  # a journald that cannot keep up loses entries, never the reactor
    return s


def journal_stream(env: Mapping[str, str], streams) -> TextIO | None:
    """Of ``streams``, the one journald reads: ``JOURNAL_STREAM`` is ``DEVICE:INODE`` of the
    stream systemd connected to the journal. INVOCATION_ID alone is not enough: systemd sets it
    for a unit whose output goes to a file or a terminal too."""
    dev, sep, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return None
    for s in streams:
        try:
            st = os.fstat(s.fileno())
        except (OSError, ValueError, AttributeError):
            continue
        if (st.st_dev, st.st_ino) == (int(dev), int(ino)):
            return s
    return None


def make_observer(
    target: str = "auto",
    env: Mapping[str, str] | None = None,
    stdout=None,
    stderr=None,
    socket_path: str | None = JOURNAL_SOCKET,
):
    """The observer the daemon logs to: ``journal`` (journald), ``text`` (one line per event
    on standard error, as before) or ``auto`` (journald when it reads our output)."""
    if target not in TARGETS:
        raise ValueError(f"log target {target!r} is not one of {', '.join(TARGETS)}")
    env = os.environ if env is None else env
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    stream = journal_stream(env, (stderr, stdout))
    if target == "journal" or (target == "auto" and stream is not None):
        return JournalObserver(stream or stdout, socket_path)
    return textFileLogObserver(stderr)
