"""Logs under systemd: journal entries with priorities and fields (native protocol, or
``<N>``-prefixed lines), text lines elsewhere, and a clean stop that logs no error."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest
from twisted.logger import Logger

from procs import (
    ADMIN,
    REPO,
    STOP_TIMEOUT,
    NotifySocket,
    admin_client,
    child_env,
    create_users,
    host_config,
    user_client,
)
from vmwebd import logs
from vmwebd.client import ApiFault


def parse_entry(data: bytes) -> dict[str, str]:
    """The fields of one native-protocol datagram (the inverse of logs.encode_entry)."""
    out, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            out[line.decode()] = data[nl + 9 : nl + 9 + n].decode()
            assert data[nl + 9 + n : nl + 10 + n] == b"\n"
            i = nl + 10 + n
    return out


class Collect:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)


def events_of(fn) -> list[dict]:
    c = Collect()
    fn(Logger(namespace="vmwebd.test", observer=c))
    return c.events


# -- the mapping -----------------------------------------------------------------------------------


def test_levels_become_syslog_priorities():
    """critical 2, error 3, warn 4, info 6, debug 7."""
    evs = events_of(
        lambda log: [getattr(log, lvl)("x") for lvl in ("critical", "error", "warn", "info", "debug")]
    )
    assert [logs.priority_of(e) for e in evs] == [2, 3, 4, 6, 7]


def test_format_keys_become_fields():
    """The keys an event carries (host, cluster, vm, user or by, request_id, faultcode) become
    HOST, CLUSTER, VM, USER, REQUEST_ID, FAULTCODE; absent or empty ones are left out."""
    (e,) = events_of(
        lambda log: log.info(
            "audit {request_id}: {user} {op} {object}: {faultcode}",
            request_id="h1/17.0",
            user="alice",
            op="StopVm",
            object="vm/c1/web-0",
            faultcode="Client.NotAuthorized",
            host="h1",
            cluster="c1",
            vm="c1/web-0",
        )
    )
    f = logs.fields_of(e)
    assert f["MESSAGE"] == "audit h1/17.0: alice StopVm vm/c1/web-0: Client.NotAuthorized"
    assert (f["PRIORITY"], f["HOST"], f["CLUSTER"], f["VM"], f["USER"], f["REQUEST_ID"], f["FAULTCODE"]) == (
        "6",
        "h1",
        "c1",
        "c1/web-0",
        "alice",
        "h1/17.0",
        "Client.NotAuthorized",
    )
    assert f["LOG_NAMESPACE"] == "vmwebd.test" and f["SYSLOG_IDENTIFIER"] == "vmwebd"
    (e,) = events_of(lambda log: log.info("user {name} deleted by {by}", name="bob", by="root", cluster=""))
    f = logs.fields_of(e)
    assert f["USER"] == "root" and "CLUSTER" not in f and "HOST" not in f


def test_native_entries_carry_multiline_values_by_length():
    """A value with a newline (a traceback) is sent with its length; the rest as KEY=value."""
    data = logs.encode_entry({"MESSAGE": "boom\n  at line 3", "PRIORITY": "2", "USER": "a=b"})
    assert parse_entry(data) == {"MESSAGE": "boom\n  at line 3", "PRIORITY": "2", "USER": "a=b"}


def _failure_event(log):
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("pass on {host} failed", host="h1")


# -- the observer ----------------------------------------------------------------------------------


def test_observer_sends_one_datagram_per_event_to_the_journal_socket(tmp_path):
    """With journald's socket there, each event is one datagram with its fields, a traceback in
    its MESSAGE; nothing goes to the stream."""
    path = str(tmp_path / "j.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    stream = io.StringIO()
    obs = logs.JournalObserver(stream, path)
    log = Logger(namespace="vmwebd.t", observer=obs)
    log.warn("VM {vm} on {host}: {err}", vm="c1/a", host="h1", err="slow")
    _failure_event(log)
    first, second = parse_entry(server.recv(65536)), parse_entry(server.recv(65536))
    server.close()
    assert (first["PRIORITY"], first["VM"], first["HOST"]) == ("4", "c1/a", "h1")
    assert first["MESSAGE"] == "VM c1/a on h1: slow"
    assert second["PRIORITY"] == "2" and "ZeroDivisionError" in second["MESSAGE"]
    assert second["MESSAGE"].startswith("pass on h1 failed\nTraceback")
    assert stream.getvalue() == ""


def test_without_the_socket_every_line_carries_its_priority(tmp_path):
    """No journald socket: ``<N>`` before every line, a traceback's lines included (journald
    makes an entry of each line)."""
    stream = io.StringIO()
    obs = logs.JournalObserver(stream, str(tmp_path / "absent.sock"))
    log = Logger(namespace="vmwebd.t", observer=obs)
    log.info("cluster {cluster} created", cluster="c1")
    _failure_event(log)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "<6>cluster c1 created"
    assert len(lines) > 3 and all(line.startswith("<2>") for line in lines[1:])
    assert any("ZeroDivisionError" in line for line in lines)


def test_auto_picks_the_journal_only_when_it_reads_our_output(tmp_path):
    """JOURNAL_STREAM naming our stderr (or stdout) means journald; INVOCATION_ID alone, or a
    JOURNAL_STREAM of another file, keeps text lines; an unknown target is refused."""
    with open(tmp_path / "err", "w") as err, open(tmp_path / "out", "w") as out:
        st = os.fstat(err.fileno())
        here = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.journal_stream(here, (err, out)) is err
        obs = logs.make_observer("auto", here, out, err, socket_path=None)
        assert isinstance(obs, logs.JournalObserver) and obs.stream is err
        for env in ({"INVOCATION_ID": "abc"}, {"JOURNAL_STREAM": "1:2"}, {"JOURNAL_STREAM": "x"}):
            assert not isinstance(logs.make_observer("auto", env, out, err), logs.JournalObserver)
        forced = logs.make_observer("journal", {}, out, err, socket_path=None)
        assert isinstance(forced, logs.JournalObserver) and forced.stream is out
    with pytest.raises(ValueError):
        logs.make_observer("syslog", {})


# -- a real daemon ---------------------------------------------------------------------------------


class JournalSocket:
    """A datagram socket playing journald's native socket, read by a thread until closed."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind(path)
        self.entries: list[dict[str, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            self.entries.append(parse_entry(data))

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(10)


def run_daemon(tmp_path, journal_socket: str):
    """Starts vmwebd with its stderr as "the journal stream" (JOURNAL_STREAM names the log file);
    returns (process, notify socket, api address, log path)."""
    config, port = host_config(tmp_path / "h1")
    log_path = tmp_path / "journal-stream.log"
    notify = NotifySocket(tmp_path)
    with open(log_path, "wb") as log:
        st = os.fstat(log.fileno())
        env = child_env(
            NOTIFY_SOCKET=notify.path,
            JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
            INVOCATION_ID="0123456789abcdef",
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vmwebd.daemon",
                "--config",
                str(config),
                "--no-fsync",
                "--journal-socket",
                journal_socket,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
            cwd=REPO,
        )
    try:
        notify.wait_for("READY", "1", alive=lambda: proc.poll() is None)
    except BaseException:
        proc.kill()
        proc.wait(STOP_TIMEOUT)
        notify.close()
        raise AssertionError(log_path.read_text(errors="replace"))
    return proc, notify, f"127.0.0.1:{port}", log_path


def work_and_stop(proc, address: str) -> None:
    """Some accepted and refused changes, a cluster coming up, then SIGTERM right away."""
    try:
        admin = admin_client(address)
        create_users(admin, ("alice",))
        admin.call("CreateCluster", "c1", "lab", "alice", 3)
        with pytest.raises(ApiFault):
            user_client(address, "alice").call("SetQuota", "alice", 999)
    finally:
        proc.terminate()
        assert proc.wait(STOP_TIMEOUT) == 0


@pytest.mark.slow
def test_daemon_under_systemd_sends_entries_with_fields_and_stops_cleanly(tmp_path):
    """A daemon whose output journald reads sends its events to the journal socket with their
    priority and fields (an audited refusal with USER, REQUEST_ID, FAULTCODE); SIGTERM after
    work in flight logs nothing at error or worse and no traceback."""
    journal = JournalSocket(str(tmp_path / "journal.sock"))
    try:
        proc, notify, address, log_path = run_daemon(tmp_path, journal.path)
        try:
            work_and_stop(proc, address)
        finally:
            notify.close()
    finally:
        journal.close()
    entries = journal.entries
    assert entries, log_path.read_text()
    assert all(e["SYSLOG_IDENTIFIER"] == "vmwebd" and e["PRIORITY"] in "234567" for e in entries)
    bad = [
        e["MESSAGE"]
        for e in entries
        if int(e["PRIORITY"]) <= 3 or "Traceback" in e["MESSAGE"] or "driver is closed" in e["MESSAGE"]
    ]
    assert bad == []
    refused = [
        e
        for e in entries
        if e.get("FAULTCODE") == "Client.NotAuthorized" and e.get("LOG_NAMESPACE") == "vmwebd.audit"
    ]
    assert len(refused) == 1
    assert refused[0]["USER"] == "alice" and refused[0]["REQUEST_ID"].startswith("host1/")
    assert refused[0]["PRIORITY"] == "6"
    created = [e for e in entries if e.get("LOG_NAMESPACE") == "vmwebd.audit" and e.get("CLUSTER") == "c1"]
    assert [e["USER"] for e in created] == [ADMIN[0]]
    assert any(e["MESSAGE"].startswith("Received SIGTERM") for e in entries)
    # Everything went to the socket: the stream holds nothing but what bypasses the logger.
    assert "Traceback" not in log_path.read_text(errors="replace")


@pytest.mark.slow
def test_daemon_without_journal_socket_prefixes_every_line_and_stops_cleanly(tmp_path):
    """No native socket: every line on the journal stream starts with <N>; none is at error or
    worse after a SIGTERM under work."""
    proc, notify, address, log_path = run_daemon(tmp_path, "")
    try:
        work_and_stop(proc, address)
    finally:
        notify.close()
    lines = log_path.read_text(errors="replace").splitlines()
    assert lines and all(line[:3] in ("<2>", "<3>", "<4>", "<6>", "<7>") for line in lines), lines
    assert [line for line in lines if line[:3] in ("<2>", "<3>") or "Traceback" in line] == []
    assert any(
        line.startswith("<6>audit ") and "alice SetQuota user/alice: Client.NotAuthorized" in line
        for line in lines
    )
